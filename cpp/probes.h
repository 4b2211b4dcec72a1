// adamcpp: the benchmark's measuring loops, compiled per ISA target like the
// kernels but kept out of the production kernel table.
#pragma once

#include <cstddef>

namespace adamcpp {

// The simplest fused Adam loop over one float32 buffer set, one
// `omp parallel for simd`: the benchmark's practical bandwidth ceiling.
using CeilingAdamFn = void (*)(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::size_t n,
                               float step_size, float bias_correction2_sqrt, int num_threads);

// STREAM triad a[i] = b[i] + s * c[i], one `omp parallel for simd`.
using TriadFn = void (*)(double* a, const double* b, const double* c, std::size_t n, double s, int num_threads);

struct ProbeTable {
  const char* name;
  CeilingAdamFn ceiling_adam;
  TriadFn triad;
};

#define ADAMCPP_DECLARE_PROBES(isa) \
  namespace isa {                   \
  const ProbeTable& probe_table();  \
  }

ADAMCPP_DECLARE_PROBES(baseline)
ADAMCPP_DECLARE_PROBES(avx2)
ADAMCPP_DECLARE_PROBES(avx512)
ADAMCPP_DECLARE_PROBES(generic)
#undef ADAMCPP_DECLARE_PROBES

}  // namespace adamcpp
