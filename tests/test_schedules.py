"""Learning-rate schedules: closed forms, boundaries, validation, chaining,
pickling, and their use as ``lr=`` by the optimizers (t = updates already applied)."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest

import adamcpp
from adamcpp import schedules as S
from conftest import Recorder, normal_problem

EPS64 = 2.0 ** -52  # float64 machine epsilon (spacing of doubles in [1, 2))


def ts_for(*marks: int) -> list:
    """Every t in 0..3*max(marks), plus each mark +-1 and far-away values."""
    top = 3 * max(marks)
    ts = set(range(0, top + 1))
    for m in marks:
        ts.update({max(0, m - 1), m, m + 1})
    ts.update({10 * top, 10 ** 6, 10 ** 12})
    return sorted(ts)


# ------------------------------------------------------------------ closed forms
# The references below are written independently in the textbook form (different
# association from the implementation), so each comparison is a real cross-check.
# Their tolerances come from counting roundings: both sides evaluate a handful of
# float64 operations (each <= 0.5 ulp) plus one libm call (cos/pow, <= 1 ulp), on
# values bounded by max(lr, final_lr); the cosine argument pi*t/N in [0, pi] is
# rounded at most twice (<= 2 ulp of pi ~ 9e-16 absolute), and |d cos/dx| <= 1.
# Altogether < 8 eps * max(lr, final_lr); we allow 16 eps * max(lr, final_lr).


def cosine_ref(lr, n, final, t):
    if t >= n:
        return final
    return final + (lr - final) * (1.0 + math.cos(math.pi * (t / n))) / 2.0


def poly_ref(lr, n, final, power, t):
    if t >= n:
        return final
    return final + (lr - final) * ((n - t) / n) ** power


def warmup_cosine_ref(peak, warmup, total, initial, final, t):
    if t < warmup:
        return initial + (peak - initial) * t / warmup
    return cosine_ref(peak, total - warmup, final, t - warmup)


def close(a, b, scale):
    return abs(a - b) <= 16 * EPS64 * scale


def test_constant():
    s = S.Constant(3e-4)
    for t in ts_for(5):
        assert s(t) == 3e-4
        assert type(s(t)) is float
    assert S.Constant(0)(7) == 0.0


@pytest.mark.parametrize("lr,step_size,gamma", [(0.1, 1, 0.5), (1e-3, 7, 0.1), (2.0, 30, 0.9), (0.5, 4, 1.5)])
def test_step_decay(lr, step_size, gamma):
    s = S.StepDecay(lr, step_size, gamma)
    for t in ts_for(step_size, 3 * step_size)[:-2]:  # exclude the huge t (gamma**1e11 under/overflows)
        n = t // step_size
        ref = lr
        for _ in range(n):
            ref *= gamma
        # pow is within 1 ulp, n repeated products within n/2 ulp: (n + 2) eps relative.
        assert s(t) == pytest.approx(ref, rel=(n + 2) * EPS64, abs=0.0), t
        if t % step_size != 0:
            assert s(t) == s(t - 1)  # piecewise constant between multiples of step_size
    # Boundaries exactly: updates 0..k-1 use lr, update k uses lr*gamma.
    assert s(0) == lr and s(step_size - 1) == lr and s(step_size) == lr * gamma


@pytest.mark.parametrize("lr,gamma,decay_steps", [(1e-3, 0.99, 1), (0.1, 0.5, 10), (1.0, 0.96, 1000), (0.2, 1.01, 3)])
def test_exponential_decay(lr, gamma, decay_steps):
    s = S.ExponentialDecay(lr, gamma, decay_steps)
    for t in ts_for(decay_steps, 50)[:-3]:
        x = (t / decay_steps) * math.log(gamma)
        ref = lr * math.exp(x)
        # exp(x) with x rounded to ~eps*|x| amplifies to a relative error ~eps*|x|;
        # plus a few roundings on each side: 4 eps (1 + |x|) relative.
        assert s(t) == pytest.approx(ref, rel=4 * EPS64 * (1 + abs(x)), abs=0.0), t
    assert s(0) == lr
    assert s(decay_steps) == pytest.approx(lr * gamma, rel=4 * EPS64)
    assert S.ExponentialDecay(1.0, 0.5)(3) == 0.125  # exact powers of two


@pytest.mark.parametrize("lr,n,final", [(1e-3, 100, 0.0), (0.1, 7, 0.01), (1.0, 1, 0.5), (0.3, 1000, 0.1), (0.0, 5, 0.2)])
def test_cosine_decay(lr, n, final):
    s = S.CosineDecay(lr, n, final)
    for t in ts_for(n):
        assert close(s(t), cosine_ref(lr, n, final, t), max(lr, final)), t
    assert s(0) == lr  # exact at both ends
    assert s(n) == final and s(n + 1) == final and s(10 ** 12) == final
    if n % 2 == 0:
        assert close(s(n // 2), (lr + final) / 2, max(lr, final))


@pytest.mark.parametrize(
    "lr,n,final,power",
    [(1e-3, 100, 0.0, 1.0), (0.1, 10, 0.01, 2.0), (0.5, 3, 0.0, 0.5), (0.0, 20, 1e-3, 1.0), (1.0, 1, 0.0, 3.0)],
)
def test_polynomial_decay(lr, n, final, power):
    s = S.PolynomialDecay(lr, n, final, power)
    for t in ts_for(n):
        assert close(s(t), poly_ref(lr, n, final, power, t), max(lr, final)), t
    assert s(0) == lr and s(n) == final and s(10 ** 12) == final
    if power == 1.0 and n % 4 == 0:  # linear: the quarter points are exact multiples
        assert close(s(n // 4), 0.75 * lr + 0.25 * final, max(lr, final))


@pytest.mark.parametrize(
    "peak,warmup,total,initial,final",
    [(1e-3, 10, 100, 0.0, 0.0), (0.1, 1, 2, 0.0, 0.01), (0.5, 0, 50, 0.0, 0.0), (1.0, 25, 26, 0.1, 0.2), (0.3, 7, 40, 0.05, 0.0)],
)
def test_warmup_cosine_decay(peak, warmup, total, initial, final):
    s = S.WarmupCosineDecay(peak, warmup, total, initial, final)
    scale = max(peak, initial, final)
    for t in ts_for(warmup, total):
        assert close(s(t), warmup_cosine_ref(peak, warmup, total, initial, final, t), scale), t
    assert s(0) == (initial if warmup else peak)
    assert s(warmup) == peak  # the peak is hit exactly at the end of the warmup
    assert s(total) == final and s(total + 5) == final
    if warmup == 0:
        for t in ts_for(total):
            assert s(t) == S.CosineDecay(peak, total, final)(t)  # same expression, same bits


# -------------------------------------------------------------------- chaining


def test_join_switches_at_boundaries_and_restarts_t():
    a, b, c = S.Constant(1.0), S.PolynomialDecay(0.5, 10, 0.0), S.ExponentialDecay(0.25, 0.5)
    j = S.JoinSchedules([a, b, c], [5, 12])
    for t in range(40):
        if t < 5:
            ref = a(t)
        elif t < 12:
            ref = b(t - 5)
        else:
            ref = c(t - 12)
        assert j(t) == ref, t
    assert j(4) == 1.0 and j(5) == 0.5 and j(11) == b(6) and j(12) == 0.25 and j(13) == 0.125


def test_join_single_schedule_and_numbers():
    assert S.JoinSchedules([S.Constant(2.0)], [])(123) == 2.0
    j = S.JoinSchedules([S.PolynomialDecay(0.0, 4, 1e-3), 1e-3], [4])  # a number is a Constant
    assert [j(t) for t in range(6)] == [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    assert j.schedules[1] == S.Constant(1e-3)


def test_join_nested_and_arbitrary_callables():
    inner = S.JoinSchedules([S.Constant(3.0), S.Constant(2.0)], [2])
    outer = S.JoinSchedules([S.Constant(9.0), inner], [3])
    assert [outer(t) for t in range(7)] == [9.0, 9.0, 9.0, 3.0, 3.0, 2.0, 2.0]
    j = S.JoinSchedules([lambda t: 1.0 / (t + 1), S.Constant(0.0)], [4])
    assert [j(t) for t in range(5)] == [1.0, 0.5, 1 / 3, 0.25, 0.0]


def test_join_reproduces_warmup_cosine():
    peak, warmup, total, final = 1e-2, 20, 120, 1e-4
    j = S.JoinSchedules(
        [S.PolynomialDecay(0.0, warmup, peak, 1.0), S.CosineDecay(peak, total - warmup, final)], [warmup]
    )
    w = S.WarmupCosineDecay(peak, warmup, total, 0.0, final)
    for t in ts_for(warmup, total):
        # Warmup: 0*w + peak*(1-w) with w = 1 - t/W vs peak*(t/W): 1 - (1 - u) differs from u
        # by <= 1 ulp of 1, times peak. Cosine phase: identical expressions.
        assert close(j(t), w(t), peak), t
    assert j(warmup) == w(warmup) == peak


# ------------------------------------------------------------------ validation

INVALID = [
    (S.Constant, dict(lr="0.1"), TypeError, "lr"),
    (S.Constant, dict(lr=True), TypeError, "lr"),
    (S.Constant, dict(lr=-1e-3), ValueError, "lr"),
    (S.Constant, dict(lr=float("nan")), ValueError, "lr"),
    (S.Constant, dict(lr=float("inf")), ValueError, "lr"),
    (S.StepDecay, dict(lr=0.1, step_size=0), ValueError, "step_size"),
    (S.StepDecay, dict(lr=0.1, step_size=2.0), TypeError, "step_size"),
    (S.StepDecay, dict(lr=0.1, step_size=True), TypeError, "step_size"),
    (S.StepDecay, dict(lr=0.1, step_size=3, gamma=0.0), ValueError, "gamma"),
    (S.StepDecay, dict(lr=0.1, step_size=3, gamma=-0.5), ValueError, "gamma"),
    (S.StepDecay, dict(lr=0.1, step_size=3, gamma=None), TypeError, "gamma"),
    (S.ExponentialDecay, dict(lr=0.1, gamma=0.0), ValueError, "gamma"),
    (S.ExponentialDecay, dict(lr=0.1, gamma=0.9, decay_steps=0), ValueError, "decay_steps"),
    (S.ExponentialDecay, dict(lr=-0.1, gamma=0.9), ValueError, "lr"),
    (S.CosineDecay, dict(lr=0.1, decay_steps=0), ValueError, "decay_steps"),
    (S.CosineDecay, dict(lr=0.1, decay_steps=10, final_lr=-1.0), ValueError, "final_lr"),
    (S.CosineDecay, dict(lr=0.1, decay_steps="10"), TypeError, "decay_steps"),
    (S.WarmupCosineDecay, dict(peak_lr=0.1, warmup_steps=-1, total_steps=10), ValueError, "warmup_steps"),
    (S.WarmupCosineDecay, dict(peak_lr=0.1, warmup_steps=10, total_steps=10), ValueError, "total_steps"),
    (S.WarmupCosineDecay, dict(peak_lr=0.1, warmup_steps=1, total_steps=5, initial_lr=-0.1), ValueError, "initial_lr"),
    (S.WarmupCosineDecay, dict(peak_lr=[0.1], warmup_steps=1, total_steps=5), TypeError, "peak_lr"),
    (S.PolynomialDecay, dict(lr=0.1, decay_steps=10, power=0.0), ValueError, "power"),
    (S.PolynomialDecay, dict(lr=0.1, decay_steps=10, power=float("nan")), ValueError, "power"),
    (S.PolynomialDecay, dict(lr=0.1, decay_steps=-3), ValueError, "decay_steps"),
    (S.JoinSchedules, dict(schedules=[], boundaries=[]), ValueError, "schedules"),
    (S.JoinSchedules, dict(schedules=S.Constant(1.0), boundaries=[]), TypeError, "schedules"),
    (S.JoinSchedules, dict(schedules=[S.Constant(1.0), "x"], boundaries=[3]), TypeError, r"schedules\[1\]"),
    (S.JoinSchedules, dict(schedules=[S.Constant(1.0), -1.0], boundaries=[3]), ValueError, r"schedules\[1\]"),
    (S.JoinSchedules, dict(schedules=[S.Constant(1.0), 2.0], boundaries=[]), ValueError, "boundaries"),
    (S.JoinSchedules, dict(schedules=[S.Constant(1.0)], boundaries=[3]), ValueError, "boundaries"),
    (S.JoinSchedules, dict(schedules=[1.0, 2.0, 3.0], boundaries=[5, 5]), ValueError, r"boundaries\[1\]"),
    (S.JoinSchedules, dict(schedules=[1.0, 2.0], boundaries=[0]), ValueError, r"boundaries\[0\]"),
    (S.JoinSchedules, dict(schedules=[1.0, 2.0], boundaries=[2.5]), TypeError, r"boundaries\[0\]"),
    (S.JoinSchedules, dict(schedules=[1.0, 2.0], boundaries=3), TypeError, "boundaries"),
]


@pytest.mark.parametrize("cls,kwargs,exc,name", INVALID, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, _, n) in enumerate(INVALID)])
def test_constructor_validation_names_the_argument(cls, kwargs, exc, name):
    with pytest.raises(exc, match=rf"^{name}"):
        cls(**kwargs)


def test_numpy_scalars_are_accepted_and_normalised():
    s = S.CosineDecay(np.float32(0.5), np.int64(10), np.float64(0.0))
    assert s == S.CosineDecay(0.5, 10)
    assert type(s.lr) is float and type(s.decay_steps) is int
    assert s(np.int64(5)) == s(5)


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.0, TypeError), (True, TypeError), ("3", TypeError), (None, TypeError)])
def test_call_validates_t(bad, exc):
    with pytest.raises(exc, match="^t: "):
        S.CosineDecay(0.1, 10)(bad)


# ------------------------------------------------ equality, repr, pickling, immutability

ALL = [
    S.Constant(1e-3),
    S.StepDecay(0.1, 30, 0.5),
    S.ExponentialDecay(0.1, 0.9, 100),
    S.CosineDecay(1e-3, 1000, 1e-5),
    S.WarmupCosineDecay(1e-3, 100, 1000, 1e-6, 1e-5),
    S.PolynomialDecay(1e-3, 500, 0.0, 2.0),
    S.JoinSchedules([S.PolynomialDecay(0.0, 10, 1e-3), S.CosineDecay(1e-3, 90)], [10]),
]


@pytest.mark.parametrize("s", ALL, ids=lambda s: type(s).__name__)
def test_equality_repr_pickle_copy(s):
    twin = eval(repr(s), vars(S))  # the repr is the constructor call
    assert twin == s and hash(twin) == hash(s) and twin is not s
    for clone in (pickle.loads(pickle.dumps(s)), copy.copy(s), copy.deepcopy(s)):
        assert clone == s and type(clone) is type(s)
        assert [clone(t) for t in range(0, 2000, 37)] == [s(t) for t in range(0, 2000, 37)]
    assert s != S.Constant(12345.0) or type(s) is S.Constant and s.lr == 12345.0
    assert s != 1e-3 and s != "x"


def test_inequality_by_parameter_and_type():
    assert S.CosineDecay(1e-3, 100) != S.CosineDecay(1e-3, 101)
    assert S.CosineDecay(1e-3, 100) != S.CosineDecay(1e-3, 100, 1e-6)
    assert S.PolynomialDecay(1e-3, 100) != S.CosineDecay(1e-3, 100)
    assert S.JoinSchedules([1.0, 2.0], [3]) != S.JoinSchedules([1.0, 2.0], [4])
    assert S.JoinSchedules([1.0, 2.0], [3]) == S.JoinSchedules([S.Constant(1.0), S.Constant(2.0)], [3])
    assert len({S.Constant(1.0), S.Constant(1.0), S.Constant(2.0)}) == 2


def test_schedules_are_immutable():
    s = S.CosineDecay(1e-3, 100)
    with pytest.raises(AttributeError):
        s.lr = 1.0
    with pytest.raises(AttributeError):
        del s.decay_steps
    assert s.lr == 1e-3


def test_exported_from_package():
    assert adamcpp.schedules is S
    assert "schedules" in adamcpp.__all__
    for name in S.__all__:
        assert isinstance(getattr(S, name), type)


# --------------------------------------------------------- use with the optimizers


def _problem(seed=0, dtype=np.float32):
    return normal_problem(seed, [(7, 5), (5,), (33,)], 16, dtype)


@pytest.mark.parametrize("decoupled", [False, True], ids=["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_optimizer_follows_schedule_bitwise(decoupled, dtype):
    """lr(t) is evaluated at t = updates already applied (0 first) and used for that update:
    the optimizer's trajectory equals the functional kernel's with lr = sched(step - 1),
    bit for bit (both run the same native path)."""
    sched = S.WarmupCosineDecay(1e-2, 4, 12, 1e-4, 1e-5)
    rec = Recorder(sched)
    params, grads = _problem(dtype=dtype)
    ref = [p.copy() for p in params]
    m = [np.zeros_like(p) for p in ref]
    v = [np.zeros_like(p) for p in ref]
    wd = 0.1
    cls = adamcpp.AdamW if decoupled else adamcpp.Adam
    opt = cls(params, lr=rec, weight_decay=wd)
    for k, g in enumerate(grads):
        assert opt.step(g) is True
        adamcpp.functional.adam(ref, g, m, v, step=k + 1, lr=sched(k), weight_decay=wd, decoupled_weight_decay=decoupled)
        for p, r in zip(params, ref):
            np.testing.assert_array_equal(p, r)
    assert rec.seen[0] == 0
    assert sorted(set(rec.seen)) == list(range(len(grads)))


def test_state_dict_resumes_schedule_at_the_right_t():
    """Checkpoint after 7 updates, pickle it (the schedule object travels inside), load it
    into a fresh optimizer built with a different lr: the next update uses lr(7), and the
    resumed run matches an uninterrupted one bit for bit."""
    sched = S.StepDecay(1e-2, 3, 0.5)
    params, grads = _problem(seed=1)
    straight = [p.copy() for p in params]
    opt_straight = adamcpp.Adam(straight, lr=sched)
    for g in grads:
        opt_straight.step(g)

    first = [p.copy() for p in params]
    opt_a = adamcpp.Adam(first, lr=Recorder(sched))
    for g in grads[:7]:
        opt_a.step(g)
    sd = pickle.loads(pickle.dumps(opt_a.state_dict()))
    assert all(s["step"] == 7 for s in sd["state"].values())
    loaded_lr = sd["param_groups"][0]["lr"]
    assert isinstance(loaded_lr, Recorder) and loaded_lr.fn == sched and loaded_lr is not opt_a.param_groups[0]["lr"]
    loaded_lr.seen.clear()

    resumed = [p.copy() for p in first]
    opt_b = adamcpp.Adam(resumed, lr=0.5)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] is loaded_lr
    for g in grads[7:]:
        opt_b.step(g)
    assert loaded_lr.seen[0] == 7
    assert sorted(set(loaded_lr.seen)) == list(range(7, len(grads)))
    for p, r in zip(resumed, straight):
        np.testing.assert_array_equal(p, r)


def test_plain_schedule_object_round_trips_in_state_dict():
    sched = S.CosineDecay(1e-3, 50, 1e-5)
    params, grads = _problem(seed=2)
    opt = adamcpp.Adam(params, lr=sched)
    opt.step(grads[0])
    sd = pickle.loads(pickle.dumps(opt.state_dict()))
    assert sd["param_groups"][0]["lr"] == sched
    opt2 = adamcpp.Adam([p.copy() for p in params], lr=1e-3)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == sched
    assert copy.deepcopy(opt2.state_dict())["param_groups"][0]["lr"] == sched


def test_skipped_step_does_not_advance_the_schedule():
    rec = Recorder(S.ExponentialDecay(1e-2, 0.5))
    params, grads = _problem(seed=3)
    opt = adamcpp.Adam(params, lr=rec, nonfinite="skip")
    assert opt.step(grads[0]) is True
    bad = [g.copy() for g in grads[1]]
    bad[1][2] = np.nan
    assert opt.step(bad) is False
    rec.seen.clear()
    assert opt.step(grads[2]) is True
    assert set(rec.seen) == {1}  # the second applied update is t = 1


def test_per_group_schedules():
    params, grads = _problem(seed=4)
    r0, r1 = Recorder(S.Constant(1e-3)), Recorder(S.CosineDecay(1e-2, 5))
    opt = adamcpp.Adam([{"params": params[:2], "lr": r0}, {"params": params[2:], "lr": r1}])
    for g in grads[:6]:
        opt.step(g)
    assert sorted(set(r0.seen)) == sorted(set(r1.seen)) == list(range(6))


def test_sgd_accepts_schedules_when_available():
    if not hasattr(adamcpp, "SGD"):
        pytest.skip("adamcpp.SGD is not available in this build")
    rec = Recorder(S.StepDecay(0.1, 2, 0.5))
    params, grads = _problem(seed=5, dtype=np.float64)
    before = [p.copy() for p in params]
    opt = adamcpp.SGD(params, lr=rec)
    opt.step(grads[0])
    assert rec.seen[0] == 0
    # Plain SGD: p <- p - lr(0) * g.
    for p, b, g in zip(params, before, grads[0]):
        np.testing.assert_array_equal(p, b - 0.1 * g)
