// adamcpp: the kernel table shared by every ISA target and the dispatcher.
// Kernels take raw pointers, element ranges and small scalar structs; they
// never see Python.
#pragma once

#include <cstddef>
#include <cstdint>

#include "optim_types.h"

namespace adamcpp {

// What every tensor of a multi-tensor call has: a parameter and its gradient.
struct TensorRef {
  void* param;
  const void* grad;
  std::size_t numel;
  DType dtype;
  double grad_scale;  // gradient multiplier (sign included), applied in the kernel
};

struct AdamTensor : TensorRef {
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  WeightDecay weight_decay_mode;
  bool amsgrad;
  EpsStyle eps_style;
  AdamStepScalars scalars;
};

struct SgdTensor : TensorRef {
  void* momentum_buffer;  // nullptr without momentum
  bool weight_decay_on;
  Momentum momentum_mode;
  bool first;  // first momentum step: the buffer starts as the gradient
  SgdStepScalars scalars;
};

// Updates elements [begin, end) of one tensor.
using AdamChunkFn = void (*)(const AdamTensor& tensor, std::size_t begin, std::size_t end);
using SgdChunkFn = void (*)(const SgdTensor& tensor, std::size_t begin, std::size_t end);

// True when any element of grad[begin, end) * scale is NaN or infinite.
using NonfiniteFn = bool (*)(const void* grad, std::size_t begin, std::size_t end, double scale);

// Sum of squares of grad[begin, end), accumulated in double.
using SumSquaresFn = double (*)(const void* grad, std::size_t begin, std::size_t end);

constexpr int kDTypes = 2;
constexpr int kWeightDecayModes = 3;
constexpr int kEpsStyles = 2;
constexpr int kMomentumModes = 3;

struct KernelTable {
  const char* name;
  // [dtype][weight decay mode][amsgrad][eps style]
  AdamChunkFn adam[kDTypes][kWeightDecayModes][2][kEpsStyles];
  // [dtype][weight decay on][momentum mode][first]
  SgdChunkFn sgd[kDTypes][2][kMomentumModes][2];
  NonfiniteFn nonfinite[kDTypes];
  SumSquaresFn sum_squares[kDTypes];

  AdamChunkFn adam_fn(const AdamTensor& t) const {
    return adam[static_cast<int>(t.dtype)][static_cast<int>(t.weight_decay_mode)][t.amsgrad ? 1 : 0]
               [static_cast<int>(t.eps_style)];
  }
  SgdChunkFn sgd_fn(const SgdTensor& t) const {
    return sgd[static_cast<int>(t.dtype)][t.weight_decay_on ? 1 : 0][static_cast<int>(t.momentum_mode)]
              [t.first ? 1 : 0];
  }
};

// One definition per compiled ISA target, each in its own namespace.
#define ADAMCPP_DECLARE_TABLE(isa)   \
  namespace isa {                    \
  const KernelTable& kernel_table(); \
  }

ADAMCPP_DECLARE_TABLE(baseline)
ADAMCPP_DECLARE_TABLE(avx2)
ADAMCPP_DECLARE_TABLE(avx512)
ADAMCPP_DECLARE_TABLE(generic)
#undef ADAMCPP_DECLARE_TABLE

}  // namespace adamcpp
