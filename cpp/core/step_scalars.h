// adamcpp: the per-step host math, beside the per-element math of
// optim_math.h: bias corrections, step sizes, the decay factor, the sign for
// `maximize` and the clipping coefficient, in double, once per tensor per step,
// and what a step does after the global norm (after_norm).
// Plain C++ with no Python, usable from a CUDA unit's host code.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "core/kernels.h"

// The functions here that a CUDA kernel calls too.
#if defined(__CUDACC__)
#define ADAMCPP_HOST_DEVICE __host__ __device__
#else
#define ADAMCPP_HOST_DEVICE
#endif

namespace adamcpp {

// The storage options of an Adam group (mixed precision and compact state).
enum class MasterWeights : int { automatic = -1, off = 0, on = 1 };  // automatic: on for 16-bit parameters
enum class StateDType : int { full = 0, bf16 = 1 };                  // full: float32, or float64 for float64 parameters

// One Adam group's hyperparameters as the Python layer validated them (the
// fields of adamcpp's AdamHyper named tuple, in that order).
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;
  bool amsgrad;
  bool maximize;
  EpsStyle eps_style;
  MasterWeights master_weights = MasterWeights::automatic;
  StateDType state_dtype = StateDType::full;
  Rounding state_rounding = Rounding::stochastic;
  Rounding param_rounding = Rounding::nearest;
  std::uint64_t seed = 0;
};

// One SGD group's hyperparameters (adamcpp's SgdHyper named tuple).
struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
};

// The gradient multiplier a kernel applies: the call's grad_scale, negated
// to ascend when `maximize`.
inline double signed_grad_scale(double grad_scale, bool maximize) { return maximize ? -grad_scale : grad_scale; }

// SplitMix64's finalizer: a bijective mix of 64 bits.
inline std::uint64_t mix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// The stochastic-rounding key of step `step` of tensor `tensor` (its flat
// index in the optimizer, or its position in a functional call) under
// `seed`: the low 32 bits key the state's random bits, the high 32 bits the
// parameter's (optim_math.h, random_bits). Elements beyond 2^32 of one tensor
// fold their high index bits into the key (kernels.cpp).
inline std::uint64_t rounding_key(std::uint64_t seed, std::int64_t step, std::uint64_t tensor) {
  return mix64(mix64(mix64(seed) ^ static_cast<std::uint64_t>(step)) ^ tensor);
}

// 1 - beta^t for both betas. Tensors of a group usually share t, so the last
// pair is remembered.
class BiasCorrections {
 public:
  void update(double beta1, double beta2, std::int64_t step) {
    if (beta1 == beta1_ && beta2 == beta2_ && step == step_) return;
    beta1_ = beta1;
    beta2_ = beta2;
    step_ = step;
    first_ = 1.0 - std::pow(beta1, static_cast<double>(step));
    second_ = 1.0 - std::pow(beta2, static_cast<double>(step));
    second_sqrt_ = std::sqrt(second_);
    inv_second_sqrt_ = 1.0 / second_sqrt_;
  }
  double first() const { return first_; }
  double second() const { return second_; }
  double second_sqrt() const { return second_sqrt_; }
  double inv_second_sqrt() const { return inv_second_sqrt_; }

 private:
  double beta1_ = -1.0;
  double beta2_ = -1.0;
  std::int64_t step_ = -1;
  double first_ = 0.0;
  double second_ = 0.0;
  double second_sqrt_ = 0.0;
  double inv_second_sqrt_ = 0.0;
};

// The variant and the scalars of Adam step `step` (1-based) of one tensor.
// A tensor that rounds stochastically also needs its key (rounding_key).
inline void set_adam_step(AdamTensor& t, const AdamHyper& h, std::int64_t step, double grad_scale,
                          BiasCorrections& bc) {
  bc.update(h.beta1, h.beta2, step);
  const double bias_correction1 = bc.first();
  AdamStepScalars& s = t.scalars;
  s.beta1 = h.beta1;
  s.beta2 = h.beta2;
  s.eps = h.eps;
  s.weight_decay = h.weight_decay;
  s.decay_factor = 1.0 - h.lr * h.weight_decay;
  s.bias_correction2_sqrt = bc.second_sqrt();
  s.inv_bias_correction2_sqrt = bc.inv_second_sqrt();
  // torch: lr / bc1 with eps added after sqrt(v) / sqrt(bc2);
  // keras: the paper's epsilon-hat, lr * sqrt(bc2) / bc1 with eps added to sqrt(v).
  s.step_size =
      h.eps_style == EpsStyle::keras ? h.lr * s.bias_correction2_sqrt / bias_correction1 : h.lr / bias_correction1;
  t.grad_scale = signed_grad_scale(grad_scale, h.maximize);
  t.run_after = 0;  // the list plan joins tensors into runs itself
  t.amsgrad = h.amsgrad;
  t.eps_style = h.eps_style;
  t.weight_decay_mode = h.weight_decay == 0.0      ? WeightDecay::none
                        : h.decoupled_weight_decay ? WeightDecay::decoupled
                                                   : WeightDecay::coupled;
}

// The variant and the scalars of one SGD tensor (the momentum buffer and
// whether this is its first step are the state's business).
inline void set_sgd_step(SgdTensor& t, const SgdHyper& h, double grad_scale) {
  t.grad_scale = signed_grad_scale(grad_scale, h.maximize);
  t.run_after = 0;  // the list plan joins tensors into runs itself
  t.momentum_mode = h.momentum == 0.0 ? Momentum::none : h.nesterov ? Momentum::nesterov : Momentum::heavy_ball;
  t.weight_decay_on = h.weight_decay != 0.0;
  t.scalars = SgdStepScalars{h.lr, h.weight_decay, h.momentum, h.dampening};
}

// Clipping by the global norm: max_norm / (norm + 1e-6), capped at 1. A NaN
// norm gives a NaN coefficient (every gradient becomes NaN), as a clip by
// norm does when a gradient is not finite. Written with comparisons only, so
// the CUDA unit's kernels compute it with this same definition.
ADAMCPP_HOST_DEVICE inline double clip_coefficient(double max_norm, double norm) {
  const double ratio = max_norm / (norm + 1e-6);
  return ratio != ratio ? ratio : (ratio < 1.0 ? ratio : 1.0);
}

// Where a step looks for a non-finite gradient after the norm: nowhere, at
// the call's grad_scale (before any clipping coefficient), or at grad_scale
// times the clipping coefficient.
enum class NonfiniteCheck : int { none = 0, at_grad_scale = 1, at_clipped_scale = 2 };

// What a step does after the global norm, decided once for the CPU step, the
// CUDA unit and the Python layer (_core.after_norm).
struct AfterNorm {
  double grad_norm;      // |grad_scale| * sqrt(sum_squares); NaN without clipping
  double coef;           // the clipping coefficient (NaN when the norm is NaN); 1 without clipping
  NonfiniteCheck check;  // where the non-finite check looks, if anywhere
};

// The decision of a step whose gradients' (unscaled) sum of squares is
// `sum_squares`; max_grad_norm < 0: no clipping (sum_squares is not read).
// With "skip"/"raise" the check is needed unless the norm proves it is not:
// no scaled element exceeds the clipped norm, so a clipped norm well inside
// float32's range proves every element finite without a pass over them, as
// long as the multiplier itself is a finite float32 (a zero gradient times an
// infinite scale is NaN) and every unscaled element converts to a finite
// float32 (a float64 gradient of a float32 parameter: the unscaled norm in
// range too). A NaN norm (only a NaN or Inf gradient makes it NaN) makes
// the coefficient NaN: the check then looks at the call's grad_scale.
ADAMCPP_HOST_DEVICE inline AfterNorm after_norm(double sum_squares, double grad_scale, double max_grad_norm,
                                                Nonfinite policy) {
  const bool check = policy != Nonfinite::propagate;
  AfterNorm r{static_cast<double>(NAN), 1.0, check ? NonfiniteCheck::at_grad_scale : NonfiniteCheck::none};
  if (max_grad_norm < 0.0) return r;
#if defined(__CUDA_ARCH__)
  const double raw_norm = ::sqrt(sum_squares);
  r.grad_norm = ::fabs(grad_scale) * raw_norm;
  r.coef = clip_coefficient(max_grad_norm, r.grad_norm);
  const double scale = ::fabs(grad_scale * r.coef);
#else
  const double raw_norm = std::sqrt(sum_squares);
  r.grad_norm = std::fabs(grad_scale) * raw_norm;
  r.coef = clip_coefficient(max_grad_norm, r.grad_norm);
  const double scale = std::fabs(grad_scale * r.coef);
#endif
  if (!check || r.coef != r.coef) return r;
  const double float_max = static_cast<double>(FLT_MAX);
  const bool proven_finite = r.grad_norm * r.coef < 0.5 * float_max && scale <= float_max && raw_norm < 0.5 * float_max;
  r.check = proven_finite ? NonfiniteCheck::none : NonfiniteCheck::at_clipped_scale;
  return r;
}

}  // namespace adamcpp
