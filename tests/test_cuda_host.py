"""The CUDA unit's step, run on the host, against the CPU optimizer, bit for bit.

cpp/cuda/host_emulator.cu compiles the unit's own code for the host: the
descriptor table (launch_plan.h), the kernel order (step_runner.h) and every
kernel's thread function (step_kernels.cuh), called for every block and thread
in turn over NumPy memory. Without a GPU this proves everything but the device
itself: the table and its layout, the block-to-tensor and chunk-to-piece
mappings, the vector and scalar paths and their tails, the norm's summation
order, the clipping and non-finite decisions, and one update launch per variant
group. The element math is optim_math.h, shared with the CPU kernels, compiled
with --fmad=false; tests/test_cuda_gpu.py checks the same on a device.

Needs nvcc (skipped without it); the library is built once per session.
"""

from __future__ import annotations

import ctypes
import pathlib
import re
import shutil
import subprocess
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from conftest import assert_bitwise_equal, source_tree
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adamcpp

ROOT = pathlib.Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not installed"),
    pytest.mark.skipif(source_tree("cpp") is None, reason="needs the source tree's cpp/ (tests run against an installed package)"),
]

# Sizes around every boundary: the 4-element vector groups, the 4096-element blocks, the 8192-element
# norm chunks.
SIZES = (0, 1, 3, 4, 5, 7, 8, 97, 1023, 4095, 4096, 4097, 8191, 8192, 8193, 16385, 70001)
POLICIES = {"propagate": 0, "skip": 1, "raise": 2}


class EmuTensor(ctypes.Structure):
    _fields_ = [
        ("param", ctypes.c_void_p),
        ("grad", ctypes.c_void_p),
        ("state0", ctypes.c_void_p),
        ("state1", ctypes.c_void_p),
        ("state2", ctypes.c_void_p),
        ("numel", ctypes.c_uint64),
        ("dtype", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("step", ctypes.c_int64),
        ("first", ctypes.c_int32),
        ("unused", ctypes.c_int32),
    ]


class EmuAdamGroup(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in ("lr", "beta1", "beta2", "eps", "weight_decay")] + [
        (n, ctypes.c_int32) for n in ("decoupled", "amsgrad", "maximize", "eps_style")
    ]


class EmuSgdGroup(ctypes.Structure):
    _fields_ = [(n, ctypes.c_double) for n in ("lr", "momentum", "dampening", "weight_decay")] + [
        (n, ctypes.c_int32) for n in ("nesterov", "maximize")
    ]


class EmuResult(ctypes.Structure):
    _fields_ = [
        ("applied", ctypes.c_int32),
        ("norm_pending", ctypes.c_int32),
        ("nonfinite_tensor", ctypes.c_int64),
        ("grad_norm", ctypes.c_double),
        ("uploads", ctypes.c_int32),
        ("norm_launches", ctypes.c_int32),
        ("check_launches", ctypes.c_int32),
        ("update_launches", ctypes.c_int32),
    ]


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> ctypes.CDLL:
    out = tmp_path_factory.mktemp("cuda_host") / "host_emulator.so"
    subprocess.run(
        [NVCC, "-std=c++17", "--fmad=false", "-O2", "-shared", "-Xcompiler", "-fPIC,-ffp-contract=off,-fno-fast-math",
         f"-I{ROOT / 'cpp'}", str(ROOT / "cpp" / "cuda" / "host_emulator.cu"), "-o", str(out)],
        check=True, capture_output=True, text=True,
    )
    lib = ctypes.CDLL(str(out))
    for name, group in (("emulate_adam", EmuAdamGroup), ("emulate_sgd", EmuSgdGroup)):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.POINTER(EmuTensor), ctypes.c_uint64, ctypes.POINTER(group), ctypes.c_double,
                       ctypes.c_int32, ctypes.c_double, ctypes.POINTER(EmuResult)]
        fn.restype = ctypes.c_int
    lib.emulate_norm.argtypes = [ctypes.POINTER(EmuTensor), ctypes.c_uint64]
    lib.emulate_norm.restype = ctypes.c_double
    return lib


def buffer(n: int, dtype: Any, misaligned: bool, fill: Optional[np.ndarray] = None) -> np.ndarray:
    """An n-element array, 16-byte aligned or deliberately not (one element in: the scalar path)."""
    base = np.zeros(n + 4, dtype)
    a = base[1 : n + 1] if misaligned else base[:n]
    if fill is not None:
        a[...] = fill
    return a


def ptr(a: Optional[np.ndarray]) -> Optional[int]:
    return None if a is None else a.ctypes.data


def same_float(a: float, b: float) -> bool:
    return np.array(a).view(np.uint64) == np.array(b).view(np.uint64)


def raised_index(err: BaseException) -> int:
    m = re.match(r"grads\[(\d+)\]", str(err))
    assert m, str(err)
    return int(m.group(1))


# ------------------------------------------------------------------- Adam

class AdamRun:
    """One problem stepped twice: by adamcpp.Adam on the CPU, and by the CUDA unit's code on the host."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[Any], group_of: Sequence[int],
                 groups: Sequence[Dict[str, Any]], misaligned: Sequence[bool], nonfinite: str,
                 max_grad_norm: Optional[float], seed: int):
        self.rng = np.random.default_rng(seed)
        self.sizes, self.dtypes, self.group_of, self.groups = list(sizes), list(dtypes), list(group_of), list(groups)
        starts = [self.rng.uniform(-1, 1, n) for n in sizes]
        self.cpu_params = [s.astype(d) for s, d in zip(starts, dtypes)]
        cpu_groups = []
        for g, hyper in enumerate(groups):
            members = [p for p, gi in zip(self.cpu_params, group_of) if gi == g]
            cpu_groups.append({"params": members, **hyper})
        self.cpu = adamcpp.Adam(cpu_groups, nonfinite=nonfinite, max_grad_norm=max_grad_norm)
        # The optimizer flattens groups in order: the emulator's tensors follow that order.
        self.order = [i for g in range(len(groups)) for i, gi in enumerate(group_of) if gi == g]
        self.params = [buffer(sizes[i], dtypes[i], misaligned[i], starts[i]) for i in self.order]
        self.m = [buffer(sizes[i], dtypes[i], misaligned[i]) for i in self.order]
        self.v = [buffer(sizes[i], dtypes[i], misaligned[i]) for i in self.order]
        self.vmax = [buffer(sizes[i], dtypes[i], misaligned[i]) for i in self.order]
        self.misaligned = [misaligned[i] for i in self.order]
        self.steps = [0] * len(sizes)
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm

    def gradients(self, poison: float = 0.0) -> List[np.ndarray]:
        grads = [self.rng.standard_normal(self.sizes[i]).astype(self.dtypes[i]) for i in self.order]
        if poison:
            k = int(self.rng.integers(len(grads)))
            if grads[k].size:
                grads[k][self.rng.integers(grads[k].size)] = poison
        return grads

    def step(self, emulator: ctypes.CDLL, grads: List[np.ndarray], grad_scale: float) -> EmuResult:
        gbufs = [buffer(g.size, g.dtype, mis, g) for g, mis in zip(grads, self.misaligned)]
        tensors = (EmuTensor * len(grads))()
        for k, i in enumerate(self.order):
            tensors[k] = EmuTensor(ptr(self.params[k]), ptr(gbufs[k]), ptr(self.m[k]), ptr(self.v[k]),
                                   ptr(self.vmax[k]), self.sizes[i], int(np.dtype(self.dtypes[i]) == np.float64),
                                   self.group_of[i], self.steps[k] + 1, 0, 0)
        groups = (EmuAdamGroup * len(self.groups))()
        for g, h in enumerate(self.groups):
            b1, b2 = h.get("betas", (0.9, 0.999))
            groups[g] = EmuAdamGroup(h.get("lr", 1e-3), b1, b2, h.get("eps", 1e-8), h.get("weight_decay", 0.0),
                                     int(h.get("decoupled_weight_decay", False)), int(h.get("amsgrad", False)),
                                     int(h.get("maximize", False)), int(h.get("eps_style", "torch") == "keras"))
        out = EmuResult()
        max_norm = -1.0 if self.max_grad_norm is None else self.max_grad_norm
        emulator.emulate_adam(tensors, len(grads), groups, grad_scale, POLICIES[self.nonfinite], max_norm,
                              ctypes.byref(out))
        if out.applied:
            self.steps = [s + 1 for s in self.steps]
        return out

    def compare(self, what: str) -> None:
        for k, p in enumerate(self.cpu.param_groups and self.cpu.layout.params):
            assert_bitwise_equal(self.params[k], p, f"{what}: params[{k}]")
            s = self.cpu.state[k]
            assert_bitwise_equal(self.m[k], s["exp_avg"], f"{what}: exp_avg[{k}]")
            assert_bitwise_equal(self.v[k], s["exp_avg_sq"], f"{what}: exp_avg_sq[{k}]")
            if "max_exp_avg_sq" in s:
                assert_bitwise_equal(self.vmax[k], s["max_exp_avg_sq"], f"{what}: max_exp_avg_sq[{k}]")


def run_and_compare(emulator, run: AdamRun, steps: int, grad_scale: float, poison_at: Sequence[int] = (),
                    poison: float = float("nan")) -> None:
    for t in range(steps):
        grads = run.gradients(poison if t in poison_at else 0.0)
        out = run.step(emulator, [g.copy() for g in grads], grad_scale)
        try:
            applied = run.cpu.step([g.copy() for g in grads], grad_scale=grad_scale)
            raised = None
        except FloatingPointError as err:
            applied, raised = False, err
        assert bool(out.applied) == applied, f"step {t}"
        if raised is not None:
            assert out.nonfinite_tensor == raised_index(raised), f"step {t}"
        elif not applied:
            assert out.nonfinite_tensor >= 0
        if run.max_grad_norm is not None and raised is None:  # a step that raises keeps the last norm
            # With "propagate" the norm stays on the device (unless there is no element at all).
            assert out.norm_pending == (run.nonfinite == "propagate" and sum(run.sizes) > 0)
            if not out.norm_pending:
                assert same_float(out.grad_norm, run.cpu.last_grad_norm), (out.grad_norm, run.cpu.last_grad_norm)
        run.compare(f"step {t}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("misaligned", [False, True], ids=["vector", "scalar"])
def test_adam_every_tail(emulator, dtype, size, misaligned):
    run = AdamRun([size, 33], [dtype, dtype], [0, 0], [{"lr": 1e-2, "weight_decay": 0.1}], [misaligned, False],
                  "propagate", None, seed=size)
    run_and_compare(emulator, run, steps=3, grad_scale=0.5)


VARIANTS = [
    {"lr": 1e-2},
    {"lr": 1e-2, "weight_decay": 0.1},
    {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True},
    {"lr": 1e-2, "amsgrad": True, "eps_style": "keras", "betas": (0.8, 0.95), "eps": 1e-3},
    {"lr": 3e-3, "maximize": True, "weight_decay": 0.05, "decoupled_weight_decay": True, "amsgrad": True},
    {"lr": 1e-3, "eps_style": "keras", "weight_decay": 0.2},
]


def test_adam_every_variant_in_one_step_one_launch_each(emulator):
    # Twelve tensors over six groups (every variant, both dtypes): one upload, one update launch per
    # (dtype, variant) present, whatever the number of tensors.
    sizes = [5, 8192, 97, 3, 16385, 1, 4099, 0, 70001, 12, 4, 8193]
    dtypes = [np.float32, np.float64] * 6
    group_of = [k % 6 for k in range(12)]
    run = AdamRun(sizes, dtypes, group_of, VARIANTS, [k % 3 == 0 for k in range(12)], "propagate", None, 7)
    keys = {(g, d) for g, d, n in zip(group_of, dtypes, sizes) if n}
    for t in range(4):
        grads = run.gradients()
        out = run.step(emulator, [g.copy() for g in grads], 0.75)
        run.cpu.step([g.copy() for g in grads], grad_scale=0.75)
        assert (out.uploads, out.update_launches, out.norm_launches, out.check_launches) == (1, len(keys), 0, 0)
        run.compare(f"step {t}")


@pytest.mark.parametrize("nonfinite", ["propagate", "skip", "raise"])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5, 1e6], ids=["no_clip", "clip", "loose"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_adam_nonfinite_and_clipping(emulator, nonfinite, max_grad_norm, poison):
    sizes = [70001, 3, 8193, 97]
    run = AdamRun(sizes, [np.float32, np.float64, np.float32, np.float64], [0, 1, 0, 1], VARIANTS[1:3],
                  [False, True, False, False], nonfinite, max_grad_norm, seed=11)
    run_and_compare(emulator, run, steps=5, grad_scale=1.5, poison_at=(1, 3), poison=poison)


@pytest.mark.parametrize("grad_scale", [1e30, 1e-40, -2.0, 0.0], ids=["huge", "tiny", "negative", "zero"])
@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
def test_adam_scales_at_the_edges(emulator, grad_scale, nonfinite):
    # A float32 multiplier beyond float32 (Inf after rounding), below its subnormals (0), negative, zero;
    # with clipping, where the norm decides whether the non-finite check can be skipped.
    run = AdamRun([8200, 5], [np.float32, np.float64], [0, 0], [{"lr": 1e-2}], [False, False], nonfinite, 1.0, 3)
    run_and_compare(emulator, run, steps=2, grad_scale=grad_scale)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    count=st.integers(1, 6),
    nonfinite=st.sampled_from(["propagate", "skip", "raise"]),
    clip=st.sampled_from([None, 0.1, 10.0]),
    grad_scale=st.sampled_from([1.0, 0.25, -3.0]),
)
def test_adam_random_problems(emulator, data, count, nonfinite, clip, grad_scale):
    sizes = data.draw(st.lists(st.sampled_from(SIZES[:-1] + (20000,)), min_size=count, max_size=count))
    dtypes = data.draw(st.lists(st.sampled_from([np.float32, np.float64]), min_size=count, max_size=count))
    misaligned = data.draw(st.lists(st.booleans(), min_size=count, max_size=count))
    ngroups = data.draw(st.integers(1, min(count, 3)))
    group_of = sorted(data.draw(st.lists(st.integers(0, ngroups - 1), min_size=count, max_size=count)))
    group_of = [g if g in group_of else g for g in group_of]
    used = sorted(set(group_of))
    group_of = [used.index(g) for g in group_of]
    groups = [data.draw(st.sampled_from(VARIANTS)) for _ in used]
    run = AdamRun(sizes, dtypes, group_of, groups, misaligned, nonfinite, clip, seed=data.draw(st.integers(0, 99)))
    poison_at = data.draw(st.sets(st.integers(0, 2), max_size=2))
    run_and_compare(emulator, run, steps=3, grad_scale=grad_scale, poison_at=poison_at)


# -------------------------------------------------------------------- SGD

SGD_VARIANTS = [
    {"lr": 0.1},
    {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "maximize": True},
    {"lr": 0.2, "momentum": 0.5, "weight_decay": 0.1},
]


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_sgd_every_variant(emulator, nonfinite, max_grad_norm):
    rng = np.random.default_rng(5)
    sizes = [70001, 5, 8193, 97, 1, 4096, 0, 33]
    dtypes = [np.float32, np.float64] * 4
    group_of = [0, 1, 2, 3, 0, 1, 2, 3]
    misaligned = [k % 2 == 1 for k in range(8)]
    starts = [rng.uniform(-1, 1, n) for n in sizes]
    cpu_params = [s.astype(d) for s, d in zip(starts, dtypes)]
    cpu = adamcpp.SGD([{"params": [p for p, g in zip(cpu_params, group_of) if g == gi], **h}
                       for gi, h in enumerate(SGD_VARIANTS)], nonfinite=nonfinite, max_grad_norm=max_grad_norm)
    order = [i for g in range(4) for i, gi in enumerate(group_of) if gi == g]
    params = [buffer(sizes[i], dtypes[i], misaligned[i], starts[i]) for i in order]
    bufs = [buffer(sizes[i], dtypes[i], misaligned[i]) for i in order]
    started = [False] * len(sizes)
    groups = (EmuSgdGroup * 4)(*[EmuSgdGroup(h["lr"], h.get("momentum", 0.0), h.get("dampening", 0.0),
                                             h.get("weight_decay", 0.0), int(h.get("nesterov", False)),
                                             int(h.get("maximize", False))) for h in SGD_VARIANTS])
    for t in range(4):
        grads = [rng.standard_normal(sizes[i]).astype(dtypes[i]) for i in order]
        if t == 2:
            grads[0][17] = np.nan
        gbufs = [buffer(g.size, g.dtype, misaligned[i], g) for g, i in zip(grads, order)]
        tensors = (EmuTensor * 8)(*[
            EmuTensor(ptr(params[k]), ptr(gbufs[k]), ptr(bufs[k]), None, None, sizes[i],
                      int(np.dtype(dtypes[i]) == np.float64), group_of[i], 0, int(not started[k]), 0)
            for k, i in enumerate(order)])
        out = EmuResult()
        emulator.emulate_sgd(tensors, 8, groups, 0.5, POLICIES[nonfinite],
                             -1.0 if max_grad_norm is None else max_grad_norm, ctypes.byref(out))
        applied = cpu.step([g.copy() for g in grads], grad_scale=0.5)
        assert bool(out.applied) == applied
        if out.applied:
            started = [True] * 8
        for k in range(8):
            assert_bitwise_equal(params[k], cpu.layout.params[k], f"step {t}: params[{k}]")
            b = cpu.state[k]["momentum_buffer"]
            if b is not None:
                assert_bitwise_equal(bufs[k], b, f"step {t}: momentum_buffer[{k}]")


# ------------------------------------------------------------------- norm

@pytest.mark.parametrize("sizes", [[], [0], [1], [8191, 1, 0, 8192, 3], [70001, 16385], [4] * 1000],
                         ids=["none", "empty", "one", "around_a_chunk", "large", "1000_tensors"])
def test_global_norm_matches_the_cpu(emulator, sizes):
    rng = np.random.default_rng(len(sizes))
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(np.float32 if k % 2 else np.float64)
             for k, n in enumerate(sizes)]
    tensors = (EmuTensor * max(1, len(grads)))()
    for k, g in enumerate(grads):
        tensors[k] = EmuTensor(None, ptr(g), None, None, None, g.size, int(g.dtype == np.float64), 0, 0, 0, 0)
    assert same_float(emulator.emulate_norm(tensors, len(grads)), adamcpp.global_norm(grads))


@pytest.mark.parametrize("seed", range(20))
def test_global_norm_random_problems(emulator, seed):
    # Magnitudes over 12 decades: any change of summation order (lanes, pieces, chunks) changes bits.
    rng = np.random.default_rng(100 + seed)
    sizes = rng.choice([1, 7, 8, 9, 100, 8191, 8192, 8193, 20000], size=int(rng.integers(1, 8)))
    grads = [(rng.standard_normal(n) * 10.0 ** rng.uniform(-6, 6, n)).astype(rng.choice([np.float32, np.float64]))
             for n in sizes]
    tensors = (EmuTensor * len(grads))()
    for k, g in enumerate(grads):
        tensors[k] = EmuTensor(None, ptr(g), None, None, None, g.size, int(g.dtype == np.float64), 0, 0, 0, 0)
    assert same_float(emulator.emulate_norm(tensors, len(grads)), adamcpp.global_norm(grads))


def test_the_norm_of_many_small_tensors_and_one_launch(emulator):
    # 1000 tensors of 256: one upload and one update launch per step (the table, not the kernel arguments,
    # carries the tensors), with clipping: two norm launches.
    sizes = [256] * 1000
    run = AdamRun(sizes, [np.float32] * 1000, [0] * 1000, [{"lr": 1e-3}], [False] * 1000, "skip", 1.0, seed=2)
    grads = run.gradients()
    out = run.step(emulator, [g.copy() for g in grads], 1.0)
    run.cpu.step([g.copy() for g in grads])
    assert (out.uploads, out.update_launches, out.norm_launches) == (1, 1, 2)
    run.compare("1000 tensors")
