// adamcpp: the benchmark's measuring loops, compiled per ISA target like the
// kernels but kept out of the production kernel table.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/optim_types.h"

namespace adamcpp {

// The simplest fused Adam loop over one float32 buffer set, one
// `omp parallel for simd`: the benchmark's practical bandwidth ceiling.
using CeilingAdamFn = void (*)(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, std::size_t n,
                               float step_size, float bias_correction2_sqrt, int num_threads);

// STREAM triad a[i] = b[i] + s * c[i], one `omp parallel for simd`.
using TriadFn = void (*)(double* a, const double* b, const double* c, std::size_t n, double s, int num_threads);

// The same simplest loop for a compact layout (FusedLayout of kernels.h:
// bfloat16 state; float32 or bfloat16 parameter and gradient; a float32 master
// copy for bf16_master), with adamcpp's numerics for that layout: the compact
// arithmetic (one division) and bfloat16 rounding of the state (and of a
// bfloat16 parameter without master) stochastically with the generator under
// `key` (mode 1), or with fixed bits instead of the generator (mode 2: the
// loop without the generator's cost).
using CeilingCompactFn = void (*)(int layout, int mode, void* param, const void* grad, std::uint16_t* exp_avg,
                                  std::uint16_t* exp_avg_sq, float* master, std::size_t n, float step_size,
                                  float inv_bias_correction2_sqrt, std::uint32_t key, int num_threads);

// The bytes of a step with a float32 parameter and nothing else: param,
// exp_avg and exp_avg_sq read and written, grad read, one addition per array
// (no division, square root or generator). `state` is float32 (28 bytes per
// element) or bfloat16 (20 bytes): the pair bounds what any step of those
// layouts can reach on the machine.
using TrafficFn = void (*)(float* param, const float* grad, void* exp_avg, void* exp_avg_sq, DType state, std::size_t n,
                           int num_threads);

// The kernels' conversions over arrays, for the tests: float32 -> float16 or
// bfloat16 (`format`), to nearest or stochastically with the generator under
// `key` (element k takes random_bits(k, key)), and 16-bit -> float32.
using NarrowFn = void (*)(const float* src, std::uint16_t* dst, std::size_t n, DType format, Rounding rounding,
                          std::uint32_t key);
using WidenFn = void (*)(const std::uint16_t* src, float* dst, std::size_t n, DType format);

struct ProbeTable {
  const char* name;
  CeilingAdamFn ceiling_adam;
  CeilingCompactFn ceiling_compact;
  TriadFn triad;
  TrafficFn traffic;
  NarrowFn narrow;
  WidenFn widen;
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
