"""adamcpp's numerics against independent references, element by element.

Two independent checks per trajectory (tests/reference.py):

1. Tolerance against the float64 reference (docs/api.md's formulas in float64).
   The tolerance is derived, not guessed. A step is about ten operations on
   each element (g*scale, [g + wd*p | p*df], two products and a sum for m,
   three products and a sum for v, sqrt, [/sqrt(bc2)], +eps, step_size*m, the
   quotient, p - update), plus host scalars (step_size, sqrt(bc2), 1 - lr*wd:
   counted as 3 roundings each). Modelling every operation as x(1 + u*delta)
   with |delta| <= 1, the error of the result after T steps is, to first
   order, sum_t (J_T...J_{t+1}) C_t delta_t: the errors of step t (C_t, about
   u*|each intermediate| each) carried forward by the step Jacobians J. In p
   this is additive accumulation, ~sum_t u(|p_t| + ~10|update_t|) plus the
   update's sensitivity to the m and v errors (m's damped by beta1, v's by
   beta2 only, so v's grow ~linearly in t). With coupled weight decay p feeds
   back through g; keeping the Jacobians' signs (rather than adding absolute
   values step by step, which would grow geometrically) gives the damped
   feedback its real, bounded weight. ``reference.ErrorBound`` computes
       B = sum_t |J_T...J_{t+1} C_t| @ 1      (units of u, per element)
   exactly, by linearizing every step at the reference state and an adjoint
   sweep. A result in dtype T then satisfies
       |x_T - x_ref| <= 1.01 * (u_T + u_64) * B
   (u_T for the library's roundings, u_64 for the reference's own roundings of
   the same-shaped graph, 1.01 for the neglected second-order terms).
   float32: u = 2^-24 ~ 6e-8; float64: u = 2^-53 ~ 1.1e-16. For these 300-step
   trajectories B*u_32 is ~1e-5 of |p| (median 8e-6); measured errors reach
   at most ~0.2 of the bound in float32 and ~0.02 in float64 (worst case vs.
   random-walk accumulation, and float64 library and reference share most
   operations). ``test_tolerance_resolves_every_variant`` checks that the
   float32 bound is far tighter than what any variant flag changes, so a
   miswired flag cannot hide inside it.

2. Bitwise equality with the emulation: the documented operation order
   replayed in NumPy in float32/float64 (correctly rounded IEEE operations),
   host scalars computed in float64 and rounded once. Any deviation — a
   reordered sum, an FMA, a scalar rounded twice, lerp instead of the
   documented m update — fails this.

Gradients are well conditioned (per-element drift > noise, non-zero, spread
over 2.5 decades so eps matters for some elements); the bound is absolute, so
it stays meaningful where m or g + wd*p cancel.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest

import adamcpp
from adamcpp import _core

from conftest import (
    SIMD_SUPPORTED,
    Snapshot,
    assert_bitwise_equal,
    assert_equal_nan_aware,
    assert_within,
    flat,
    make_problem,
    using_simd,
)
from reference import UNIT_ROUNDOFF, ReferenceAdam, emulated_step, run_trajectory

STEPS = 300
SHAPES = [(7,), (4, 5), (33,), (), (2, 3, 4)]
# eps comparable to sqrt(v) of the small-scale elements, so "torch" and
# "keras" differ measurably; lr large enough that p moves by O(1).
BASE = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-3)
DTYPES = [np.float32, np.float64]

# (decoupled, weight_decay, amsgrad, maximize, eps_style, grad_scale)
VARIANTS = list(
    itertools.product([False, True], [0.0, 0.1], [False, True], [False, True], ["torch", "keras"], [1.0, 0.37])
)


def _variant_id(v):
    dec, wd, ams, mx, es, gsc = v
    return (
        f"{'AdamW' if dec else 'Adam'}-wd{wd}-{'ams' if ams else 'noams'}-{'max' if mx else 'min'}-{es}-gs{gsc}"
    )


def _hyper(v):
    dec, wd, ams, mx, es, _ = v
    return dict(BASE, weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams, maximize=mx, eps_style=es)


@functools.lru_cache(maxsize=None)
def _problem():
    """One fixed problem shared by every variant and dtype (float32-representable)."""
    return make_problem(np.random.default_rng(20240601), SHAPES, STEPS, np.float32)


def _reference(v) -> ReferenceAdam:
    """float64 reference trajectory with its error bound (shared by both dtypes;
    without weight decay, Adam and AdamW are the same reference)."""
    dec, wd = v[:2]
    return _reference_cached((dec and wd != 0.0, wd) + tuple(v[2:]))


@functools.lru_cache(maxsize=None)
def _reference_cached(v) -> ReferenceAdam:
    params0, grads = _problem()
    return run_trajectory(
        flat(params0, np.float64), [flat(g, np.float64) for g in grads],
        grad_scale=v[5], track_error=True, **_hyper(v),
    )


def _check_against_reference(ref: ReferenceAdam, name: str, actual: np.ndarray, dtype, what: str) -> None:
    """|actual - ref| <= the derived bound, element by element."""
    assert_within(np.ravel(actual), np.ravel(getattr(ref, name)), np.ravel(ref.error_bound(name, dtype)), what)


def _make_optimizer(v, params):
    dec, wd, ams, mx, es, _ = v
    common = dict(lr=BASE["lr"], betas=(BASE["beta1"], BASE["beta2"]), eps=BASE["eps"], weight_decay=wd,
                  amsgrad=ams, maximize=mx, eps_style=es)
    if not dec:
        return adamcpp.Adam(params, **common)
    # Both spellings of decoupled weight decay must be the same optimizer.
    if mx:
        return adamcpp.Adam(params, decoupled_weight_decay=True, **common)
    return adamcpp.AdamW(params, **common)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[_variant_id(v) for v in VARIANTS])
def test_trajectory(variant, dtype):
    params0, grads = _problem()
    grad_scale = variant[5]
    hyper = _hyper(variant)
    amsgrad = hyper["amsgrad"]
    grads = [[g.astype(dtype) for g in gk] for gk in grads]

    # The optimizer, under the default (best) SIMD target.
    opt_params = [p.astype(dtype) for p in params0]
    opt = _make_optimizer(variant, opt_params)
    for gk in grads:
        assert opt.step(gk, grad_scale=grad_scale) is True

    # The functional kernel, under the baseline target (so the two paths also
    # cross-check two ISAs over a long trajectory; both are also compared with
    # the emulation separately, which tells which one is off).
    fn_params = [p.astype(dtype) for p in params0]
    ms = [np.zeros_like(p) for p in fn_params]
    vs = [np.zeros_like(p) for p in fn_params]
    vmaxs = [np.zeros_like(p) for p in fn_params] if amsgrad else None
    with using_simd(SIMD_SUPPORTED[0]):
        for k, gk in enumerate(grads, start=1):
            adamcpp.functional.adam(fn_params, gk, ms, vs, step=k, max_exp_avg_sqs=vmaxs, grad_scale=grad_scale,
                                    **hyper)

    # Bit-exact emulation in dtype.
    emu = run_trajectory(flat(params0, dtype), [flat(gk) for gk in grads], mode="emulate",
                         grad_scale=grad_scale, **hyper)

    opt_state = {
        "p": flat(opt_params),
        "m": flat([s["exp_avg"] for s in opt.state]),
        "v": flat([s["exp_avg_sq"] for s in opt.state]),
    }
    fn_state = {"p": flat(fn_params), "m": flat(ms), "v": flat(vs)}
    if amsgrad:
        opt_state["vmax"] = flat([s["max_exp_avg_sq"] for s in opt.state])
        fn_state["vmax"] = flat(vmaxs)
    else:
        assert all("max_exp_avg_sq" not in s for s in opt.state)

    ref = _reference(variant)
    for name, actual in opt_state.items():
        assert actual.dtype == dtype
        # (1) within the derived rounding bound of the float64 reference
        _check_against_reference(ref, name, actual, dtype, f"optimizer {name} vs float64 reference")
        # (2) bitwise equal to the emulation of the documented operation order
        assert_bitwise_equal(actual, getattr(emu, name), f"optimizer ({_core.simd()}) {name} vs emulation")
        assert_bitwise_equal(fn_state[name], getattr(emu, name), f"functional ({SIMD_SUPPORTED[0]}) {name} vs emulation")
        # (3) optimizer and functional: the same native path, bit-identical
        assert_bitwise_equal(actual, fn_state[name], f"optimizer vs functional {name}")
    assert [s["step"] for s in opt.state] == [STEPS] * len(SHAPES)
    for p, p0 in zip(opt_params, params0):
        assert p.shape == p0.shape and p.dtype == dtype


def test_tolerance_resolves_every_variant():
    """The float32 bound is much smaller than the effect of any single flag, so
    the tolerance test above really distinguishes the variants."""
    base = (False, 0.1, False, False, "torch", 1.0)
    flips = {
        "decoupled": (True, 0.1, False, False, "torch", 1.0),
        "weight_decay": (False, 0.0, False, False, "torch", 1.0),
        "amsgrad": (False, 0.1, True, False, "torch", 1.0),
        "maximize": (False, 0.1, False, True, "torch", 1.0),
        "eps_style": (False, 0.1, False, False, "keras", 1.0),
        "grad_scale": (False, 0.1, False, False, "torch", 0.37),
    }
    ref = _reference(base)
    tol = ref.error_bound("p", np.float32)
    for flag, other in flips.items():
        diff = np.abs(_reference(other).p - ref.p)
        # at least one element moves by > 100x its float32 tolerance
        assert np.max(diff / tol) > 100, flag


# ---------------------------------------------------------------------------
# Several parameter groups, mixed dtypes, a callable lr schedule
# ---------------------------------------------------------------------------
def _schedule(t):
    """Warm-up then inverse-sqrt decay; t = updates already applied."""
    return 2e-2 * min(1.0, (t + 1) / 20) / math.sqrt(1.0 + t / 50)


GROUPS = [
    # (shapes and dtypes, overrides)
    ([((7,), np.float32), ((3, 5), np.float64)],
     dict(lr=_schedule, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.05, amsgrad=True)),
    ([((33,), np.float64), ((), np.float32)],
     dict(lr=5e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.02, decoupled_weight_decay=True,
          eps_style="keras", maximize=True)),
    ([((2, 3, 4), np.float32)], dict()),
]
GROUP_STEPS = 200


def _group_hyper(overrides):
    h = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
             amsgrad=False, maximize=False, eps_style="torch")
    for k, val in overrides.items():
        if k == "betas":
            h["beta1"], h["beta2"] = val
        else:
            h[k] = val
    return h


def test_param_groups_schedule_mixed_dtypes(rng):
    shapes = [s for members, _ in GROUPS for s, _ in members]
    dtypes = [d for members, _ in GROUPS for _, d in members]
    params0, grads = make_problem(rng, shapes, GROUP_STEPS, np.float32)
    params = [p.astype(d) for p, d in zip(params0, dtypes)]
    groups, it = [], iter(params)
    for members, overrides in GROUPS:
        groups.append({"params": [next(it) for _ in members], **overrides})
    opt = adamcpp.Adam(groups)
    # grad_scale changes every step, including a non-representable 1/3.
    scales = [(1.0, 1.0 / 3.0, 2.5)[k % 3] for k in range(GROUP_STEPS)]
    for k in range(GROUP_STEPS):
        gk = [g.astype(d) for g, d in zip(grads[k], dtypes)]
        assert opt.step(gk, grad_scale=scales[k])

    i = 0
    for members, overrides in GROUPS:
        hyper = _group_hyper(overrides)
        for (shape, dtype) in members:
            gs_i = [grads[k][i].astype(dtype) for k in range(GROUP_STEPS)]
            emu = run_trajectory(params0[i].astype(dtype), gs_i, mode="emulate", grad_scale=scales, **hyper)
            ref = run_trajectory(params0[i].astype(np.float64), gs_i, grad_scale=scales, track_error=True, **hyper)
            st = opt.state[i]
            got = {"p": params[i], "m": st["exp_avg"], "v": st["exp_avg_sq"]}
            if hyper["amsgrad"]:
                got["vmax"] = st["max_exp_avg_sq"]
            for name, arr in got.items():
                assert arr.shape == shape and arr.dtype == dtype
                assert_bitwise_equal(arr, getattr(emu, name), f"params[{i}] {name} vs emulation")
                _check_against_reference(ref, name, arr, dtype, f"params[{i}] {name} vs reference")
            assert st["step"] == GROUP_STEPS
            i += 1


def test_schedule_sees_updates_already_applied():
    """lr(t) is called with t = 0 for the first update: a schedule that is 0 at
    t = 0 leaves the parameter unchanged on the first step only."""
    p = np.array([1.0, -2.0], dtype=np.float64)
    opt = adamcpp.Adam([p], lr=lambda t: 0.0 if t == 0 else 0.1)
    opt.step([np.array([0.5, 0.5])])
    assert_bitwise_equal(p, np.array([1.0, -2.0]), "after the first (lr=0) step")
    opt.step([np.array([0.5, 0.5])])
    assert np.all(p != np.array([1.0, -2.0]))


# ---------------------------------------------------------------------------
# Functional: one step count per tensor
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_functional_per_tensor_steps(rng, dtype):
    shapes = [(11,), (5, 3), (64,)]
    offsets = [0, 7, 1000]  # tensor i applies step k + offsets[i]
    n_steps = 100
    hyper = dict(lr=1e-2, beta1=0.85, beta2=0.995, eps=1e-4, weight_decay=0.03, amsgrad=True, eps_style="torch")
    params0, grads = make_problem(rng, shapes, n_steps, dtype)
    ps = [p.copy() for p in params0]
    ms, vs, vmaxs = ([np.zeros_like(p) for p in ps] for _ in range(3))
    for k in range(1, n_steps + 1):
        adamcpp.functional.adam(ps, grads[k - 1], ms, vs, step=[k + o for o in offsets], max_exp_avg_sqs=vmaxs,
                                **hyper)
    for i, off in enumerate(offsets):
        emu = ReferenceAdam(params0[i], mode="emulate", **hyper)
        ref = ReferenceAdam(params0[i].astype(np.float64), track_error=True, **hyper)
        for k in range(1, n_steps + 1):
            emu.step(grads[k - 1][i], step=k + off)
            ref.step(grads[k - 1][i], step=k + off)
        for name, arr in (("p", ps[i]), ("m", ms[i]), ("v", vs[i]), ("vmax", vmaxs[i])):
            assert_bitwise_equal(arr, getattr(emu, name), f"tensor {i} (step offset {off}) {name}")
            _check_against_reference(ref, name, arr, dtype, f"tensor {i} {name} vs reference")
    # The per-tensor step matters: tensor 0 would differ had it used tensor 2's steps.
    emu_wrong = ReferenceAdam(params0[0], mode="emulate", **hyper)
    for k in range(1, n_steps + 1):
        emu_wrong.step(grads[k - 1][0], step=k + offsets[2])
    assert not np.array_equal(emu_wrong.p, ps[0])


# ---------------------------------------------------------------------------
# Zero-size and 0-d arrays
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_zero_size_arrays(simd_target, dtype):
    empty1, empty2 = np.zeros(0, dtype=dtype), np.zeros((3, 0), dtype=dtype)
    normal = np.linspace(-1, 1, 5).astype(dtype)
    hyper = dict(lr=1e-2, amsgrad=True, weight_decay=0.1)
    opt = adamcpp.Adam([empty1, normal, empty2], **hyper)
    g = np.array([0.3, -0.2, 0.1, 0.5, -0.7], dtype=dtype)
    for _ in range(2):
        assert opt.step([np.zeros(0, dtype), g, np.zeros((3, 0), dtype)]) is True
    emu = run_trajectory(np.linspace(-1, 1, 5).astype(dtype), [g, g], mode="emulate", **hyper)
    assert_bitwise_equal(normal, emu.p, "non-empty parameter next to empty ones")
    assert empty1.shape == (0,) and empty2.shape == (3, 0)
    for i, shape in ((0, (0,)), (2, (3, 0))):
        st = opt.state[i]
        assert st["step"] == 2
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert st[key].shape == shape and st[key].dtype == dtype

    # Functional: a single empty array, and a list of only empty arrays.
    e = np.zeros(0, dtype=dtype)
    adamcpp.functional.adam(e, np.zeros(0, dtype), np.zeros(0, dtype), np.zeros(0, dtype), step=1, lr=1e-3)
    adamcpp.functional.adam([e, np.zeros((0, 4), dtype)], [np.zeros(0, dtype), np.zeros((0, 4), dtype)],
                            [np.zeros(0, dtype), np.zeros((0, 4), dtype)], [np.zeros(0, dtype), np.zeros((0, 4), dtype)],
                            step=[1, 5], lr=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_zero_dim_arrays(simd_target, dtype):
    hyper = dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, eps_style="keras")
    gs = [np.array(x, dtype=dtype) for x in (0.3, -0.1, 0.25, 0.4)]
    # optimizer
    p = np.array(0.75, dtype=dtype)
    opt = adamcpp.AdamW([p], lr=1e-2, weight_decay=0.1, eps_style="keras")
    for g in gs:
        opt.step([g])
    emu = run_trajectory(np.array(0.75, dtype=dtype), gs, mode="emulate", **hyper)
    assert p.shape == () and opt.state[0]["exp_avg"].shape == ()
    assert_bitwise_equal(p, emu.p, "0-d optimizer p")
    assert_bitwise_equal(opt.state[0]["exp_avg_sq"], emu.v, "0-d optimizer v")
    # functional, single-array form
    q, m, v = np.array(0.75, dtype=dtype), np.array(0.0, dtype=dtype), np.array(0.0, dtype=dtype)
    for k, g in enumerate(gs, start=1):
        adamcpp.functional.adam(q, g, m, v, step=k, **hyper)
    assert_bitwise_equal(q, emu.p, "0-d functional p")
    assert_bitwise_equal(m, emu.m, "0-d functional m")


# ---------------------------------------------------------------------------
# Non-finite gradients
# ---------------------------------------------------------------------------
def _nonfinite_setup(policy):
    """An optimizer with two groups (amsgrad + schedule in one), mixed dtypes,
    after three good steps; and a twin that will never see the bad step."""
    rng = np.random.default_rng(7)
    shapes, dtypes = [(6,), (2, 4), (9,)], [np.float32, np.float64, np.float32]
    params0, grads = make_problem(rng, shapes, 5, np.float32)
    grads = [[g.astype(d) for g, d in zip(gk, dtypes)] for gk in grads]

    def build(nonfinite):
        ps = [p.astype(d) for p, d in zip(params0, dtypes)]
        groups = [
            {"params": ps[:2], "amsgrad": True, "lr": lambda t: 1e-2 / (1 + t)},
            {"params": ps[2:], "weight_decay": 0.1, "decoupled_weight_decay": True},
        ]
        opt = adamcpp.Adam(groups, eps=1e-6, nonfinite=nonfinite)
        for gk in grads[:3]:
            assert opt.step(gk) is True
        return opt, ps

    return build(policy), build("propagate"), grads


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_skip_and_raise_change_nothing(simd_target, policy, bad):
    (opt, params), (twin, twin_params), grads = _nonfinite_setup(policy)
    snap = Snapshot(opt, params)
    bad_grads = [g.copy() for g in grads[3]]
    bad_grads[1].flat[5] = bad  # a float64 tensor, in the middle
    if policy == "skip":
        assert opt.step(bad_grads) is False
    else:
        with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
            opt.step(bad_grads)
    snap.assert_values_unchanged()
    # The schedule position was not consumed either: the next good step gives
    # exactly what an optimizer that never saw the bad step gives.
    for gk in grads[3:]:
        assert opt.step(gk) is True
        assert twin.step(gk) is True
    for i, (p, q) in enumerate(zip(params, twin_params)):
        assert_bitwise_equal(p, q, f"params[{i}] after resuming")
    for i, (s, t) in enumerate(zip(opt.state, twin.state)):
        assert s["step"] == t["step"] == 5
        for k in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(s[k], t[k], f"state[{i}][{k!r}] after resuming")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_nonfinite_propagate_like_torch(simd_target, dtype):
    """NaN/Inf flow through the formulas (as in torch.optim): a NaN gradient
    makes m, v and p NaN there; an Inf gradient makes m and v infinite and p
    NaN (inf/inf); every other element is updated normally."""
    hyper = dict(lr=1e-2, amsgrad=True)
    p0 = np.linspace(-1, 1, 8).astype(dtype)
    g_good = np.linspace(0.1, 0.8, 8).astype(dtype)
    g_bad = g_good.copy()
    g_bad[2], g_bad[5] = np.nan, np.inf
    p = p0.copy()
    opt = adamcpp.Adam([p], **hyper)  # default nonfinite="propagate"
    assert opt.step([g_good]) is True
    assert opt.step([g_bad]) is True
    emu = run_trajectory(p0, [g_good, g_bad], mode="emulate", **hyper)
    st = opt.state[0]
    for name, arr in (("p", p), ("m", st["exp_avg"]), ("v", st["exp_avg_sq"]), ("vmax", st["max_exp_avg_sq"])):
        assert_equal_nan_aware(arr, getattr(emu, name), name)
    assert np.isnan(p[[2, 5]]).all() and np.isfinite(np.delete(p, [2, 5])).all()
    assert np.isnan(st["exp_avg"][2]) and st["exp_avg"][5] == np.inf
    assert np.isnan(st["exp_avg_sq"][2]) and st["exp_avg_sq"][5] == np.inf
    assert np.isnan(st["max_exp_avg_sq"][2]) and st["max_exp_avg_sq"][5] == np.inf


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_amsgrad_max_propagates_nan(simd_target, dtype):
    """max_exp_avg_sq = max(max_exp_avg_sq, v) propagates NaN from either
    operand (like torch.maximum / np.maximum), also on later steps."""
    hyper = dict(lr=1e-2, amsgrad=True)
    n = 37  # a vector body and a tail
    p0 = np.linspace(-1, 1, n).astype(dtype)
    g = np.linspace(0.05, 0.9, n).astype(dtype)
    m0 = np.full(n, 0.01, dtype)
    v0 = np.full(n, 0.04, dtype)
    vmax0 = np.full(n, 0.05, dtype)
    v0[3] = np.nan     # v NaN, vmax finite -> vmax must become NaN
    vmax0[20] = np.nan  # vmax NaN, v finite -> vmax must stay NaN
    g_nan = g.copy()
    g_nan[33] = np.nan  # NaN gradient -> v and vmax NaN
    p, m, v, vmax = p0.copy(), m0.copy(), v0.copy(), vmax0.copy()
    adamcpp.functional.adam(p, g_nan, m, v, step=4, max_exp_avg_sqs=vmax, **hyper)
    e = emulated_step(p0, g_nan, m0, v0, vmax0, step=4, **hyper)
    for name, got, want in zip(("p", "m", "v", "vmax"), (p, m, v, vmax), e):
        assert_equal_nan_aware(got, want, f"step 4 {name}")
    assert np.isnan(vmax[[3, 20, 33]]).all()
    assert np.isfinite(np.delete(vmax, [3, 20, 33])).all()
    assert np.isnan(p[[3, 20, 33]]).all()
    # A later step with a finite gradient keeps the NaNs in vmax.
    adamcpp.functional.adam(p, g, m, v, step=5, max_exp_avg_sqs=vmax, **hyper)
    e = emulated_step(*e[:1], g, *e[1:], step=5, **hyper)
    for name, got, want in zip(("p", "m", "v", "vmax"), (p, m, v, vmax), e):
        assert_equal_nan_aware(got, want, f"step 5 {name}")
    assert np.isnan(vmax[[3, 20, 33]]).all()


def test_unit_roundoff_constants():
    """The tolerances above rest on these."""
    assert UNIT_ROUNDOFF[np.dtype(np.float32)] == np.finfo(np.float32).eps / 2
    assert UNIT_ROUNDOFF[np.dtype(np.float64)] == np.finfo(np.float64).eps / 2
