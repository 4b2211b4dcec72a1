"""adamcpp.global_norm and in-kernel gradient clipping (`max_grad_norm=`).

Contract under test:
  global_norm(grads) = sqrt(sum of squares of every element), accumulated in
  float64 per chunk of the concatenated gradients, then over chunks in order
  (so the same bits at every thread count).

  With max_grad_norm = M and grad_scale = s, a step computes
      norm = |s| * global_norm(grads)                (kept in opt.last_grad_norm)
      coef = min(1, M / (norm + 1e-6))                (torch.nn.utils.clip_grad_norm_)
  and every tensor's gradient multiplier becomes s * coef, formed in float64
  and rounded once to the element type: exactly what a step with
  max_grad_norm=None and grad_scale = s * coef does. The tests therefore
  compare the two runs *bitwise*.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import numpy as np
import pytest

import adamcpp

from conftest import SIMD_SUPPORTED, Snapshot, assert_bitwise_equal, assert_equal_nan_aware, using_simd

INFO = adamcpp.build_info()
CHUNK = int(INFO["chunk_elements"])
PAR_MIN = int(INFO["parallel_min_elements"])
U64 = 2.0 ** -53  # unit roundoff of float64


# ---------------------------------------------------------------------------
# Tolerances for global_norm
# ---------------------------------------------------------------------------
def _numpy_depth(n: int) -> int:
    """Additions a term can pass through in NumPy's sum of n float64 values
    (np.sum of a contiguous array, no axis): pairwise summation over blocks of
    at most 8192 elements (NumPy's reduction buffer), the block results added
    in order. Within a block, pieces of <= 128 elements go to 8 interleaved
    accumulators (<= 15 additions each, a 3-level tree, then <= 7 leftover
    elements added in turn); larger pieces are split in two (the larger part
    has n - (n//2 rounded down to a multiple of 8) elements), one more
    addition per level."""
    levels, m = 0, min(n, 8192)
    while m > 128:
        m -= (m // 2) - (m // 2) % 8
        levels += 1
    return 15 + 3 + 7 + levels + (n + 8191) // 8192


def _library_depth(total: int) -> int:
    """Additions a term can pass through in adamcpp's sum: within one chunk of
    <= CHUNK elements every order (SIMD lanes, then the lanes and the pieces of
    the chunk's tensors) has depth <= 2 * chunk length; then the chunks are
    summed in order."""
    return 2 * min(total, CHUNK) + (total + CHUNK - 1) // CHUNK


def norm_rel_tol(sizes: Sequence[int], *, torch_form: bool = False) -> float:
    """Relative bound on |global_norm - numpy reference|.

    A float64 sum of non-negative terms where each term passes through at most
    d roundings has relative error <= d*u (first order). Squares of float32
    values are exact in float64; of float64 values rounded once (+1). Both
    sums err, so their difference is <= (d_lib + d_ref + 2) u relative; the
    square root halves a relative error and rounds once more on each side
    (+2u). The reference is sum over tensors (in order) of per-tensor NumPy
    sums; in torch's form (norm of the per-tensor norms) each per-tensor norm
    is a square root and is squared again (+3 roundings). 1.01 covers second
    order terms (d*u < 1e-11 here)."""
    total = int(sum(sizes))
    d_lib = _library_depth(total) + 1
    d_ref = max((_numpy_depth(n) for n in sizes), default=0) + len(sizes) + 1 + (3 if torch_form else 0)
    return 1.01 * ((d_lib + d_ref) * U64 / 2 + 2 * U64)


def reference_norm(grads: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.ravel(g).astype(np.float64) ** 2) for g in grads)))


def assert_norm_close(got: float, expected: float, sizes, what: str = "", **kw):
    assert isinstance(got, float), f"{what}: global_norm must return a Python float, got {type(got).__name__}"
    tol = norm_rel_tol(sizes, **kw) * expected
    assert abs(got - expected) <= tol, f"{what}: {got!r} vs {expected!r}: |diff| {abs(got - expected):.3e} > {tol:.3e}"


# ---------------------------------------------------------------------------
# global_norm: values
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n", [0, 1, 7, 4099, 1_000_003])
def test_global_norm_single_tensor(simd_target, n, dtype):
    rng = np.random.default_rng(n + 17)
    g = (rng.normal(size=n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
    expected = reference_norm([g])
    for form in ([g], (g,), g, {"only": g}):
        got = adamcpp.global_norm(form)
        assert_norm_close(got, expected, [n], f"n={n} as {type(form).__name__}")
    if n == 0:
        assert adamcpp.global_norm([g]) == 0.0


def test_global_norm_many_tensors_mixed_dtypes(simd_target):
    rng = np.random.default_rng(5)
    sizes = list(rng.integers(0, 60, 400)) + [CHUNK - 1, 3, CHUNK + 5, 4099]
    shapes = [(int(n),) if k % 3 else (1, int(n), 1) for k, n in enumerate(sizes)]
    grads = [rng.normal(size=s).astype((np.float32, np.float64)[k % 2]) for k, s in enumerate(shapes)]
    expected = reference_norm(grads)
    assert_norm_close(adamcpp.global_norm(grads), expected, sizes, "400+ mixed tensors")
    names = {f"t{k}": g for k, g in enumerate(grads)}
    assert adamcpp.global_norm(names) == adamcpp.global_norm(grads)


def test_global_norm_exact_cases():
    """Integer squares sum exactly in float64 in any order, so the result is
    the correctly rounded sqrt of the exact sum, at every size and split."""
    assert adamcpp.global_norm([np.array([3.0, 4.0])]) == 5.0
    assert adamcpp.global_norm([np.array([3.0], np.float32), np.array([[4.0]])]) == 5.0
    assert adamcpp.global_norm([]) == 0.0
    for n in (1, 7, 4099, CHUNK + 1, 3 * CHUNK + 17):
        g = np.full(n, 3.0, np.float32)
        assert adamcpp.global_norm([g]) == math.sqrt(9.0 * n), n
        parts = np.array_split(np.full(n, -2.0), 5)
        assert adamcpp.global_norm(parts) == math.sqrt(4.0 * n), n
    # Squares accumulate in float64: float32 squares of 1e30 would overflow.
    assert adamcpp.global_norm([np.full(4, 1e30, np.float32)]) == pytest.approx(2e30, rel=1e-7)
    assert adamcpp.global_norm([np.array([1e-30], np.float32)]) == pytest.approx(1e-30, rel=1e-7)


def test_global_norm_nonfinite():
    assert math.isnan(adamcpp.global_norm([np.ones(3), np.array([1.0, np.nan], np.float32)]))
    assert adamcpp.global_norm([np.array([np.inf, 1.0])]) == math.inf
    assert adamcpp.global_norm([np.array([-np.inf], np.float32)]) == math.inf


def test_global_norm_readonly_and_only_reads():
    rng = np.random.default_rng(1)
    grads = [rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=11)]
    copies = [g.copy() for g in grads]
    for g in grads:
        g.setflags(write=False)
    assert adamcpp.global_norm(grads) == adamcpp.global_norm(copies)
    for g, c in zip(grads, copies):
        assert_bitwise_equal(g, c)
    # Gradients may alias each other (they are only read).
    a = rng.normal(size=10)
    assert adamcpp.global_norm([a, a[2:5]]) == adamcpp.global_norm([a, a[2:5].copy()])


# ---------------------------------------------------------------------------
# global_norm: determinism
# ---------------------------------------------------------------------------
def _big_grads(seed=3):
    rng = np.random.default_rng(seed)
    sizes = [1, CHUNK - 1, 7, 3 * CHUNK + 5, 2 * CHUNK + 1, 97]
    assert sum(sizes) >= PAR_MIN
    return [rng.normal(size=n).astype((np.float32, np.float64)[k % 2]) for k, n in enumerate(sizes)], sizes


def test_global_norm_same_bits_at_every_thread_count(restore_threads):
    grads, sizes = _big_grads()
    values = {}
    for threads in (1, 2, 3):
        adamcpp.set_num_threads(threads)
        values[threads] = [adamcpp.global_norm(grads) for _ in range(3)]
    first = values[1][0]
    for threads, vs in values.items():
        for v in vs:
            assert v.hex() == first.hex(), f"{threads} threads: {v.hex()} != {first.hex()}"
    assert_norm_close(first, reference_norm(grads), sizes)


def test_global_norm_repeated_calls_are_identical():
    grads, _ = _big_grads(4)
    first = adamcpp.global_norm(grads)
    assert all(adamcpp.global_norm(grads).hex() == first.hex() for _ in range(20))


# ---------------------------------------------------------------------------
# global_norm: errors
# ---------------------------------------------------------------------------
def _strided():
    return np.zeros(10)[::2]


@pytest.mark.parametrize("grads, exc, fragments", [
    ([np.ones(2), [1.0, 2.0]], TypeError, ["grads[1]", "numpy.ndarray"]),
    ([np.arange(3)], TypeError, ["grads[0]", "dtype", "int64"]),
    ([np.ones(3, np.int32)], TypeError, ["grads[0]", "dtype"]),
    ([np.ones(3, np.complex64)], TypeError, ["grads[0]", "dtype", "complex64"]),
    ([np.ones(3, ">f4")], TypeError, ["grads[0]", "dtype"]),
    ([np.ones(3), _strided()], ValueError, ["grads[1]", "contiguous"]),
    ([np.ones((3, 4)).T], ValueError, ["grads[0]", "contiguous"]),
    ({"w": np.ones(2), "b": np.arange(2)}, TypeError, ["grads['b']", "dtype"]),
    ({"w": _strided()}, ValueError, ["grads['w']", "contiguous"]),
    (5, TypeError, []),
    (None, TypeError, []),
], ids=["list_item", "int64", "int32", "complex64", "big_endian", "strided", "transposed", "dict_int",
        "dict_strided", "int", "none"])
def test_global_norm_errors(grads, exc, fragments):
    with pytest.raises(exc) as info:
        adamcpp.global_norm(grads)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


# ---------------------------------------------------------------------------
# Clipping inside the step
# ---------------------------------------------------------------------------
SHAPES = [(5,), (4099,), (3, 7), (1,)]
DTYPES = [np.float32, np.float64, np.float64, np.float32]

OPTIMIZERS = {
    "adam": lambda ps, **kw: adamcpp.Adam(ps, lr=1e-2, **kw),
    "adam-amsgrad-l2-max": lambda ps, **kw: adamcpp.Adam(ps, lr=1e-2, weight_decay=0.01, amsgrad=True,
                                                          maximize=True, **kw),
    "adamw-keras": lambda ps, **kw: adamcpp.AdamW(ps, lr=1e-2, eps_style="keras", **kw),
    "sgd-momentum-damp": lambda ps, **kw: adamcpp.SGD(ps, lr=1e-2, momentum=0.9, dampening=0.3,
                                                       weight_decay=0.01, **kw),
    "sgd-nesterov-max": lambda ps, **kw: adamcpp.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True, maximize=True,
                                                      **kw),
    "sgd-plain": lambda ps, **kw: adamcpp.SGD(ps, lr=1e-1, **kw),
}


def make_run(seed: int, steps: int):
    """Parameters and gradient lists whose global norm (~64 at factor 1)
    changes from step to step by factors 0.01..3, so a max norm of ~20 clips
    some steps and not others."""
    rng = np.random.default_rng(seed)
    params = [rng.uniform(-1, 1, s).astype(d) for s, d in zip(SHAPES, DTYPES)]
    grads = []
    for k in range(steps):
        factor = (0.01, 1.0, 3.0, 0.3)[k % 4]
        grads.append([(rng.normal(size=s) * factor).astype(d) for s, d in zip(SHAPES, DTYPES)])
    return params, grads


def state_arrays(opt):
    return [(i, k, v) for i, s in enumerate(opt.state) for k, v in sorted(s.items()) if isinstance(v, np.ndarray)]


def assert_same_run(pa, oa, pb, ob, what):
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_bitwise_equal(a, b, f"{what}: params[{i}]")
    sa, sb = state_arrays(oa), state_arrays(ob)
    assert [(i, k) for i, k, _ in sa] == [(i, k) for i, k, _ in sb], f"{what}: state keys"
    for (i, k, a), (_, _, b) in zip(sa, sb):
        assert_bitwise_equal(a, b, f"{what}: state[{i}][{k!r}]")
    assert [s["step"] for s in oa.state] == [s["step"] for s in ob.state]


def clip_coef(norm: float, max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_'s factor: max_norm / (norm + 1e-6), capped at 1."""
    return min(1.0, max_norm / (norm + 1e-6))


@pytest.mark.parametrize("nonfinite", ["propagate", "skip"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37, -2.0], ids=["gs1", "gs0.37", "gs-2"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_clipping_equals_scaling_by_the_coefficient(simd_target, name, grad_scale, nonfinite):
    """max_grad_norm=M with grad_scale=s is bitwise the unclipped step with
    grad_scale = s * coef, coef from |s| * global_norm(grads); and
    last_grad_norm is that norm, to the bit."""
    make = OPTIMIZERS[name]
    params0, grads = make_run(7, 12)
    first_norm = abs(grad_scale) * adamcpp.global_norm(grads[0])
    pa, pb = [p.copy() for p in params0], [p.copy() for p in params0]
    # M == the first step's norm: coef = norm / (norm + 1e-6), just below 1.
    clipped = make(pa, max_grad_norm=first_norm, nonfinite=nonfinite)
    plain = make(pb, nonfinite=nonfinite)
    assert clipped.last_grad_norm is None and plain.last_grad_norm is None
    coefs = []
    for k, gk in enumerate(grads):
        if k == 1:
            clipped.max_grad_norm = 20.0 * abs(grad_scale)  # an edit applies from the next step
        norm = abs(grad_scale) * adamcpp.global_norm(gk)
        coef = clip_coef(norm, clipped.max_grad_norm)
        coefs.append(coef)
        assert clipped.step(gk, grad_scale=grad_scale) is True
        assert plain.step(gk, grad_scale=grad_scale * coef) is True
        assert clipped.last_grad_norm.hex() == norm.hex(), f"step {k + 1}: last_grad_norm"
        assert plain.last_grad_norm is None
        assert_same_run(pa, clipped, pb, plain, f"step {k + 1}")
    assert min(coefs) < 0.5 and coefs.count(1.0) >= 3, coefs  # both regimes were exercised


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_clipping_inactive_below_the_max_norm(name):
    """norm + 1e-6 <= M gives coef exactly 1: bitwise the unclipped run."""
    make = OPTIMIZERS[name]
    params0, grads = make_run(8, 8)
    pa, pb = [p.copy() for p in params0], [p.copy() for p in params0]
    big = 10.0 * max(adamcpp.global_norm(g) for g in grads)
    clipped, plain = make(pa, max_grad_norm=big), make(pb)
    for gk in grads:
        clipped.step(gk, grad_scale=0.5)
        plain.step(gk, grad_scale=0.5)
        assert clipped.last_grad_norm == 0.5 * adamcpp.global_norm(gk)
    assert_same_run(pa, clipped, pb, plain, "inactive clipping")


def np_clip_grad_norm_(grads: List[np.ndarray], max_norm: float,
                       norm_fn: Optional[Callable[[List[np.ndarray]], float]] = None) -> float:
    """torch.nn.utils.clip_grad_norm_'s semantics in NumPy, in place: total
    norm = 2-norm of the per-tensor 2-norms, coef = max_norm / (total + 1e-6)
    clamped to at most 1 (NaN propagates, as torch.clamp does), every gradient
    multiplied by coef in its own dtype. Returns the total norm. `norm_fn`
    replaces the total-norm computation (to feed the exact same bits)."""
    if norm_fn is None:
        per_tensor = np.array([np.sqrt(np.sum(np.ravel(g).astype(np.float64) ** 2)) for g in grads])
        total = float(np.sqrt(np.sum(per_tensor ** 2)))
    else:
        total = float(norm_fn(grads))
    with np.errstate(all="ignore"):
        coef = float(np.minimum(max_norm / (total + 1e-6), 1.0))
        for g in grads:
            g *= g.dtype.type(coef)
    return total


@pytest.mark.parametrize("max_norm", [20.0, 1.0, 0.0, 1e6])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_clipping_matches_clip_grad_norm_semantics(name, max_norm):
    """With grad_scale = 1 the kernel multiplies by T(coef) exactly where
    clip_grad_norm_ would have scaled the gradient: bitwise the unclipped
    optimizer fed with gradients clipped in NumPy (same norm bits); and the
    norm itself agrees with torch's form (norm of per-tensor norms)."""
    make = OPTIMIZERS[name]
    params0, grads = make_run(9, 10)
    pa, pb = [p.copy() for p in params0], [p.copy() for p in params0]
    clipped, plain = make(pa, max_grad_norm=max_norm), make(pb)
    for k, gk in enumerate(grads):
        assert clipped.step(gk)
        torch_total = np_clip_grad_norm_([g.copy() for g in gk], max_norm)
        assert_norm_close(clipped.last_grad_norm, torch_total, [g.size for g in gk], f"step {k + 1}", torch_form=True)
        g_clipped = [g.copy() for g in gk]
        np_clip_grad_norm_(g_clipped, max_norm, norm_fn=adamcpp.global_norm)
        assert plain.step(g_clipped)
        assert_same_run(pa, clipped, pb, plain, f"step {k + 1}")


@pytest.mark.parametrize("make", [
    lambda ps, **kw: adamcpp.SGD(ps, lr=0.1, momentum=0.9, **kw),
    lambda ps, **kw: adamcpp.Adam(ps, lr=0.1, **kw),
], ids=["sgd", "adam"])
def test_max_grad_norm_zero_zeroes_the_gradient(make):
    """coef = 0: every gradient is multiplied by 0 (as clip_grad_norm_ with
    max_norm=0 leaves zero gradients), so a first step changes no parameter
    and starts zero state; the norm is still reported."""
    params0, grads = make_run(10, 1)
    params = [p.copy() for p in params0]
    opt = make(params, max_grad_norm=0.0)
    assert opt.step(grads[0]) is True
    assert opt.last_grad_norm == adamcpp.global_norm(grads[0]) > 0
    for i, (p, p0) in enumerate(zip(params, params0)):
        assert_bitwise_equal(p, p0, f"params[{i}]")
        for k, v in opt.state[i].items():
            if isinstance(v, np.ndarray):
                assert not np.any(v), f"state[{i}][{k!r}] must be zero"


# ---------------------------------------------------------------------------
# Non-finite gradients
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["adam", "sgd-momentum-damp"])
def test_skip_with_clipping(name, bad):
    params0, grads = make_run(11, 3)
    params = [p.copy() for p in params0]
    opt = OPTIMIZERS[name](params, max_grad_norm=1.0, nonfinite="skip")
    assert opt.step(grads[0]) is True
    snap = Snapshot(opt, params)
    g = [x.copy() for x in grads[1]]
    g[3][0] = bad
    assert opt.step(g, grad_scale=0.5) is False
    snap.assert_values_unchanged("skipped step")
    if np.isnan(bad):
        assert math.isnan(opt.last_grad_norm)
    else:
        assert opt.last_grad_norm == math.inf
    assert opt.step(grads[2]) is True
    assert opt.last_grad_norm == adamcpp.global_norm(grads[2])


@pytest.mark.parametrize("name", ["adam", "sgd-momentum-damp"])
def test_raise_with_clipping(name):
    params0, grads = make_run(12, 3)
    params = [p.copy() for p in params0]
    opt = OPTIMIZERS[name](params, max_grad_norm=1.0, nonfinite="raise")
    opt.step(grads[0])
    norm0 = opt.last_grad_norm
    snap = Snapshot(opt, params)
    g = [x.copy() for x in grads[1]]
    g[1][100] = np.nan
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        opt.step(g)
    snap.assert_values_unchanged("refused step")
    assert opt.last_grad_norm == norm0  # nothing changes, the reported norm included


@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("max_grad_norm", [None, 1e39], ids=["unclipped", "clipped-coef1"])
def test_overflow_after_grad_scale_is_nonfinite_with_or_without_clipping(policy, max_grad_norm):
    """A float32 gradient that overflows once multiplied by grad_scale is a
    non-finite gradient for skip/raise ("NaN or Inf after grad_scale"). With
    clipping whose coefficient is 1 the effective multiplier is the same, so
    the verdict must be the same: no parameter may become infinite under
    nonfinite="skip"."""
    p = np.array([0.5, 0.25, 1.0], np.float32)
    g = np.array([3e38, 1.0, 1.0], np.float32)
    opt = adamcpp.SGD([p], lr=1.0, nonfinite=policy, max_grad_norm=max_grad_norm)
    if policy == "skip":
        assert opt.step([g], grad_scale=2.0) is False
    else:
        with pytest.raises(FloatingPointError):
            opt.step([g], grad_scale=2.0)
    np.testing.assert_array_equal(p, np.array([0.5, 0.25, 1.0], np.float32))


def test_propagate_inf_gradient_like_clip_grad_norm():
    """propagate + an Inf: norm = inf, coef = M / inf = 0, so the Inf element
    gets Inf * 0 = NaN and every other gradient is zeroed (torch's result)."""
    params0, grads = make_run(13, 2)
    pa, pb = [p.copy() for p in params0], [p.copy() for p in params0]
    clipped = adamcpp.SGD(pa, lr=0.1, momentum=0.9, max_grad_norm=5.0)
    plain = adamcpp.SGD(pb, lr=0.1, momentum=0.9)
    clipped.step(grads[0])
    g0 = [g.copy() for g in grads[0]]
    np_clip_grad_norm_(g0, 5.0, norm_fn=adamcpp.global_norm)
    plain.step(g0)
    g = [x.copy() for x in grads[1]]
    g[2][1, 3] = np.inf
    clipped.step(g)
    assert clipped.last_grad_norm == math.inf
    np_clip_grad_norm_(g, 5.0)
    plain.step(g)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_equal_nan_aware(a, b, f"params[{i}]")
    assert np.isnan(pa[2][1, 3]) and np.isfinite(pa[0]).all()


def test_propagate_nan_gradient_like_clip_grad_norm():
    """propagate (documented as torch's behaviour) + a NaN: torch's
    clip_grad_norm_ computes a NaN norm and a NaN coefficient
    (clamp(NaN, max=1) is NaN) and multiplies *every* gradient by it, so every
    parameter becomes NaN. In particular the finite gradients must not be
    applied unclipped."""
    params0, grads = make_run(14, 1)
    pa, pb = [p.copy() for p in params0], [p.copy() for p in params0]
    clipped = adamcpp.SGD(pa, lr=0.1, max_grad_norm=1.0)
    plain = adamcpp.SGD(pb, lr=0.1)
    g = [x.copy() for x in grads[0]]
    g[0][2] = np.nan
    assert clipped.step(g) is True
    assert math.isnan(clipped.last_grad_norm)
    np_clip_grad_norm_(g, 1.0)
    plain.step(g)
    for i, (a, b) in enumerate(zip(pa, pb)):
        assert_equal_nan_aware(a, b, f"params[{i}]")


# ---------------------------------------------------------------------------
# Determinism of clipped steps
# ---------------------------------------------------------------------------
def test_clipped_step_same_bits_at_every_thread_count(restore_threads):
    grads, sizes = _big_grads(6)
    rng = np.random.default_rng(6)
    params0 = [rng.uniform(-1, 1, g.shape).astype(g.dtype) for g in grads]
    runs = []
    for threads in (1, 2, 3):
        adamcpp.set_num_threads(threads)
        ps = [p.copy() for p in params0]
        opt = adamcpp.Adam(ps, lr=1e-2, max_grad_norm=10.0)
        opt.step(grads, grad_scale=0.37)
        runs.append((ps, opt))
    for ps, opt in runs[1:]:
        assert opt.last_grad_norm.hex() == runs[0][1].last_grad_norm.hex()
        assert_same_run(ps, opt, *runs[0], "threads")


@pytest.mark.skipif(len(SIMD_SUPPORTED) < 2, reason="needs two SIMD targets")
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.SGD], ids=["adam", "sgd"])
def test_clipped_step_same_bits_on_every_simd_target(cls):
    """Every SIMD target gives bitwise identical steps (notes: compiled
    without FMA, identical per-element arithmetic); a clipped step must keep
    that, so the global norm that sets its coefficient must not depend on the
    target either."""
    grads, sizes = _big_grads(7)
    rng = np.random.default_rng(7)
    params0 = [rng.uniform(-1, 1, g.shape).astype(g.dtype) for g in grads]
    runs = {}
    for target in SIMD_SUPPORTED:
        with using_simd(target):
            ps = [p.copy() for p in params0]
            opt = cls(ps, lr=1e-2, max_grad_norm=10.0)
            opt.step(grads)
            runs[target] = (ps, opt, adamcpp.global_norm(grads))
    base = SIMD_SUPPORTED[0]
    for target in SIMD_SUPPORTED[1:]:
        assert_same_run(runs[target][0], runs[target][1], runs[base][0], runs[base][1], f"{target} vs {base}")
        assert runs[target][2].hex() == runs[base][2].hex(), f"global_norm: {target} vs {base}"


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
BAD_MAX = [
    (-1.0, ValueError), (-1e-12, ValueError), (float("nan"), ValueError),
    ("1.0", TypeError), (True, TypeError), ([1.0], TypeError), (1 + 0j, TypeError),
]


@pytest.mark.parametrize("value, exc", BAD_MAX, ids=[repr(v) for v, _ in BAD_MAX])
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.AdamW, adamcpp.SGD], ids=["adam", "adamw", "sgd"])
def test_invalid_max_grad_norm(cls, value, exc):
    with pytest.raises(exc, match="max_grad_norm"):
        cls([np.ones(3)], max_grad_norm=value)
    # Set after construction: the next step refuses it and changes nothing.
    params = [np.ones(3), np.ones(2, np.float32)]
    opt = cls(params, lr=0.1, max_grad_norm=1.0)
    opt.step([np.ones(3), np.ones(2, np.float32)])
    snap, norm = Snapshot(opt, params), opt.last_grad_norm
    opt.max_grad_norm = value
    with pytest.raises(exc, match="max_grad_norm"):
        opt.step([np.ones(3), np.ones(2, np.float32)])
    snap.assert_values_unchanged("refused step")
    assert opt.last_grad_norm == norm


def test_valid_max_grad_norm_values():
    for value in (0, 1, 0.5, np.float32(2.0), np.float64(3.0), 10**6):
        opt = adamcpp.SGD([np.ones(2)], lr=0.1, max_grad_norm=value)
        opt.step([np.full(2, 3.0)])
        assert opt.last_grad_norm == math.sqrt(18.0)
    opt = adamcpp.Adam([np.ones(2)])
    opt.step([np.ones(2)])
    assert opt.max_grad_norm is None and opt.last_grad_norm is None


def test_clipping_with_dict_params():
    rng = np.random.default_rng(15)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3)}
    grads = {"w": rng.normal(size=(4, 3)).astype(np.float32) * 10, "b": rng.normal(size=3) * 10}
    ref = {k: v.copy() for k, v in params.items()}
    opt = adamcpp.Adam(params, lr=1e-2, max_grad_norm=1.0)
    plain = adamcpp.Adam(ref, lr=1e-2)
    norm = adamcpp.global_norm(grads)
    assert norm == adamcpp.global_norm([grads["w"], grads["b"]])
    opt.step(grads)
    plain.step(grads, grad_scale=clip_coef(norm, 1.0))
    assert opt.last_grad_norm == norm
    for k in params:
        assert_bitwise_equal(params[k], ref[k], k)
