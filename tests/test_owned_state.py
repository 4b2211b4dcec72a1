"""State memory owned by the optimizer (docs/api.md, "Parameters and state"): a list-layout optimizer's new and
loaded state arrays are views of one block per entry and dtype, each view starting on a cache line, so that a
step streams each entry through one buffer. Everything a user sees stays as before: the arrays in opt.state
have the parameter's shape and dtype, state_dict() exports copies, an array assigned into a state dict is
used as it is, and the numbers are those of separate arrays."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import adamcpp

SHAPES = [(4, 3), (7,), (2, 2, 2), (300,)]


def _params(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def _grads(seed, dtype=np.float32):
    return _params(dtype, 100 + seed)


def _block_of(a):
    base = a.base
    assert isinstance(base, np.ndarray) and base.base is None and base.ndim == 1, "a view of an owned block"
    return base


def _assert_owned(states, key, expect_dtype):
    arrays = [s[key] for s in states]
    block = _block_of(arrays[0])
    starts = []
    for a in arrays:
        assert _block_of(a) is block, f"{key}: one block for the entry"
        assert a.dtype == expect_dtype and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0, f"{key}: each view starts on a cache line"
        starts.append((a.ctypes.data, a.ctypes.data + a.nbytes))
    starts.sort()
    assert all(end <= nxt for (_, end), (nxt, _) in zip(starts, starts[1:])), "the parts do not overlap"


def test_new_adam_state_is_views_of_one_block_per_entry():
    params = _params()
    opt = adamcpp.Adam(params, lr=1e-2, amsgrad=True)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        _assert_owned(opt.state, key, np.float32)
        for s, p in zip(opt.state, params):
            assert s[key].shape == p.shape and not s[key].any()


def test_master_copies_and_bfloat16_state_are_owned_too():
    params = _params(np.float16)
    opt = adamcpp.Adam(params, lr=1e-2)
    _assert_owned(opt.state, "master_param", np.float32)
    for s, p in zip(opt.state, params):
        assert np.array_equal(s["master_param"], p.astype(np.float32))
    _assert_owned(opt.state, "exp_avg", np.float32)


def test_mixed_dtypes_get_a_block_each_and_a_lone_array_keeps_its_own():
    params = _params() + [np.ones(5, np.float64)]
    opt = adamcpp.Adam(params, lr=1e-2)
    _assert_owned(opt.state[:4], "exp_avg", np.float32)
    assert opt.state[4]["exp_avg"].dtype == np.float64 and opt.state[4]["exp_avg"].base is None


def test_steps_are_those_of_separate_arrays():
    a, b = _params(), _params()
    opt, ctrl = adamcpp.Adam(a, lr=1e-2, weight_decay=0.1), adamcpp.Adam(b, lr=1e-2, weight_decay=0.1)
    for s in ctrl.state:  # assigned arrays are used as they are: the control steps separate allocations
        s["exp_avg"] = s["exp_avg"].copy()
        s["exp_avg_sq"] = s["exp_avg_sq"].copy()
    assert ctrl.state[0]["exp_avg"].base is None
    for k in range(4):
        g = _grads(k)
        assert opt.step(g) and ctrl.step(g)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    for s, c in zip(opt.state, ctrl.state):
        assert np.array_equal(s["exp_avg"], c["exp_avg"]) and np.array_equal(s["exp_avg_sq"], c["exp_avg_sq"])
    assert ctrl.state[0]["exp_avg"].base is None  # the assigned array is still the one updated


def test_state_dict_exports_copies_and_a_load_is_owned_again():
    opt = adamcpp.Adam(_params(), lr=1e-2)
    for k in range(2):
        opt.step(_grads(k))
    sd = opt.state_dict()
    exported = [sd["state"][i]["exp_avg"] for i in range(len(SHAPES))]
    assert all(not np.shares_memory(e, s["exp_avg"]) for e, s in zip(exported, opt.state))
    other = adamcpp.Adam(_params(seed=1), lr=1e-2)
    other.load_state_dict(sd)
    _assert_owned(other.state, "exp_avg", np.float32)
    _assert_owned(other.state, "exp_avg_sq", np.float32)
    for e, s in zip(exported, other.state):
        assert np.array_equal(e, s["exp_avg"]) and not np.shares_memory(e, s["exp_avg"])
    assert [s["step"] for s in other.state] == [2] * len(SHAPES)


def test_an_added_group_owns_its_state():
    opt = adamcpp.Adam(_params(), lr=1e-2)
    extra = [np.ones(10, np.float32), np.ones((3, 3), np.float32)]
    opt.add_param_group({"params": extra, "lr": 1e-3})
    new = opt.state[len(SHAPES) :]
    _assert_owned(new, "exp_avg", np.float32)
    assert _block_of(new[0]["exp_avg"]) is not _block_of(opt.state[0]["exp_avg"])


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_copies_step_alike(clone):
    opt = adamcpp.Adam(_params(), lr=1e-2)
    opt.step(_grads(0))
    twin = clone(opt)
    a = [g["params"] for g in opt.param_groups][0]
    b = [g["params"] for g in twin.param_groups][0]
    for k in range(1, 3):
        assert opt.step(_grads(k)) and twin.step(_grads(k))
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
