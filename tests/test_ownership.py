"""Ownership, concurrency, copies and limits (docs/api.md, "Concurrency" and
"Copies and persistence").

Each test here is the regression test of a defect found by driving the
optimizers as a demanding user would: threads that rebind or empty lists while
a step runs, two threads stepping one optimizer, copies followed by edits,
in-place edits of mutable hyperparameters, state lists replaced by copies,
Python code re-entering a running step, joblib round trips, step counts and
numbers at the limits, and the caller's floating-point modes.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading
import time

import numpy as np
import pytest

import adamcpp
from conftest import assert_bitwise_equal

F32 = np.float32


def _problem(n=3, size=5, steps=6, seed=0, dtype=F32):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(size).astype(dtype) for _ in range(n)]
    grads = [[rng.standard_normal(size).astype(dtype) for _ in range(n)] for _ in range(steps)]
    return params, grads


def _state_bits(opt):
    return [
        {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state
    ]


def _assert_same_state(a, b, what):
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), f"{what}: state[{i}] keys"
        for k in sa:
            if isinstance(sa[k], np.ndarray):
                assert_bitwise_equal(sa[k], sb[k], f"{what}: state[{i}][{k!r}]")
            else:
                assert sa[k] == sb[k], f"{what}: state[{i}][{k!r}]: {sa[k]!r} != {sb[k]!r}"


def _assert_same_params(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert_bitwise_equal(x, y, f"{what}: params[{i}]")


# ---------------------------------------------------------------------------
# 1, 2. A running step owns what it uses
# ---------------------------------------------------------------------------
def _run_with_mutator(step_once, mutate, seconds=0.6):
    """Calls step_once() repeatedly while another thread calls mutate() as fast
    as it can; returns the number of steps."""
    stop = threading.Event()
    errors = []

    def mutator():
        try:
            while not stop.is_set():
                mutate()
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    t = threading.Thread(target=mutator)
    t.start()
    count = 0
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline or count < 5:
            step_once()
            count += 1
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    return count


@pytest.mark.parametrize("how", ["rebind", "replace_list"])
def test_step_survives_gradients_freed_by_another_thread(restore_threads, how):
    """The gradients' only references are in a list that another thread keeps
    rebinding while the step runs with the GIL released: the step must hold
    them (large arrays are unmapped when freed, so a borrowed pointer would
    fault)."""
    adamcpp.set_num_threads(2)
    n = 1 << 20
    params = [np.zeros(n, F32) for _ in range(2)]
    opt = adamcpp.Adam(params, lr=1e-3)
    grads = [np.full(n, 0.5, F32) for _ in range(2)]

    def mutate():
        if how == "rebind":
            grads[0] = np.full(n, 0.5, F32)
            grads[1] = np.full(n, 0.5, F32)
        else:
            grads[:] = [np.full(n, 0.5, F32) for _ in range(2)]

    steps = _run_with_mutator(lambda: opt.step(grads), mutate)
    # Every gradient ever seen was 0.5 everywhere: the trajectory is known.
    ref_params = [np.zeros(8, F32)]
    ref = adamcpp.Adam(ref_params, lr=1e-3)
    for _ in range(steps):
        ref.step([np.full(8, 0.5, F32)])
    for p in params:
        assert np.all(p == ref_params[0][0])
    assert [s["step"] for s in opt.state] == [steps, steps]


def test_global_norm_survives_gradients_freed_by_another_thread(restore_threads):
    adamcpp.set_num_threads(2)
    n = 1 << 20
    grads = [np.full(n, 2.0, F32) for _ in range(3)]
    expected = float(np.sqrt(3 * n * 4.0))

    def mutate():
        grads[:] = [np.full(n, 2.0, F32) for _ in range(3)]

    norms = []
    _run_with_mutator(lambda: norms.append(adamcpp.global_norm(grads)), mutate)
    assert all(x == expected for x in norms)


def test_state_arrays_replaced_by_another_thread_during_steps(restore_threads):
    """Another thread replaces (and so frees) state arrays and whole state
    dicts while steps run: no crash, and every step counts."""
    adamcpp.set_num_threads(2)
    n = 1 << 19
    params = [np.zeros(n, F32) for _ in range(2)]
    opt = adamcpp.Adam(params, lr=1e-3)
    grads = [np.full(n, 0.5, F32) for _ in range(2)]
    opt.step(grads)

    def mutate():
        opt.state[0]["exp_avg"] = np.zeros(n, F32)
        opt.state[1] = dict(opt.state[1])  # may race with a step's count: only safety is asserted for it

    applied = []
    steps = _run_with_mutator(lambda: applied.append(opt.step(grads)), mutate)
    assert all(applied) and len(applied) == steps
    assert opt.state[0]["step"] == steps + 1


# ---------------------------------------------------------------------------
# 3. Calls on one optimizer run one at a time
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.SGD])
def test_two_threads_stepping_one_optimizer_are_serialized(restore_threads, cls):
    adamcpp.set_num_threads(1)
    n = 1 << 16
    kwargs = {"momentum": 0.9} if cls is adamcpp.SGD else {"amsgrad": True}
    rng = np.random.default_rng(1)
    p0 = [rng.standard_normal(n).astype(F32) for _ in range(3)]
    grads = [rng.standard_normal(n).astype(F32) for _ in range(3)]
    params = [p.copy() for p in p0]
    opt = cls(params, lr=1e-3, **kwargs)
    barrier = threading.Barrier(2)

    def worker():
        barrier.wait()
        for _ in range(20):
            assert opt.step(grads)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s["step"] for s in opt.state] == [40, 40, 40]
    seq = [p.copy() for p in p0]
    ref = cls(seq, lr=1e-3, **kwargs)
    for _ in range(40):
        ref.step(grads)
    _assert_same_params(params, seq, "two threads vs 40 sequential steps")
    _assert_same_state(_state_bits(opt), _state_bits(ref), "two threads vs 40 sequential steps")


def test_state_dict_waits_for_a_running_step(restore_threads):
    """state_dict() from another thread never sees a half-written step: its
    step counts and arrays belong to one and the same step."""
    adamcpp.set_num_threads(1)
    n = 1 << 20
    params = [np.zeros(n, F32)]
    opt = adamcpp.Adam(params, lr=1e-3)
    grads = [np.full(n, 0.5, F32)]
    stop = threading.Event()

    def stepper():
        while not stop.is_set():
            opt.step(grads)

    t = threading.Thread(target=stepper)
    t.start()
    try:
        for _ in range(10):
            sd = opt.state_dict()
            k = sd["state"][0]["step"]
            m = sd["state"][0]["exp_avg"]
            # m after k steps of a constant gradient g: g * (1 - 0.9**k), the same in every element.
            assert np.all(m == m[0]) and np.all(m[-1] == m[0])
            if k:
                assert abs(float(m[0]) - 0.5 * (1 - 0.9**k)) < 1e-5
    finally:
        stop.set()
        t.join()


# ---------------------------------------------------------------------------
# 4. Copies keep no stale cache
# ---------------------------------------------------------------------------
COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


def _joblib_copy(obj):
    joblib = pytest.importorskip("joblib")
    buf = io.BytesIO()
    joblib.dump(obj, buf)
    buf.seek(0)
    return joblib.load(buf)


COPIES["joblib"] = _joblib_copy


def _edit_three_times(group, last_lr):
    group["lr"] = 0.1
    group["eps"] = 1e-8
    group["lr"] = last_lr


@pytest.mark.parametrize("how", list(COPIES))
def test_copied_optimizer_sees_every_later_group_edit(how):
    """The copy is edited as often after the copy as the original was before
    it: nothing the copy carries may make its old validated values look
    current."""
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    _edit_three_times(opt.param_groups[0], 1e-2)
    opt.step(grads[0])
    params2, opt2 = COPIES[how]((params, opt))
    if how == "joblib":
        opt2.param_groups[0]["params"] = params2  # joblib restores arrays as distinct copies
    _edit_three_times(opt2.param_groups[0], 0.5)
    twin = [p.copy() for p in params2]
    ref = adamcpp.Adam(twin, lr=0.5)
    ref.load_state_dict(opt2.state_dict())
    opt2.step(grads[1])
    ref.step(grads[1])
    _assert_same_params(params2, twin, f"{how}: lr edited after the copy")

    params3, opt3 = COPIES[how]((params, opt))
    if how == "joblib":
        opt3.param_groups[0]["params"] = params3
    _edit_three_times(opt3.param_groups[0], -1.0)
    before = [p.copy() for p in params3]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        opt3.step(grads[2])
    _assert_same_params(params3, before, f"{how}: refused lr changed nothing")


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.AdamW, adamcpp.SGD])
def test_copies_continue_exactly_like_the_original(how, cls):
    """Every copy path preserves parameters, state, counts, groups and
    schedules: the copy continues bit for bit like the original."""
    params, grads = _problem(n=4)
    groups = [
        {"params": params[:2], "lr": adamcpp.schedules.ExponentialDecay(1e-2, 0.9)},
        {"params": params[2:], "lr": 3e-3},
    ]
    kwargs = {"momentum": 0.9, "nesterov": True} if cls is adamcpp.SGD else {"amsgrad": True}
    opt = cls(groups, max_grad_norm=1.0, nonfinite="skip", **kwargs)
    for g in grads[:3]:
        opt.step(g)
    params2, opt2 = COPIES[how]((params, opt))
    if how == "joblib":
        opt2.param_groups[0]["params"] = params2[:2]
        opt2.param_groups[1]["params"] = params2[2:]
    for g in grads[3:]:
        assert opt.step(g) and opt2.step(g)
    _assert_same_params(params, params2, how)
    _assert_same_state(_state_bits(opt), _state_bits(opt2), how)
    assert opt2.last_grad_norm == opt.last_grad_norm


def test_joblib_round_trip_keeps_the_state():
    """joblib restores the groups' arrays as distinct objects: the loaded
    optimizer must still step from its saved state (step 3 -> 4), not restart."""
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    for g in grads[:3]:
        opt.step(g)
    loaded = _joblib_copy(opt)
    assert [s["step"] for s in loaded.state] == [3, 3, 3]
    exp_avg = [s["exp_avg"].copy() for s in loaded.state]
    loaded.step(grads[3])
    assert [s["step"] for s in loaded.state] == [4, 4, 4]
    opt.step(grads[3])
    for i, s in enumerate(loaded.state):
        assert_bitwise_equal(s["exp_avg"], opt.state[i]["exp_avg"], f"exp_avg of params[{i}]")
        assert not np.array_equal(s["exp_avg"], exp_avg[i])
    for a, b in zip(loaded.param_groups[0]["params"], params):
        assert_bitwise_equal(a, b, "loaded parameters")


class _Model:
    """A scikit-learn-style estimator: it keeps its weights itself and an
    optimizer over them, and re-binds the optimizer after loading."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.coefs_ = [rng.standard_normal((4, 3)).astype(F32), rng.standard_normal(3).astype(F32)]
        self.opt_ = adamcpp.AdamW(self.coefs_, lr=1e-2)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.opt_.param_groups[0]["params"] = self.coefs_  # the documented re-binding idiom

    def partial_fit(self, grads):
        self.opt_.step(grads)


def test_joblib_model_holding_an_optimizer_continues_bitwise():
    rng = np.random.default_rng(3)
    grads = [[rng.standard_normal((4, 3)).astype(F32), rng.standard_normal(3).astype(F32)] for _ in range(6)]
    model = _Model()
    for g in grads[:3]:
        model.partial_fit(g)
    loaded = _joblib_copy(model)
    assert loaded.opt_.param_groups[0]["params"][0] is loaded.coefs_[0]
    for g in grads[3:]:
        model.partial_fit(g)
        loaded.partial_fit(g)
    _assert_same_params(loaded.coefs_, model.coefs_, "joblib-loaded model")
    assert [s["step"] for s in loaded.opt_.state] == [6, 6]


def test_parameters_replaced_by_equal_copies_keep_their_state():
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    twin = [p.copy() for p in params]
    ref = adamcpp.Adam(twin, lr=1e-2)
    for g in grads[:2]:
        opt.step(g)
        ref.step(g)
    copies = [p.copy() for p in params]
    opt.param_groups[0]["params"] = copies
    for g in grads[2:]:
        opt.step(g)
        ref.step(g)
    _assert_same_params(copies, twin, "after replacing the parameters by copies")
    assert [s["step"] for s in opt.state] == [6, 6, 6]


def test_a_new_array_that_is_not_a_replacement_starts_fresh():
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.step(grads[0])
    extra = np.zeros(5, F32)
    opt.param_groups[0]["params"] = [*params, extra]  # added, not replacing anything
    opt.step([*grads[1], np.ones(5, F32)])
    assert [s["step"] for s in opt.state] == [2, 2, 2, 1]
    other_shape = np.zeros(7, F32)
    opt.param_groups[0]["params"] = [params[0], params[1], other_shape, extra]  # different shape: fresh
    opt.step([grads[2][0], grads[2][1], np.ones(7, F32), np.ones(5, F32)])
    assert [s["step"] for s in opt.state] == [3, 3, 1, 2]


# ---------------------------------------------------------------------------
# 5. Mutable hyperparameters are re-read at every step
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("container", [list, np.array])
def test_in_place_edit_of_mutable_betas_applies(container):
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.param_groups[0]["betas"] = container([0.9, 0.999])
    twin = [p.copy() for p in params]
    ref = adamcpp.Adam(twin, lr=1e-2)
    for g in grads[:2]:
        opt.step(g)
        ref.step(g)
    opt.param_groups[0]["betas"][0] = 0.0  # in place: the dict itself is not edited
    ref.param_groups[0]["betas"] = (0.0, 0.999)
    for g in grads[2:4]:
        opt.step(g)
        ref.step(g)
    _assert_same_params(params, twin, "in-place beta1 edit")
    opt.param_groups[0]["betas"][1] = 7.0
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\]\[1\]"):
        opt.step(grads[4])
    _assert_same_params(params, before, "refused beta2 changed nothing")


def test_immutable_group_keeps_its_validated_values_until_edited():
    """A group of immutable values is validated once and then reused; any edit
    through the dict's methods is seen at the next step."""
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.step(grads[0])
    group = opt.param_groups[0]
    assert group.validated_hyper is not None and group.validated_hyper.lr == 1e-2
    group.update(eps=1e-3)
    assert group.validated_hyper is None
    opt.step(grads[1])
    assert group.validated_hyper.eps == 1e-3


# ---------------------------------------------------------------------------
# 6. A replaced state list is followed
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["deepcopy", "other_optimizer"])
def test_state_list_replaced_by_copies_then_edited(source):
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    twin = [p.copy() for p in params]
    ref = adamcpp.Adam(twin, lr=1e-2)
    for g in grads[:2]:
        opt.step(g)
        ref.step(g)
    if source == "deepcopy":
        opt.state = copy.deepcopy(opt.state)
    else:
        other = adamcpp.Adam([p.copy() for p in params], lr=1e-2)
        other.load_state_dict(opt.state_dict())
        opt.state = other.state
    opt.step(grads[2])
    ref.step(grads[2])
    opt.state[0]["step"] = 10
    opt.state[1]["exp_avg"] = np.full(5, 0.25, F32)
    ref.state[0]["step"] = 10
    ref.state[1]["exp_avg"] = np.full(5, 0.25, F32)
    marker = opt.state[1]["exp_avg"]
    for g in grads[3:]:
        opt.step(g)
        ref.step(g)
    assert opt.state[1]["exp_avg"] is marker and not np.all(marker == 0.25)  # the new array was written
    _assert_same_params(params, twin, f"{source}: edits after replacing the state list")
    _assert_same_state(_state_bits(opt), _state_bits(ref), source)


# ---------------------------------------------------------------------------
# 7. Python code run mid-step
# ---------------------------------------------------------------------------
class _SteppingCount:
    """An int-like step count whose __index__ runs another optimizer's step."""

    def __init__(self, value, action):
        self.value = value
        self.action = action

    def __index__(self):
        self.action()
        return self.value


def test_step_count_whose_index_steps_another_optimizer():
    params, grads = _problem(n=4)
    groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 5e-3}]
    opt = adamcpp.Adam(groups)
    twin = [p.copy() for p in params]
    ref = adamcpp.Adam([{"params": twin[:2], "lr": 1e-2}, {"params": twin[2:], "lr": 5e-3}])
    for g in grads[:2]:
        opt.step(g)
        ref.step(g)
    other_params = [np.zeros(3000, F32) for _ in range(6)]
    other = adamcpp.Adam(other_params, lr=0.3)

    def step_other():  # temporaries only: nothing but the call holds these gradients
        other.step([np.ones(3000, F32) for _ in range(6)])

    opt.state[2]["step"] = _SteppingCount(2, step_other)
    opt.step(grads[2])
    ref.step(grads[2])
    _assert_same_params(params, twin, "re-entered step")
    assert [s["step"] for s in opt.state] == [3, 3, 3, 3]
    assert [s["step"] for s in other.state] == [1] * 6
    assert all(np.all(p == other_params[0][0]) and p[0] != 0 for p in other_params)


@pytest.mark.parametrize("where", ["step_count", "schedule"])
def test_reentering_the_same_optimizer_is_refused(where):
    params, grads = _problem()
    box = {}

    def reenter(t=None):
        box["opt"].step(grads[0])
        return 1e-2

    opt = adamcpp.Adam(params, lr=reenter if where == "schedule" else 1e-2)
    box["opt"] = opt
    if where == "step_count":
        opt.state[0]["step"] = _SteppingCount(0, reenter)
    before = [p.copy() for p in params]
    with pytest.raises(RuntimeError, match="one call at a time"):
        opt.step(grads[1])
    _assert_same_params(params, before, "refused re-entry")
    assert [s["step"] for s in opt.state][1:] == [0, 0]
    opt.state[0]["step"] = 0
    opt.param_groups[0]["lr"] = 1e-2
    assert opt.step(grads[1])  # the optimizer is usable again


def test_native_owner_refuses_a_second_call_while_busy():
    """The native owner itself refuses overlapping calls (the Python lock
    normally prevents them)."""
    from adamcpp import _core
    from adamcpp._native import StepCall

    params, grads = _problem()
    opt = adamcpp.Adam(params)
    box = {}

    def inner():
        box["err"] = None
        try:
            _core.adam_step(opt._state_cache, StepCall(opt.layout.params, grads[0], opt.state, opt.layout.group_of,
                                                       opt._group_hypers(), 1.0, 0, -1.0, opt._family.patterns, None))
        except RuntimeError as err:
            box["err"] = err

    opt.state[0]["step"] = _SteppingCount(0, inner)
    opt._state_cache.clear()
    _core.adam_step(opt._state_cache, StepCall(opt.layout.params, grads[1], opt.state, opt.layout.group_of,
                                               [opt._family.hyper(opt.param_groups[0], "g")], 1.0, 0, -1.0,
                                               opt._family.patterns, None))
    assert isinstance(box["err"], RuntimeError) and "already running a step" in str(box["err"])


# ---------------------------------------------------------------------------
# 9. Step counts at the limit
# ---------------------------------------------------------------------------
MAX_STORED = 2**63 - 2


def test_step_count_that_cannot_be_incremented_is_refused():
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.state[1]["step"] = MAX_STORED
    assert opt.step(grads[0])
    assert opt.state[1]["step"] == MAX_STORED + 1 and np.all(np.isfinite(params[1]))
    before = [p.copy() for p in params]
    states = _state_bits(opt)
    with pytest.raises(ValueError, match=r"state\[1\]\['step'\]: expected an integer <= 9223372036854775806"):
        opt.step(grads[1])
    _assert_same_params(params, before, "refused count")
    _assert_same_state(_state_bits(opt), states, "refused count")
    opt.state[1]["step"] = 2**63
    with pytest.raises(ValueError, match=r"state\[1\]\['step'\]: expected an integer <= "):
        opt.step(grads[1])


@pytest.mark.parametrize("bad", [2**63 - 1, 2**63, 1e300, 10**400, float(2**63)])
def test_load_state_dict_refuses_counts_that_cannot_be_incremented(bad):
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    opt.step(grads[0])
    sd = opt.state_dict()
    sd["state"][2]["step"] = bad
    with pytest.raises(ValueError, match=r"state_dict\['state'\]\[2\]\['step'\]"):
        opt.load_state_dict(sd)
    assert [s["step"] for s in opt.state] == [1, 1, 1]
    sd["state"][2]["step"] = MAX_STORED
    opt.load_state_dict(sd)
    assert opt.state[2]["step"] == MAX_STORED


def test_functional_accepts_the_largest_step():
    p, g, m, v = (np.ones(4, F32) for _ in range(4))
    adamcpp.functional.adam(p, g, m, v, step=2**63 - 1, lr=1e-2)
    assert np.all(np.isfinite(p))
    with pytest.raises(ValueError, match=r"step\[0\]: expected an integer <= "):
        adamcpp.functional.adam(p, g, m, v, step=2**63, lr=1e-2)


# ---------------------------------------------------------------------------
# 10. grad_scale beyond float32 with skip/raise and clipping
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("max_grad_norm", [1.0, 1e6, None])
def test_grad_scale_beyond_float32_is_not_finite_for_skip_and_raise(policy, max_grad_norm):
    """A float32 gradient times a grad_scale above float32's range is Inf (or
    NaN for 0): "skip"/"raise" must see it, in particular when clipping's norm
    (zero here) would otherwise prove every element finite."""
    params = [np.ones(6, F32), np.ones(3, F32)]
    grads = [np.zeros(6, F32), np.zeros(3, F32)]
    opt = adamcpp.Adam(params, lr=1e-2, nonfinite=policy, max_grad_norm=max_grad_norm)
    before = [p.copy() for p in params]
    states = _state_bits(opt)
    if policy == "skip":
        assert opt.step(grads, grad_scale=1e39) is False
    else:
        with pytest.raises(FloatingPointError, match=r"grads\[0\]"):
            opt.step(grads, grad_scale=1e39)
    _assert_same_params(params, before, policy)
    _assert_same_state(_state_bits(opt), states, policy)


def test_clipping_brings_a_huge_grad_scale_back_into_range():
    """Clipping folds its coefficient into the scale: 1e-30 * 1e39 clipped to
    norm 1 is an ordinary float32 gradient, and the step applies."""
    params = [np.ones(9, F32)]
    opt = adamcpp.Adam(params, lr=1e-2, nonfinite="raise", max_grad_norm=1.0)
    assert opt.step([np.full(9, 1e-30, F32)], grad_scale=1e39)
    assert np.all(np.isfinite(params[0])) and np.all(params[0] < 1)


def test_grad_scale_beyond_float32_is_fine_for_float64():
    params = [np.ones(6)]
    opt = adamcpp.Adam(params, lr=1e-2, nonfinite="raise", max_grad_norm=1.0)
    assert opt.step([np.full(6, 1e-30)], grad_scale=1e39)
    assert np.all(np.isfinite(params[0]))


# ---------------------------------------------------------------------------
# 11. The caller's floating-point modes reach every worker
# ---------------------------------------------------------------------------
def test_flush_denormals_gives_the_same_bits_at_any_thread_count(restore_threads):
    torch = pytest.importorskip("torch")
    n = 1 << 17
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal(n).astype(F32)
    g = (rng.standard_normal(n) * 1e-21).astype(F32)  # g * g and v are float32 subnormals
    results = {}
    previous = torch.set_flush_denormal(True)
    assert previous is True or previous is False
    try:
        for threads in (1, 2):
            adamcpp.set_num_threads(threads)
            p = p0.copy()
            opt = adamcpp.Adam([p], lr=1e-3)
            for _ in range(3):
                opt.step([g])
            results[threads] = (p, opt.state[0]["exp_avg_sq"].copy())
    finally:
        torch.set_flush_denormal(False)
    assert np.all(results[1][1] == 0), "flush-to-zero was not in effect on the calling thread"
    assert_bitwise_equal(results[2][0], results[1][0], "params, 2 threads vs 1 with flushed denormals")
    assert_bitwise_equal(results[2][1], results[1][1], "exp_avg_sq, 2 threads vs 1 with flushed denormals")


# ---------------------------------------------------------------------------
# 12. Huge integers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda ps: adamcpp.Adam(ps, lr=10**400), r"defaults\['lr'\]: expected a finite number, got an integer of 401"),
        (lambda ps: adamcpp.SGD(ps, lr=1e-3, momentum=10**400), r"defaults\['momentum'\]: expected a finite number"),
        (lambda ps: adamcpp.Adam(ps, max_grad_norm=10**400), r"max_grad_norm: expected a finite number"),
    ],
)
def test_huge_integers_give_value_errors(make, fragment):
    with pytest.raises(ValueError, match=fragment):
        make([np.zeros(3, F32)])


def test_huge_integers_at_step_give_value_errors():
    params, grads = _problem()
    opt = adamcpp.Adam(params, lr=1e-2)
    before = [p.copy() for p in params]
    with pytest.raises(ValueError, match=r"grad_scale: expected a finite number, got an integer of 401 digits"):
        opt.step(grads[0], grad_scale=10**400)
    opt.param_groups[0]["lr"] = 10**400
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]: expected a finite number"):
        opt.step(grads[0])
    opt.param_groups[0]["lr"] = 1e-2
    opt.state[0]["step"] = 10**400
    with pytest.raises(ValueError, match=r"state\[0\]\['step'\]: expected an integer <= \d+ .*an integer of 401"):
        opt.step(grads[0])
    _assert_same_params(params, before, "huge integers")
    with pytest.raises(ValueError, match="lr: expected a finite number"):
        adamcpp.functional.adam(params[0], grads[0][0], np.zeros(5, F32), np.zeros(5, F32), step=1, lr=10**400)


def test_huge_thread_count_gives_a_value_error(restore_threads):
    adamcpp.set_num_threads(2)
    with pytest.raises(ValueError, match=r"n: expected an int <= 2147483647"):
        adamcpp.set_num_threads(10**30)
    assert adamcpp.get_num_threads() == 2
