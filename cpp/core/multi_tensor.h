// adamcpp: one call over many tensors (the multi_tensor_apply idea on the
// CPU) and the GIL-free core of a step: the global norm, clipping, the
// non-finite check and the fused update, over tables of raw pointers. No
// Python here; the caller has validated everything.
#pragma once

#include <cstddef>
#include <vector>

#include "core/kernels.h"

namespace adamcpp {

// Work is cut into fixed-size chunks of the concatenation of all tensors;
// each thread takes one contiguous run of chunks. The split never changes an
// element's arithmetic, so results do not depend on the thread count.
constexpr std::size_t kChunkElements = std::size_t(1) << 13;

// Below this many elements in total the step runs on the calling thread
// without starting an OpenMP team.
constexpr std::size_t kParallelMinElements = std::size_t(1) << 14;

// Scratch a multi-tensor pass reuses between calls so that a steady-state
// step does not allocate. Its owner lets one call use it at a time.
struct Workspace {
  std::vector<std::size_t> offsets;  // first global element of each tensor, then the total
  std::vector<double> partial;       // per-chunk sums of squares
};

// What a step does with its gradients besides the update.
struct StepPolicy {
  double grad_scale;     // the call's gradient multiplier (the reported norm is after it)
  Nonfinite nonfinite;   // what a NaN/Inf scaled gradient does
  double max_grad_norm;  // clip by the global norm to this; < 0: no clipping
  // The gradients the norm is taken over, when they are not the step's own
  // tensors: a flat optimizer steps a few long ranges but takes the norm over
  // its per-parameter views in parameter order, so that its norm has the bits
  // of a list optimizer's over the same arrays. Null: the step's tensors.
  const TensorRef* norm_tensors = nullptr;
  std::size_t norm_count = 0;
};

struct StepOutcome {
  bool applied;
  std::ptrdiff_t nonfinite_tensor;  // a tensor whose scaled gradient has a NaN/Inf (skip/raise), or -1
  double grad_norm;                 // the global norm after grad_scale; NaN without clipping
};

// One step over every tensor: with clipping, the global norm and the
// coefficient folded into each tensor's grad_scale; with "skip"/"raise", the
// non-finite check; then the fused update unless a non-finite gradient was
// found (then nothing is written).
StepOutcome run_step(AdamTensor* tensors, std::size_t count, const StepPolicy& policy, Workspace& ws);
StepOutcome run_step(SgdTensor* tensors, std::size_t count, const StepPolicy& policy, Workspace& ws);

// Sum of squares of all (unscaled) gradients, accumulated in double per chunk
// and then over chunks in order: the same bits at any thread count.
double sum_squares(const TensorRef* tensors, std::size_t count, Workspace& ws);

// The per-chunk sums of squares behind sum_squares, left in ws.partial (one
// per chunk of the concatenation, in order): sum_squares adds exactly these,
// in this order. A process holding a chunk-aligned part of a flat gradient
// buffer computes its chunks' sums bit for bit.
void chunk_sum_squares(const TensorRef* tensors, std::size_t count, Workspace& ws);

// Index of the first tensor whose gradient times its grad_scale (in its
// element type) has a NaN or Inf, or -1: the check of nonfinite="skip"/"raise".
std::ptrdiff_t first_nonfinite(const TensorRef* tensors, std::size_t count, Workspace& ws);

}  // namespace adamcpp
