// adamcpp: the per-element optimizer updates (Adam/AdamW, SGD), written once,
// and the per-element conversions between the compute type and the 16-bit
// storage formats (float16, bfloat16; to nearest or stochastically, with the
// counter-based generator that keys stochastic rounding).
//
// This header is plain inline arithmetic (it includes only <cstdint>, the
// plain optim_types.h and, for compilers without GCC's builtins,
// <cmath>/<cstring>), so the same function serves the CPU kernels (compiled
// once per ISA target) and a CUDA translation unit (where it becomes
// __host__ __device__). Every operation is an IEEE basic operation or integer
// arithmetic, so every ISA and the GPU give the same bits.
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

#include <cstdint>

#include "core/optim_types.h"

// GCC, Clang and nvcc's host pass spell sqrt, fma and memcpy as builtins (no
// header, no errno); any other compiler (MSVC), or any build defining
// ADAMCPP_STD_MATH (tests/test_portable_source.py compiles that branch with
// GCC), calls the standard library, which computes the same correctly rounded
// IEEE operations.
#if (defined(__GNUC__) || defined(__clang__)) && !defined(ADAMCPP_STD_MATH)
#define ADAMCPP_BUILTIN_MATH 1
#else
#include <cmath>
#include <cstring>
#endif

#ifndef ADAMCPP_MATH_NS
#define ADAMCPP_MATH_NS portable
#endif

namespace adamcpp {

namespace ADAMCPP_MATH_NS {

ADAMCPP_HD float sqrt_of(float x) {
#if defined(__CUDA_ARCH__)
  return ::sqrtf(x);
#elif defined(ADAMCPP_BUILTIN_MATH)
  return __builtin_sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

ADAMCPP_HD double sqrt_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#elif defined(ADAMCPP_BUILTIN_MATH)
  return __builtin_sqrt(x);
#else
  return std::sqrt(x);
#endif
}

// a * b + c rounded once (a fused multiply-add, IEEE's fusedMultiplyAdd):
// the compact form's arithmetic. Every target with FMA hardware (AVX2,
// AVX-512, the GPU) computes it in one instruction; the baseline target calls
// the C library's correctly rounded fmaf. Same bits everywhere.
ADAMCPP_HD float fma_of(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(ADAMCPP_BUILTIN_MATH)
  return __builtin_fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

ADAMCPP_HD double fma_of(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#elif defined(ADAMCPP_BUILTIN_MATH)
  return __builtin_fma(a, b, c);
#else
  return std::fma(a, b, c);
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
  r.inv_bias_correction2_sqrt = static_cast<T>(s.inv_bias_correction2_sqrt);
  const double sqrt_one_minus_beta2 = sqrt_of(1.0 - s.beta2);
  r.m_grad = static_cast<T>((1.0 - s.beta1) * grad_scale);
  r.v_grad = static_cast<T>(sqrt_one_minus_beta2 * (grad_scale < 0.0 ? -grad_scale : grad_scale));
  r.sqrt_one_minus_beta2 = static_cast<T>(sqrt_one_minus_beta2);
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

// Stores the new moments; returns the second moment the denominator uses
// (under amsgrad the running maximum, which is stored too).
template <typename T, bool Amsgrad>
ADAMCPP_HD T store_moments(T m, T v, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq) {
  exp_avg = m;
  exp_avg_sq = v;
  if constexpr (Amsgrad) {
    const T v_max = nan_max(*max_exp_avg_sq, v);
    *max_exp_avg_sq = v_max;
    return v_max;
  }
  return v;
}

// The compact form, four fused multiply-adds and one division per element
// (the gradient scale folded into the coefficients, 1/sqrt(bc2) a multiplier):
//   m = fma(beta1, m, ((1 - beta1) * scale) * g)
//   t = (sqrt(1 - beta2) * |scale|) * g;   v = fma(t, t, beta2 * v)
//   denom = fma(sqrt(v), 1 / sqrt(bc2), eps)       ("keras": sqrt(v) + eps)
//   p = fma(-step_size, m / denom, p)              (p * decay_factor first for AdamW)
// With coupled weight decay the gradient is g * scale + weight_decay * p
// (one fma) and the coefficients are 1 - beta1 and sqrt(1 - beta2).
template <typename T, WeightDecay WD, bool Amsgrad, EpsStyle Eps>
ADAMCPP_HD void compact_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq,
                                const AdamScalars<T>& s) {
  T g = grad;
  T m_coef = s.m_grad;
  T v_coef = s.v_grad;
  T p = param;
  if constexpr (WD == WeightDecay::coupled) {
    g = fma_of(s.weight_decay, p, grad * s.grad_scale);
    m_coef = s.one_minus_beta1;
    v_coef = s.sqrt_one_minus_beta2;
  }
  if constexpr (WD == WeightDecay::decoupled) {
    p = p * s.decay_factor;
  }
  const T m = fma_of(s.beta1, exp_avg, m_coef * g);
  const T t = v_coef * g;
  const T v = fma_of(t, t, s.beta2 * exp_avg_sq);
  const T v_used = store_moments<T, Amsgrad>(m, v, exp_avg, exp_avg_sq, max_exp_avg_sq);
  T denom;
  if constexpr (Eps == EpsStyle::torch) {
    denom = fma_of(sqrt_of(v_used), s.inv_bias_correction2_sqrt, s.eps);
  } else {
    denom = sqrt_of(v_used) + s.eps;
  }
  param = fma_of(-s.step_size, m / denom, p);
}

// One Adam step of one element. The operation order matches torch.optim:
//   v = beta2 * v + ((1 - beta2) * g) * g
//   p = p - (step_size * m) / (sqrt(v) / bias_correction2_sqrt + eps)
// `Compact` is the bfloat16-state form: its moments are rounded to 8 bits
// after every step, so it owes torch's float32 operation order nothing and
// takes the fewest operations instead (compact_element).
template <typename T, WeightDecay WD, bool Amsgrad, EpsStyle Eps, bool Compact = false>
ADAMCPP_HD void adam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T* max_exp_avg_sq, const AdamScalars<T>& s) {
  if constexpr (Compact) {
    compact_element<T, WD, Amsgrad, Eps>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, s);
    return;
  }
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
  const T v_used = store_moments<T, Amsgrad>(m, v, exp_avg, exp_avg_sq, max_exp_avg_sq);
  T denom;
  if constexpr (Eps == EpsStyle::torch) {
    denom = sqrt_of(v_used) / s.bias_correction2_sqrt + s.eps;
  } else {
    denom = sqrt_of(v_used) + s.eps;
  }
  param = p - (s.step_size * m) / denom;
}

// ------------------------------------------------------------ 16-bit storage
// Conversions between float32 (the compute type of 16-bit tensors) and the
// 16-bit formats, on bit patterns held in std::uint16_t. Each is integer
// arithmetic and IEEE basic operations only.

ADAMCPP_HD std::uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t u;
#if defined(ADAMCPP_BUILTIN_MATH)
  __builtin_memcpy(&u, &x, sizeof u);
#else
  std::memcpy(&u, &x, sizeof u);
#endif
  return u;
#endif
}

ADAMCPP_HD float float_of(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
#if defined(ADAMCPP_BUILTIN_MATH)
  __builtin_memcpy(&x, &u, sizeof x);
#else
  std::memcpy(&x, &u, sizeof x);
#endif
  return x;
#endif
}

// The 16-bit conversions test for NaN with `x != x`: one floating-point
// compare in a vector loop (an integer test of the bits needs a mask and an
// unsigned compare, which AVX2 lacks). Never built with -ffinite-math-only.

// bfloat16 is the upper half of a float32: widening is exact.
ADAMCPP_HD float float_from_bf16(std::uint16_t h) { return float_of(static_cast<std::uint32_t>(h) << 16); }

// A NaN becomes the quiet NaN 0x7FC0 with its sign (as ml_dtypes converts).
ADAMCPP_HD std::uint16_t bf16_nan(std::uint32_t b) {
  return static_cast<std::uint16_t>(((b >> 16) & 0x8000u) | 0x7FC0u);
}

// float32 -> bfloat16, to nearest, ties to even; Inf stays Inf, an overflow becomes Inf.
ADAMCPP_HD std::uint16_t bf16_nearest(float x) {
  const std::uint32_t b = bits_of(x);
  const std::uint16_t rounded = static_cast<std::uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
  return x != x ? bf16_nan(b) : rounded;
}

// float32 -> bfloat16, stochastically: the 16 dropped bits are exactly the
// dropped fraction, so adding 16 uniform random bits `r` (0..65535) and
// truncating rounds away from zero with probability fraction: E[result] = x.
// A NaN stays a NaN (its quiet bit set; sign and the top of its payload kept).
ADAMCPP_HD std::uint16_t bf16_stochastic(float x, std::uint32_t r) {
  const std::uint32_t b = bits_of(x);
  const std::uint32_t rounded = x != x ? (b | 0x00400000u) : b + (r & 0xFFFFu);
  return static_cast<std::uint16_t>(rounded >> 16);
}

// float16 -> float32, exact. Subnormals are m * 2^-24 (an exact product).
ADAMCPP_HD float float_from_f16(std::uint16_t h) {
  const std::uint32_t sign = (static_cast<std::uint32_t>(h) & 0x8000u) << 16;
  const std::uint32_t exponent = (static_cast<std::uint32_t>(h) >> 10) & 0x1Fu;
  const std::uint32_t mantissa = static_cast<std::uint32_t>(h) & 0x3FFu;
  const std::uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  const std::uint32_t special = sign | 0x7F800000u | (mantissa << 13);
  const std::uint32_t subnormal =
      sign | bits_of(static_cast<float>(static_cast<int>(mantissa)) * 5.9604644775390625e-8f);
  return float_of(exponent == 0x1Fu ? special : (exponent == 0u ? subnormal : normal));
}

// The float16 bits of a float32 Inf or NaN (`a` = |bits|): the NaN keeps the
// top of its payload, never 0 (NumPy's rule).
ADAMCPP_HD std::uint32_t f16_special(std::uint32_t a) {
  const std::uint32_t payload = (a & 0x7FFFFFu) >> 13;
  return a == 0x7F800000u ? 0x7C00u : (0x7C00u | (payload == 0u ? 1u : payload));
}

// float32 -> float16, to nearest, ties to even (as NumPy's astype): values
// from 65520 on overflow to Inf. Subnormal results are rounded by the float
// addition |x| + 0.5, whose ulp is float16's smallest step 2^-24.
ADAMCPP_HD std::uint16_t f16_nearest(float x) {
  const std::uint32_t b = bits_of(x);
  const std::uint32_t sign = (b >> 16) & 0x8000u;
  const std::uint32_t a = b & 0x7FFFFFFFu;
  const std::uint32_t t = a - 0x38000000u;  // rebias the exponent from 127 to 15
  const std::uint32_t normal = (t + 0xFFFu + ((t >> 13) & 1u)) >> 13;
  const std::uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
  std::uint32_t h = a >= 0x38800000u ? normal : subnormal;
  h = a >= 0x477FF000u ? 0x7C00u : h;
  h = a >= 0x7F800000u ? f16_special(a) : h;
  return static_cast<std::uint16_t>(sign | h);
}

// float32 -> float16, stochastically, with 16 uniform random bits `r`: in
// float16's normal range the 13 dropped bits are compared with 13 of them
// (exactly the dropped fraction); below it, the value in units of 2^-24 is
// taken with 16 fraction bits. Values beyond the largest float16 round up to Inf
// with the probability of their fraction, like any other.
ADAMCPP_HD std::uint16_t f16_stochastic(float x, std::uint32_t r) {
  const std::uint32_t b = bits_of(x);
  const std::uint32_t sign = (b >> 16) & 0x8000u;
  const std::uint32_t a = b & 0x7FFFFFFFu;
  r &= 0xFFFFu;
  const std::uint32_t normal_bits = (a - 0x38000000u + (r >> 3)) >> 13;
  const std::uint32_t normal = normal_bits > 0x7C00u ? 0x7C00u : normal_bits;
  // a < 2^-14: a value of mantissa * 2^(exponent - 150), i.e. mantissa >> shift units of 2^-24.
  const std::uint32_t exponent = a >> 23;
  const std::uint32_t mantissa = exponent == 0u ? a : ((a & 0x7FFFFFu) | 0x800000u);
  const std::uint32_t shift = exponent == 0u ? 125u : 126u - exponent;  // >= 14 here
  const std::uint32_t fixed =
      shift >= 48u ? 0u : (shift >= 16u ? mantissa >> (shift - 16u) : mantissa << (16u - shift));
  const std::uint32_t subnormal = (fixed + r) >> 16;
  std::uint32_t h = a >= 0x38800000u ? normal : subnormal;
  h = a >= 0x7F800000u ? f16_special(a) : h;
  return static_cast<std::uint16_t>(sign | h);
}

// The counter-based generator of stochastic rounding: 32 uniform bits for
// element `index` under `key`, a hash of (seed, step, tensor) computed on the
// host (step_scalars.h). A bijection of index ^ key (a multiplicative hash
// whose high half is folded into the low half), so a fresh key per step makes
// every element's bits uniform and independent from step to step; the result
// depends on nothing else (not the thread, the chunk or the SIMD target). The
// low 16 bits round exp_avg, the high 16 bits exp_avg_sq (and max_exp_avg_sq);
// a parameter uses its own key.
ADAMCPP_HD std::uint32_t random_bits(std::uint32_t index, std::uint32_t key) {
  const std::uint32_t h = (index ^ key) * 0x9E3779B1u;
  return h ^ (h >> 16);
}

// The key of the elements of a tensor from index 2^32 * high on (high > 0):
// the generator hashes an element's low 32 index bits under it.
ADAMCPP_HD std::uint32_t segment_key(std::uint32_t key, std::uint64_t high) {
  return random_bits(static_cast<std::uint32_t>(high) ^ static_cast<std::uint32_t>(high >> 32), key ^ 0xA511E9B3u);
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
