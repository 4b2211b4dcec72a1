"""Mixed precision and compact state (docs/api.md, "Mixed precision and compact state").

What is checked, and against what:

1. Conversions: the kernels' float32 -> float16/bfloat16 rounding to nearest
   equals NumPy's / ml_dtypes' astype, and widening equals theirs, on every
   float32 pattern class (zeros, subnormals, normals at every exponent with
   the mantissa patterns around every rounding boundary, the largest values,
   overflow to Inf for float16, Inf, NaN with payloads), on every SIMD target.
   A float16 NaN is compared with adamcpp's rule by the bits (tests/reference.py),
   not with NumPy's cast, which quiets a signalling NaN where it is a hardware
   instruction (NumPy's aarch64 wheels) and keeps it where it is software (x86-64).
   Stochastic rounding equals the documented rule (tests/reference.py) bit for
   bit, with the documented generator.
2. Every layout of parameter, gradient and state equals the bit-exact NumPy
   emulation of the documented arithmetic (reference.emulated_mixed_step) on
   every SIMD target at the tail sizes, through the fused loops and through
   the blocked path alike.
3. A float32 master copy follows exactly the float32 optimizer fed the same
   gradients; the 16-bit parameter is the master rounded to nearest.
4. Gradients of another dtype equal the same step fed the gradient converted
   by NumPy first.
5. Stochastic rounding is unbiased (a bound derived from Hoeffding's
   inequality at fixed seeds), lets a bfloat16 second moment decay where
   rounding to nearest sticks (Azuma's inequality for the deviation), and its
   bits do not depend on threads, chunks, SIMD targets or a save and load.
"""

from __future__ import annotations

import copy
import math
import pickle
from fractions import Fraction

import numpy as np
import pytest

import adamcpp
from adamcpp import _core
from conftest import SIMD_SUPPORTED, assert_bitwise_equal, using_simd
from reference import (
    emulated_mixed_step,
    f16_bits_nearest,
    f16_widened,
    fma32,
    random_bits,
    round_to,
    rounding_key,
    step_scalars,
)

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
F32 = np.dtype(np.float32)
CHUNK = int(adamcpp.build_info()["chunk_elements"])

# Tail sizes: empty, pure tails, one vector of every ISA plus a tail, exact
# multiples (16 uint16 per AVX2 vector, 32 per AVX-512), the blocked path's
# 512-element blocks, and several chunks.
SIZES = [0, 1, 7, 15, 16, 17, 31, 33, 97, 511, 513, 4099, 3 * CHUNK + 5]


def bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def same_bits(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
    diff = bits(a) != bits(b)
    if diff.any():
        k = np.flatnonzero(diff)[:5]
        first = f"at {k}: {a.ravel()[k]} vs {b.ravel()[k]}"
        raise AssertionError(f"{what}: {int(diff.sum())} of {diff.size} differ, {first}")


# ------------------------------------------------------------------ patterns
def float32_patterns(rng: np.random.Generator) -> np.ndarray:
    """Every exponent (subnormals, normals, Inf/NaN) with the mantissa patterns
    that sit on or next to the rounding boundaries of both 16-bit formats
    (10 and 7 kept bits), both signs, plus random bit patterns."""
    mantissas = [0, 1, 2, 0x7FF, 0x800, 0x801, 0xFFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000,
                 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x10000, 0x18000, 0x3FF000, 0x400000, 0x400001,
                 0x7FE000, 0x7FEFFF, 0x7FF000, 0x7FFFFE, 0x7FFFFF]
    exponents = np.arange(256, dtype=np.uint32)
    grid = (exponents[:, None] << np.uint32(23) | np.array(mantissas, dtype=np.uint32)[None, :]).ravel()
    # float16's overflow threshold 65520 and its neighbours, the smallest float16 subnormal's halves
    edges = np.array([0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FE000, 0x33000000, 0x33000001, 0x32FFFFFF,
                      0x387FC000, 0x387FE000, 0x387FF000, 0x38800000], dtype=np.uint32)
    random = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    pat = np.concatenate([grid, edges, random])
    return np.concatenate([pat, pat | np.uint32(0x80000000)]).view(np.float32)


@pytest.mark.parametrize("target", SIMD_SUPPORTED)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_nearest_equals_numpy_cast(rng, target, dtype):
    """NumPy's (float16) and ml_dtypes' (bfloat16) astype, bit for bit, on
    numbers and Inf; a float16 NaN by the bits (reference.f16_bits_nearest:
    sign and payload top kept, a signalling NaN not quieted), which NumPy's
    cast equals on x86-64 but not where it is a hardware instruction (aarch64)."""
    x = float32_patterns(rng)
    got = np.empty(x.size, dtype)
    with using_simd(target):
        _core.narrow(x, got, 0, 0)
    if dtype == F16:
        want = f16_bits_nearest(x).view(F16)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            want = x.astype(dtype)
    same_bits(got, want, f"{dtype} to nearest [{target}]")
    if dtype == F16:  # the pattern set reaches overflow to Inf
        assert np.isinf(got[np.abs(x) >= 65520.0].astype(np.float32)).all()


@pytest.mark.parametrize("target", SIMD_SUPPORTED)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_widening_equals_numpy_cast(target, dtype):
    """Every 16-bit pattern: ml_dtypes' astype for bfloat16; for float16 the
    exact widening by the bits (reference.f16_widened, a signalling NaN kept
    signalling), itself NumPy's astype on every number and Inf."""
    h = np.arange(2**16, dtype=np.uint16).view(dtype)
    got = np.empty(h.size, np.float32)
    with using_simd(target):
        _core.widen(h, got)
    if dtype == F16:
        want = f16_widened(h)
        numbers = (h.view(np.uint16) & np.uint16(0x7FFF)) <= np.uint16(0x7C00)
        same_bits(want[numbers], h[numbers].astype(np.float32), "reference.f16_widened vs NumPy")
    else:
        want = h.astype(np.float32)
    same_bits(got, want, f"{dtype} -> float32 [{target}]")


@pytest.mark.parametrize("target", SIMD_SUPPORTED)
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_stochastic_rounding_is_the_documented_rule(rng, target, dtype):
    x = float32_patterns(rng)
    key = 0x9E3779B9
    got = np.empty(x.size, dtype)
    with using_simd(target):
        _core.narrow(x, got, 1, key)
    want = round_to(x, dtype, True, random_bits(np.arange(x.size), key))
    same_bits(got, want, f"{dtype} stochastic [{target}]")
    # and it only ever picks one of the two neighbours (or keeps an exact value, Inf, NaN)
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(x) & (np.abs(x) < (65504.0 if dtype == F16 else 3.38e38))
        q = np.spacing(np.abs(x).astype(dtype)).astype(np.float64)  # the 16-bit ulp there
    with np.errstate(invalid="ignore"):  # a hardware cast of a signalling NaN (aarch64) raises FE_INVALID
        y = got.astype(np.float64)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    assert (np.abs(y[finite] - x[finite].astype(np.float64)) < 2 * q[finite]).all()


# --------------------------------------------------------------- unbiasedness
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_stochastic_rounding_is_unbiased(dtype):
    """Each value x is rounded K times under K keys: each rounding is the lower
    neighbour d or the upper d + q, up with probability (x - d) / q (exactly,
    for bfloat16 and float16 normals). The mean of K independent roundings
    deviates from x by more than t*q with probability <= 2 exp(-2 K t^2)
    (Hoeffding); with N values, t = sqrt(ln(2 N / 1e-12) / (2 K)) bounds all of
    them at once except with probability 1e-12. At fixed seeds the outcome is
    fixed, so the test is not flaky; rounding to nearest or truncation
    violates the bound by far (fractions 1/8 .. 7/8 of q)."""
    K, per = 256, 200
    rng = np.random.default_rng(11)
    fractions = np.repeat(np.arange(1, 8) / 8.0, per)
    sign = rng.choice([-1.0, 1.0], fractions.size)
    exponent = rng.integers(-10, 10, fractions.size)
    base = (sign * np.ldexp(1.0 + rng.integers(0, 2**6, fractions.size) / 2**6, exponent)).astype(dtype)
    base32 = base.astype(np.float32)
    q = np.spacing(np.abs(base)).astype(np.float64)  # the 16-bit ulp at |base|
    x = (base32.astype(np.float64) + sign * fractions * q).astype(np.float32)
    assert np.array_equal(x.astype(np.float64), base32.astype(np.float64) + sign * fractions * q)  # exact in float32
    total = np.zeros(x.size)
    for k in range(K):
        out = np.empty(x.size, dtype)
        _core.narrow(x, out, 1, int(rounding_key(2024, k + 1, 0) & 0xFFFFFFFF))
        total += out.astype(np.float64)
    mean_error = np.abs(total / K - x.astype(np.float64)) / q
    t = math.sqrt(math.log(2 * x.size / 1e-12) / (2 * K))
    assert mean_error.max() <= t, (mean_error.max(), t)
    # The bound resolves bias: rounding to nearest is off by min(f, 1 - f), 3/8 or 1/2 of q for the fractions
    # 3/8, 1/2 and 5/8; truncation by f, up to 7/8 of q. Either breaks the bound.
    assert t < 3 / 8


def test_random_bits_uniform_across_steps():
    """For one element, the 16-bit halves the generator gives over 2**14
    steps are uniform: each of 16 bins holds 1024 in expectation, and a
    chi-square statistic above 80 (15 degrees of freedom: p < 1e-10) would
    mean they are not."""
    steps = np.arange(1, 2**14 + 1)
    for element in (0, 1, 12345, 2**31 + 7):
        keys = [rounding_key(7, int(s), 3) & 0xFFFFFFFF for s in steps]
        r = np.array([random_bits(np.array([element]), k)[0] for k in keys], dtype=np.uint64)
        for half in (r & 0xFFFF, r >> 16):
            counts = np.bincount((half >> 12).astype(np.int64), minlength=16)
            chi2 = ((counts - 1024.0) ** 2 / 1024.0).sum()
            assert chi2 < 80, (element, chi2)


# ---------------------------------------------------- layouts vs the emulation
# name -> (param dtype, grad dtype, optimizer options, emulation options)
LAYOUTS = {
    "bf16-state": (F32, F32, dict(state_dtype="bfloat16"), dict(state_dtype=BF16)),
    "bf16-state-nearest": (F32, F32, dict(state_dtype="bfloat16", state_rounding="nearest"),
                           dict(state_dtype=BF16, state_rounding="nearest")),
    "bf16-master": (BF16, BF16, dict(state_dtype="bfloat16"), dict(state_dtype=BF16, master=True)),
    "bf16-master-f32state-f32grad": (BF16, F32, dict(), dict(master=True)),
    "bf16": (BF16, BF16, dict(state_dtype="bfloat16", master_weights=False, param_rounding="stochastic"),
             dict(state_dtype=BF16, param_rounding="stochastic")),
    "bf16-nearest": (BF16, BF16, dict(state_dtype="bfloat16", state_rounding="nearest", master_weights=False),
                     dict(state_dtype=BF16, state_rounding="nearest")),
    "f16-master": (F16, F16, dict(), dict(master=True)),
    "f16-stochastic": (F16, F32, dict(master_weights=False, param_rounding="stochastic"),
                       dict(param_rounding="stochastic")),
    "f32-f64grad": (F32, np.dtype(np.float64), dict(), dict()),
    "f32-bf16grad-bf16state": (F32, BF16, dict(state_dtype="bfloat16"), dict(state_dtype=BF16)),
}
VARIANTS = {
    "adam": dict(lr=1e-2),
    "adamw-amsgrad-keras": dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True,
                                eps_style="keras", eps=1e-6),
    "l2-maximize-scaled": dict(lr=3e-3, beta1=0.8, beta2=0.99, weight_decay=0.05, maximize=True),
}


def _optimizer_hyper(h):
    h = dict(h)
    if "beta1" in h:
        h["betas"] = (h.pop("beta1"), h.pop("beta2"))
    return h


def _run_layout(layout, variant, n, steps, seed=5, grad_scale=1.0, tensors=1, rng_seed=0):
    """Runs the layout through the optimizer (tensors of n elements each) and
    through the emulation; returns both (each a list per tensor of (p, m, v, vmax, master))."""
    pd, gd, opt_kw, emu_kw = LAYOUTS[layout]
    hyper = VARIANTS[variant]
    rng = np.random.default_rng(rng_seed)
    p0 = [rng.uniform(-1, 1, n).astype(np.float32) for _ in range(tensors)]
    grads = [[rng.normal(0, 1, n).astype(gd) for _ in range(tensors)] for _ in range(steps)]
    params = [p.astype(pd) for p in p0]
    opt = adamcpp.Adam(params, seed=seed, **opt_kw, **_optimizer_hyper(hyper))
    for gk in grads:
        assert opt.step(gk, grad_scale=grad_scale)
    got = []
    for i, p in enumerate(params):
        s = opt.state[i]
        got.append((p, s["exp_avg"], s["exp_avg_sq"], s.get("max_exp_avg_sq"), s.get("master_param")))
    want = []
    sd = emu_kw.get("state_dtype", F32)
    for i in range(tensors):
        p = p0[i].astype(pd)
        master = p.astype(np.float32) if emu_kw.get("master") else None
        m, v = np.zeros(n, sd), np.zeros(n, sd)
        vmax = np.zeros(n, sd) if hyper.get("amsgrad") else None
        for t, gk in enumerate(grads, start=1):
            p, m, v, vmax, master = emulated_mixed_step(
                p, gk[i], m, v, vmax, step=t, grad_scale=grad_scale, param_dtype=pd, master=master, state_dtype=sd,
                state_rounding=emu_kw.get("state_rounding", "stochastic"),
                param_rounding=emu_kw.get("param_rounding", "nearest"), seed=seed, tensor=i, **hyper)
        want.append((p, m, v, vmax, master))
    return got, want


def _assert_layout(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"), g, w):
            if b is None:
                assert a is None, f"{what}: tensor {i} has an unexpected {name}"
            else:
                same_bits(a, b, f"{what}: tensor {i} {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_equals_emulation(layout, variant):
    got, want = _run_layout(layout, variant, 97, 4, tensors=3, grad_scale=0.75)
    _assert_layout(got, want, f"{layout} {variant}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "blocked"])
@pytest.mark.parametrize("target", SIMD_SUPPORTED)
@pytest.mark.parametrize("layout", ["bf16-state", "bf16-master", "bf16", "f16-master", "f16-stochastic",
                                    "f32-f64grad"])
def test_every_target_at_tail_sizes(layout, target, fused):
    """Each size is one tensor of one call: vector bodies, tails, blocks and chunks."""
    try:
        _core.set_fused_layouts(fused)
        with using_simd(target):
            for n in SIZES:
                got, want = _run_layout(layout, "adam", n, 2, rng_seed=n)
                _assert_layout(got, want, f"{layout} n={n} [{target}, {'fused' if fused else 'blocked'}]")
    finally:
        _core.set_fused_layouts(True)


# ------------------------------------------------------------- master weights
@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("param_dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_master_trajectory_equals_float32_optimizer(param_dtype, variant, state_dtype):
    """A 16-bit parameter with a master copy: the master, m and v are bit for
    bit those of a float32 parameter with the same options fed the same
    gradients (converted to float32), and the parameter is the master rounded
    to nearest after every step."""
    rng = np.random.default_rng(3)
    shapes = [(37,), (5, 9), (4099,)]
    p0 = [rng.uniform(-1, 1, s).astype(np.float32).astype(param_dtype) for s in shapes]
    half = [p.copy() for p in p0]
    full = [p.astype(np.float32) for p in p0]
    hyper = _optimizer_hyper(VARIANTS[variant])
    opt_half = adamcpp.Adam(half, state_dtype=state_dtype, seed=9, **hyper)
    opt_full = adamcpp.Adam(full, state_dtype=state_dtype, seed=9, **hyper)
    for _ in range(20):
        grads = [rng.normal(0, 1, s).astype(param_dtype) for s in shapes]
        opt_half.step(grads)
        opt_full.step([g.astype(np.float32) for g in grads])
        for i in range(len(shapes)):
            sh, sf = opt_half.state[i], opt_full.state[i]
            same_bits(sh["master_param"], full[i], f"master_param of params[{i}]")
            same_bits(half[i], full[i].astype(param_dtype), f"params[{i}] = master rounded to nearest")
            for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if k in sf:
                    same_bits(sh[k], sf[k], f"{k} of params[{i}]")


# ----------------------------------------------------------- gradient dtypes
GRAD_PAIRS = [(F32, F16), (F32, BF16), (F32, np.dtype(np.float64)), (np.dtype(np.float64), F16),
              (np.dtype(np.float64), BF16), (np.dtype(np.float64), F32)]


@pytest.mark.parametrize("param_dtype, grad_dtype", GRAD_PAIRS, ids=[f"{p.name}-{g.name}" for p, g in GRAD_PAIRS])
def test_gradients_of_any_dtype_equal_numpy_converted(param_dtype, grad_dtype):
    """A gradient of another dtype is converted as it is read, exactly as
    NumPy's astype converts it (to nearest for float64 -> float32)."""
    rng = np.random.default_rng(4)
    p0 = [rng.uniform(-1, 1, n).astype(param_dtype) for n in (1, 33, 5000)]
    a, b = [p.copy() for p in p0], [p.copy() for p in p0]
    opt_a = adamcpp.AdamW(a, lr=1e-2, amsgrad=True)
    opt_b = adamcpp.AdamW(b, lr=1e-2, amsgrad=True)
    for _ in range(5):
        grads = [(rng.normal(0, 1, p.shape) * 10.0 ** rng.uniform(-3, 3, p.shape)).astype(grad_dtype) for p in p0]
        opt_a.step(grads, grad_scale=0.5)
        opt_b.step([g.astype(param_dtype) for g in grads], grad_scale=0.5)
    for i in range(len(p0)):
        same_bits(a[i], b[i], f"params[{i}]")
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            same_bits(opt_a.state[i][k], opt_b.state[i][k], f"{k} of params[{i}]")


def test_sgd_gradients_of_any_dtype():
    rng = np.random.default_rng(8)
    p0 = rng.uniform(-1, 1, 3000).astype(np.float32)
    a, b = p0.copy(), p0.copy()
    opt_a = adamcpp.SGD([a], lr=0.1, momentum=0.9, nesterov=True)
    opt_b = adamcpp.SGD([b], lr=0.1, momentum=0.9, nesterov=True)
    for dt in (BF16, F16, np.float64, BF16):
        g = rng.normal(0, 1, 3000).astype(dt)
        opt_a.step([g])
        opt_b.step([g.astype(np.float32)])
    same_bits(a, b, "params")
    same_bits(opt_a.state[0]["momentum_buffer"], opt_b.state[0]["momentum_buffer"], "momentum_buffer")


def test_global_norm_of_16_bit_gradients():
    rng = np.random.default_rng(2)
    grads = [rng.normal(0, 1, 1000).astype(d) for d in (F16, BF16, np.float32, np.float64)]
    want = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert adamcpp.global_norm(grads) == pytest.approx(want, rel=1e-12)


def test_nonfinite_check_sees_conversion_overflow():
    """A finite float64 gradient beyond float32's range is Inf once converted
    for a float32 parameter: "skip" skips the step."""
    p = np.ones(3, np.float32)
    opt = adamcpp.Adam([p], nonfinite="skip")
    assert opt.step([np.array([1.0, 1e300, 1.0])]) is False
    assert (p == 1).all() and opt.state[0]["step"] == 0
    opt_clip = adamcpp.Adam([p], nonfinite="skip", max_grad_norm=1.0)
    assert opt_clip.step([np.array([1.0, 1e300, 1.0])], grad_scale=1e-300) is False


# ------------------------------------------------------- beta2 = 0.999 decay
def test_bfloat16_second_moment_decays_with_stochastic_rounding():
    """v starts at 1e-4 (in bfloat16) and the gradient is a constant 3e-3, so
    exactly v_t = g^2 + (v_0 - g^2) beta2^t -> 4.25e-5 after 1,000 steps.
    Rounded to nearest, beta2 * v differs from v by less than half a bfloat16
    ulp and v never moves. Stochastically, the deviation from the float32
    trajectory is a martingale D = sum_t beta2^(T-t) e_t with |e_t| < q (the
    ulp, at most 2^-21 here); the mean over n elements with independent bits
    deviates by more than lambda with probability <= 2 exp(-lambda^2 n (1 -
    beta2^2) / (2 q^2)) (Azuma). With n = 4096, lambda = 3 q: < 1e-15. The
    float32 trajectory's own rounding is far below q."""
    n, steps, beta2, g = 4096, 1000, 0.999, 3e-3
    v0 = np.float32(1e-4).astype(BF16)
    results = {}
    for rounding in ("nearest", "stochastic"):
        p = np.zeros(n, np.float32)
        opt = adamcpp.Adam([p], lr=0.0, betas=(0.9, beta2), state_dtype="bfloat16", state_rounding=rounding, seed=1)
        opt.state[0]["exp_avg_sq"] = np.full(n, v0, BF16)
        for _ in range(steps):
            opt.step([np.full(n, g, np.float32)])
        results[rounding] = opt.state[0]["exp_avg_sq"].astype(np.float64)
    p = np.zeros(n, np.float32)
    ref = adamcpp.Adam([p], lr=0.0, betas=(0.9, beta2))
    ref.state[0]["exp_avg_sq"] = np.full(n, np.float32(v0), np.float32)
    for _ in range(steps):
        ref.step([np.full(n, g, np.float32)])
    v32 = ref.state[0]["exp_avg_sq"].astype(np.float64)
    exact = g**2 + (float(np.float32(v0)) - g**2) * beta2**steps
    assert abs(v32[0] - exact) < 1e-3 * exact
    q = 2.0**-21  # bfloat16's ulp in [2^-14, 2^-13), above every v of the trajectory
    assert (results["nearest"] == float(np.float32(v0))).all()  # stuck
    assert abs(results["stochastic"].mean() - v32.mean()) <= 3 * q
    assert abs(results["stochastic"].mean() - exact) <= 3 * q + 1e-3 * exact
    # and the bound separates the two: nearest is off by more than 100 q
    assert abs(results["nearest"].mean() - v32.mean()) > 100 * q


# --------------------------------------------- bits independent of execution
def _precision_run(layout, threads, sizes, steps=3):
    pd, gd, opt_kw, _ = LAYOUTS[layout]
    rng = np.random.default_rng(21)
    params = [rng.uniform(-1, 1, n).astype(np.float32).astype(pd) for n in sizes]
    adamcpp.set_num_threads(threads)
    opt = adamcpp.Adam(params, lr=1e-2, seed=3, **opt_kw)
    for _ in range(steps):
        opt.step([rng.normal(0, 1, n).astype(gd) for n in sizes])
    return params, opt


@pytest.mark.parametrize("layout", ["bf16-state", "bf16-master", "bf16", "f16-stochastic", "bf16-nearest"])
def test_bits_independent_of_threads_and_chunks(restore_threads, layout):
    sizes = [1, CHUNK - 1, CHUNK + 1, 7, 3 * CHUNK + 5, 2, CHUNK // 2 + 3, 97]
    runs = [_precision_run(layout, t, sizes) for t in (1, 2, 3)]
    for params, opt in runs[1:]:
        for i in range(len(sizes)):
            same_bits(params[i], runs[0][0][i], f"params[{i}]")
            for k in opt.state[i]:
                if isinstance(opt.state[i][k], np.ndarray):
                    same_bits(opt.state[i][k], runs[0][1].state[i][k], f"{k} of params[{i}]")


@pytest.mark.parametrize("layout", ["bf16-state", "bf16-master", "bf16", "f16-stochastic"])
def test_bits_independent_of_chunk_boundaries(layout):
    """Tensor 1 of a call, after a tensor 0 of 1 or of 5000 elements: its
    chunk boundaries fall elsewhere, its key (seed, step, index 1) is the same."""
    pd, gd, opt_kw, _ = LAYOUTS[layout]
    rng = np.random.default_rng(17)
    p1 = rng.uniform(-1, 1, 3 * CHUNK + 77).astype(np.float32).astype(pd)
    g1 = [rng.normal(0, 1, p1.size).astype(gd) for _ in range(3)]
    out = []
    for lead in (1, 5000):
        params = [np.zeros(lead, pd), p1.copy()]
        opt = adamcpp.Adam(params, lr=1e-2, seed=3, **opt_kw)
        for g in g1:
            opt.step([np.ones(lead, gd), g])
        out.append((params[1], opt.state[1]))
    same_bits(out[0][0], out[1][0], "params[1]")
    for k, v in out[0][1].items():
        if isinstance(v, np.ndarray):
            same_bits(v, out[1][1][k], f"{k} of params[1]")


@pytest.mark.parametrize("layout", ["bf16-state", "bf16-master", "bf16"])
def test_resumed_run_continues_bit_for_bit(tmp_path, layout):
    """state_dict / load_state_dict, pickle, deepcopy and adamcpp.save/load:
    the copy takes the same next steps as the original (the generator's
    position is the seed, a group option, and the step counts)."""
    pd, gd, opt_kw, _ = LAYOUTS[layout]
    rng = np.random.default_rng(6)
    params = [rng.uniform(-1, 1, n).astype(np.float32).astype(pd) for n in (300, 17)]
    opt = adamcpp.Adam(params, lr=1e-2, seed=12345, **opt_kw)
    grads = [[rng.normal(0, 1, p.shape).astype(gd) for p in params] for _ in range(6)]
    for g in grads[:3]:
        opt.step(g)
    sd = opt.state_dict()
    path = tmp_path / "opt.safetensors"
    adamcpp.save(sd, path)
    copies = []
    for how in ("state_dict", "file", "pickle", "deepcopy"):
        if how in ("pickle", "deepcopy"):
            p2, o2 = (pickle.loads(pickle.dumps((params, opt))) if how == "pickle"
                      else copy.deepcopy((params, opt)))
        else:
            p2 = [p.copy() for p in params]
            o2 = adamcpp.Adam(p2, lr=1e-2, **opt_kw)  # another seed: the state dict brings 12345
            o2.load_state_dict(sd if how == "state_dict" else adamcpp.load(path))
            assert o2.param_groups[0]["seed"] == 12345
        copies.append((how, p2, o2))
    for g in grads[3:]:
        opt.step(g)
        for _, _p2, o2 in copies:
            o2.step(g)
    for how, p2, o2 in copies:
        for i in range(len(params)):
            same_bits(p2[i], params[i], f"{how}: params[{i}]")
            for k, v in opt.state[i].items():
                if isinstance(v, np.ndarray):
                    same_bits(o2.state[i][k], v, f"{how}: {k} of params[{i}]")


def test_seed_and_tensor_key_the_bits():
    rng = np.random.default_rng(1)
    p0 = rng.uniform(-1, 1, 1000).astype(np.float32)
    g = rng.normal(0, 1, 1000).astype(np.float32)
    out = {}
    for seed in (0, 1):
        p = p0.copy()
        opt = adamcpp.Adam([p0.copy(), p], state_dtype="bfloat16", seed=seed)
        opt.step([g, g])
        out[seed] = (opt.state[0]["exp_avg_sq"].copy(), opt.state[1]["exp_avg_sq"].copy())
    assert not np.array_equal(bits(out[0][0]), bits(out[1][0]))  # another seed, other bits
    assert not np.array_equal(bits(out[0][0]), bits(out[0][1]))  # another tensor, other bits


# ----------------------------------------------------------- functional API
def test_functional_matches_optimizer_for_every_layout():
    rng = np.random.default_rng(13)
    for layout in ("bf16-state", "bf16-master", "bf16", "f16-stochastic"):
        pd, gd, opt_kw, emu_kw = LAYOUTS[layout]
        p0 = [rng.uniform(-1, 1, n).astype(np.float32).astype(pd) for n in (5, 700)]
        a = [p.copy() for p in p0]
        opt = adamcpp.Adam(a, lr=1e-2, seed=4, **opt_kw)
        b = [p.copy() for p in p0]
        sd = BF16 if opt_kw.get("state_dtype") == "bfloat16" else F32
        ms = [np.zeros(p.shape, sd) for p in b]
        vs = [np.zeros(p.shape, sd) for p in b]
        masters = [p.astype(np.float32) for p in b] if emu_kw.get("master") else None
        kw = {k: v for k, v in opt_kw.items() if k != "master_weights"}
        for t in range(1, 4):
            g = [rng.normal(0, 1, p.shape).astype(gd) for p in p0]
            opt.step(g)
            adamcpp.functional.adam(b, g, ms, vs, step=t, lr=1e-2, seed=4, master_params=masters, **kw)
        for i in range(2):
            same_bits(a[i], b[i], f"{layout}: params[{i}]")
            same_bits(opt.state[i]["exp_avg_sq"], vs[i], f"{layout}: exp_avg_sq[{i}]")
            if masters is not None:
                same_bits(opt.state[i]["master_param"], masters[i], f"{layout}: master_params[{i}]")


# ------------------------------------------------- the compact arithmetic
@pytest.mark.parametrize("eps_style", ["torch", "keras"])
def test_compact_step_within_float64_bound(eps_style):
    """From the same stored state, one bfloat16-state step's parameter against
    the float64 reference: the update uses the unrounded float32 m and v, so
    its error is float32 rounding only. Relative to the update (u32 = 2**-24,
    first order): m = fma(beta1, m, c1*g) with c1 = (1-beta1)*scale rounded on
    the host: 3 u32 (c1, the product, the fma); v = fma(t, t, beta2*v) with
    t = c2*g, c2 = sqrt(1-beta2) rounded: 2*2 u32 through t**2, + beta2*v and
    the fma: 6 u32, halved by the sqrt, + the sqrt itself: 4 u32; the
    denominator fma(sqrt(v), 1/sqrt(bc2), eps): the host scalar and the fma,
    2 u32; the quotient 1 u32; step_size rounded 1 u32: 11 u32 of |update|,
    bounded here by 16 u32, plus u32 |p_new| for the final fma's one rounding;
    2x margin for the first-order model."""
    rng = np.random.default_rng(31)
    n = 20000
    p = rng.uniform(-1, 1, n).astype(np.float32)
    m = (rng.normal(0, 1, n) * 1e-2).astype(BF16)
    v = (np.abs(rng.normal(0, 1, n)) * 1e-4 + 1e-8).astype(BF16)
    g = rng.normal(0, 1, n).astype(np.float32) * np.float32(10.0) ** rng.uniform(-3, 1, n).astype(np.float32)
    t, lr, beta1, beta2, eps = 7, 1e-2, 0.9, 0.999, 1e-6
    pa = p.copy()
    ma, va = m.copy(), v.copy()
    adamcpp.functional.adam(pa, g, ma, va, step=t, lr=lr, eps=eps, eps_style=eps_style, state_dtype="bfloat16")
    p64, m64, v64, g64 = (x.astype(np.float64) for x in (p, m, v, g))
    m1 = beta1 * m64 + (1 - beta1) * g64
    v1 = beta2 * v64 + (1 - beta2) * g64**2
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    if eps_style == "torch":
        update = (lr / bc1) * m1 / (np.sqrt(v1) / math.sqrt(bc2) + eps)
    else:
        update = (lr * math.sqrt(bc2) / bc1) * m1 / (np.sqrt(v1) + eps)
    p_ref = p64 - update
    u = 2.0**-24
    bound = 2 * (16 * u * np.abs(update) + u * np.abs(p_ref))
    err = np.abs(pa.astype(np.float64) - p_ref)
    assert (err <= bound).all(), float((err / bound).max())
    # the stored moments are the float32 ones rounded: within one bfloat16 ulp of the exact values
    for got, exact in ((ma, m1), (va, v1)):
        assert (np.abs(got.astype(np.float64) - exact) <= np.spacing(np.abs(exact).astype(BF16)).astype(np.float64)
                * 1.01 + 1e-30).all()


def _exact_fma32(a: float, b: float, c: float) -> float:
    """a * b + c in exact rational arithmetic, rounded once to float32: the
    float32 nearest to the exact value (ties to even) among the neighbours of
    a first approximation, which is within one float32 ulp of it."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    lo = np.float32(float(exact))
    # the float32 values around the exact result, and the nearest (ties to even)
    candidates = {np.nextafter(lo, np.float32(-np.inf)), lo, np.nextafter(lo, np.float32(np.inf))}
    def key(x):
        return (abs(Fraction(float(x)) - exact), int(np.array(x).view(np.uint32)) & 1)
    return float(min(candidates, key=key))


def test_fma32_emulation_is_correctly_rounded():
    """The reference's float32 fused multiply-add (the compact form's
    emulation) against exact rational arithmetic: random operands over many
    binades, and the cases where summing in float64 then rounding to float32
    rounds twice (a*b + c lands on a float32 tie in float64 while the exact
    value is off it): 1 + 2**-11 + 2**-24 is a tie, and + 2**-80 breaks it."""
    rng = np.random.default_rng(47)
    n = 3000
    a = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    b = (rng.standard_normal(n) * 2.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    c = (rng.standard_normal(n) * 2.0 ** rng.integers(-60, 60, n)).astype(np.float32)
    # near-cancellations: c close to -a*b
    c[: n // 4] = (-(a[: n // 4].astype(np.float64) * b[: n // 4])).astype(np.float32)
    one = np.float32(1 + 2.0**-12)
    tie_cases = [(one, one, np.float32(2.0**-80)), (one, one, np.float32(-(2.0**-80))),
                 (-one, one, np.float32(2.0**-80)), (one, -one, np.float32(-(2.0**-80)))]
    a = np.concatenate([a, [x[0] for x in tie_cases]]).astype(np.float32)
    b = np.concatenate([b, [x[1] for x in tie_cases]]).astype(np.float32)
    c = np.concatenate([c, [x[2] for x in tie_cases]]).astype(np.float32)
    got = fma32(a, b, c)
    want = np.array([_exact_fma32(float(x), float(y), float(z)) for x, y, z in zip(a, b, c)], dtype=np.float32)
    assert_bitwise_equal(got, want)
    # summing in float64 first rounds the tie-breaking cases (+-(tie + 2**-80)) twice, to even, wrongly
    naive = (a[-4:].astype(np.float64) * b[-4:] + c[-4:]).astype(np.float32)
    assert (naive != got[-4:]).tolist() == [True, False, False, True]
    assert got[-4] == np.float32(1 + 2.0**-11 + 2.0**-23) and got[-1] == -got[-4]
    # special values follow a*b + c
    specials = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], dtype=np.float32)
    for x in specials:
        for y in specials:
            for z in specials:
                with np.errstate(all="ignore"):
                    expect = np.float32(np.float64(x) * np.float64(y) + np.float64(z))
                    result = fma32(x, y, z)
                if np.isnan(expect):
                    assert np.isnan(result), (x, y, z, result)
                else:
                    assert_bitwise_equal(result, expect)


def test_step_scalars_include_the_reciprocal():
    s = step_scalars(3, beta2=0.999)
    assert 1.0 / s.bias_correction2_sqrt == pytest.approx(1 / math.sqrt(1 - 0.999**3), rel=1e-15)


# --------------------------------------------------------------- state layout
def test_state_layout_per_group():
    w32 = np.zeros(4, np.float32)
    w16 = np.zeros(4, F16)
    wbf = np.zeros(4, BF16)
    w64 = np.zeros(4)
    opt = adamcpp.Adam([
        {"params": [w32, w16]},
        {"params": [wbf], "state_dtype": "bfloat16"},
        {"params": [w64]},
        {"params": [np.zeros(2, BF16)], "master_weights": False, "param_rounding": "stochastic",
         "state_dtype": "bfloat16"},
    ])
    dtypes = [(s["exp_avg"].dtype, s.get("master_param", np.zeros(0)).dtype if "master_param" in s else None)
              for s in opt.state]
    assert dtypes == [(F32, None), (F32, F32), (BF16, F32), (np.dtype(np.float64), None), (BF16, None)]
    opt.step([np.ones(4, np.float32), np.ones(4, F16), np.ones(4, BF16), np.ones(4), np.ones(2, BF16)])
    assert all(s["step"] == 1 for s in opt.state)
    assert opt.param_groups[1]["state_dtype"] == "bfloat16" and opt.param_groups[0]["seed"] == 0


def test_master_copy_created_when_missing():
    """A master copy that is absent (deleted, or master_weights switched on)
    starts at the parameter's value at the next step."""
    p = np.linspace(-1, 1, 8).astype(BF16)
    opt = adamcpp.Adam([p], master_weights=False)
    assert "master_param" not in opt.state[0]
    opt.param_groups[0]["master_weights"] = True
    before = p.astype(np.float32)
    opt.step([np.ones(8, BF16)])
    master = opt.state[0]["master_param"]
    assert master.dtype == F32 and opt.state[0]["step"] == 1
    q = before.copy()
    ref = adamcpp.Adam([q])
    ref.step([np.ones(8, np.float32)])
    same_bits(master, q, "master started from the parameter")


# master_weights turned off, then on again: each step of the schedule, True = with the master copy.
TOGGLE = [True, False, False, False, False, False, True, True]


def _toggle_problem(dtype):
    rng = np.random.default_rng(21)
    p0 = [rng.uniform(-1, 1, n).astype(dtype) for n in (5, 7, 3)]
    grads = [[rng.normal(0, 1, p.size).astype(dtype) for p in p0] for _ in TOGGLE]
    return p0, grads


def _toggle_emulation(p0, grads, lr):
    """The documented behaviour, emulated: a step without the master copy drops
    it, and the step that turns master_weights on again starts a fresh copy
    from the weights. Returns (p, m, v, master) per tensor."""
    out = []
    for i, p in enumerate(p0):
        m, v, master = np.zeros(p.size, F32), np.zeros(p.size, F32), None
        for t, (on, gk) in enumerate(zip(TOGGLE, grads), start=1):
            if on and master is None:
                master = p.astype(F32)
            if not on:
                master = None
            p, m, v, _, master = emulated_mixed_step(p, gk[i], m, v, step=t, param_dtype=p.dtype, master=master,
                                                     tensor=i, lr=lr)
        out.append((p, m, v, master))
    return out


@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_master_weights_off_then_on_continues_from_the_weights(dtype, mode):
    """master_weights=False for some steps, then True again: the steps without
    the copy drop it (a copy older than its weights is never read back), and
    the step that turns it on again starts a fresh one from the weights; the
    weights continue from where the steps without the copy left them, bit for
    bit as the emulation of that schedule. (A ZeroRedundancyOptimizer has no
    16-bit parameters, so no master copies.)"""
    lr = 0.05
    p0, grads = _toggle_problem(dtype)
    params, opt, step = _adam_in_mode(mode, p0, lr)
    for on, gk in zip(TOGGLE, grads):
        opt.param_groups[0]["master_weights"] = on
        step(gk)
        assert all(("master_param" in s) == on for s in opt.state), "a master copy only where it is current"
    want = _toggle_emulation(p0, grads, lr)
    sd = opt.state_dict()
    for i, (p, m, v, master) in enumerate(want):
        same_bits(params[i], p, f"params[{i}]")
        same_bits(np.ravel(sd["state"][i]["exp_avg"]), m, f"exp_avg of params[{i}]")
        same_bits(np.ravel(sd["state"][i]["exp_avg_sq"]), v, f"exp_avg_sq of params[{i}]")
        same_bits(np.ravel(sd["state"][i]["master_param"]), master, f"master_param of params[{i}]")


def _adam_in_mode(mode, arrays, lr):
    """Adam over copies of `arrays`, as a list ("list") or through one FlatParams ("flat"): (the parameters, the
    optimizer, a function that steps it with a list of gradients and asserts the step applied)."""
    if mode == "flat":
        flat = adamcpp.FlatParams([a.copy() for a in arrays])
        opt = adamcpp.Adam(flat, lr=lr)

        def step(gk):
            for view, g in zip(flat.grads, gk):
                view[...] = g
            assert opt.step(flat.grads)

        return list(flat.params), opt, step
    params = [a.copy() for a in arrays]
    opt = adamcpp.Adam(params, lr=lr)

    def step(gk):
        assert opt.step(gk)

    return params, opt, step


@pytest.mark.parametrize("mode", ["list", "flat"])
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_master_copy_of_a_loaded_group_without_master_weights_is_not_read_back(dtype, mode):
    """A state dict that carries "master_param" for a group whose
    master_weights is False loads without the copy; turned on again later, the
    copy starts from the weights (the same emulated schedule)."""
    lr = 0.05
    p0, grads = _toggle_problem(dtype)
    first = [p.copy() for p in p0]
    opt0 = adamcpp.Adam(first, lr=lr)
    assert opt0.step(grads[0])
    sd = opt0.state_dict()
    assert all("master_param" in s for s in sd["state"].values())
    sd["param_groups"][0]["master_weights"] = False
    params, opt, step = _adam_in_mode(mode, first, lr)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["master_weights"] is False
    assert not any("master_param" in s for s in opt.state)
    for t, (on, gk) in enumerate(zip(TOGGLE, grads)):
        if t == 0:
            continue
        opt.param_groups[0]["master_weights"] = on
        step(gk)
    for i, (p, _m, _v, master) in enumerate(_toggle_emulation(p0, grads, lr)):
        same_bits(params[i], p, f"params[{i}]")
        same_bits(np.ravel(opt.state[i]["master_param"]), master, f"master_param of params[{i}]")


def test_a_refused_or_skipped_step_keeps_the_master_copy():
    """A step that changes nothing (refused, or skipped for a non-finite
    gradient) does not drop the master copy, still as new as the weights: on
    again, the optimizer continues as one that never turned it off."""
    p, twin = np.linspace(-1, 1, 6).astype(BF16), np.linspace(-1, 1, 6).astype(BF16)
    opt = adamcpp.Adam([p], lr=0.05, nonfinite="skip")
    ref = adamcpp.Adam([twin], lr=0.05)
    g1, g2 = np.full(6, 0.5, BF16), np.linspace(-2, 1, 6).astype(BF16)
    assert opt.step([g1]) and ref.step([g1])
    opt.param_groups[0]["master_weights"] = False
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        opt.step([np.ones(5, BF16)])
    assert not opt.step([np.full(6, np.nan, BF16)])
    same_bits(opt.state[0]["master_param"], ref.state[0]["master_param"], "master after steps that changed nothing")
    opt.param_groups[0]["master_weights"] = True
    assert opt.step([g2]) and ref.step([g2])
    same_bits(p, twin, "params[0]")
    same_bits(opt.state[0]["master_param"], ref.state[0]["master_param"], "master_param")


def test_build_info_lists_the_precisions():
    info = adamcpp.build_info()["precisions"]
    assert info["param_dtypes"] == ["float16", "bfloat16", "float32", "float64"]
    assert info["state_dtypes"] == ["float32", "bfloat16"] and info["roundings"] == ["nearest", "stochastic"]
    assert info["bfloat16"] is True


def test_import_and_float16_without_ml_dtypes():
    """ml_dtypes is optional: without it adamcpp imports, float16 parameters
    and gradients work, build_info says bfloat16 is unavailable, and bfloat16
    state is refused with the install command."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['ml_dtypes'] = None\n"
        "import numpy as np, adamcpp\n"
        "assert 'ml_dtypes' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "assert adamcpp.build_info()['precisions']['bfloat16'] is False\n"
        "p = np.ones(5, np.float16)\n"
        "opt = adamcpp.Adam([p], lr=0.1)\n"
        "assert opt.step([np.full(5, 0.5, np.float16)]) and (p < 1).all()\n"
        "try:\n"
        "    adamcpp.Adam([np.ones(2, np.float32)], state_dtype='bfloat16')\n"
        "except ImportError as err:\n"
        "    assert 'pip install ml_dtypes' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('bfloat16 state without ml_dtypes')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
