"""cpp/core/optim_math.h (per element: the updates, the 16-bit conversions, the
stochastic-rounding generator) and cpp/core/step_scalars.h (per step, on the host)
are the arithmetic a CUDA unit shares with the CPU kernels.

Without a GPU here, this proves what can be proven: nvcc compiles the header's
update functions into __global__ kernels (device code, --fmad=false so no
contraction changes results), and the same functions compiled by nvcc for the
host reproduce adamcpp's CPU results bit for bit."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import adamcpp
from conftest import source_tree

CPP = pathlib.Path(__file__).resolve().parents[1] / "cpp"
NVCC = shutil.which("nvcc")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc is not installed"),
    pytest.mark.skipif(source_tree("cpp") is None, reason="needs the source tree's cpp/ (tests run against an installed package)"),
]

SOURCE = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "core/optim_math.h"
#include "core/step_scalars.h"
using namespace adamcpp;

template <typename T, WeightDecay WD, bool A, EpsStyle E>
__global__ void adam_kernel(T* p, const T* g, T* m, T* v, T* vmax, int n, AdamScalars<T> s) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) portable::adam_element<T, WD, A, E>(p[i], g[i], m[i], v[i], A ? &vmax[i] : nullptr, s);
}
template __global__ void adam_kernel<float, WeightDecay::decoupled, true, EpsStyle::torch>(
    float*, const float*, float*, float*, float*, int, AdamScalars<float>);

// The compact-state step: bfloat16 moments read, updated in float32 with the
// compact arithmetic and rounded stochastically with the counter-based generator.
__global__ void bf16_state_kernel(float* p, const float* g, unsigned short* m, unsigned short* v, int n,
                                  AdamScalars<float> s, unsigned key) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float mm = portable::float_from_bf16(m[i]), vv = portable::float_from_bf16(v[i]), unused = 0.f;
  portable::adam_element<float, WeightDecay::none, false, EpsStyle::torch, true>(p[i], g[i], mm, vv, &unused, s);
  const unsigned r = portable::random_bits((unsigned)i, key);
  m[i] = portable::bf16_stochastic(mm, r);
  v[i] = portable::bf16_stochastic(vv, r >> 16);
}

__global__ void sgd_kernel(float* p, const float* g, float* b, int n, SgdScalars<float> s) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) portable::sgd_element<float, true, Momentum::nesterov, false>(p[i], g[i], &b[i], s);
}

// Host run of the same functions: AdamW + amsgrad, float32, `steps` steps.
int main(int argc, char** argv) {
  const int n = 4099, steps = 5;
  std::vector<float> p(n), m(n, 0.f), v(n, 0.f), vmax(n, 0.f), g((size_t)n * steps);
  std::vector<float> p0;
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(p.data(), 4, n, f) != (size_t)n || std::fread(g.data(), 4, g.size(), f) != g.size()) return 2;
  std::fclose(f);
  p0 = p;
  // The per-step host math of the CPU path (step_scalars.h), compiled by nvcc.
  const AdamHyper h{1e-2, 0.9, 0.999, 1e-8, 1e-2, true, true, false, EpsStyle::torch};
  BiasCorrections bc;
  for (int t = 1; t <= steps; ++t) {
    AdamTensor tensor{};
    set_adam_step(tensor, h, t, 1.0, bc);
    const AdamScalars<float> s = portable::adam_scalars<float>(tensor.scalars, tensor.grad_scale);
    for (int i = 0; i < n; ++i)
      portable::adam_element<float, WeightDecay::decoupled, true, EpsStyle::torch>(
          p[i], g[(size_t)(t - 1) * n + i], m[i], v[i], &vmax[i], s);
  }
  f = std::fopen(argv[2], "wb");
  std::fwrite(p.data(), 4, n, f);
  // The same run with bfloat16 state rounded stochastically (the compact form), keyed like tensor 0 of an
  // optimizer with seed 11; the parameter again float32.
  std::vector<float> q(p0.begin(), p0.end());
  std::vector<unsigned short> mb(n, 0), vb(n, 0);
  const AdamHyper hb{1e-2, 0.9, 0.999, 1e-8, 0.0, false, false, false, EpsStyle::torch};
  BiasCorrections bcb;
  for (int t = 1; t <= steps; ++t) {
    AdamTensor tensor{};
    set_adam_step(tensor, hb, t, 1.0, bcb);
    const AdamScalars<float> s = portable::adam_scalars<float>(tensor.scalars, tensor.grad_scale);
    const unsigned key = static_cast<unsigned>(rounding_key(11, t, 0));
    for (int i = 0; i < n; ++i) {
      float mm = portable::float_from_bf16(mb[i]), vv = portable::float_from_bf16(vb[i]), unused = 0.f;
      portable::adam_element<float, WeightDecay::none, false, EpsStyle::torch, true>(
          q[i], g[(size_t)(t - 1) * n + i], mm, vv, &unused, s);
      const unsigned r = portable::random_bits((unsigned)i, key);
      mb[i] = portable::bf16_stochastic(mm, r);
      vb[i] = portable::bf16_stochastic(vv, r >> 16);
    }
  }
  std::fwrite(q.data(), 4, n, f);
  std::fwrite(mb.data(), 2, n, f);
  std::fwrite(vb.data(), 2, n, f);
  std::fclose(f);
  return 0;
}
"""


def test_header_compiles_for_the_gpu_and_matches_the_cpu_on_the_host(tmp_path):
    src = tmp_path / "shared_math.cu"
    src.write_text(SOURCE)
    exe = tmp_path / "shared_math"
    subprocess.run(
        [NVCC, "-std=c++17", "--fmad=false", "-Xcompiler", "-ffp-contract=off,-fno-fast-math",
         f"-I{CPP}", str(src), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )
    rng = np.random.default_rng(3)
    n, steps = 4099, 5
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = rng.standard_normal((steps, n)).astype(np.float32)
    (tmp_path / "in.bin").write_bytes(p0.tobytes() + grads.tobytes())
    subprocess.run([str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], check=True)
    out = (tmp_path / "out.bin").read_bytes()
    host = np.frombuffer(out[: 4 * n], dtype=np.float32)

    p = p0.copy()
    opt = adamcpp.AdamW([p], lr=1e-2, weight_decay=1e-2, amsgrad=True)
    for g in grads:
        opt.step([g.copy()])
    np.testing.assert_array_equal(host.view(np.uint32), p.view(np.uint32))

    # bfloat16 state, stochastic rounding: the nvcc-built host code against the CPU kernels
    q = p0.copy()
    opt_b = adamcpp.Adam([q], lr=1e-2, state_dtype="bfloat16", seed=11)
    for g in grads:
        opt_b.step([g.copy()])
    host_q = np.frombuffer(out[4 * n : 8 * n], dtype=np.float32)
    host_m = np.frombuffer(out[8 * n : 10 * n], dtype=np.uint16)
    host_v = np.frombuffer(out[10 * n : 12 * n], dtype=np.uint16)
    np.testing.assert_array_equal(host_q.view(np.uint32), q.view(np.uint32))
    np.testing.assert_array_equal(host_m, opt_b.state[0]["exp_avg"].view(np.uint16))
    np.testing.assert_array_equal(host_v, opt_b.state[0]["exp_avg_sq"].view(np.uint16))
