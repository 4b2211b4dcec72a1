"""The list mode's fast path (cpp/py/list_plan.h): after a full step of a list-layout optimizer applied, the next
steps run from the plan it recorded, comparing instead of re-checking; anything but new gradient arrays of the
same dtype sends the call back to the full step. Every test compares bit for bit with a control optimizer whose
fast path is switched off (it runs the full step every time), so the plan can change speed only, never results."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import adamcpp

SHAPES = [(4, 3), (7,), (2, 2, 2)]


def _arrays(seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _pair(cls=adamcpp.Adam, dtype=np.float32, **kw):
    """An optimizer and its control (fast path off) over equal copies."""
    a, b = _arrays(0, dtype), _arrays(0, dtype)
    opt, ctrl = cls(a, **kw), cls(b, **kw)
    ctrl._fast_step = lambda *args: None
    return opt, ctrl, a, b


def _same(xs, ys):
    assert all(x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(xs, ys))


def _same_state(opt, ctrl):
    for s, c in zip(opt.state, ctrl.state):
        assert s.keys() == c.keys()
        for k in s:
            if isinstance(s[k], np.ndarray):
                _same([s[k]], [c[k]])
            else:
                assert s[k] == c[k]


def _grads(seed: int, dtype=np.float32):
    return _arrays(100 + seed, dtype)


def _warm(opt, ctrl, steps: int = 2):
    for k in range(steps):
        g = _grads(k)
        assert opt.step(g) and ctrl.step([x.copy() for x in g])


def test_the_fast_path_runs_after_a_full_step_and_matches_the_full_step():
    opt, ctrl, a, b = _pair(lr=1e-2, weight_decay=0.1)
    assert opt._fast_step(opt, _grads(0), 1.0) is None  # no plan before the first full step
    _warm(opt, ctrl, 1)
    reused = _grads(7)
    for k in range(6):
        g = reused if k % 2 else _grads(10 + k)  # the same gradient objects again, or new arrays
        assert opt._fast_step(opt, g, 1.0) is True
        assert ctrl.step([x.copy() for x in g])
        _same(a, b)
        _same_state(opt, ctrl)
    assert [s["step"] for s in opt.state] == [7, 7, 7]


@pytest.mark.parametrize(
    "kw",
    [
        dict(amsgrad=True),
        dict(maximize=True, eps_style="keras"),
        dict(weight_decay=0.05, decoupled_weight_decay=True),
        dict(state_dtype="bfloat16", seed=3),
    ],
)
def test_adam_variants_match_the_full_step(kw):
    opt, ctrl, a, b = _pair(lr=1e-2, **kw)
    for k in range(6):
        g = _grads(k)
        assert opt.step(g, grad_scale=0.5) and ctrl.step([x.copy() for x in g], grad_scale=0.5)
    assert opt._fast_step(opt, _grads(9), 0.5) is True
    assert ctrl.step(_grads(9), grad_scale=0.5)
    _same(a, b)
    _same_state(opt, ctrl)


def test_half_parameters_with_master_copies_and_stochastic_rounding_match():
    opt, ctrl, a, b = _pair(dtype=np.float16, lr=1e-2)
    opt2, ctrl2, a2, b2 = _pair(dtype=np.float16, lr=1e-2, master_weights=False, param_rounding="stochastic", seed=5)
    for k in range(5):
        for o, c in ((opt, ctrl), (opt2, ctrl2)):
            g = _grads(k, np.float16)
            assert o.step(g) and c.step([x.copy() for x in g])
    assert opt._fast_step(opt, _grads(8, np.float16), 1.0) is True
    assert opt2._fast_step(opt2, _grads(8, np.float16), 1.0) is True
    ctrl.step(_grads(8, np.float16))
    ctrl2.step(_grads(8, np.float16))
    _same(a, b)
    _same(a2, b2)
    _same_state(opt, ctrl)
    _same_state(opt2, ctrl2)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_momentum_matches_the_full_step(nesterov):
    opt, ctrl, a, b = _pair(adamcpp.SGD, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
    for k in range(6):
        g = _grads(k)
        assert opt.step(g) and ctrl.step([x.copy() for x in g])
    assert opt._fast_step(opt, _grads(3), 1.0) is True
    ctrl.step(_grads(3))
    _same(a, b)
    _same_state(opt, ctrl)


def test_clipping_and_the_nonfinite_policies_match():
    opt, ctrl, a, b = _pair(lr=1e-2, max_grad_norm=0.5)
    _warm(opt, ctrl)
    assert opt._fast_step(opt, _grads(3), 2.0) is True
    ctrl.step(_grads(3), grad_scale=2.0)
    assert opt.last_grad_norm == ctrl.last_grad_norm and opt.last_grad_norm > 0.5
    _same(a, b)
    bad = _grads(4)
    bad[1][3] = np.nan
    opt.nonfinite = ctrl.nonfinite = "skip"
    before = [x.copy() for x in a]
    assert opt._fast_step(opt, bad, 1.0) is False and ctrl.step(bad) is False
    _same(a, before)
    assert opt.state[0]["step"] == 3
    opt.nonfinite = ctrl.nonfinite = "raise"
    with pytest.raises(FloatingPointError, match=r"^grads\[1\]: non-finite gradient"):
        opt._fast_step(opt, bad, 1.0)
    _same(a, before)
    opt.max_grad_norm = ctrl.max_grad_norm = None  # read at every step
    assert opt._fast_step(opt, _grads(5), 1.0) is True
    ctrl.step(_grads(5))
    _same(a, b)
    _same_state(opt, ctrl)


def test_dict_form_gradients_are_matched_by_key():
    a = dict(zip("wbc", _arrays(0)))
    b = dict(zip("wbc", _arrays(0)))
    opt, ctrl = adamcpp.Adam(a, lr=1e-2), adamcpp.Adam(b, lr=1e-2)
    ctrl._fast_step = lambda *args: None
    for k in range(2):
        g = dict(zip("wbc", _grads(k)))
        opt.step(g)
        ctrl.step(g)
    g = dict(zip("wbc", _grads(5)))
    shuffled = {k: g[k] for k in "cwb"}  # another order: matched by key, not position
    assert opt._fast_step(opt, shuffled, 1.0) is True
    ctrl.step(g)
    _same(a.values(), b.values())
    assert opt._fast_step(opt, {k: g[k] for k in "wb"}, 1.0) is None  # a missing key: the full step says which
    with pytest.raises(ValueError, match="missing gradient"):
        opt.step({k: g[k] for k in "wb"})


def _change_group(opt, a):
    opt.param_groups[0]["lr"] = 0.5


def _change_params_list(opt, a):
    opt.param_groups[0]["params"][1] = a[1].copy()


def _change_state(opt, a):
    opt.state[1]["exp_avg"] = opt.state[1]["exp_avg"].copy()


def _replace_state_list(opt, a):
    opt.state = [dict(s) for s in opt.state]


def _reshape_param(opt, a):
    a[0].shape = (3, 4)


def _readonly_param(opt, a):
    a[2].setflags(write=False)


def _resize_param(opt, a):
    a[1].resize(9, refcheck=False)


def _reshape_state(opt, a):
    opt.state[0]["exp_avg_sq"].shape = (12,)


def _policy(opt, a):
    opt.nonfinite = "bogus"


@pytest.mark.parametrize(
    "change",
    [
        _change_group,
        _change_params_list,
        _change_state,
        _replace_state_list,
        _reshape_param,
        _readonly_param,
        _resize_param,
        _reshape_state,
        _policy,
    ],
)
def test_any_change_but_new_gradients_goes_back_to_the_full_step(change):
    opt, ctrl, a, b = _pair(lr=1e-2)
    _warm(opt, ctrl)
    snapshot = [x.copy() for x in a]
    states = [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state]
    change(opt, a)
    assert opt._fast_step(opt, _grads(3), 1.0) is None
    # Nothing was written by the refused fast step (a resized parameter keeps its first elements).
    for x, before in zip(a, snapshot):
        assert np.array_equal(x.reshape(-1)[: before.size], before.reshape(-1))
    for s, before in zip(opt.state, states):
        assert s["step"] == before["step"]
        for k, v in before.items():
            if isinstance(v, np.ndarray):
                assert np.array_equal(s[k].reshape(-1), v.reshape(-1))


@pytest.mark.parametrize(
    "bad",
    [
        lambda g, a: [g[0], g[1].astype(np.float64), g[2]],  # another gradient dtype
        lambda g, a: [g[0], a[1], g[2]],  # a gradient aliasing a parameter
        lambda g, a: [g[0], g[1].reshape(-1)[:6], g[2]],  # another size
        lambda g, a: [g[0], np.ones((7, 2), np.float32)[:, 0], g[2]],  # not C-contiguous
        lambda g, a: [g[0], g[1]],  # one short
        lambda g, a: iter(g),  # not a list, tuple or dict
    ],
)
def test_gradients_the_plan_cannot_take_go_back_to_the_full_step(bad):
    opt, ctrl, a, b = _pair(lr=1e-2)
    _warm(opt, ctrl)
    grads = bad(_grads(3), a)
    before = [x.copy() for x in a]
    assert opt._fast_step(opt, grads, 1.0) is None
    _same(a, before)
    assert [s["step"] for s in opt.state] == [2, 2, 2]


def test_grad_scale_that_is_not_a_plain_finite_number_goes_back_to_the_full_step():
    opt, ctrl, a, b = _pair(lr=1e-2)
    _warm(opt, ctrl)
    for scale in (np.float32(2.0), float("inf"), float("nan"), 2**60, "2"):
        assert opt._fast_step(opt, _grads(3), scale) is None
    assert opt._fast_step(opt, _grads(3), 2) is True  # an int is a plain number
    ctrl.step(_grads(3), grad_scale=2.0)
    _same(a, b)


def test_a_schedule_or_a_mutable_value_always_runs_the_full_step():
    opt, ctrl, a, b = _pair(lr=lambda t: 1e-2 / (1 + t))
    _warm(opt, ctrl, 3)
    assert opt._fast_step(opt, _grads(3), 1.0) is None
    opt2, ctrl2, a2, b2 = _pair(lr=1e-2)
    opt2.param_groups[0]["betas"] = [0.9, 0.999]  # a mutable value: validated at every step
    ctrl2.param_groups[0]["betas"] = [0.9, 0.999]
    _warm(opt2, ctrl2, 3)
    assert opt2._fast_step(opt2, _grads(3), 1.0) is None
    _same(a, b)
    _same(a2, b2)


def test_the_plan_is_recorded_again_after_a_change():
    opt, ctrl, a, b = _pair(lr=1e-2)
    _warm(opt, ctrl)
    opt.param_groups[0]["lr"] = ctrl.param_groups[0]["lr"] = 3e-2
    assert opt.step(_grads(3)) and ctrl.step(_grads(3))  # a full step: validates the edit, records a plan
    assert opt._fast_step(opt, _grads(4), 1.0) is True
    ctrl.step(_grads(4))
    _same(a, b)
    _same_state(opt, ctrl)


def test_a_call_on_another_thread_waits_for_the_fast_step():
    opt, ctrl, a, b = _pair(lr=1e-3)
    _warm(opt, ctrl)
    grads = _grads(3)
    errors = []

    def run():
        try:
            for _ in range(200):
                assert opt.step(grads)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [s["step"] for s in opt.state] == [602, 602, 602]
    for _ in range(600):
        ctrl.step(grads)
    _same(a, b)


def test_the_lock_held_elsewhere_sends_the_call_to_the_full_step():
    opt, ctrl, a, b = _pair(lr=1e-3)
    _warm(opt, ctrl)
    opt._lock.enter()
    try:
        assert opt._fast_step(opt, _grads(3), 1.0) is None
        with pytest.raises(RuntimeError, match="called again while a call on this optimizer is running"):
            opt.step(_grads(3))
    finally:
        opt._lock.leave()
    assert opt._fast_step(opt, _grads(3), 1.0) is True


def test_copies_start_without_a_plan_and_step_alike():
    import copy
    import pickle

    opt, ctrl, a, b = _pair(lr=1e-2)
    _warm(opt, ctrl)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone._fast_step(clone, _grads(3), 1.0) is None
        assert clone.step(_grads(3))
        assert clone._fast_step(clone, _grads(4), 1.0) is True
        assert [s["step"] for s in clone.state] == [4, 4, 4]
    assert [s["step"] for s in opt.state] == [2, 2, 2]


class _FinalizedGrad(np.ndarray):
    """A gradient whose finalizer runs `hook` (once per array)."""

    hook = None

    def __del__(self):
        hook, _FinalizedGrad.hook = _FinalizedGrad.hook, None
        if hook is not None:
            hook()


def test_a_gradient_finalizer_that_steps_the_optimizer_again_is_safe():
    """A step holds its gradients only while it runs (and lets go of them after leaving the call lock): a finalizer
    run when the caller drops them may step the same optimizer (a full or a fast step), and the results are those
    of the same sequence of steps."""
    opt, ctrl, a, b = _pair(lr=1e-2)
    applied = []

    def nested():
        assert opt.step(_grads(9))
        applied.append(9)

    for k in range(6):
        grads = [x.view(_FinalizedGrad) for x in _grads(k)]
        applied.append(k)  # before: the nested step runs at the end of this one, after its update
        assert opt.step(grads)
        del grads
        _FinalizedGrad.hook = nested  # fires when the plan lets go of this step's gradients
    _FinalizedGrad.hook = None
    assert 9 in applied
    for k in applied:
        assert ctrl.step(_grads(k))
    _same(a, b)
    _same_state(opt, ctrl)
    assert [s["step"] for s in opt.state] == [len(applied)] * 3


@pytest.mark.parametrize("elements", [8, 3 * adamcpp.build_info()["parallel_min_elements"]])
def test_gradients_are_not_kept_after_the_step(elements):
    """The plan keeps parameters and state, never gradients: a caller's gradient arrays are freed as soon as the
    caller drops them, after a full step and after fast steps (small steps run with the GIL held, large ones hold
    their gradients while the GIL is released)."""
    import gc
    import weakref

    rng = np.random.default_rng(1)
    params = [rng.standard_normal(elements).astype(np.float32) for _ in range(3)]
    opt = adamcpp.Adam(params, lr=1e-3)
    for k in range(4):
        grads = [rng.standard_normal(elements).astype(np.float32) for _ in range(3)]
        refs = [weakref.ref(g) for g in grads]
        assert opt.step(grads)
        del grads
        assert all(r() is None for r in refs), f"step {k}: a gradient outlived its step"
    gc.collect()
    assert opt._fast_step(opt, [np.zeros(elements, np.float32) for _ in range(3)], 1.0) is True


def _run_arrays(seed: int, sizes, dtypes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(d) for n, d in zip(sizes, dtypes)]


# Runs of tensors (a group's native tensors of one dtype and one count share one kernel call): sizes that put
# run boundaries inside and across the 8192-element chunks the threads split at (with two threads the second
# starts inside a run, at tensor 7, which follows tensors 5 and 6), an empty tensor, float32 and
# float64 tensors interleaved in one group, and groups that differ in every scalar the run shares.
RUN_SIZES = [300, 5000, 0, 9000, 64, 64, 3, 12000, 7000, 20000, 1, 2]
RUN_DTYPES = [np.float32, np.float32, np.float32, np.float64, np.float64, np.float32] * 2
# Groups [0, 4), [4, 8), [8, 12): each boundary between two tensors of one dtype (a run must not cross it).
RUN_BOUNDS = [0, 4, 8, 12]


@pytest.mark.parametrize("threads", [1, 2])
def test_runs_of_tensors_match_the_full_step_across_groups_dtypes_counts_and_threads(threads):
    groups_kw = [
        dict(lr=1e-2),
        dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True),
        dict(lr=5e-3, weight_decay=0.05, decoupled_weight_decay=True, eps_style="keras", maximize=True),
    ]
    bounds = RUN_BOUNDS

    def build():
        arrays = _run_arrays(0, RUN_SIZES, RUN_DTYPES)
        groups = [dict(params=arrays[bounds[k] : bounds[k + 1]], **kw) for k, kw in enumerate(groups_kw)]
        return adamcpp.Adam(groups), arrays

    old = adamcpp.get_num_threads()
    adamcpp.set_num_threads(threads)
    try:
        (opt, a), (ctrl, b) = build(), build()
        ctrl._fast_step = lambda *args: None

        def both(seed, scale=1.0):
            g = _run_arrays(seed, RUN_SIZES, RUN_DTYPES)
            assert opt.step(g, grad_scale=scale) and ctrl.step([x.copy() for x in g], grad_scale=scale)
            _same(a, b)
            _same_state(opt, ctrl)

        both(1)
        for k in range(3):
            assert opt._fast_step(opt, _run_arrays(2 + k, RUN_SIZES, RUN_DTYPES), 0.5) is True
            assert ctrl.step(_run_arrays(2 + k, RUN_SIZES, RUN_DTYPES), grad_scale=0.5)
            _same(a, b)
            _same_state(opt, ctrl)
        # Counts that differ inside a group (a run must not share one step's scalars across them).
        for o in (opt, ctrl):
            o.state[1]["step"] = 40
            o.state[7]["step"] = 2
        both(6)
        for k in range(3):
            assert opt._fast_step(opt, _run_arrays(7 + k, RUN_SIZES, RUN_DTYPES), 1.0) is True
            assert ctrl.step(_run_arrays(7 + k, RUN_SIZES, RUN_DTYPES))
            _same(a, b)
            _same_state(opt, ctrl)
        assert [s["step"] for s in opt.state][:3] == [8, 44, 8]
    finally:
        adamcpp.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_sgd_runs_match_the_full_step_across_groups_dtypes_and_threads(threads):
    groups_kw = [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01),
        dict(lr=0.02, momentum=0.8, nesterov=True, maximize=True),
    ]
    bounds = RUN_BOUNDS

    def grads(seed):
        g = _run_arrays(seed, RUN_SIZES, RUN_DTYPES)
        g[6] = g[6].astype(np.float16)  # a gradient converted as it is read: a tensor alone, between runs
        return g

    def build():
        arrays = _run_arrays(0, RUN_SIZES, RUN_DTYPES)
        groups = [dict(params=arrays[bounds[k] : bounds[k + 1]], **kw) for k, kw in enumerate(groups_kw)]
        return adamcpp.SGD(groups), arrays

    old = adamcpp.get_num_threads()
    adamcpp.set_num_threads(threads)
    try:
        (opt, a), (ctrl, b) = build(), build()
        ctrl._fast_step = lambda *args: None
        for k in range(2):  # the momentum buffers start at the first step: the plan is recorded at the second
            g = grads(k)
            assert opt.step(g) and ctrl.step([x.copy() for x in g])
        for k in range(3):
            assert opt._fast_step(opt, grads(2 + k), 0.5) is True
            assert ctrl.step(grads(2 + k), grad_scale=0.5)
            _same(a, b)
            _same_state(opt, ctrl)
    finally:
        adamcpp.set_num_threads(old)


def test_a_new_gradient_laid_out_as_the_last_is_checked_where_it_lies():
    """A new gradient with the last one's layout (dtype descriptor, flags, dimensions) is taken after checking
    only where its data lies: over a buffer the step writes, it goes back to the full step, which refuses it."""
    opt, ctrl, a, b = _pair(lr=1e-2)

    def views(seed):  # gradients as views of one buffer (arrays that do not own their data, as state views)
        g = _grads(seed)
        buf = np.concatenate([x.reshape(-1) for x in g])
        out, at = [], 0
        for x in g:
            out.append(buf[at : at + x.size].reshape(x.shape))
            at += x.size
        return out

    for k in range(2):
        g = views(k)
        assert opt.step(g) and ctrl.step([x.copy() for x in g])
    for k in range(2, 4):  # new buffers, the same layout: taken by the plan
        g = views(k)
        assert opt._fast_step(opt, g, 1.0) is True and ctrl.step([x.copy() for x in g])
        _same(a, b)
    g = views(5)
    g[1] = opt.state[1]["exp_avg"]  # laid out as a gradient view, over memory the step writes
    assert g[1].flags["OWNDATA"] is False and g[1].shape == a[1].shape
    before = [x.copy() for x in a]
    assert opt._fast_step(opt, g, 1.0) is None
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        opt.step(g)
    _same(a, before)
    assert [s["step"] for s in opt.state] == [4, 4, 4]
