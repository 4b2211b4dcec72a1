"""Every compiled SIMD target this CPU supports gives bitwise-identical results,
equal to the bit-exact emulation of the documented operation order.

The kernels are compiled with -ffp-contract=off, so the vector body and the
scalar tail of every target round exactly like the scalar emulation; sizes
0, 1, 7, 15, 16, 17, 97, 4099 and ~1e6 hit empty input, pure tails, one
vector plus a tail, exact vector multiples (8 floats / 4 doubles in AVX2,
16 / 8 in AVX-512) and the chunked multi-threaded path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import adamcpp
from adamcpp import _core

from conftest import SIMD_SUPPORTED, assert_bitwise_equal, using_simd
from reference import emulated_step, run_trajectory

SIZES = [0, 1, 7, 15, 16, 17, 97, 4099, 1_000_003]
DTYPES = [np.float32, np.float64]

# (hyperparameters, grad_scale)
VARIANTS = {
    "adam": (dict(lr=1e-2), 1.0),
    "adamw-amsgrad-keras-maximize": (
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, eps_style="keras",
             maximize=True, eps=1e-3),
        1.0,
    ),
    "l2-amsgrad-scaled": (dict(lr=3e-3, beta1=0.8, beta2=0.99, weight_decay=0.05, amsgrad=True, eps=1e-6), 0.37),
}


def _inputs(rng, n, dtype, steps):
    p = rng.uniform(-1, 1, n).astype(dtype)
    grads = [rng.normal(0, 1, n).astype(dtype) for _ in range(steps)]
    return p, grads


def _run_functional(p0, grads, hyper, grad_scale):
    """Runs the steps through adamcpp.functional.adam on copies; returns the
    final (p, m, v, vmax)."""
    p = p0.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    vmax = np.zeros_like(p) if hyper.get("amsgrad") else None
    for k, g in enumerate(grads, start=1):
        adamcpp.functional.adam(p, g, m, v, step=k, max_exp_avg_sqs=vmax, grad_scale=grad_scale, **hyper)
    return p, m, v, vmax


def _emulate(p0, grads, hyper, grad_scale):
    emu = run_trajectory(p0, grads, mode="emulate", grad_scale=grad_scale, **hyper)
    return emu.p, emu.m, emu.v, emu.vmax


def _assert_same(got, want, what):
    for name, a, b in zip(("p", "m", "v", "vmax"), got, want):
        if b is None:
            assert a is None
        else:
            assert_bitwise_equal(a, b, f"{what} {name}")


def test_build_info_simd_consistent():
    info = adamcpp.build_info()
    assert set(info["simd_supported"]) <= set(info["simd_targets"])
    assert info["simd"] in info["simd_supported"]
    assert info["simd"] == _core.simd()
    assert SIMD_SUPPORTED, "at least one compiled target must run on this CPU"


# ---------------------------------------------------------------------------
# (a) in-process: every target, every tail size, against the emulation
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("n", SIZES)
def test_targets_bitwise_identical(rng, n, dtype):
    steps = 2 if n > 100_000 else 3
    p0, grads = _inputs(rng, n, dtype, steps)
    for vname, (hyper, grad_scale) in VARIANTS.items():
        expected = _emulate(p0, grads, hyper, grad_scale)
        first = None
        for target in SIMD_SUPPORTED:
            with using_simd(target):
                assert _core.simd() == target
                got = _run_functional(p0, grads, hyper, grad_scale)
            _assert_same(got, expected, f"{vname} n={n} [{target}] vs emulation:")
            if first is None:
                first = (target, got)
            else:
                _assert_same(got, first[1], f"{vname} n={n} [{target}] vs [{first[0]}]:")


@pytest.mark.parametrize("target", SIMD_SUPPORTED)
def test_targets_multi_tensor_mixed_dtypes(rng, target):
    """All tail sizes in one call, float32 and float64 alternating, one step
    count per tensor."""
    sizes = [s for s in SIZES if s < 100_000]
    dtypes = [DTYPES[i % 2] for i in range(len(sizes))]
    hyper, grad_scale = VARIANTS["adamw-amsgrad-keras-maximize"]
    data = [_inputs(rng, n, d, 3) for n, d in zip(sizes, dtypes)]
    ps = [p.copy() for p, _ in data]
    ms, vs, vmaxs = ([np.zeros_like(p) for p in ps] for _ in range(3))
    with using_simd(target):
        for k in range(3):
            adamcpp.functional.adam(ps, [g[k] for _, g in data], ms, vs, step=[k + 1 + i for i in range(len(ps))],
                                    max_exp_avg_sqs=vmaxs, grad_scale=grad_scale, **hyper)
    for i, (p0, grads) in enumerate(data):
        p, m, v, vmax = p0.copy(), np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
        for k in range(3):
            p, m, v, vmax = emulated_step(p, grads[k], m, v, vmax, step=k + 1 + i, grad_scale=grad_scale, **hyper)
        _assert_same((ps[i], ms[i], vs[i], vmaxs[i]), (p, m, v, vmax), f"tensor {i} (n={sizes[i]}) [{target}]")


def test_select_simd_rejects_bad_names_and_keeps_target():
    before = _core.simd()
    with pytest.raises((ValueError, RuntimeError), match="bogus"):
        _core.select_simd("bogus")
    assert _core.simd() == before
    unsupported = [t for t in adamcpp.build_info()["simd_targets"] if t not in SIMD_SUPPORTED]
    for t in unsupported:
        with pytest.raises((ValueError, RuntimeError), match="not supported by this CPU"):
            _core.select_simd(t)
        assert _core.simd() == before


# ---------------------------------------------------------------------------
# (b) ADAMCPP_SIMD=<target> in a fresh interpreter
# ---------------------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import adamcpp

    target, folder = sys.argv[1], sys.argv[2]
    chosen = adamcpp.build_info()["simd"]
    assert chosen == target, f"build_info()['simd'] is {chosen!r}, expected {target!r}"
    hyper = json.loads(sys.argv[3])
    grad_scale = float(sys.argv[4])
    for tag in ("f32", "f64"):
        p = np.load(f"{folder}/{tag}_p.npy")
        grads = np.load(f"{folder}/{tag}_grads.npy")
        m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
        for k in range(len(grads)):
            adamcpp.functional.adam(p, grads[k], m, v, step=k + 1, max_exp_avg_sqs=vmax,
                                    grad_scale=grad_scale, **hyper)
        for name, a in (("p", p), ("m", m), ("v", v), ("vmax", vmax)):
            np.save(f"{folder}/{tag}_out_{name}.npy", a)
    """
)


def _python(code_args, env_simd, cwd):
    env = dict(os.environ)
    env["ADAMCPP_SIMD"] = env_simd
    return subprocess.run([sys.executable, *code_args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("target", SIMD_SUPPORTED)
def test_env_forced_target_in_subprocess(tmp_path, rng, target):
    hyper, grad_scale = VARIANTS["l2-amsgrad-scaled"]
    inputs = {}
    for tag, dtype in (("f32", np.float32), ("f64", np.float64)):
        p0, grads = _inputs(rng, 4099, dtype, 3)
        np.save(tmp_path / f"{tag}_p.npy", p0)
        np.save(tmp_path / f"{tag}_grads.npy", np.stack(grads))
        inputs[tag] = (p0, grads)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    res = _python([str(script), target, str(tmp_path), json.dumps(hyper), repr(grad_scale)], target, tmp_path)
    assert res.returncode == 0, f"child with ADAMCPP_SIMD={target} failed:\n{res.stderr}"
    for tag, (p0, grads) in inputs.items():
        with using_simd(target):
            expected = _run_functional(p0, grads, hyper, grad_scale)
        got = tuple(np.load(tmp_path / f"{tag}_out_{name}.npy") for name in ("p", "m", "v", "vmax"))
        _assert_same(got, expected, f"ADAMCPP_SIMD={target} subprocess {tag} vs in-process")


# ---------------------------------------------------------------------------
# (c) bad ADAMCPP_SIMD values fail the import
# ---------------------------------------------------------------------------
def test_env_unknown_target_fails_import(tmp_path):
    res = _python(["-c", "import adamcpp"], "bogus", tmp_path)
    assert res.returncode != 0
    assert "bogus" in res.stderr


_UNSUPPORTED = [t for t in adamcpp.build_info()["simd_targets"] if t not in SIMD_SUPPORTED]


@pytest.mark.skipif(not _UNSUPPORTED, reason="every compiled SIMD target runs on this CPU")
def test_env_unsupported_target_fails_import(tmp_path):
    target = _UNSUPPORTED[-1]
    res = _python(["-c", "import adamcpp"], target, tmp_path)
    assert res.returncode != 0
    assert "not supported by this CPU" in res.stderr
    assert target in res.stderr
