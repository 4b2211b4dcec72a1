// adamcpp: the per-element optimizer updates (Adam/AdamW, SGD), written once.
//
// This header is plain inline arithmetic (its only include is the plain
// optim_types.h), so the same function serves the CPU kernels (compiled once per ISA target) and a CUDA
// translation unit (where it becomes __host__ __device__).
//
// Every ISA translation unit defines ADAMCPP_MATH_NS to its own name before
// including this file, so each target gets its own copy of these inline
// functions and the linker can never merge an AVX-512 body into the baseline
// path.
#pragma once

#if defined(__CUDACC__)
#define ADAMCPP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define ADAMCPP_HD inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ADAMCPP_HD __forceinline
#else
#define ADAMCPP_HD inline
#endif

#include "optim_types.h"

#ifndef ADAMCPP_MATH_NS
#define ADAMCPP_MATH_NS portable
#endif

namespace adamcpp {

namespace ADAMCPP_MATH_NS {

ADAMCPP_HD float sqrt_of(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#else
  return __builtin_sqrtf(x);
#endif
}

ADAMCPP_HD double sqrt_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return __builtin_sqrt(x);
#endif
}

// The host's double scalars of one step, each rounded once to the element type.
template <typename T>
ADAMCPP_HD AdamScalars<T> adam_scalars(const AdamStepScalars& s, double grad_scale) {
  AdamScalars<T> r;
  r.grad_scale = static_cast<T>(grad_scale);
  r.beta1 = static_cast<T>(s.beta1);
  r.one_minus_beta1 = static_cast<T>(1.0 - s.beta1);
  r.beta2 = static_cast<T>(s.beta2);
  r.one_minus_beta2 = static_cast<T>(1.0 - s.beta2);
  r.eps = static_cast<T>(s.eps);
  r.weight_decay = static_cast<T>(s.weight_decay);
  r.decay_factor = static_cast<T>(s.decay_factor);
  r.step_size = static_cast<T>(s.step_size);
  r.bias_correction2_sqrt = static_cast<T>(s.bias_correction2_sqrt);
  return r;
}

template <typename T>
ADAMCPP_HD SgdScalars<T> sgd_scalars(const SgdStepScalars& s, double grad_scale) {
  SgdScalars<T> r;
  r.grad_scale = static_cast<T>(grad_scale);
  r.lr = static_cast<T>(s.lr);
  r.weight_decay = static_cast<T>(s.weight_decay);
  r.momentum = static_cast<T>(s.momentum);
  r.one_minus_dampening = static_cast<T>(1.0 - s.dampening);
  return r;
}

// NaN-propagating maximum (like torch.maximum): a NaN in either operand wins.
template <typename T>
ADAMCPP_HD T nan_max(T current, T candidate) {
  return (candidate > current || candidate != candidate) ? candidate : current;
}

// One Adam step of one element. The operation order matches torch.optim:
//   v = beta2 * v + ((1 - beta2) * g) * g
//   p = p - (step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)
template <typename T, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
ADAMCPP_HD void adam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq, const AdamScalars<T>& s) {
  T g = grad * s.grad_scale;
  T p = param;
  if constexpr (WD == WeightDecay::coupled) {
    g = g + s.weight_decay * p;
  }
  if constexpr (WD == WeightDecay::decoupled) {
    p = p * s.decay_factor;
  }
  const T m = s.beta1 * exp_avg + s.one_minus_beta1 * g;
  const T v = s.beta2 * exp_avg_sq + s.one_minus_beta2 * g * g;
  exp_avg = m;
  exp_avg_sq = v;
  T v_used = v;
  if constexpr (Amsgrad) {
    v_used = nan_max(*max_exp_avg_sq, v);
    *max_exp_avg_sq = v_used;
  }
  T denom;
  if constexpr (Eps == EpsStyle::torch) {
    denom = sqrt_of(v_used) / s.bias_correction2_sqrt + s.eps;
  } else {
    denom = sqrt_of(v_used) + s.eps;
  }
  param = p - (s.step_size * m) / denom;
}

// SGD with momentum, in torch.optim.SGD's operation order. `First` marks the
// first momentum step, where the buffer starts as a copy of the gradient.
template <typename T, bool WeightDecayOn, Momentum Mom, bool First>
ADAMCPP_HD void sgd_element(T& param, T grad, T* momentum_buffer, const SgdScalars<T>& s) {
  T g = grad * s.grad_scale;
  const T p = param;
  if constexpr (WeightDecayOn) {
    g = g + s.weight_decay * p;
  }
  if constexpr (Mom != Momentum::none) {
    T buf;
    if constexpr (First) {
      buf = g;
    } else {
      buf = *momentum_buffer * s.momentum + s.one_minus_dampening * g;
    }
    *momentum_buffer = buf;
    if constexpr (Mom == Momentum::nesterov) {
      g = g + s.momentum * buf;
    } else {
      g = buf;
    }
  }
  param = p - s.lr * g;
}

}  // namespace ADAMCPP_MATH_NS
}  // namespace adamcpp
