// adamcpp: the benchmark probes (ceiling Adam loop, STREAM triad). Compiled
// once per ISA target with the kernels' flags, in adamcpp::<ADAMCPP_ISA>, so a
// ceiling is measured with the same instructions the kernels may use.
#include "probes.h"
#include "isa_unit.h"

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

void triad(double* ADAMCPP_RESTRICT a, const double* ADAMCPP_RESTRICT b, const double* ADAMCPP_RESTRICT c,
           std::size_t n, double s, int num_threads) {
  const std::ptrdiff_t count = static_cast<std::ptrdiff_t>(n);
  (void)num_threads;
#pragma omp parallel for simd schedule(static) num_threads(num_threads)
  for (std::ptrdiff_t i = 0; i < count; ++i) {
    a[i] = b[i] + s * c[i];
  }
}

}  // namespace

const ProbeTable& probe_table() {
  static const ProbeTable table{ADAMCPP_STR(ADAMCPP_ISA), &ceiling_adam, &triad};
  return table;
}

}  // namespace ADAMCPP_ISA
}  // namespace adamcpp
