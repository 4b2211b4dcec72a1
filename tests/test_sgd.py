"""adamcpp.SGD: torch.optim.SGD's numerics, state, checkpoints and errors.

Two independent references, both in reference.py and written from the
algorithm rather than from the C++ sources:

* ``reference_sgd_step``: torch.optim.SGD's algorithm in float64, as the
  documented update reads (with the gradient negated first for ``maximize``,
  which is what torch's implementation does and what adamcpp documents). The
  library is compared with it under an elementwise first-order rounding-error
  bound (``SgdErrorBound``, derived in its docstring).

* ``emulated_sgd_step``: the same update in the element type with the
  documented operation order and every scalar rounded once from float64 (as
  ``1 - dampening`` is formed in float64 first). NumPy's float32/float64
  ``+ - *`` are correctly rounded and the kernels are compiled without FMA
  contraction, so the library must agree with it *bitwise*, on every SIMD
  target.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

import adamcpp
from adamcpp import schedules as S

from conftest import (
    SIMD_SUPPORTED,
    Recorder,
    Snapshot,
    alternating_dtype_problem,
    assert_bitwise_equal,
    assert_within,
    flat,
    make_problem,
)
from reference import UNIT_ROUNDOFF, SgdErrorBound, emulated_sgd_step, reference_sgd_step, sgd_hyper

INFO = adamcpp.build_info()
CHUNK = int(INFO["chunk_elements"])
PAR_MIN = int(INFO["parallel_min_elements"])

DTYPES = [np.float32, np.float64]
# Sizes 1, 7, 4099 hit every vector tail; (3, 5) a 2-D parameter.
SHAPES = [(1,), (7,), (4099,), (3, 5)]
STEPS = 300

# (momentum, dampening, nesterov): every valid combination of the grid
# momentum {0, 0.9} x dampening {0, 0.5} x nesterov (Nesterov needs momentum > 0
# and dampening == 0).
MOMENTUM_CONFIGS = [
    (0.0, 0.0, False),
    (0.0, 0.5, False),  # dampening without momentum: no buffer, plain SGD
    (0.9, 0.0, False),
    (0.9, 0.5, False),
    (0.9, 0.0, True),
]
MOMENTUM_IDS = ["plain", "plain-damp", "momentum", "momentum-damp", "nesterov"]


# ---------------------------------------------------------------------------
# Trajectories against both references, every combination, every SIMD target
# ---------------------------------------------------------------------------
_PROBLEMS: Dict[Any, Tuple[List[np.ndarray], List[List[np.ndarray]]]] = {}


def trajectory_problem(dtype):
    """One fixed problem per dtype, shared by the whole grid (read-only)."""
    key = np.dtype(dtype)
    if key not in _PROBLEMS:
        params0, grads = make_problem(np.random.default_rng(2024), SHAPES, STEPS, dtype)
        for a in params0 + [g for gk in grads for g in gk]:
            a.setflags(write=False)
        _PROBLEMS[key] = (params0, grads)
    return _PROBLEMS[key]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("grad_scale", [1.0, 0.37], ids=["gs1", "gs0.37"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["wd0", "wd0.01"])
@pytest.mark.parametrize("momentum, dampening, nesterov", MOMENTUM_CONFIGS, ids=MOMENTUM_IDS)
def test_sgd_trajectory(simd_target, momentum, dampening, nesterov, weight_decay, maximize, grad_scale, dtype):
    """300 steps: bitwise equal to the element-type emulation after every
    step, on every SIMD target; and within the derived bound of the float64
    reference every 50 steps. (The float64 comparison does not depend on the
    target: it runs under the first one, and the bitwise check ties every
    other target to the same bits.)"""
    hyper = sgd_hyper(momentum, dampening, nesterov, weight_decay, maximize)
    params0, grads = trajectory_problem(dtype)
    with_reference = simd_target == SIMD_SUPPORTED[0]
    params = [p.copy() for p in params0]
    opt = adamcpp.SGD(params, **hyper)
    # Emulation and reference on the concatenation (the update is elementwise).
    emu_p, emu_b = flat(params0, np.float64).astype(dtype), None
    ref_p, ref_b = flat(params0, np.float64), None
    bound = SgdErrorBound(ref_p, dtype)
    scale_p = np.abs(ref_p)  # largest |p| seen, for the relative size of the bound
    for k, gk in enumerate(grads):
        assert opt.step(gk, grad_scale=grad_scale) is True
        g = flat(gk, np.float64)
        emu_p, emu_b = emulated_sgd_step(emu_p, g.astype(dtype), emu_b, grad_scale=grad_scale, **hyper)
        # Every step at first (the first momentum step is special), then every
        # 10th and the last: a bitwise difference, once made, persists.
        check = k < 10 or (k + 1) % 10 == 0
        if check:
            got_p = np.concatenate([p.ravel() for p in params])
            assert_bitwise_equal(got_p, emu_p, f"step {k + 1}: params vs emulation")
            if momentum != 0:
                got_b = np.concatenate([s["momentum_buffer"].ravel() for s in opt.state])
                assert_bitwise_equal(got_b, emu_b, f"step {k + 1}: momentum_buffer vs emulation")
        if with_reference:
            new_p, new_b = reference_sgd_step(ref_p, g, ref_b, grad_scale=grad_scale, **hyper)
            bound.advance(ref_p, g, ref_b, new_b, grad_scale=grad_scale, **hyper)
            ref_p, ref_b = new_p, new_b
            scale_p = np.maximum(scale_p, np.abs(ref_p))
            if (k + 1) % 50 == 0:
                assert_within(got_p, ref_p, bound.bound("p"), f"step {k + 1}: params vs float64 reference")
                if momentum != 0:
                    assert_within(got_b, ref_b, bound.bound("b"), f"step {k + 1}: buffer vs float64 reference")
    assert all(s["step"] == STEPS for s in opt.state)
    for i, s in enumerate(opt.state):
        if momentum == 0:
            assert s["momentum_buffer"] is None, f"state[{i}]: no momentum, yet a buffer"
        else:
            assert s["momentum_buffer"].dtype == np.dtype(dtype) and s["momentum_buffer"].shape == SHAPES[i]
    if with_reference:
        # The bound means something: it grows like steps * a few u relative to
        # |p| (300 * 3 * 6e-8 ~ 5e-5 in float32), far below what a wrong formula
        # costs (test_error_bound_detects_a_wrong_first_step).
        u = UNIT_ROUNDOFF[np.dtype(dtype)]
        assert np.max(bound.bound("p") / (scale_p + 1.0)) < STEPS * 12 * u


def test_error_bound_detects_a_wrong_first_step(rng):
    """Sanity check of the tolerance: a reference that dampens the first
    momentum step (a plausible bug) falls outside the float32 bound."""
    hyper = sgd_hyper(0.9, 0.5, False, 0.0, False)
    params0, grads = make_problem(rng, [(64,)], 20, np.float32)
    p = params0[0].copy()
    opt = adamcpp.SGD([p], **hyper)
    ref_p, ref_b, wrong_p, wrong_b = params0[0].astype(np.float64), None, params0[0].astype(np.float64), None
    bound = SgdErrorBound(ref_p, np.float32)
    for gk in grads:
        opt.step(gk)
        g = gk[0].astype(np.float64)
        new_p, new_b = reference_sgd_step(ref_p, g, ref_b, **hyper)
        bound.advance(ref_p, g, ref_b, new_b, grad_scale=1.0, **hyper)
        ref_p, ref_b = new_p, new_b
        if wrong_b is None:
            wrong_b = np.zeros_like(g)  # zero-initialized buffer: the first step dampens g
        wrong_p, wrong_b = reference_sgd_step(wrong_p, g, wrong_b, **hyper)
    assert_within(p, ref_p, bound.bound("p"), "params vs reference")
    assert np.any(np.abs(wrong_p - ref_p) > bound.bound("p"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_sgd_groups_with_different_hyperparameters(simd_target, rng, dtype):
    """One call over groups with different settings: each tensor gets its own
    group's arithmetic (bitwise)."""
    specs = [
        ([(97,)], dict(lr=1e-2)),
        ([(7, 13), (1,)], dict(lr=5e-3, momentum=0.9, dampening=0.2, weight_decay=0.01)),
        ([(5,)], dict(lr=2e-2, momentum=0.8, nesterov=True, maximize=True)),
        ([(33,)], dict(momentum=0.5, weight_decay=0.1, maximize=True)),
    ]
    shapes = [s for sh, _ in specs for s in sh]
    params0, grads = make_problem(rng, shapes, 30, dtype)
    params = [p.copy() for p in params0]
    groups, hypers, at = [], [], 0
    for sh, h in specs:
        groups.append({"params": params[at:at + len(sh)], **h})
        full = dict(sgd_hyper(0.0, 0.0, False, 0.0, False, lr=1e-3), **h)
        hypers += [full] * len(sh)
        at += len(sh)
    opt = adamcpp.SGD(groups, lr=1e-3)
    emu = [(p.copy(), None) for p in params0]
    for gk in grads:
        assert opt.step(gk, grad_scale=0.75)
        emu = [emulated_sgd_step(p, g, b, grad_scale=0.75, **h) for (p, b), g, h in zip(emu, gk, hypers)]
    for i, ((p, b), h) in enumerate(zip(emu, hypers)):
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        if h["momentum"]:
            assert_bitwise_equal(opt.state[i]["momentum_buffer"], b, f"momentum_buffer of params[{i}]")
        else:
            assert opt.state[i]["momentum_buffer"] is None


def test_first_momentum_step_copies_the_gradient():
    """torch.optim.SGD: the buffer starts as the (scaled, decayed) gradient,
    undamped; the buffer is a new array, not the gradient itself."""
    p = np.array([1.0, -2.0, 0.5], np.float64)
    g = np.array([0.25, 4.0, -1.0], np.float64)
    opt = adamcpp.SGD([p], lr=0.5, momentum=0.9, dampening=0.5, weight_decay=0.5)
    assert opt.state[0] == {"step": 0, "momentum_buffer": None}
    opt.step([g], grad_scale=2.0)
    # g' = 2 g + 0.5 p = [1, 7, -1.75]; buf = g'; p = p - 0.5 g'  (all exact in binary)
    expected_buf = np.array([1.0, 7.0, -1.75])
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], expected_buf)
    np.testing.assert_array_equal(p, np.array([0.5, -5.5, 1.375]))
    assert opt.state[0]["momentum_buffer"] is not g
    assert not np.shares_memory(opt.state[0]["momentum_buffer"], g)
    assert opt.state[0]["step"] == 1
    # Second step: buf = 0.9 buf + 0.5 g'' with g'' = 2 g + 0.5 p.
    opt.step([g], grad_scale=2.0)
    g2 = 2.0 * g + 0.5 * np.array([0.5, -5.5, 1.375])
    np.testing.assert_array_equal(opt.state[0]["momentum_buffer"], expected_buf * 0.9 + 0.5 * g2)


# ---------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------
THREAD_SIZES = [1, CHUNK - 1, CHUNK + 1, 7, 3 * CHUNK + 5, 2 * CHUNK - 1]


@pytest.mark.parametrize("momentum, dampening, nesterov", MOMENTUM_CONFIGS[1:], ids=MOMENTUM_IDS[1:])
def test_thread_count_does_not_change_results(restore_threads, momentum, dampening, nesterov):
    assert sum(THREAD_SIZES) >= PAR_MIN  # the parallel path runs
    hyper = sgd_hyper(momentum, dampening, nesterov, 0.01, False)
    params0, grads = alternating_dtype_problem(THREAD_SIZES, 3, seed=11)
    runs = {}
    for threads in (1, 2):
        adamcpp.set_num_threads(threads)
        ps = [p.copy() for p in params0]
        opt = adamcpp.SGD(ps, **hyper)
        for gk in grads:
            assert opt.step(gk, grad_scale=0.37)
        runs[threads] = (ps, opt)
    (ps1, opt1), (ps2, opt2) = runs[1], runs[2]
    for i in range(len(THREAD_SIZES)):
        assert_bitwise_equal(ps2[i], ps1[i], f"2 threads vs 1: params[{i}]")
        if momentum:
            assert_bitwise_equal(opt2.state[i]["momentum_buffer"], opt1.state[i]["momentum_buffer"],
                                 f"2 threads vs 1: momentum_buffer of params[{i}]")
        p, b = params0[i].copy(), None
        for gk in grads:
            p, b = emulated_sgd_step(p, gk[i], b, grad_scale=0.37, **hyper)
        assert_bitwise_equal(ps1[i], p, f"params[{i}] vs emulation")


# ---------------------------------------------------------------------------
# state_dict
# ---------------------------------------------------------------------------
def _problem(seed=3, dtype=np.float32, shapes=((5,), (2, 3), (1,)), steps=60):
    rng = np.random.default_rng(seed)
    return make_problem(rng, list(shapes), steps, dtype)


@pytest.mark.parametrize("momentum, dampening, nesterov", MOMENTUM_CONFIGS, ids=MOMENTUM_IDS)
def test_state_dict_round_trip(momentum, dampening, nesterov):
    hyper = sgd_hyper(momentum, dampening, nesterov, 0.01, False)
    params0, grads = _problem()
    pa = [p.copy() for p in params0]
    a = adamcpp.SGD(pa, **hyper)
    for gk in grads[:30]:
        a.step(gk)
    sd = a.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert sd["param_groups"] == [dict(hyper, params=[0, 1, 2])]
    for i in range(3):
        assert set(sd["state"][i]) == {"step", "momentum_buffer"}
        assert sd["state"][i]["step"] == 30
        if momentum:
            buf = sd["state"][i]["momentum_buffer"]
            assert_bitwise_equal(buf, a.state[i]["momentum_buffer"], f"state_dict buffer {i}")
            assert not np.shares_memory(buf, a.state[i]["momentum_buffer"]), "state_dict must copy arrays"
        else:
            assert sd["state"][i]["momentum_buffer"] is None
    # A fresh optimizer with other settings continues exactly like the original.
    pb = [p.copy() for p in pa]
    b = adamcpp.SGD(pb, lr=0.5, momentum=0.3, dampening=0.1, weight_decay=0.2)
    b.load_state_dict(sd)
    for key, value in hyper.items():
        assert b.param_groups[0][key] == value, key
    # Mutating the dict afterwards changes neither optimizer.
    for entry in sd["state"].values():
        if entry["momentum_buffer"] is not None:
            entry["momentum_buffer"][...] = 123.0
    for gk in grads[30:]:
        a.step(gk)
        b.step(gk)
    for i in range(3):
        assert_bitwise_equal(pb[i], pa[i], f"params[{i}] after resuming")
        assert b.state[i]["step"] == a.state[i]["step"] == 60
        if momentum:
            assert_bitwise_equal(b.state[i]["momentum_buffer"], a.state[i]["momentum_buffer"], f"buffer {i}")
        else:  # the key itself: test_loaded_state_keeps_the_documented_layout
            assert b.state[i].get("momentum_buffer") is None


def test_state_dict_before_any_step_round_trips():
    params0, grads = _problem()
    a = adamcpp.SGD([p.copy() for p in params0], lr=0.1, momentum=0.9)
    sd = a.state_dict()
    assert sd["state"] == {i: {"step": 0, "momentum_buffer": None} for i in range(3)}
    pb = [p.copy() for p in params0]
    b = adamcpp.SGD(pb, lr=0.1, momentum=0.9)
    b.load_state_dict(sd)
    assert all(s["step"] == 0 and s.get("momentum_buffer") is None for s in b.state)
    b.step(grads[0])
    for i, (p0, g) in enumerate(zip(params0, grads[0])):
        p, buf = emulated_sgd_step(p0, g, None, lr=0.1, momentum=0.9)
        assert_bitwise_equal(pb[i], p, f"params[{i}]")
        assert_bitwise_equal(b.state[i]["momentum_buffer"], buf, f"buffer {i}")


def _torch_style_groups(**hyper):
    """A param_groups entry as torch.optim.SGD.state_dict() writes it (torch 2.x keys)."""
    group = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                 foreach=None, differentiable=False, fused=None, params=[0, 1, 2])
    group.update(hyper)
    return [group]


def test_load_torch_style_state_dict_with_none_buffers():
    """torch writes {"momentum_buffer": None} per parameter and no "step" key:
    loading it gives step 0 and no buffer; the next step is a first momentum
    step (buf = g, no dampening)."""
    params0, grads = _problem()
    sd = {"state": {i: {"momentum_buffer": None} for i in range(3)},
          "param_groups": _torch_style_groups(dampening=0.5)}
    params = [p.copy() for p in params0]
    opt = adamcpp.SGD(params, lr=1.0, momentum=0.1)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["momentum"] == 0.9
    assert opt.param_groups[0]["dampening"] == 0.5
    assert not {"foreach", "differentiable", "fused"} & set(opt.param_groups[0])
    assert all(s["step"] == 0 and s.get("momentum_buffer") is None for s in opt.state)
    opt.step(grads[0])
    opt.step(grads[1])
    h = sgd_hyper(0.9, 0.5, False, 0.0, False, lr=0.05)
    for i in range(3):
        p, b = emulated_sgd_step(params0[i], grads[0][i], None, **h)
        p, b = emulated_sgd_step(p, grads[1][i], b, **h)
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        assert_bitwise_equal(opt.state[i]["momentum_buffer"], b, f"buffer {i}")
        assert opt.state[i]["step"] == 2


def test_load_torch_style_state_dict_empty_state_and_buffers():
    """torch's state is {} before its first step, and holds only
    "momentum_buffer" afterwards. A loaded buffer is continued (not restarted),
    converted to the parameter's dtype and copied."""
    params0, grads = _problem()
    params = [p.copy() for p in params0]
    opt = adamcpp.SGD(params, lr=1.0)
    opt.load_state_dict({"state": {}, "param_groups": _torch_style_groups(momentum=0.0)})
    assert all(s["step"] == 0 and s.get("momentum_buffer") is None for s in opt.state)

    rng = np.random.default_rng(4)
    bufs = [rng.normal(size=p.shape).astype(np.float64) for p in params0]  # float64 -> float32 params
    sd = {"state": {0: {"momentum_buffer": bufs[0]}, 2: {"momentum_buffer": bufs[2]}},  # 1 has no entry
          "param_groups": _torch_style_groups(dampening=0.25)}
    opt.load_state_dict(sd)
    for i in (0, 2):
        b = opt.state[i]["momentum_buffer"]
        assert b.dtype == np.float32 and b.shape == params0[i].shape and not np.shares_memory(b, bufs[i])
        assert opt.state[i]["step"] == 0
    assert opt.state[1]["step"] == 0 and opt.state[1].get("momentum_buffer") is None
    opt.step(grads[0])
    h = sgd_hyper(0.9, 0.25, False, 0.0, False, lr=0.05)
    for i in range(3):
        start = None if i == 1 else bufs[i].astype(np.float32)
        p, b = emulated_sgd_step(params0[i], grads[0][i], start, **h)
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        assert_bitwise_equal(opt.state[i]["momentum_buffer"], b, f"buffer {i}")


@pytest.mark.parametrize("source", ["own_before_step", "own_no_momentum", "torch_none", "torch_empty"])
def test_loaded_state_keeps_the_documented_layout(source):
    """State per parameter is {"step": int, "momentum_buffer": None or array}
    (SGD's docstring, like a fresh optimizer's state): loading a checkpoint
    whose buffers are None, or absent as torch writes them before its first
    step, must give the same layout, and state_dict() must write it back."""
    params0, _ = _problem()
    if source.startswith("own"):
        momentum = 0.9 if source == "own_before_step" else 0.0
        sd = adamcpp.SGD([p.copy() for p in params0], lr=0.1, momentum=momentum).state_dict()
        for i in range(3):
            assert sd["state"][i] == {"step": 0, "momentum_buffer": None}
    elif source == "torch_none":
        sd = {"state": {i: {"momentum_buffer": None} for i in range(3)}, "param_groups": _torch_style_groups()}
    else:
        sd = {"state": {}, "param_groups": _torch_style_groups()}
    opt = adamcpp.SGD([p.copy() for p in params0], lr=0.1, momentum=0.9)
    fresh = [dict(s) for s in opt.state]
    opt.load_state_dict(sd)
    assert opt.state == fresh == [{"step": 0, "momentum_buffer": None}] * 3
    assert opt.state_dict()["state"] == {i: {"step": 0, "momentum_buffer": None} for i in range(3)}


# ---------------------------------------------------------------------------
# Skipped steps and the momentum buffer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_skipped_first_step_creates_no_buffer(policy):
    """A skipped (or refused) first step stores no buffer anywhere; the next
    applied step is the first momentum step (buf = g, undamped)."""
    params0, grads = _problem()
    params = [p.copy() for p in params0]
    h = sgd_hyper(0.9, 0.5, False, 0.01, False, lr=0.05)
    opt = adamcpp.SGD(params, nonfinite=policy, **h)
    bad = [g.copy() for g in grads[0]]
    bad[2][0] = np.nan  # only the last tensor is bad
    if policy == "skip":
        assert opt.step(bad) is False
    else:
        with pytest.raises(FloatingPointError, match=r"grads\[2\]"):
            opt.step(bad)
    for i in range(3):
        assert opt.state[i] == {"step": 0, "momentum_buffer": None}
        assert_bitwise_equal(params[i], params0[i], f"params[{i}] after a skipped step")
    assert opt.step(grads[1]) is True
    for i in range(3):
        p, b = emulated_sgd_step(params0[i], grads[1][i], None, **h)
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        assert_bitwise_equal(opt.state[i]["momentum_buffer"], b, f"buffer {i} (must be g, undamped)")
        assert opt.state[i]["step"] == 1


def test_skipped_later_step_leaves_buffers_alone():
    params0, grads = _problem()
    params = [p.copy() for p in params0]
    h = sgd_hyper(0.9, 0.0, True, 0.0, True, lr=0.05)
    opt = adamcpp.SGD(params, nonfinite="skip", **h)
    opt.step(grads[0])
    before = [(p.copy(), s["momentum_buffer"], s["momentum_buffer"].copy()) for p, s in zip(params, opt.state)]
    bad = [g.copy() for g in grads[1]]
    bad[0][-1] = -np.inf
    assert opt.step(bad) is False
    for i, (p, buf_obj, buf) in enumerate(before):
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        assert opt.state[i]["momentum_buffer"] is buf_obj
        assert_bitwise_equal(buf_obj, buf, f"buffer {i}")
        assert opt.state[i]["step"] == 1


# ---------------------------------------------------------------------------
# Errors change nothing
# ---------------------------------------------------------------------------
BAD_HYPER = [
    # (kwargs, exception, message fragment)
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(momentum=-0.5), ValueError, "momentum"),
    (dict(momentum=float("inf")), ValueError, "momentum"),
    (dict(dampening=-0.1), ValueError, "dampening"),
    (dict(dampening=1.5), ValueError, "dampening"),
    (dict(dampening=float("nan")), ValueError, "dampening"),
    (dict(weight_decay=-1e-4), ValueError, "weight_decay"),
    (dict(nesterov=True), ValueError, "nesterov"),  # momentum 0
    (dict(nesterov=True, momentum=0.9, dampening=0.1), ValueError, "nesterov"),
    (dict(nesterov="yes", momentum=0.9), TypeError, "nesterov"),
    (dict(maximize=1), TypeError, "maximize"),
    (dict(momentum=[0.9]), TypeError, "momentum"),
]


@pytest.mark.parametrize("kwargs, exc, fragment", BAD_HYPER, ids=[str(c[0]) for c in BAD_HYPER])
def test_bad_hyperparameters_at_construction(kwargs, exc, fragment):
    p = np.ones(3, np.float32)
    with pytest.raises(exc, match=fragment):
        adamcpp.SGD([p], **kwargs)
    np.testing.assert_array_equal(p, np.ones(3, np.float32))


def test_dampening_bounds_are_inclusive():
    for d in (0.0, 1.0):
        p = np.ones(2)
        opt = adamcpp.SGD([p], lr=0.5, momentum=0.5, dampening=d)
        opt.step([np.ones(2)])
        opt.step([np.ones(2)])
        # buf = 1, then 0.5 * 1 + (1 - d) * 1; p = 1 - 0.5 - 0.5 * buf
        np.testing.assert_array_equal(p, np.full(2, 0.5 - 0.5 * (0.5 + (1.0 - d))))


def _trained(nonfinite="propagate", **kw):
    params0, grads = _problem()
    params = [p.copy() for p in params0]
    hyper = dict(sgd_hyper(0.9, 0.5, False, 0.01, False), **kw)
    opt = adamcpp.SGD(params, nonfinite=nonfinite, **hyper)
    for gk in grads[:3]:
        opt.step(gk)
    return opt, params, grads


@pytest.mark.parametrize("kwargs, exc, fragment", BAD_HYPER, ids=[str(c[0]) for c in BAD_HYPER])
def test_bad_hyperparameters_edited_between_steps_change_nothing(kwargs, exc, fragment):
    opt, params, grads = _trained()
    opt.param_groups[0].update(kwargs)
    snap = Snapshot(opt, params)
    with pytest.raises(exc, match=fragment):
        opt.step(grads[3])
    snap.assert_unchanged()


@pytest.mark.parametrize("value", [-0.01, float("nan"), float("inf")])
def test_bad_scheduled_lr_changes_nothing(value):
    opt, params, grads = _trained(lr=lambda t: 0.01 if t < 3 else value)
    snap = Snapshot(opt, params)
    with pytest.raises(ValueError, match="lr"):
        opt.step(grads[3])
    snap.assert_unchanged()


def _state_buffer(opt, i):
    return opt.state[i]["momentum_buffer"]


ERROR_CASES = {
    # name -> (mutate(opt, params, grads) -> grads to pass, exception, message fragments)
    "readonly_param": (lambda o, p, g: (p[2].setflags(write=False), g)[1], ValueError,
                       ["params[2]", "read-only"]),
    "readonly_buffer": (lambda o, p, g: (_state_buffer(o, 2).setflags(write=False), g)[1], ValueError,
                        ["momentum_buffer of params[2]", "read-only"]),
    "buffer_is_own_param": (lambda o, p, g: (o.state[2].__setitem__("momentum_buffer", p[2]), g)[1], ValueError,
                            ["momentum_buffer of params[2]", "params[2]", "shares memory"]),
    "buffer_is_other_param": (
        lambda o, p, g: (o.state[2].__setitem__("momentum_buffer", p[0][:1]), g)[1], ValueError,
        ["shares memory"]),
    "buffer_is_other_buffer": (
        lambda o, p, g: (o.state[0].__setitem__("momentum_buffer", _state_buffer(o, 1).reshape(-1)[:5]), g)[1],
        ValueError, ["shares memory"]),
    "grad_is_buffer": (lambda o, p, g: g[:2] + [_state_buffer(o, 2)], ValueError,
                       ["grads[2]", "momentum_buffer of params[2]", "shares memory"]),
    "grad_is_param": (lambda o, p, g: g[:1] + [p[1]] + g[2:], ValueError, ["grads[1]", "shares memory"]),
    "grad_wrong_shape": (lambda o, p, g: g[:2] + [np.zeros((1, 1), np.float32)], ValueError,
                         ["grads[2]", "shape"]),
    "grad_wrong_dtype": (lambda o, p, g: g[:2] + [g[2].astype(np.int32)], TypeError, ["grads[2]", "dtype"]),
    "too_few_grads": (lambda o, p, g: g[:2], ValueError, ["grads"]),
    "buffer_wrong_shape": (
        lambda o, p, g: (o.state[2].__setitem__("momentum_buffer", np.zeros(2, np.float32)), g)[1], ValueError,
        ["momentum_buffer of params[2]", "shape"]),
    "buffer_wrong_dtype": (
        lambda o, p, g: (o.state[2].__setitem__("momentum_buffer", np.zeros(1, np.float64)), g)[1], TypeError,
        ["momentum_buffer of params[2]", "dtype"]),
    "buffer_not_array": (
        lambda o, p, g: (o.state[2].__setitem__("momentum_buffer", [0.0]), g)[1], TypeError,
        ["momentum_buffer of params[2]", "ndarray"]),
    "buffer_non_contiguous": (
        lambda o, p, g: (o.state[1].__setitem__("momentum_buffer", np.zeros((3, 2), np.float32).T), g)[1],
        ValueError, ["momentum_buffer of params[1]", "contiguous"]),
    "bad_step_count": (lambda o, p, g: (o.state[2].__setitem__("step", -1), g)[1], ValueError, ["step"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_step_errors_change_nothing(case):
    mutate, exc, fragments = ERROR_CASES[case]
    opt, params, grads = _trained()
    g = mutate(opt, params, list(grads[3]))
    snap = Snapshot(opt, params)
    with pytest.raises(exc) as info:
        opt.step(g)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    snap.assert_unchanged()


@pytest.mark.parametrize("case", ["readonly_param", "grad_wrong_shape", "grad_wrong_dtype", "grad_is_param"])
def test_errors_on_the_first_step_store_no_buffer(case):
    """Validation fails in the last tensor after the first ones already got
    new buffers in the native call: none of them may be stored."""
    mutate, exc, fragments = ERROR_CASES[case]
    params0, grads = _problem()
    params = [p.copy() for p in params0]
    opt = adamcpp.SGD(params, lr=0.1, momentum=0.9)
    g = mutate(opt, params, list(grads[0]))
    snap = Snapshot(opt, params)
    with pytest.raises(exc):
        opt.step(g)
    snap.assert_unchanged()
    assert all(s == {"step": 0, "momentum_buffer": None} for s in opt.state)


def test_readonly_param_refused_at_construction():
    p = np.ones(4, np.float32)
    p.setflags(write=False)
    with pytest.raises(ValueError, match=r"params\[1\].*read-only"):
        adamcpp.SGD([np.ones(2), p], lr=0.1)


def test_readonly_grads_are_accepted():
    opt, params, grads = _trained()
    g = [x.copy() for x in grads[3]]
    for x in g:
        x.setflags(write=False)
    assert opt.step(g) is True


@pytest.mark.parametrize("mutate, exc", [
    (lambda sd: sd["state"][1].__setitem__("momentum_buffer", np.zeros((3, 2))), ValueError),
    (lambda sd: sd["state"][1].__setitem__("momentum_buffer", np.zeros((2, 3), np.int32)), TypeError),
    (lambda sd: sd["state"][2].__setitem__("step", -3), ValueError),
    (lambda sd: sd["state"][2].__setitem__("step", 1.5), ValueError),
    (lambda sd: sd["state"].__setitem__(7, {"momentum_buffer": None}), ValueError),
    (lambda sd: sd["param_groups"][0].__setitem__("dampening", 2.0), ValueError),
    (lambda sd: sd["param_groups"][0].update(nesterov=True), ValueError),
    (lambda sd: sd["param_groups"][0].__setitem__("params", [0, 1]), ValueError),
], ids=["buffer_shape", "buffer_int", "step_negative", "step_fraction", "unknown_id", "dampening",
        "nesterov_with_dampening", "param_count"])
def test_bad_state_dict_changes_nothing(mutate, exc):
    opt, params, grads = _trained()
    sd = opt.state_dict()
    for entry in sd["state"].values():
        entry["momentum_buffer"] = entry["momentum_buffer"] + 1.0
    mutate(sd)
    snap = Snapshot(opt, params)
    with pytest.raises(exc):
        opt.load_state_dict(sd)
    snap.assert_unchanged()


# ---------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [S.StepDecay(0.1, 2, 0.5), S.WarmupCosineDecay(0.05, 3, 10),
                                      lambda t: 0.1 / (1 + t)], ids=["step", "warmup_cosine", "lambda"])
def test_schedules_drive_sgd(schedule):
    """Update k uses lr(k - 1) (updates applied before it), a skipped step does
    not advance the schedule, and a checkpoint resumes at the same position."""
    params0, grads = _problem(steps=12)
    params = [p.copy() for p in params0]
    rec = Recorder(schedule)
    h = sgd_hyper(0.9, 0.1, False, 0.01, True, lr=schedule)  # the emulation calls the bare schedule
    opt = adamcpp.SGD(params, nonfinite="skip", **dict(h, lr=rec))
    emu = [(p.copy(), None) for p in params0]
    applied = 0
    for k, gk in enumerate(grads[:8]):
        if k == 4:  # a skipped update in the middle
            bad = [g.copy() for g in gk]
            bad[1].flat[0] = np.nan
            assert opt.step(bad) is False
            continue
        assert opt.step(gk, grad_scale=0.5)
        emu = [emulated_sgd_step(p, g, b, t=applied, grad_scale=0.5, **h) for (p, b), g in zip(emu, gk)]
        applied += 1
    # lr was asked for t = 0, 1, 2, 3, 4 (the skipped step), 4, 5, 6
    assert rec.seen == [0, 1, 2, 3, 4, 4, 5, 6]
    for i, (p, b) in enumerate(emu):
        assert_bitwise_equal(params[i], p, f"params[{i}]")
        assert_bitwise_equal(opt.state[i]["momentum_buffer"], b, f"buffer {i}")
    # Resume from a checkpoint in a fresh optimizer.
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] is rec
    pb = [p.copy() for p in params]
    other = adamcpp.SGD(pb, lr=1.0)
    other.load_state_dict(sd)
    rec.seen.clear()
    for gk in grads[8:]:
        other.step(gk, grad_scale=0.5)
        emu = [emulated_sgd_step(p, g, b, t=applied, grad_scale=0.5, **h) for (p, b), g in zip(emu, gk)]
        applied += 1
    assert rec.seen == [7, 8, 9, 10]
    for i, (p, b) in enumerate(emu):
        assert_bitwise_equal(pb[i], p, f"resumed params[{i}]")


def test_lr_edit_between_steps_applies_from_next_step():
    p = np.array([1.0, 2.0])
    opt = adamcpp.SGD([p], lr=0.5)
    opt.step([np.array([1.0, 1.0])])
    np.testing.assert_array_equal(p, [0.5, 1.5])
    opt.param_groups[0]["lr"] = 0.25
    opt.step([np.array([1.0, 1.0])])
    np.testing.assert_array_equal(p, [0.25, 1.25])
    opt.param_groups[0]["lr"] = S.Constant(0.125)
    opt.step([np.array([2.0, 2.0])])
    np.testing.assert_array_equal(p, [0.0, 1.0])


def test_dict_params_and_zero_size():
    """Dict-form params (labels by key) and zero-size tensors (nothing to do,
    a buffer of size 0 is still created for a momentum step)."""
    w = np.ones((2, 2), np.float32)
    e = np.zeros((0, 3), np.float64)
    opt = adamcpp.SGD({"w": w, "e": e}, lr=0.5, momentum=0.9)
    assert opt.step({"w": np.ones((2, 2), np.float32), "e": np.zeros((0, 3))}) is True
    np.testing.assert_array_equal(w, np.full((2, 2), 0.5, np.float32))
    assert opt.state[1]["momentum_buffer"].shape == (0, 3)
    with pytest.raises(ValueError, match=r"grads\['w'\].*shape"):
        opt.step({"w": np.ones(4, np.float32), "e": np.zeros((0, 3))})
