// adamcpp: the per-step host math, beside the per-element math of
// optim_math.h: bias corrections, step sizes, the decay factor, the sign for
// `maximize` and the clipping coefficient, in double, once per tensor per step.
// Plain C++ with no Python, usable from a CUDA unit's host code.
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels.h"

// The functions here that a CUDA kernel calls too.
#if defined(__CUDACC__)
#define ADAMCPP_HOST_DEVICE __host__ __device__
#else
#define ADAMCPP_HOST_DEVICE
#endif

namespace adamcpp {

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
  }
  double first() const { return first_; }
  double second() const { return second_; }

 private:
  double beta1_ = -1.0;
  double beta2_ = -1.0;
  std::int64_t step_ = -1;
  double first_ = 0.0;
  double second_ = 0.0;
};

// The variant and the scalars of Adam step `step` (1-based) of one tensor.
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
  s.bias_correction2_sqrt = std::sqrt(bc.second());
  // torch: lr / bc1 with eps added after sqrt(v) / sqrt(bc2);
  // keras: the paper's epsilon-hat, lr * sqrt(bc2) / bc1 with eps added to sqrt(v).
  s.step_size =
      h.eps_style == EpsStyle::keras ? h.lr * s.bias_correction2_sqrt / bias_correction1 : h.lr / bias_correction1;
  t.grad_scale = signed_grad_scale(grad_scale, h.maximize);
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

}  // namespace adamcpp
