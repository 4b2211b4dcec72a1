// adamcpp: the kernel table shared by every ISA target and the dispatcher.
// Kernels take raw pointers, element ranges and small scalar structs; they
// never see Python.
#pragma once

#include <cstddef>
#include <cstdint>

namespace adamcpp {

enum class DType : int { f32 = 0, f64 = 1 };

// What every tensor of a multi-tensor call has: a parameter and its gradient.
struct TensorRef {
  void* param;
  const void* grad;
  std::size_t numel;
  DType dtype;
  double grad_scale;  // gradient multiplier (sign included), applied in the kernel
};

// Host-side (double) scalars of one Adam tensor for one step.
struct AdamStepScalars {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double decay_factor;
  double step_size;
  double bias_correction2_sqrt;
};

struct AdamTensor : TensorRef {
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;   // nullptr unless amsgrad
  int weight_decay_mode;  // WeightDecay
  bool amsgrad;
  int eps_style;  // EpsStyle
  AdamStepScalars scalars;
};

struct SgdStepScalars {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
};

struct SgdTensor : TensorRef {
  void* momentum_buffer;  // nullptr without momentum
  bool weight_decay_on;
  int momentum_mode;  // Momentum
  bool first;         // first momentum step: the buffer starts as the gradient
  SgdStepScalars scalars;
};

// Updates elements [begin, end) of one tensor.
using AdamChunkFn = void (*)(const AdamTensor& tensor, std::size_t begin, std::size_t end);
using SgdChunkFn = void (*)(const SgdTensor& tensor, std::size_t begin, std::size_t end);

// True when any element of grad[begin, end) * scale is NaN or infinite.
using NonfiniteFn = bool (*)(const void* grad, std::size_t begin, std::size_t end, double scale);

// Sum of squares of grad[begin, end), accumulated in double.
using SumSquaresFn = double (*)(const void* grad, std::size_t begin, std::size_t end);

// The simplest fused Adam loop over one float32 buffer set, one
// `omp parallel for simd`: the benchmark's practical bandwidth ceiling.
using CeilingAdamFn = void (*)(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::size_t n,
                               float step_size, float bias_correction2_sqrt, int num_threads);

// STREAM triad a[i] = b[i] + s * c[i], one `omp parallel for simd`.
using TriadFn = void (*)(double* a, const double* b, const double* c, std::size_t n, double s, int num_threads);

struct KernelTable {
  const char* name;
  // [dtype][weight decay mode][amsgrad][eps style]
  AdamChunkFn adam[2][3][2][2];
  // [dtype][weight decay on][momentum mode][first]
  SgdChunkFn sgd[2][2][3][2];
  NonfiniteFn nonfinite[2];
  SumSquaresFn sum_squares[2];
  CeilingAdamFn ceiling_adam;
  TriadFn triad;
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
