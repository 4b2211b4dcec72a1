// adamcpp: one call over many tensors (the multi_tensor_apply idea on the CPU).
#pragma once

#include <cstddef>

#include "kernels.h"

namespace adamcpp {

// Work is cut into fixed-size chunks of the concatenation of all tensors;
// each thread takes one contiguous run of chunks. The split never changes an
// element's arithmetic, so results do not depend on the thread count.
constexpr std::size_t kChunkElements = std::size_t(1) << 13;

// Below this many elements in total the step runs on the calling thread
// without starting an OpenMP team.
constexpr std::size_t kParallelMinElements = std::size_t(1) << 14;

// Index of the first tensor whose scaled gradient has a NaN or Inf, or -1.
template <typename Tensor>
std::ptrdiff_t find_nonfinite(const Tensor* tensors, std::size_t count);

// Sum of squares of all (unscaled) gradients, accumulated in double per chunk
// and then over chunks in order: the same bits at any thread count.
template <typename Tensor>
double sum_squares(const Tensor* tensors, std::size_t count);

// Applies one step to every tensor. Pure pointer math; no validation.
void adam_multi_tensor(const AdamTensor* tensors, std::size_t count);
void sgd_multi_tensor(const SgdTensor* tensors, std::size_t count);

}  // namespace adamcpp
