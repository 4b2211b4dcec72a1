// adamcpp: the benchmark probes (ceiling Adam loop, STREAM triad). Compiled
// once per ISA target with the kernels' flags, in adamcpp::<ADAMCPP_ISA>, so a
// ceiling is measured with the same instructions the kernels may use.
#include "core/probes.h"

#include <type_traits>

#include "core/isa_unit.h"
#include "core/kernels.h"

namespace adamcpp {
namespace ADAMCPP_ISA {
namespace {

void ceiling_adam(float* ADAMCPP_RESTRICT param, const float* ADAMCPP_RESTRICT grad, float* ADAMCPP_RESTRICT exp_avg,
                  float* ADAMCPP_RESTRICT exp_avg_sq, std::size_t n, float step_size, float bias_correction2_sqrt,
                  int num_threads) {
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  (void)num_threads;
#pragma omp parallel for simd schedule(static) num_threads(num_threads)
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    const float g = grad[i];
    const float m = 0.9f * exp_avg[i] + 0.1f * g;
    const float v = 0.999f * exp_avg_sq[i] + 0.001f * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = param[i] - (step_size * m) / (sqrt_of(v) / bias_correction2_sqrt + 1e-8f);
  }
}

template <FusedLayout L, int Mode>
void ceiling_compact_loop(void* param_ptr, const void* grad_ptr, std::uint16_t* ADAMCPP_RESTRICT exp_avg,
                          std::uint16_t* ADAMCPP_RESTRICT exp_avg_sq, float* ADAMCPP_RESTRICT master, std::size_t n,
                          float step_size, float inv_bias_correction2_sqrt, std::uint32_t key, int num_threads) {
  using P = std::conditional_t<L == FusedLayout::bf16_state, float, std::uint16_t>;
  P* ADAMCPP_RESTRICT param = static_cast<P*>(param_ptr);
  const P* ADAMCPP_RESTRICT grad = static_cast<const P*>(grad_ptr);
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  (void)num_threads;
  (void)master;
  (void)key;
#pragma omp parallel for simd schedule(static) num_threads(num_threads)
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    float p;
    float g;
    if constexpr (L == FusedLayout::bf16_state) {
      p = param[i];
      g = grad[i];
    } else {
      p = L == FusedLayout::bf16_master ? master[i] : float_from_bf16(param[i]);
      g = float_from_bf16(grad[i]);
    }
    const float m = fma_of(0.9f, float_from_bf16(exp_avg[i]), 0.1f * g);
    const float t = 0.0316227766f * g;  // sqrt(1 - 0.999)
    const float v = fma_of(t, t, 0.999f * float_from_bf16(exp_avg_sq[i]));
    p = fma_of(-step_size, m / fma_of(sqrt_of(v), inv_bias_correction2_sqrt, 1e-8f), p);
    const std::uint32_t index = static_cast<std::uint32_t>(i);
    const std::uint32_t r = Mode == 1 ? random_bits(index, key) : 0x80008000u;
    exp_avg[i] = bf16_stochastic(m, r);
    exp_avg_sq[i] = bf16_stochastic(v, r >> 16);
    if constexpr (L == FusedLayout::bf16_state) {
      param[i] = p;
    } else if constexpr (L == FusedLayout::bf16_master) {
      master[i] = p;
      param[i] = bf16_nearest(p);
    } else {
      const std::uint32_t rp = Mode == 1 ? random_bits(index, ~key) : 0x8000u;
      param[i] = bf16_stochastic(p, rp);
    }
  }
}

template <FusedLayout L>
void ceiling_compact_layout(int mode, void* param, const void* grad, std::uint16_t* exp_avg, std::uint16_t* exp_avg_sq,
                            float* master, std::size_t n, float step_size, float inv_bc2, std::uint32_t key,
                            int threads) {
  if (mode == 1) {
    ceiling_compact_loop<L, 1>(param, grad, exp_avg, exp_avg_sq, master, n, step_size, inv_bc2, key, threads);
  } else {
    ceiling_compact_loop<L, 2>(param, grad, exp_avg, exp_avg_sq, master, n, step_size, inv_bc2, key, threads);
  }
}

void ceiling_compact(int layout, int mode, void* param, const void* grad, std::uint16_t* exp_avg,
                     std::uint16_t* exp_avg_sq, float* master, std::size_t n, float step_size, float inv_bc2,
                     std::uint32_t key, int threads) {
  switch (static_cast<FusedLayout>(layout)) {
    case FusedLayout::bf16_state:
      ceiling_compact_layout<FusedLayout::bf16_state>(mode, param, grad, exp_avg, exp_avg_sq, master, n, step_size,
                                                      inv_bc2, key, threads);
      break;
    case FusedLayout::bf16_master:
      ceiling_compact_layout<FusedLayout::bf16_master>(mode, param, grad, exp_avg, exp_avg_sq, master, n, step_size,
                                                       inv_bc2, key, threads);
      break;
    case FusedLayout::bf16:
      ceiling_compact_layout<FusedLayout::bf16>(mode, param, grad, exp_avg, exp_avg_sq, master, n, step_size, inv_bc2,
                                                key, threads);
      break;
  }
}

void triad(double* ADAMCPP_RESTRICT a, const double* ADAMCPP_RESTRICT b, const double* ADAMCPP_RESTRICT c,
           std::size_t n, double s, int num_threads) {
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  (void)num_threads;
#pragma omp parallel for simd schedule(static) num_threads(num_threads)
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    a[i] = b[i] + s * c[i];
  }
}

template <typename S>
void traffic_loop(float* ADAMCPP_RESTRICT param, const float* ADAMCPP_RESTRICT grad, S* ADAMCPP_RESTRICT exp_avg,
                  S* ADAMCPP_RESTRICT exp_avg_sq, std::size_t n, int num_threads) {
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  (void)num_threads;
#pragma omp parallel for simd schedule(static) num_threads(num_threads)
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    exp_avg[i] = static_cast<S>(exp_avg[i] + S(1));
    exp_avg_sq[i] = static_cast<S>(exp_avg_sq[i] + S(1));
    param[i] = param[i] + grad[i];
  }
}

void traffic(float* param, const float* grad, void* exp_avg, void* exp_avg_sq, DType state, std::size_t n,
             int num_threads) {
  if (state == DType::bf16) {
    traffic_loop(param, grad, static_cast<std::uint16_t*>(exp_avg), static_cast<std::uint16_t*>(exp_avg_sq), n,
                 num_threads);
  } else {
    traffic_loop(param, grad, static_cast<float*>(exp_avg), static_cast<float*>(exp_avg_sq), n, num_threads);
  }
}

void narrow(const float* ADAMCPP_RESTRICT src, std::uint16_t* ADAMCPP_RESTRICT dst, std::size_t n, DType format,
            Rounding rounding, std::uint32_t key) {
  const bool sr = rounding == Rounding::stochastic;
  if (format == DType::bf16) {
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) {
      dst[k] = sr ? bf16_stochastic(src[k], random_bits(static_cast<std::uint32_t>(k), key)) : bf16_nearest(src[k]);
    }
  } else {
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) {
      dst[k] = sr ? f16_stochastic(src[k], random_bits(static_cast<std::uint32_t>(k), key)) : f16_nearest(src[k]);
    }
  }
}

void widen(const std::uint16_t* ADAMCPP_RESTRICT src, float* ADAMCPP_RESTRICT dst, std::size_t n, DType format) {
  if (format == DType::bf16) {
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) dst[k] = float_from_bf16(src[k]);
  } else {
#pragma omp simd
    for (std::size_t k = 0; k < n; ++k) dst[k] = float_from_f16(src[k]);
  }
}

}  // namespace

const ProbeTable& probe_table() {
  static const ProbeTable table{
      ADAMCPP_STR(ADAMCPP_ISA), &ceiling_adam, &ceiling_compact, &triad, &traffic, &narrow, &widen};
  return table;
}

}  // namespace ADAMCPP_ISA
}  // namespace adamcpp
