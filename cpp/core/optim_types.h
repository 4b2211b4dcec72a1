// adamcpp: the variants and per-element scalars shared by the element math,
// the kernel table, the host step math and a CUDA unit. Plain C++, no includes.
#pragma once

namespace adamcpp {

// Element type of an array: float32, float64 and the two 16-bit formats
// (IEEE float16, bfloat16). A parameter's compute type is float64 for float64
// parameters and float32 for the others; gradients of any of these types are
// converted to it as they are read.
enum class DType : int { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };
constexpr int kDTypeCount = 4;

// How a value is rounded to a narrower storage type: to nearest (ties to
// even), or stochastically (away from zero with probability equal to the
// dropped fraction, keyed on seed, step, tensor and element).
enum class Rounding : int { nearest = 0, stochastic = 1 };

// Which weight decay a tensor uses: none, coupled L2 (Adam: g += wd * p) or
// decoupled (AdamW: p *= 1 - lr * wd). A template parameter, never a branch
// inside the element loop.
enum class WeightDecay : int { none = 0, coupled = 1, decoupled = 2 };

// Where epsilon enters the denominator: "torch" adds it after the bias
// correction of sqrt(v), "keras" (the paper's epsilon-hat) before.
enum class EpsStyle : int { torch = 0, keras = 1 };

// Host-side (double) scalars of one Adam tensor for one step.
struct AdamStepScalars {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double decay_factor;
  double step_size;
  double bias_correction2_sqrt;
  double inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t): the compact-state form's multiplier
};

// Host-side (double) scalars of one SGD tensor for one step.
struct SgdStepScalars {
  double lr;
  double weight_decay;
  double momentum;
  double dampening;
};

// Scalars of one tensor for one step, computed in double on the host and
// rounded once to the element type T.
template <typename T>
struct AdamScalars {
  T grad_scale;  // gradient multiplier, negated for `maximize`
  T beta1;
  T one_minus_beta1;
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;               // coupled L2 coefficient
  T decay_factor;               // 1 - lr * weight_decay (decoupled)
  T step_size;                  // torch: lr / bc1;   keras: lr * sqrt(bc2) / bc1
  T bias_correction2_sqrt;      // sqrt(1 - beta2^t) (torch style only)
  T inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t) (torch style, compact state only)
  // The compact form's coefficients of the gradient (compact state only):
  T m_grad;                // (1 - beta1) * grad_scale
  T v_grad;                // sqrt(1 - beta2) * |grad_scale|
  T sqrt_one_minus_beta2;  // sqrt(1 - beta2) (coupled weight decay, whose gradient is scaled first)
};

// Scalars of one SGD tensor for one step, rounded once to the element type.
template <typename T>
struct SgdScalars {
  T grad_scale;  // gradient multiplier, negated for `maximize`
  T lr;
  T weight_decay;  // coupled L2 coefficient
  T momentum;
  T one_minus_dampening;
};

// Momentum flavour of an SGD tensor: none, heavy ball, or Nesterov.
enum class Momentum : int { none = 0, heavy_ball = 1, nesterov = 2 };

// What a non-finite gradient does: "propagate" (like torch), "skip" (nothing
// changes, the step reports False) or "raise" (nothing changes, an error).
enum class Nonfinite : int { propagate = 0, skip = 1, raise = 2 };

}  // namespace adamcpp
