// adamcpp: the kernel table shared by every ISA target and the dispatcher.
// Kernels take raw pointers, element ranges and small scalar structs; they
// never see Python. (Nothing here is called by a kernel translation unit:
// the ISA targets keep their inline code in their own namespaces.)
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/optim_types.h"

namespace adamcpp {

// What every tensor of a multi-tensor call has: a parameter and its gradient.
struct TensorRef {
  void* param;
  const void* grad;
  std::size_t numel;
  DType dtype;        // the parameter's; its compute type is float64 for float64, float32 otherwise
  DType grad_dtype;   // any DType: converted to the compute type as it is read
  double grad_scale;  // gradient multiplier (sign included), applied in the kernel
};

// A part of a tensor whose random bits are those of another tensor's
// elements: elements [start, next piece's start) take the generator's bits of
// elements first, first + 1, ... under `key`. A flat range of many parameters
// (or a shard that cuts them) rounds each element as the parameter's own
// tensor would in a list optimizer.
struct RoundingPiece {
  std::size_t start;
  std::uint64_t first;
  std::uint64_t key;
};

struct AdamTensor : TensorRef {
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;     // nullptr unless amsgrad
  void* master_param;       // float32 master copy of a 16-bit parameter, or nullptr (the parameter is its own master)
  DType state_dtype;        // of exp_avg, exp_avg_sq and max_exp_avg_sq: the compute type, or bf16
  bool native;              // parameter, gradient and state all of the compute type (no master copy)
  Rounding state_rounding;  // bf16 state only
  Rounding param_rounding;  // 16-bit parameters without a master copy only
  std::uint64_t rounding_key = 0;         // stochastic rounding: low 32 bits key the state, high 32 the parameter
  const RoundingPiece* pieces = nullptr;  // when set, the keys and element indices of the tensor's parts
  std::size_t piece_count = 0;
  WeightDecay weight_decay_mode;
  bool amsgrad;
  EpsStyle eps_style;
  AdamStepScalars scalars;
  // How many tensors after this one in the same call share its loop (a native one: every array of the
  // compute type) and its scalars: the update runs them in one kernel call (adam_run) with the scalars and
  // grad_scale of the run's first tensor. Set only by a caller that knows (the list plan: a group's tensors of
  // one dtype and one count); 0 otherwise.
  std::uint32_t run_after = 0;
};

struct SgdTensor : TensorRef {
  void* momentum_buffer;  // nullptr without momentum
  bool weight_decay_on;
  Momentum momentum_mode;
  bool first;  // first momentum step: the buffer starts as the gradient
  SgdStepScalars scalars;
  // As AdamTensor::run_after: following tensors that share this one's loop (its gradient of its own dtype) and
  // scalars, run in one kernel call (sgd_run) with the scalars and grad_scale of the run's first tensor.
  std::uint32_t run_after = 0;
};

// Updates elements [begin, end) of one tensor.
using AdamChunkFn = void (*)(const AdamTensor& tensor, std::size_t begin, std::size_t end);
// Updates tensors[0, count) of a run (AdamTensor::run_after) with the scalars and grad_scale of `head`, the
// run's first tensor (the others' need not be set): elements [begin, ...) of the first, every element of the
// middle ones, [..., end) of the last.
using AdamRunFn = void (*)(const AdamTensor& head, const AdamTensor* tensors, std::size_t count, std::size_t begin,
                           std::size_t end);
using SgdChunkFn = void (*)(const SgdTensor& tensor, std::size_t begin, std::size_t end);
using SgdRunFn = void (*)(const SgdTensor& head, const SgdTensor* tensors, std::size_t count, std::size_t begin,
                          std::size_t end);

// True when any element of grad[begin, end), converted to the compute type, times scale is NaN or infinite.
using NonfiniteFn = bool (*)(const void* grad, std::size_t begin, std::size_t end, double scale);

// Sum of squares of grad[begin, end), accumulated in double.
using SumSquaresFn = double (*)(const void* grad, std::size_t begin, std::size_t end);

constexpr int kComputeTypes = 2;  // index = DType: f32, f64
constexpr int kWeightDecayModes = 3;
constexpr int kEpsStyles = 2;
constexpr int kMomentumModes = 3;

// The 16-bit layouts with a fused loop of their own, all with bfloat16 state
// rounded stochastically, without amsgrad, in the "torch" epsilon style (the
// layouts adamcpp-bench's --precision names).
// Every other combination of parameter, gradient, state and rounding converts
// in L1-sized blocks around the compute-type loop (same arithmetic, same bits).
enum class FusedLayout : int {
  bf16_state = 0,   // float32 parameter and gradient
  bf16_master = 1,  // bfloat16 parameter and gradient, float32 master copy
  bf16 = 2,         // bfloat16 parameter (stochastic rounding) and gradient, no master copy
};
constexpr int kFusedLayouts = 3;

inline std::size_t dtype_size(DType d) { return d == DType::f64 ? 8 : (d == DType::f32 ? 4 : 2); }

struct KernelTable {
  const char* name;
  // Parameter, gradient and state all of the compute type: [compute][weight decay mode][amsgrad][eps style]
  AdamChunkFn adam[kComputeTypes][kWeightDecayModes][2][kEpsStyles];
  // The same loops over a run of tensors: [compute][weight decay mode][amsgrad][eps style]
  AdamRunFn adam_run[kComputeTypes][kWeightDecayModes][2][kEpsStyles];
  // The fused 16-bit layouts: [layout][weight decay mode]
  AdamChunkFn adam_fused[kFusedLayouts][kWeightDecayModes];
  // Any other Adam tensor: [compute]
  AdamChunkFn adam_blocked[kComputeTypes];
  // [compute][weight decay on][momentum mode][first]
  SgdChunkFn sgd[kComputeTypes][2][kMomentumModes][2];
  // The same loops over a run of tensors
  SgdRunFn sgd_run[kComputeTypes][2][kMomentumModes][2];
  // An SGD tensor whose gradient is not of its compute type: [compute]
  SgdChunkFn sgd_blocked[kComputeTypes];
  NonfiniteFn nonfinite[kDTypeCount][kComputeTypes];  // [gradient dtype][compute]
  SumSquaresFn sum_squares[kDTypeCount];              // [gradient dtype]
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
