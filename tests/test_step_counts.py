"""Every way a user can observe a list-mode optimizer's step counts sees the true, current count.

After its first full step a list-mode optimizer steps through the plan's fast path (tests/test_list_plan.py,
docs/api.md section 2.3). Whether that path writes "step" into every state dict at each step or keeps the count
natively and writes it only when someone can look, each read below (through the dict's methods, copies, pickles,
state_dict(), the optimizer gone, the dicts edited or handed on) must show the count as it is now, and a count
set by hand must be the one the next step continues from (Adam's bias correction reads it: parameters are
compared bit for bit with a control optimizer that runs the full step every time)."""

from __future__ import annotations

import collections
import copy
import gc
import itertools
import json
import pickle
import pprint
import re
import threading
import time
import types
import weakref

import numpy as np
import pytest

import adamcpp

K = 3
NAMES = ("w", "b", "c")
SHAPES = ((4, 3), (5,), (2, 2, 2))
KEYS = {"adam": ["step", "exp_avg", "exp_avg_sq"], "sgd": ["step", "momentum_buffer"]}
MISSING = "state[1]['step']: missing from the optimizer state"


def _arrays(seed: int):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _make(form: str, kind: str, params=None, **kw):
    params = _arrays(0) if params is None else params
    arg = dict(zip(NAMES, params)) if form == "dict" else params
    if kind == "adam":
        return adamcpp.Adam(arg, lr=1e-2, **kw), params
    return adamcpp.SGD(arg, lr=1e-2, momentum=0.9, **kw), params


def _bits_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


class Run:
    """An optimizer, its control (same class and values, fast path off: the full step every time) and the
    gradients both are fed: the same arrays at every step (`reuse`) or new arrays at every step."""

    def __init__(self, form: str, kind: str, reuse: bool, **kw):
        self.form, self.kind, self.reuse = form, kind, reuse
        self.opt, self.params = _make(form, kind, **kw)
        self.ctrl, self.cparams = _make(form, kind, **kw)
        self.ctrl._fast_step = lambda *args: None
        self.fixed = self.pack(_arrays(100))
        self.taken = 0

    def pack(self, arrays):
        return dict(zip(NAMES, arrays)) if self.form == "dict" else arrays

    def grads(self):
        self.taken += 1
        return self.fixed if self.reuse else self.pack(_arrays(100 + self.taken))

    def steps(self, k: int, ctrl: bool = True) -> None:
        for _ in range(k):
            g = self.grads()
            assert self.opt.step(g) is True
            if ctrl:
                assert self.ctrl.step(g) is True

    def counts(self, opt=None):
        return [s["step"] for s in (opt or self.opt).state]

    def assert_same(self) -> None:
        """Parameters, state arrays and counts of the optimizer and its control, bit for bit."""
        assert all(_bits_equal(p, c) for p, c in zip(self.params, self.cparams))
        for s, c in zip(self.opt.state, self.ctrl.state):
            assert list(s) == list(c) and s["step"] == c["step"]
            assert all(_bits_equal(s[k], c[k]) for k in s if isinstance(s[k], np.ndarray))


CASES = [(f, k, r) for f in ("list", "dict") for k in ("adam", "sgd") for r in (True, False)]
IDS = [f"{f}-{k}-{'same_grads' if r else 'new_grads'}" for f, k, r in CASES]
cases = pytest.mark.parametrize("form,kind,reuse", CASES, ids=IDS)


@pytest.fixture(params=CASES, ids=IDS)
def stepped(request) -> Run:
    run = Run(*request.param)
    run.steps(K)
    return run


def _one(xs):
    assert len(xs) == 1
    return xs[0]


def _merged(s, how):
    d = {}
    if how == "ior":
        d |= s
    else:
        d.update(s)
    return d["step"]


STATE_READS = {
    "getitem": lambda s: s["step"],
    "get": lambda s: s.get("step"),
    "get_default": lambda s: s.get("step", -1),
    "dict": lambda s: dict(s)["step"],
    "unpack": lambda s: {**s}["step"],
    "copy_method": lambda s: s.copy()["step"],
    "dict_of_items": lambda s: dict(s.items())["step"],
    "values": lambda s: _one([v for v in s.values() if type(v) is int]),
    "items": lambda s: _one([v for k, v in s.items() if k == "step"]),
    "json": lambda s: json.loads(json.dumps({k: v for k, v in s.items() if k == "step"}))["step"],
    "pickle": lambda s: pickle.loads(pickle.dumps(s))["step"],
    "copy.copy": lambda s: copy.copy(s)["step"],
    "copy.deepcopy": lambda s: copy.deepcopy(s)["step"],
    "or_left": lambda s: (s | {})["step"],
    "or_right": lambda s: ({} | s)["step"],
    "plain_ior": lambda s: _merged(s, "ior"),
    "plain_update": lambda s: _merged(s, "update"),
    "kwargs": lambda s: (lambda **kw: kw["step"])(**s),
    "format_map": lambda s: int("{step}".format_map(s)),
    "percent": lambda s: int("%(step)d" % s),  # noqa: UP031  (the % operator reads the mapping too)
    "mappingproxy": lambda s: types.MappingProxyType(s)["step"],
    "chainmap": lambda s: collections.ChainMap({}, s)["step"],
    "setdefault": lambda s: s.setdefault("step", 99),  # returns the count and changes nothing
}
OPT_READS = {
    "state_dict": lambda opt, i: opt.state_dict()["state"][i]["step"],
    "deepcopy_opt": lambda opt, i: copy.deepcopy(opt).state[i]["step"],
    "pickle_opt": lambda opt, i: pickle.loads(pickle.dumps(opt)).state[i]["step"],
    "deepcopy_state_list": lambda opt, i: copy.deepcopy(opt.state)[i]["step"],
}


def _of_state(read):
    return lambda opt, i: read(opt.state[i])


READS = {**{name: _of_state(read) for name, read in STATE_READS.items()}, **OPT_READS}


def test_the_steps_take_the_fast_path(stepped):
    """The other tests' steps after the first run from the plan (else they would not test it)."""
    assert stepped.opt._fast_step(stepped.opt, stepped.grads(), 1.0) is True
    assert stepped.counts() == [K + 1] * 3


@pytest.mark.parametrize("read", list(READS))
def test_each_read_sees_the_current_count(stepped, read):
    for i in (2, 0, 1):
        value = READS[read](stepped.opt, i)
        assert type(value) is int and value == K, (read, i, value)
    stepped.steps(1)  # reading changed nothing: the next step continues from K
    assert stepped.counts() == [K + 1] * 3
    stepped.assert_same()


def test_the_dict_as_a_whole_shows_the_count(stepped):
    keys = KEYS[stepped.kind]
    for s in stepped.opt.state:
        assert "step" in s and "step" in s.keys() and len(s) == len(keys)  # noqa: SIM118
        assert list(s) == keys and [key for key in s] == keys and sorted(s) == sorted(keys)
        assert repr(s).startswith(f"{{'step': {K}, ") and str(s).startswith(f"{{'step': {K}, ")
        assert re.search(f"'step': {K}[,}}]", pprint.pformat(s))  # pprint sorts the keys


@cases
def test_equality_with_the_expected_dict(form, kind, reuse):
    run = Run(form, kind, reuse)
    run.steps(1)
    arrays = [{k: v for k, v in s.items() if k != "step"} for s in run.opt.state]  # the same objects after
    run.steps(K - 1)
    for s, c, a in zip(run.opt.state, run.ctrl.state, arrays):
        expected = {k: c["step"] if k == "step" else a[k] for k in KEYS[kind]}
        assert expected["step"] == K
        assert s == expected and expected == s and not (s != expected)  # noqa: SIM202
        assert s != {**expected, "step": K - 1} and s != {**expected, "step": 1}
        assert not (s == {**expected, "step": K + 1})  # noqa: SIM201


@cases
def test_views_taken_before_steps(form, kind, reuse):
    """A values()/items() view reads the dict's storage directly: after the plan's fast steps (which keep the
    counts in the optimizer) it shows the count as of the last read or edit through the dict's methods, and any
    such read brings it up to date (docs/api.md, section 2.8)."""
    run = Run(form, kind, reuse)
    run.steps(1)
    views = [(s.values(), s.items()) for s in run.opt.state]
    run.steps(K - 1)
    for values, _ in views:
        seen = [v for v in list(values) if type(v) is int]
        assert len(seen) == 1 and 1 <= seen[0] <= K
    assert [s["step"] for s in run.opt.state] == [K] * len(views)  # a read through the dict writes them in
    for values, items in views:
        assert [v for v in list(values) if type(v) is int] == [K]
        assert dict(items)["step"] == K


@cases
@pytest.mark.parametrize("value", [10, 1, K])  # 1: what the dict held after the first step; K: the count itself
@pytest.mark.parametrize("how", ["setitem", "update_kw", "update_dict", "ior"])
def test_a_count_set_by_hand_is_continued(form, kind, reuse, value, how):
    run = Run(form, kind, reuse)
    run.steps(K)
    for opt in (run.opt, run.ctrl):
        s = opt.state[1]
        if how == "setitem":
            s["step"] = value
        elif how == "update_kw":
            s.update(step=value)
        elif how == "update_dict":
            s.update({"step": value})
        else:
            s |= {"step": value}
    assert run.opt.state[1]["step"] == value
    run.steps(1)
    assert run.counts() == [K + 1, value + 1, K + 1]
    run.assert_same()
    run.steps(1)
    assert run.counts() == [K + 2, value + 2, K + 2]
    run.assert_same()


@cases
@pytest.mark.parametrize("how", ["pop", "del"])
def test_a_removed_count_is_refused_and_nothing_changes(form, kind, reuse, how):
    run = Run(form, kind, reuse)
    run.steps(K)
    before = [p.copy() for p in run.params]
    arrays = [{k: v.copy() for k, v in c.items() if k != "step" and v is not None} for c in run.ctrl.state]
    g = run.grads()
    for opt in (run.opt, run.ctrl):  # the control too: the same dicts, the same key order afterwards
        s = opt.state[1]
        if how == "pop":
            assert s.pop("step") == K
        else:
            del s["step"]
        assert "step" not in s and s.get("step") is None
        with pytest.raises(ValueError) as err:
            opt.step(g)
        assert str(err.value) == MISSING
        assert "step" not in s and [opt.state[i]["step"] for i in (0, 2)] == [K, K]
        s["step"] = K
    assert all(_bits_equal(p, q) for p, q in zip(run.params, before))
    for opt in (run.opt, run.ctrl):
        assert all(_bits_equal(s[k], a[k]) for s, a in zip(opt.state, arrays) for k in a)
    run.steps(1)
    assert run.counts() == [K + 1] * 3
    run.assert_same()


@cases
def test_popitem_returns_the_count_when_it_is_the_last_key(form, kind, reuse):
    run = Run(form, kind, reuse)
    run.steps(K)
    assert list(run.opt.state[1])[-1] != "step"  # "step" comes first: popitem takes an array entry
    for opt in (run.opt, run.ctrl):
        s = opt.state[1]
        s["step"] = s.pop("step")  # "step" is now the last key
    assert list(run.opt.state[1]) == [*KEYS[kind][1:], "step"]
    run.steps(2)
    assert run.opt.state[1].popitem() == ("step", K + 2)
    assert run.ctrl.state[1].popitem() == ("step", K + 2)
    with pytest.raises(ValueError, match=r"^state\[1\]\['step'\]: missing from the optimizer state$"):
        run.opt.step(run.grads())
    for opt in (run.opt, run.ctrl):
        opt.state[1]["step"] = K + 2
    run.steps(1)
    assert run.counts() == [K + 3] * 3
    run.assert_same()


@cases
@pytest.mark.parametrize("held", ["state_list", "one_dict"])
def test_counts_outlive_the_optimizer(form, kind, reuse, held):
    run = Run(form, kind, reuse)
    run.steps(K)
    states = run.opt.state if held == "state_list" else [run.opt.state[0]]
    gone = weakref.ref(run.opt)
    run.opt = None
    gc.collect()
    assert gone() is None
    assert [s["step"] for s in states] == [K] * len(states)
    assert [dict(s)["step"] for s in states] == [K] * len(states)


@cases
@pytest.mark.parametrize("how", ["plain_dicts", "deepcopy"])
def test_a_replaced_state_list_continues_from_the_count(form, kind, reuse, how):
    run = Run(form, kind, reuse)
    run.steps(K)
    old = run.opt.state
    run.opt.state = [dict(s) for s in old] if how == "plain_dicts" else copy.deepcopy(old)
    assert run.counts() == [K] * 3
    run.steps(2)
    assert run.counts() == [K + 2] * 3
    run.assert_same()
    assert [s["step"] for s in old] == [K] * 3  # the dicts that left keep the count they left with


@cases
def test_load_state_dict_continues_from_the_count(form, kind, reuse):
    run = Run(form, kind, reuse)
    run.steps(K)
    opt2, params2 = _make(form, kind, params=[p.copy() for p in run.params])
    opt2.load_state_dict(run.opt.state_dict())
    assert run.counts(opt2) == [K] * 3
    for _ in range(2):
        g = run.grads()
        assert run.opt.step(g) and opt2.step(g)
    assert run.counts(opt2) == run.counts() == [K + 2] * 3
    assert all(_bits_equal(p, q) for p, q in zip(run.params, params2))
    # and the dicts that a load replaced keep the count they had
    old = run.opt.state
    fresh, _ = _make(form, kind, params=[p.copy() for p in run.params])
    fresh.step(run.grads())
    run.opt.load_state_dict(fresh.state_dict())
    assert [s["step"] for s in old] == [K + 2] * 3 and run.counts() == [1] * 3
    run.opt.step(run.grads())
    assert run.counts() == [2] * 3


@cases
def test_state_dicts_handed_to_another_optimizer(form, kind, reuse):
    run = Run(form, kind, reuse)
    run.steps(K)
    opt2, params2 = _make(form, kind, params=[p.copy() for p in run.params])
    ctrl2, cparams2 = _make(form, kind, params=[p.copy() for p in run.cparams])
    ctrl2._fast_step = lambda *args: None
    opt2.state, ctrl2.state = run.opt.state, run.ctrl.state  # the same dicts (and arrays) in both
    g = run.grads()
    assert opt2.step(g) and ctrl2.step(g)
    assert run.counts() == run.counts(opt2) == [K + 1] * 3
    run.steps(1)
    assert run.counts() == run.counts(opt2) == [K + 2] * 3
    run.assert_same()
    assert all(_bits_equal(p, c) for p, c in zip(params2, cparams2))


@cases
@pytest.mark.parametrize("read_between", [True, False])
def test_two_optimizers_stepping_in_turn_keep_their_counts(form, kind, reuse, read_between):
    a, b = Run(form, kind, reuse), Run(form, kind, reuse)
    for n in range(1, 7):
        a.steps(1)
        if n % 2 == 0:
            b.steps(1)
        if read_between:
            assert a.counts() == [n] * 3 and b.counts() == [n // 2] * 3
    assert a.counts() == [6] * 3 and b.counts() == [3] * 3
    a.assert_same()
    b.assert_same()


@cases
def test_counts_read_after_every_step_or_once(form, kind, reuse):
    every, once = Run(form, kind, reuse), Run(form, kind, reuse)
    seen = []
    for _ in range(5):
        every.steps(1)
        seen.append(every.counts())
        once.steps(1)
    assert seen == [[n] * 3 for n in range(1, 6)]
    assert once.counts() == [5] * 3
    every.assert_same()
    once.assert_same()
    assert all(_bits_equal(p, q) for p, q in zip(every.params, once.params))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_reads_from_another_thread_never_see_a_wrong_count(kind):
    # Arrays large enough that the kernel runs with the GIL released: the reader reads while steps are in flight.
    rng = np.random.default_rng(1)
    opt, _ = _make("list", kind, params=[rng.standard_normal((128, 128)).astype(np.float32) for _ in range(3)])
    grads = [[rng.standard_normal((128, 128)).astype(np.float32) for _ in range(3)] for _ in range(201)]
    assert opt.step(grads[0])
    first = opt.state[0]["step"]
    assert first == 1
    done = threading.Event()
    seen, errors = [], []

    def reader():
        try:
            while True:
                last = done.is_set()
                seen.append(opt.state[0]["step"])
                seen.append(dict(opt.state[0])["step"])
                if last:
                    return
                time.sleep(0)  # lets the stepping thread on between reads
        except BaseException as e:  # reported below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for n in range(1, 201):
            assert opt.step(grads[n])
            if n % 4 == 0:  # now and then waits for the reader to read again, so that reads land between steps
                mark, deadline = len(seen), time.monotonic() + 10
                while len(seen) == mark and t.is_alive() and time.monotonic() < deadline:
                    time.sleep(0)
    finally:
        done.set()
        t.join()
    assert not errors
    assert all(type(v) is int for v in seen)
    assert all(first <= x <= y <= first + 200 for x, y in itertools.pairwise(seen))
    assert len(set(seen)) >= 20  # the reads did interleave with the steps
    assert seen[-2:] == [first + 200] * 2  # read after the last step
    assert [s["step"] for s in opt.state] == [first + 200] * 3


@cases
@pytest.mark.parametrize("policy", ["skip", "raise"])
@pytest.mark.parametrize("read_after_bad", [True, False])
def test_a_step_refused_for_a_nonfinite_gradient_does_not_count(form, kind, reuse, policy, read_after_bad):
    run = Run(form, kind, reuse, nonfinite=policy)
    run.steps(K)
    bad = _arrays(7)
    bad[1][0] = np.nan
    if policy == "skip":
        assert run.opt.step(run.pack(bad)) is False
    else:
        with pytest.raises(FloatingPointError) as err:
            run.opt.step(run.pack(bad))
        where = "grads['b']" if form == "dict" else "grads[1]"
        assert str(err.value) == f"{where}: non-finite gradient (NaN or Inf after grad_scale); nothing was updated"
    if read_after_bad:
        assert run.counts() == [K] * 3
    run.steps(1)
    assert run.counts() == [K + 1] * 3
    run.assert_same()
