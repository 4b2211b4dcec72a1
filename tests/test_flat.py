"""Flat storage (docs/api.md, "Flat storage"): adamcpp.FlatParams and the flat
mode of Adam, AdamW and SGD.

The contract tested here: flat storage changes the layout, never an element's
arithmetic, so a flat optimizer and a list optimizer over copies of the same
arrays, fed the same gradients, agree bit for bit after every step (parameters,
state, step counts, the clipping norm), through groups, schedules, clipping,
the non-finite policies, every SIMD target and thread count, state edits that
split a parameter out of its range, checkpoints in both directions and copies.
"""

from __future__ import annotations

import copy
import math
import pickle
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import adamcpp
from adamcpp import FlatParams, _core
from adamcpp.flat import ALIGNMENT, FlatParamState
from conftest import Recorder, Snapshot, assert_bitwise_equal, assert_equal_nan_aware, normal_problem

CHUNK = int(_core.chunk_elements)
PAR_MIN = int(_core.parallel_min_elements)

SHAPES = [(3, 4), (5,), (0,), (), (7, 2), (1, 1, 3)]


def _ordered(values, keys):
    return [values[k] for k in keys] if keys is not None else list(values)


def make_pair(cls, arrays, groups=None, **kwargs):
    """A flat optimizer over FlatParams(arrays) and a list optimizer over
    copies of the arrays, built alike. `groups`: a list of (indices,
    overrides); both optimizers get groups of the same parameters in the same
    order (the flat one over the FlatParams' views)."""
    flat = FlatParams(arrays)
    keys = list(arrays) if isinstance(arrays, dict) else None
    source = _ordered(arrays, keys)
    copies = [a.copy() for a in source]
    views = _ordered(flat.params, keys)
    if groups is None:
        opt_flat = cls(flat, **kwargs)
        opt_list = cls(dict(zip(keys, copies)) if keys is not None else copies, **kwargs)
    else:
        opt_flat = cls([{"params": [views[i] for i in idx], **over} for idx, over in groups], **kwargs)
        opt_list = cls([{"params": [copies[i] for i in idx], **over} for idx, over in groups], **kwargs)
    assert opt_flat.layout.mode == "flat" and opt_list.layout.mode != "flat"
    return flat, opt_flat, copies, opt_list


def feed(flat, grads):
    """Writes one gradient per parameter (in the FlatParams' order) into flat.grads."""
    for view, g in zip(_ordered(flat.grads, flat.keys), grads):
        view[...] = g


def assert_same(opt_flat, views, opt_list, copies, what=""):
    """Parameters, every state entry and step count: bitwise."""
    for i, (a, b) in enumerate(zip(views, copies)):
        assert_bitwise_equal(a, b, f"{what} params[{i}]")
    assert len(opt_flat.state) == len(opt_list.state)
    for i, (sf, sl) in enumerate(zip(opt_flat.state, opt_list.state)):
        assert list(sf) == list(sl), f"{what} state[{i}] keys {list(sf)} vs {list(sl)}"
        for k in sl:
            if isinstance(sl[k], np.ndarray):
                assert_bitwise_equal(sf[k], sl[k], f"{what} state[{i}][{k!r}]")
            else:
                assert sf[k] == sl[k] and type(sf[k]) is type(sl[k]), f"{what} state[{i}][{k!r}]"


def opt_order(opt):
    """The optimizer's parameters in its order (groups flattened)."""
    return [p for g in opt.param_groups for p in g["params"]]


def run_both(flat, opt_flat, copies, opt_list, steps, *, grad_scale=1.0, check_each=True):
    """Feeds the same gradients (steps[k][i]: parameter i of the FlatParams at
    step k) to both optimizers and compares after every step."""
    views = _ordered(flat.params, flat.keys)
    index_of = {id(v): i for i, v in enumerate(views)}
    order = [index_of[id(v)] for v in opt_order(opt_flat)]
    for k, grads in enumerate(steps):
        feed(flat, grads)
        a = opt_flat.step(flat.grads, grad_scale=grad_scale)
        b = opt_list.step([grads[i].copy() for i in order], grad_scale=grad_scale)
        assert a is b
        assert opt_flat.last_grad_norm == opt_list.last_grad_norm or (
            math.isnan(opt_flat.last_grad_norm) and math.isnan(opt_list.last_grad_norm)
        )
        if check_each:
            assert_same(opt_flat, [views[i] for i in order], opt_list, [copies[i] for i in order], f"step {k}")


def problem(shapes, steps=4, seed=0, dtypes=(np.float32,)):
    params, grads = normal_problem(seed, shapes, steps, np.float64)
    cast = [dtypes[i % len(dtypes)] for i in range(len(shapes))]
    params = [p.astype(d) for p, d in zip(params, cast)]
    grads = [[g.astype(d) for g, d in zip(gs, cast)] for gs in grads]
    return params, grads


# ------------------------------------------------------------------ FlatParams


def test_flatparams_list_layout_and_views():
    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.ones(5),
        np.zeros(0, np.float32),
        np.full((), 7, np.float32),
    ]
    flat = FlatParams(arrays)
    assert flat.dtypes == (np.dtype(np.float32), np.dtype(np.float64))
    assert [b.size for b in flat.buffers] == [13, 5] and flat.numel == 18 and len(flat) == 4
    assert isinstance(flat.params, tuple) and isinstance(flat.grads, tuple)
    for b in (*flat.buffers, *flat.grad_buffers):
        assert b.ctypes.data % ALIGNMENT == 0 and b.flags.c_contiguous and b.flags.writeable
    assert flat.layout() == [(0, 0, (3, 4)), (1, 0, (5,)), (0, 12, (0,)), (0, 12, ())]
    for a, p, g in zip(arrays, flat.params, flat.grads):
        assert p.shape == a.shape and p.dtype == a.dtype and g.shape == a.shape and g.dtype == a.dtype
        assert np.array_equal(p, a) and not np.shares_memory(p, a)  # copied in
        assert (g == 0).all() and p.flags.c_contiguous and p.flags.writeable
    assert np.shares_memory(flat.params[0], flat.buffers[0]) and np.shares_memory(flat.grads[1], flat.grad_buffers[1])
    flat.params[0][1, 2] = -1.0
    assert flat.buffers[0][6] == -1.0  # a view: writes land in the buffer
    flat.grad_buffers[0][:] = 3.0
    flat.zero_grad()
    assert all((g == 0).all() for g in flat.grad_buffers)
    assert repr(flat) == "FlatParams(4 arrays (list), 13 float32, 5 float64)"


def test_flatparams_dict_and_shapes():
    flat = FlatParams({"w": (2, 3), "b": 3, "s": ()}, dtype=np.float64)
    assert flat.keys == ("w", "b", "s") and list(flat.params) == ["w", "b", "s"]
    assert flat.params["w"].shape == (2, 3) and flat.params["b"].shape == (3,) and flat.params["s"].shape == ()
    assert all(v.dtype == np.float64 and (v == 0).all() for v in flat.params.values())
    assert FlatParams([4]).dtypes == (np.dtype(np.float32),)  # shapes default to float32
    with pytest.raises(TypeError, match="read-only"):
        flat.params["w"] = np.zeros((2, 3))
    with pytest.raises(TypeError, match="read-only"):
        flat.grads.update(w=None)
    plain = flat.params.copy()
    plain["w"] = None  # a plain dict of the same views
    assert flat.params["w"] is not None


@pytest.mark.parametrize(
    "arrays, exc, message",
    [
        (
            np.zeros(3),
            TypeError,
            "arrays: expected a list or dict of arrays (or shapes), got a single ndarray (wrap it)",
        ),
        ([], ValueError, "arrays: FlatParams got no arrays"),
        ("abc", TypeError, "arrays: expected a list or dict of arrays (or shapes), got str"),
        (
            [np.zeros(2, np.int32)],
            TypeError,
            "arrays[0]: expected dtype float16, bfloat16, float32 or float64 (native byte order), got int32",
        ),
        (
            {"w": [1.0, 2.0]},
            TypeError,
            "arrays['w']: expected an array, or a shape (an int or a tuple of ints), got list",
        ),
        ([(2, -1)], ValueError, "arrays[0]: expected a shape of non-negative sizes, got (2, -1)"),
        (
            [np.zeros(2), (True,)],
            TypeError,
            "arrays[1]: expected an array, or a shape (an int or a tuple of ints), got (True,)",
        ),
        (
            [np.zeros(2, ">f8")],
            TypeError,
            "arrays[0]: expected dtype float16, bfloat16, float32 or float64 (native byte order), got >f8",
        ),
    ],
    ids=["ndarray", "empty", "str", "int32", "list-entry", "negative", "bool", "big-endian"],
)
def test_flatparams_refuses(arrays, exc, message):
    with pytest.raises(exc) as info:
        FlatParams(arrays)
    assert str(info.value) == message


MAX = np.iinfo(np.intp).max


@pytest.mark.parametrize(
    "arrays, kwargs, message",
    [
        (
            {"w": (2**40, 2**40)},
            {},
            r"arrays['w']: shape (1099511627776, 1099511627776) is 1208925819614629174706176 elements of float32 "
            r"(4835703278458516698824704 bytes), more than one array can hold",
        ),
        ({"w": (2**62,)}, {}, r"arrays['w']: shape (4611686018427387904,) is 4611686018427387904 elements of float32"),
        ([np.zeros(3), (2**64,)], {}, r"arrays[1]: shape (18446744073709551616,) is 18446744073709551616 elements"),
        ([(10**5000,)], {}, r"arrays[0]: shape (2**16609 or more,) is 2**16609 or more elements of float32"),
        (
            {"w": (2**70, 0)},
            {},
            rf"arrays['w']: shape (1180591620717411303424, 0) has a dimension larger than an array can have "
            rf"(at most {MAX})",
        ),
        (
            {"a": (2**60,), "b": (2**60,)},
            {},
            r"arrays['b']: shape (1152921504606846976,) brings the float32 buffer to 2305843009213693952 elements "
            r"(9223372036854775808 bytes), more than one array can hold",
        ),
        (
            [(3,)],
            {"pad_to": 2**62},
            r"pad_to: 4611686018427387904 pads the float32 buffer of 3 elements to 4611686018427387904 elements "
            r"(18446744073709551616 bytes), more than one array can hold",
        ),
    ],
    ids=["2^80", "2^62", "2^64", "10^5000", "huge-dim-zero-size", "two-entries", "pad_to"],
)
def test_flatparams_refuses_impossible_sizes_before_allocating(arrays, kwargs, message, monkeypatch):
    """A size no array can hold is a ValueError naming the entry and the size, raised before any allocation."""

    def no_allocation(count, dtype):
        raise AssertionError("allocated")

    monkeypatch.setattr(adamcpp.flat, "aligned_zeros", no_allocation)
    with pytest.raises(ValueError) as info:
        FlatParams(arrays, **kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_flatparams_out_of_memory_names_the_entry(monkeypatch):
    real = adamcpp.flat.aligned_zeros

    def scarce(count, dtype):
        if count > 1000:
            raise MemoryError("Unable to allocate")
        return real(count, dtype)

    monkeypatch.setattr(adamcpp.flat, "aligned_zeros", scarce)
    with pytest.raises(MemoryError) as info:
        FlatParams({"small": np.zeros(3, np.float32), "big": (40, 40), "bias": (2,)})
    assert str(info.value) == (
        "arrays['big']: out of memory for the float32 parameter buffer holding it (its largest entry, shape (40, 40)): "
        "1605 elements (6420 bytes)"
    )
    assert FlatParams({"w": (10, 10)}).numel == 100


def test_flatparams_padding():
    flat = FlatParams([np.ones(5, np.float32), np.ones(3)], pad_to=16)
    assert [b.size for b in flat.buffers] == [5, 3] and flat.pad_to == 16
    assert [b.size for b in flat._padded] == [16, 16] and [b.size for b in flat._grad_padded] == [16, 16]
    assert (flat._padded[0][5:] == 0).all() and np.shares_memory(flat.buffers[0], flat._padded[0])
    assert pickle.loads(pickle.dumps(flat)).pad_to == 16
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=r"^pad_to: expected an int >= 1"):
            FlatParams([np.ones(2)], pad_to=bad)


def test_flatparams_copies_any_layout_in():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    flat = FlatParams([base.T, base[::2], np.asarray(base, order="F")])
    assert np.array_equal(flat.params[0], base.T) and flat.params[0].flags.c_contiguous
    assert np.array_equal(flat.params[1], base[::2]) and np.array_equal(flat.params[2], base)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "joblib"])
def test_flatparams_copies_keep_views_shared(how, tmp_path):
    flat = FlatParams({"w": np.arange(6.0).reshape(2, 3), "b": np.ones(2, np.float32)})
    flat.grads["w"][...] = 5.0
    model = {"params": flat.params, "grads": flat.grads}
    if how == "pickle":
        flat2, model2 = pickle.loads(pickle.dumps((flat, model)))
    elif how == "deepcopy":
        flat2, model2 = copy.deepcopy((flat, model))
    else:
        joblib = pytest.importorskip("joblib")
        path = tmp_path / "flat.joblib"
        joblib.dump((flat, model), path)
        flat2, model2 = joblib.load(path)
    assert flat2 is not flat and model2["params"] is flat2.params and model2["grads"] is flat2.grads
    for k in ("w", "b"):
        assert np.array_equal(flat2.params[k], flat.params[k]) and np.array_equal(flat2.grads[k], flat.grads[k])
        assert np.shares_memory(flat2.params[k], flat2.buffers[flat2.dtypes.index(flat2.params[k].dtype)])
        assert not np.shares_memory(flat2.params[k], flat.params[k])
    assert flat2.buffers[0].ctypes.data % ALIGNMENT == 0
    # The copy's views are its own: an optimizer over them is flat.
    assert adamcpp.Adam(flat2).layout.mode == "flat"


# ------------------------------------------------------ flat against list, bitwise


CASES = {
    "adam": (adamcpp.Adam, dict(lr=1e-2)),
    "adam-wd-maximize": (adamcpp.Adam, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    "adamw-amsgrad-keras": (adamcpp.AdamW, dict(lr=3e-2, amsgrad=True, eps_style="keras", eps=1e-3)),
    "sgd": (adamcpp.SGD, dict(lr=0.1)),
    "sgd-momentum-dampening": (adamcpp.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01)),
    "sgd-nesterov": (adamcpp.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, maximize=True)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize(
    "dtypes", [(np.float32,), (np.float64,), (np.float32, np.float64)], ids=["f32", "f64", "mixed"]
)
def test_flat_matches_list_bitwise(name, dtypes):
    cls, kwargs = CASES[name]
    params, grads = problem([*SHAPES, (40,), (3, 3)], steps=5, dtypes=dtypes)
    flat, opt_flat, copies, opt_list = make_pair(cls, params, **kwargs)
    assert len(opt_flat.layout.segments) == len(dtypes)  # one range per dtype: one native tensor each
    run_both(flat, opt_flat, copies, opt_list, grads, grad_scale=0.75)


def test_flat_matches_list_on_every_simd_target(simd_target):
    params, grads = problem([(37,), (5, 9), (1,), (130,)], steps=4, dtypes=(np.float32, np.float64))
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.AdamW, params, lr=1e-2, amsgrad=True, max_grad_norm=2.0)
    run_both(flat, opt_flat, copies, opt_list, grads)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_flat_matches_list_at_any_thread_count(threads, restore_threads):
    adamcpp.set_num_threads(threads)
    sizes = [CHUNK + 5, 3, 2 * CHUNK - 1, PAR_MIN, 11]  # several chunks, pieces that straddle them
    params, grads = problem([(n,) for n in sizes], steps=3, dtypes=(np.float32, np.float64))
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2, max_grad_norm=10.0)
    run_both(flat, opt_flat, copies, opt_list, grads)


def test_dict_form_and_dict_gradients():
    params, grads = problem([(4,), (2, 2), (3,)], steps=3)
    arrays = dict(zip("abc", params))
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, arrays, lr=1e-2)
    for gs in grads:
        feed(flat, gs)
        assert opt_flat.step(flat.grads) and opt_list.step(dict(zip("abc", gs)))
        # a dict or a list of the very views works too
        assert opt_flat.step(dict(flat.grads)) and opt_list.step(dict(zip("abc", gs)))
        assert opt_flat.step(list(flat.grads.values())) and opt_list.step(dict(zip("abc", gs)))
    assert_same(opt_flat, list(flat.params.values()), opt_list, copies)
    assert opt_flat.state_dict()["param_groups"][0]["params"] == [0, 1, 2]


def test_groups_map_to_ranges_and_match_list():
    """Interleaved groups (weights and biases, as for no decay on biases) with
    their own hyperparameters and a schedule: the flat optimizer steps one
    range per run of one group, and matches the list optimizer."""
    params, grads = problem([(6, 3), (3,), (3, 4), (4,), (4, 2), (2,)], steps=5, dtypes=(np.float32,))
    sched = Recorder(adamcpp.schedules.CosineDecay(1e-2, 10))
    groups = [([0, 2, 4], {"lr": sched}), ([1, 3, 5], {"weight_decay": 0.0, "betas": (0.8, 0.99)})]
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.AdamW, params, groups, lr=1e-2, weight_decay=0.1)
    assert len(opt_flat.layout.segments) == 6  # each parameter: its neighbours are in the other group
    run_both(flat, opt_flat, copies, opt_list, grads)
    assert sched.seen == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # once per step and optimizer

    # contiguous groups: one range each
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, [([0, 1, 2], {}), ([3, 4, 5], {"lr": 0.1})])
    assert [s.members for s in opt_flat.layout.segments] == [(0, 1, 2), (3, 4, 5)]
    run_both(flat, opt_flat, copies, opt_list, grads)


def test_part_of_a_flatparams():
    """An optimizer over some of the views steps those ranges only."""
    params, grads = problem([(5,), (6,), (7,)], steps=3)
    flat = FlatParams(params)
    opt = adamcpp.Adam([flat.params[0], flat.params[2]], lr=1e-2)
    ref = [params[0].copy(), params[2].copy()]
    opt_ref = adamcpp.Adam(ref, lr=1e-2)
    middle = flat.params[1].copy()
    for gs in grads:
        feed(flat, gs)
        opt.step(flat.grads)
        opt_ref.step([gs[0], gs[2]])
    assert_same(opt, [flat.params[0], flat.params[2]], opt_ref, ref)
    assert np.array_equal(flat.params[1], middle)
    assert [s.members for s in opt.layout.segments] == [(0,), (1,)]


def test_clipping_norm_is_the_list_norm():
    params, grads = problem([(CHUNK - 3,), (7,), (CHUNK + 9,)], steps=3, dtypes=(np.float32, np.float64))
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.SGD, params, lr=0.1, momentum=0.9, max_grad_norm=1.0)
    run_both(flat, opt_flat, copies, opt_list, grads, grad_scale=-2.0)
    assert opt_flat.last_grad_norm == 2.0 * adamcpp.global_norm(flat.grads)


@pytest.mark.parametrize("policy", ["skip", "raise", "propagate"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_nonfinite_policies_match_list(policy, clip):
    params, grads = problem([(5,), (3, 2), (4,)], steps=4, dtypes=(np.float32, np.float64))
    grads[2][1][1, 0] = np.inf  # params[1] at step 2
    grads[2][2][3] = np.nan  # params[2] at step 2
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2, nonfinite=policy, max_grad_norm=clip)
    views = list(flat.params)
    for k, gs in enumerate(grads):
        feed(flat, gs)
        if k == 2 and policy == "raise":
            snap = Snapshot(opt_flat, views)
            with pytest.raises(FloatingPointError) as got:
                opt_flat.step(flat.grads)
            with pytest.raises(FloatingPointError) as want:
                opt_list.step(gs)
            assert (
                str(got.value)
                == str(want.value)
                == ("grads[1]: non-finite gradient (NaN or Inf after grad_scale); nothing was updated")
            )
            snap.assert_unchanged("a refused flat step")
            continue
        assert opt_flat.step(flat.grads) is opt_list.step(gs) is (k != 2 or policy == "propagate")
        for i in range(3):
            assert_equal_nan_aware(views[i], copies[i], f"step {k} params[{i}]")
        last_f, last_l = opt_flat.last_grad_norm, opt_list.last_grad_norm
        assert (last_f == last_l) or (math.isnan(last_f) and math.isnan(last_l))
    assert [s["step"] for s in opt_flat.state] == [s["step"] for s in opt_list.state]


def test_raise_names_the_parameter_by_key():
    flat = FlatParams({"w": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)})
    opt = adamcpp.Adam(flat, nonfinite="raise")
    flat.grads["b"][1] = np.nan
    with pytest.raises(FloatingPointError, match=r"^grads\['b'\]: non-finite gradient"):
        opt.step(flat.grads)


def test_overflow_at_the_callers_scale_but_not_after_clipping():
    """With clipping, the non-finite check runs at the clipped scale (as in a
    list optimizer): a gradient that overflows float32 at the caller's scale
    alone is not non-finite."""
    params = [np.zeros(4, np.float32)]
    g = [np.full(4, 1e30, np.float32)]
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, nonfinite="raise", max_grad_norm=1.0)
    run_both(flat, opt_flat, copies, opt_list, [g], grad_scale=1e10)


# ---------------------------------------------------------------- state and its edits


def test_state_is_per_parameter_views_of_flat_buffers():
    params, grads = problem([(3, 4), (5,), (2,)], steps=2)
    flat = FlatParams(params)
    opt = adamcpp.Adam(flat, lr=1e-2, amsgrad=True)
    assert isinstance(opt.state, tuple) and all(isinstance(s, FlatParamState) for s in opt.state)
    assert list(opt.state[0]) == ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    m = [s["exp_avg"] for s in opt.state]
    assert [a.shape for a in m] == [(3, 4), (5,), (2,)]
    # back to back in one buffer, like the parameters
    assert m[0].ctypes.data + m[0].nbytes == m[1].ctypes.data and m[1].ctypes.data + m[1].nbytes == m[2].ctypes.data
    assert m[0].ctypes.data % ALIGNMENT == 0
    assert opt.state[0]["exp_avg"] is m[0]  # the same view object each time
    feed(flat, grads[0])
    opt.step(flat.grads)
    assert [s["step"] for s in opt.state] == [1, 1, 1] and opt.state[2]["exp_avg"] is m[2]
    assert (m[1] != 0).all()  # updated in place
    assert dict(opt.state[0]).keys() == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert "step" in opt.state[0] and len(opt.state[0]) == 4
    assert isinstance(copy.copy(opt.state[0]), dict) and isinstance(pickle.loads(pickle.dumps(opt.state[0])), dict)


def test_sgd_momentum_buffer_starts_at_the_first_momentum_step():
    params, grads = problem([(3,), (4,)], steps=3)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.SGD, params, lr=0.1)
    assert opt_flat.state[0] == {"step": 0, "momentum_buffer": None}
    run_both(flat, opt_flat, copies, opt_list, grads[:1])
    for opt in (opt_flat, opt_list):
        opt.param_groups[0]["momentum"] = 0.9  # momentum switched on: the buffer starts now
    run_both(flat, opt_flat, copies, opt_list, grads[1:])
    assert np.shares_memory(opt_flat.state[0]["momentum_buffer"], opt_flat.state[1]["momentum_buffer"]) is False
    a, b = opt_flat.state[0]["momentum_buffer"], opt_flat.state[1]["momentum_buffer"]
    assert a.ctypes.data + a.nbytes == b.ctypes.data  # one buffer for the range


def test_amsgrad_switched_on_later():
    params, grads = problem([(3,), (4,)], steps=4)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    run_both(flat, opt_flat, copies, opt_list, grads[:2])
    for opt in (opt_flat, opt_list):
        opt.param_groups[0]["amsgrad"] = True
    run_both(flat, opt_flat, copies, opt_list, grads[2:])
    assert "max_exp_avg_sq" in opt_flat.state[1]


EDITS = {
    "step": lambda opt: opt.state[1].__setitem__("step", 40),
    "numpy-step": lambda opt: opt.state[1].__setitem__("step", np.int64(7)),
    "array": lambda opt: opt.state[2].__setitem__("exp_avg", np.full((2, 2), 0.25, np.float32)),
    "update": lambda opt: opt.state[0].update(exp_avg_sq=np.full(5, 2.0, np.float32), step=3),
    "replace-state-list": lambda opt: setattr(
        opt, "state", [dict(s) if i == 1 else s for i, s in enumerate(opt.state)]
    ),
    "replace-with-copies": lambda opt: setattr(
        opt, "state", [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in s.items()} for s in opt.state]
    ),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_state_edits_fall_back_to_per_parameter_stepping(edit):
    """An edit that makes one parameter differ from its range (another step
    count, another array) splits it into a range of its own: the optimizer
    then behaves exactly like a list optimizer edited the same way."""
    params, grads = problem([(5,), (3,), (2, 2), (6,)], steps=6)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    run_both(flat, opt_flat, copies, opt_list, grads[:2])
    EDITS[edit](opt_flat)
    EDITS[edit](opt_list)
    run_both(flat, opt_flat, copies, opt_list, grads[2:])


def test_split_and_join():
    params, grads = problem([(5,), (3,), (2,), (6,)], steps=4)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    fs = opt_flat.layout
    m1 = opt_flat.state[1]["exp_avg"]
    run_both(flat, opt_flat, copies, opt_list, grads[:1])
    for opt in (opt_flat, opt_list):
        opt.state[1]["step"] = 5
    assert [s.members for s in fs.segments] == [(0,), (1,), (2, 3)]
    assert opt_flat.state[1]["exp_avg"] is m1 and opt_flat.state[1]["step"] == 5 and opt_flat.state[0]["step"] == 1
    run_both(flat, opt_flat, copies, opt_list, grads[1:2])
    assert [s["step"] for s in opt_flat.state] == [2, 6, 2, 2]
    # set back in line: joined again at the next step, still matching the list optimizer
    for opt in (opt_flat, opt_list):
        opt.state[1]["step"] = 2
    run_both(flat, opt_flat, copies, opt_list, grads[2:])
    assert [s.members for s in fs.segments] == [(0, 1, 2, 3)]
    assert opt_flat.state[1]["exp_avg"] is m1  # the same object across the split and the join
    # assigning the same value changes nothing
    opt_flat.state[2]["exp_avg"] = opt_flat.state[2]["exp_avg"]
    opt_flat.state[2]["step"] = opt_flat.state[2]["step"]
    assert len(fs.segments) == 1 and not fs.dirty


def test_replaced_array_is_stepped_in_place():
    params, grads = problem([(4,), (3,)], steps=3)
    flat = FlatParams(params)
    opt = adamcpp.Adam(flat, lr=1e-2)
    mine = np.zeros(3, np.float32)
    opt.state[1]["exp_avg"] = mine
    feed(flat, grads[0])
    opt.step(flat.grads)
    assert opt.state[1]["exp_avg"] is mine and (mine != 0).all()
    assert opt.state_dict()["state"][1]["exp_avg"].tolist() == mine.tolist()


@pytest.mark.parametrize(
    "edit, exc, message",
    [
        (lambda s: s.__setitem__("step", 1.5), TypeError, "state[1]['step']: expected an int step count, got float"),
        (lambda s: s.__setitem__("step", -1), ValueError, "state[1]['step']: expected an integer >= 0, got -1"),
        (
            lambda s: s.__setitem__("step", 2**63 - 1),
            ValueError,
            "state[1]['step']: expected an integer <= 9223372036854775806 (step counts are signed 64-bit integers, "
            "and a step adds one), got 9223372036854775807",
        ),
        (lambda s: s.__delitem__("step"), ValueError, "state[1]['step']: missing from the optimizer state"),
        (lambda s: s.__delitem__("exp_avg"), ValueError, "exp_avg of params[1]: missing from the optimizer state"),
        (
            lambda s: s.__setitem__("exp_avg_sq", np.zeros(4, np.float64)),
            TypeError,
            "exp_avg_sq of params[1]: expected dtype float32 like params[1], got float64",
        ),
        (
            lambda s: s.__setitem__("exp_avg", np.zeros(5, np.float32)),
            ValueError,
            "exp_avg of params[1]: expected shape (4,) like params[1], got (5,)",
        ),
        (lambda s: s.__setitem__("exp_avg", "x"), TypeError, "exp_avg of params[1]: expected a numpy.ndarray, got str"),
    ],
    ids=["float-step", "negative-step", "huge-step", "no-step", "no-exp_avg", "dtype", "shape", "type"],
)
def test_bad_state_edits_give_the_list_message_and_change_nothing(edit, exc, message):
    params, grads = problem([(3,), (4,), (2,)], steps=2)
    for kind in ("flat", "list"):
        if kind == "flat":
            flat = FlatParams(params)
            opt = adamcpp.Adam(flat, lr=1e-2)
            views, step_grads = list(flat.params), flat.grads
            feed(flat, grads[0])
        else:
            views = [p.copy() for p in params]
            opt = adamcpp.Adam(views, lr=1e-2)
            step_grads = grads[0]
        opt.step(step_grads)
        edit(opt.state[1])
        snap = Snapshot(opt, views)
        with pytest.raises(exc) as info:
            opt.step(step_grads)
        assert str(info.value) == message, kind
        snap.assert_values_unchanged(kind)


def test_bad_state_list_is_refused():
    flat = FlatParams([np.zeros(2, np.float32)])
    opt = adamcpp.Adam(flat)
    opt.state = {"a": 1}
    with pytest.raises(TypeError, match=r"^state: expected a list or tuple, got dict$"):
        opt.step(flat.grads)
    opt.state = []
    with pytest.raises(ValueError, match=r"^state: expected 1 entries \(one per parameter\), got 0$"):
        opt.step(flat.grads)
    opt.state = [3]
    with pytest.raises(TypeError, match=r"^state\[0\]: expected a dict, got int$"):
        opt.step(flat.grads)
    opt.state = [{"step": 0, "exp_avg": np.zeros(2, np.float32), "exp_avg_sq": np.zeros(2, np.float32)}]
    assert opt.step(flat.grads) and isinstance(opt.state, tuple) and opt.state[0]["step"] == 1


# ----------------------------------------------------------------- the fixed layout


def test_gradients_must_be_the_flat_views():
    flat = FlatParams([np.zeros(3, np.float32), np.zeros(2, np.float32)])
    opt = adamcpp.Adam(flat)
    snap = Snapshot(opt, list(flat.params))
    with pytest.raises(ValueError) as info:
        opt.step([flat.grads[0], np.zeros(2, np.float32)])
    assert str(info.value) == (
        "grads[1]: a flat optimizer reads its gradients from its FlatParams' gradient buffer: pass flat.grads "
        "(with the gradients written into its views), not other arrays"
    )
    with pytest.raises(ValueError, match=r"^grads: expected 2 gradients \(one per parameter\), got 1$"):
        opt.step([flat.grads[0]])
    with pytest.raises(TypeError, match="a dict of gradients needs dict-form params"):
        opt.step({"a": flat.grads[0]})
    with pytest.raises(TypeError, match="got a single ndarray"):
        opt.step(flat.grad_buffers[0])
    snap.assert_unchanged("refused gradients")


def test_parameters_are_fixed():
    flat = FlatParams([np.zeros(3, np.float32), np.zeros(2, np.float32)])
    opt = adamcpp.Adam(flat)
    with pytest.raises(ValueError, match=r"^add_param_group: a flat optimizer steps a fixed set"):
        opt.add_param_group({"params": [np.zeros(2)]})
    opt.param_groups[0]["params"] = list(opt.param_groups[0]["params"])  # the same views: fine
    assert opt.step(flat.grads)
    opt.param_groups[0]["params"] = [flat.params[1], flat.params[0]]
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]: a flat optimizer steps a fixed set"):
        opt.step(flat.grads)
    opt.param_groups[0]["params"] = list(flat.params)
    opt.param_groups[0] = dict(opt.param_groups[0], lr=0.5)  # a plain dict with the same views: fine
    assert opt.step(flat.grads) and opt.state[0]["step"] == 2


def test_views_reshaped_in_place_keep_the_layout():
    """The FlatParams owns the layout: a parameter or gradient view reshaped in
    place (`view.shape = ...`: the same memory seen another way) changes
    nothing for a flat optimizer, in a range of several parameters or of its
    own: it steps, keeps and saves the state in the layout's shapes, matching a
    list optimizer over the arrays as laid out, and its state dict loads back."""
    params, grads = problem([(3, 4), (12,), (2,)], steps=4)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    views, gviews = list(flat.params), list(flat.grads)
    views[0].shape = (4, 3)
    gviews[1].shape = (3, 4)

    def both(k):
        for view, g in zip(gviews, grads[k]):
            view[...] = g.reshape(view.shape)
        assert opt_flat.step(flat.grads) and opt_list.step([g.copy() for g in grads[k]])
        laid_out = [v.reshape(c.shape) for v, c in zip(views, copies)]
        assert_same(opt_flat, laid_out, opt_list, copies, f"step {k}")

    both(0)
    assert len(opt_flat.layout.segments) == 1
    sd = opt_flat.state_dict()
    assert sd["state"][0]["exp_avg"].shape == (3, 4)
    opt_flat.load_state_dict(sd)
    opt_list.load_state_dict(sd)
    both(1)
    for opt in (opt_flat, opt_list):  # each reshaped parameter in a range of its own
        for i in (0, 1):
            opt.state[i]["exp_avg"] = np.array(opt.state[i]["exp_avg"])
    assert [s.members for s in opt_flat.layout.segments] == [(0,), (1,), (2,)]
    both(2)
    opt_flat.load_state_dict(opt_flat.state_dict())
    both(3)
    assert flat.layout() == [(0, 0, (3, 4)), (0, 12, (12,)), (0, 24, (2,))]


def test_views_reshaped_before_the_optimizer_keep_the_layout():
    params, grads = problem([(3, 4), (5,)], steps=2)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    flat.params[0].shape = (2, 6)
    late = adamcpp.Adam(flat, lr=1e-2)
    assert late.state[0]["exp_avg"].shape == (3, 4) and len(late.layout.segments) == 1
    feed(flat, grads[0])
    assert late.step(flat.grads) and opt_list.step([g.copy() for g in grads[0]])
    assert_same(late, [flat.params[0].reshape(3, 4), flat.params[1]], opt_list, copies)


def test_views_of_a_flatparams_or_not():
    flat = FlatParams([np.zeros(3), np.zeros(2)])
    assert adamcpp.Adam(flat.params).layout.mode == "flat"  # its views, in its form
    assert adamcpp.Adam([flat.params[1]]).layout.mode == "flat"
    assert adamcpp.Adam([flat.params[0], np.zeros(2)]).layout.mode != "flat"  # mixed: a list optimizer
    assert adamcpp.Adam([flat.params[0][:2]]).layout.mode != "flat"  # a view of a view: not handed out by it
    assert adamcpp.Adam([flat.grads[0]]).layout.mode != "flat"  # gradient views are not parameters
    other = FlatParams([np.zeros(1)])
    assert adamcpp.Adam([flat.params[0], other.params[0]]).layout.mode != "flat"  # two FlatParams


# --------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "cls, kwargs", [(adamcpp.AdamW, dict(lr=1e-2, amsgrad=True)), (adamcpp.SGD, dict(lr=0.1, momentum=0.9))]
)
def test_checkpoints_move_between_flat_and_list(cls, kwargs):
    params, grads = problem([(4, 3), (5,), (2,)], steps=6, dtypes=(np.float32, np.float64))
    flat, opt_flat, copies, opt_list = make_pair(cls, params, **kwargs)
    run_both(flat, opt_flat, copies, opt_list, grads[:3])
    sd_flat, sd_list = opt_flat.state_dict(), opt_list.state_dict()
    assert sd_flat["param_groups"] == sd_list["param_groups"]
    for i in sd_list["state"]:
        assert sd_flat["state"][i].keys() == sd_list["state"][i].keys()
        for k, v in sd_list["state"][i].items():
            got = sd_flat["state"][i][k]
            if isinstance(v, np.ndarray):
                assert_bitwise_equal(got, v, f"state_dict state[{i}][{k!r}]")
                assert not np.shares_memory(got, opt_flat.state[i][k])  # copied
            else:
                assert got == v
    # flat -> list and list -> flat, from the same parameters: both continue like the originals
    flat2 = FlatParams(copies)
    opt_flat2 = cls(flat2, **kwargs)
    opt_flat2.load_state_dict(sd_list)
    assert len(opt_flat2.layout.segments) == 2  # loaded uniform state: one range per dtype again
    copies2 = [np.array(v) for v in flat.params]
    opt_list2 = cls(copies2, **kwargs)
    opt_list2.load_state_dict(sd_flat)
    run_both(flat2, opt_flat2, copies2, opt_list2, grads[3:])
    run_both(flat, opt_flat, copies, opt_list, grads[3:])
    assert_same(opt_flat2, list(flat2.params), opt_list, copies)


def test_checkpoint_files_and_torch_layout(tmp_path):
    params, grads = problem([(3,), (2, 2)], steps=3)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=adamcpp.schedules.CosineDecay(1e-2, 5))
    run_both(flat, opt_flat, copies, opt_list, grads[:2])
    path = tmp_path / "flat.safetensors"
    adamcpp.save(opt_flat.state_dict(), str(path))
    flat2 = FlatParams([np.array(v) for v in flat.params])
    opt2 = adamcpp.Adam(flat2)
    opt2.load_state_dict(adamcpp.load(str(path)))
    assert opt2.param_groups[0]["lr"] == opt_flat.param_groups[0]["lr"]
    run_both(flat2, opt2, copies, opt_list, grads[2:])


def test_load_with_uneven_steps_and_errors_change_nothing():
    params, grads = problem([(3,), (4,), (2,)], steps=3)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=1e-2)
    run_both(flat, opt_flat, copies, opt_list, grads[:1])
    sd = opt_list.state_dict()
    sd["state"][1]["step"] = 9
    del sd["state"][2]  # fresh state for params[2]
    opt_flat.load_state_dict(copy.deepcopy(sd))
    opt_list.load_state_dict(copy.deepcopy(sd))
    assert [s.members for s in opt_flat.layout.segments] == [(0,), (1,), (2,)]
    run_both(flat, opt_flat, copies, opt_list, grads[1:])
    bad = opt_list.state_dict()
    bad["state"][2]["exp_avg"] = np.zeros(5)
    snap = Snapshot(opt_flat, list(flat.params))
    with pytest.raises(ValueError, match=r"^state_dict\['state'\]\[2\]\['exp_avg'\]: expected shape \(2,\)"):
        opt_flat.load_state_dict(bad)
    snap.assert_unchanged("a refused load")


# ------------------------------------------------------------------------- copies


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "joblib"])
def test_copies_continue_bit_for_bit(how, tmp_path):
    params, grads = problem([(4,), (3, 2), (5,)], steps=6, dtypes=(np.float32, np.float64))
    flat = FlatParams(dict(zip("abc", params)))
    opt = adamcpp.AdamW(
        [{"params": [flat.params["a"], flat.params["c"]]}, {"params": [flat.params["b"]], "lr": 0.02}],
        lr=adamcpp.schedules.Constant(1e-2),
        amsgrad=True,
        max_grad_norm=3.0,
        nonfinite="skip",
    )
    for gs in grads[:2]:
        feed(flat, gs)
        opt.step(flat.grads)
    opt.state[2]["step"] = 11  # a parameter in a range of its own travels too
    if how == "pickle":
        flat2, opt2 = pickle.loads(pickle.dumps((flat, opt)))
    elif how == "deepcopy":
        flat2, opt2 = copy.deepcopy((flat, opt))
    else:
        joblib = pytest.importorskip("joblib")
        joblib.dump((flat, opt), tmp_path / "opt.joblib")
        flat2, opt2 = joblib.load(tmp_path / "opt.joblib")
    assert opt2.layout.mode == "flat" and opt2.layout.flat is flat2
    assert opt2.param_groups[0]["params"][0] is flat2.params["a"] and opt2.nonfinite == "skip"
    assert opt2.last_grad_norm == opt.last_grad_norm
    for gs in grads[2:]:
        feed(flat, gs)
        feed(flat2, gs)
        assert opt.step(flat.grads) is opt2.step(flat2.grads)
    assert_same(opt2, opt_order(opt2), opt, opt_order(opt))
    assert [s["step"] for s in opt2.state] == [6, 6, 15]


def test_optimizer_copied_alone_gets_its_own_flatparams():
    flat = FlatParams([np.ones(3, np.float32)])
    opt = adamcpp.Adam(flat)
    opt.step(flat.grads)
    opt2 = copy.deepcopy(opt)
    assert opt2.layout.flat is not flat and opt2.state[0]["step"] == 1
    opt2.step(opt2.layout.flat.grads)
    assert opt.state[0]["step"] == 1 and opt2.state[0]["step"] == 2


# -------------------------------------------------------------------- concurrency


def test_concurrent_steps_and_edits():
    n = 3 * PAR_MIN
    params, grads = problem([(n,), (5,)], steps=1)
    flat = FlatParams(params)
    feed(flat, grads[0])
    opt = adamcpp.Adam(flat, lr=1e-3)
    ref = [p.copy() for p in params]
    opt_ref = adamcpp.Adam(ref, lr=1e-3)

    def twenty():
        for _ in range(20):
            opt.step(flat.grads)

    workers = [threading.Thread(target=twenty) for _ in range(2)]
    for w in workers:
        w.start()
    for _ in range(10):  # edits from this thread wait for the running step
        opt.state[1]["exp_avg"] = opt.state[1]["exp_avg"]
    for w in workers:
        w.join()
    for _ in range(40):
        opt_ref.step(grads[0])
    assert [s["step"] for s in opt.state] == [40, 40]
    assert_same(opt, list(flat.params), opt_ref, ref)


def test_schedule_editing_the_state_mid_step():
    """A schedule runs inside a step; its edit of the state applies from the next step, as in a list optimizer."""
    params, grads = problem([(3,), (4,)], steps=4)
    holder = {}

    def sched(t):
        if t == 1:
            holder["opt"].state[1]["step"] = 10
        return 1e-2

    flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, lr=sched)
    for opt in (opt_flat, opt_list):
        holder["opt"] = opt
        opt.param_groups[0]["lr"] = sched
    views = list(flat.params)
    for gs in grads:
        feed(flat, gs)
        holder["opt"] = opt_flat
        opt_flat.step(flat.grads)
        holder["opt"] = opt_list
        opt_list.step(gs)
    assert_same(opt_flat, views, opt_list, copies)
    assert [s["step"] for s in opt_flat.state] == [4, 13]


# -------------------------------------------------------------- the native helpers


def test_chunk_sums_are_what_global_norm_adds():
    rng = np.random.default_rng(5)
    grads = [
        rng.standard_normal(n).astype(d)
        for n, d in [(CHUNK + 17, np.float32), (3, np.float64), (2 * CHUNK, np.float32)]
    ]
    chunks = -(-sum(g.size for g in grads) // CHUNK)
    out = np.zeros(chunks)
    _core.chunk_sum_squares(grads, out, ("params[{}]", "grads[{}]"), None)
    total = 0.0
    for v in out.tolist():
        total += v
    assert math.sqrt(total) == adamcpp.global_norm(grads)
    with pytest.raises(ValueError, match=r"^out: expected 4 elements \(one per chunk of 8192\), got 3$"):
        _core.chunk_sum_squares(grads, np.zeros(3), ("params[{}]", "grads[{}]"), None)
    with pytest.raises(TypeError, match=r"^grads\[1\]: expected a numpy.ndarray, got list: gradients mirror the parameters \(a list or dict "
                       r"of arrays\): flatten nested gradients the same way$"):
        _core.chunk_sum_squares([grads[0], [1.0]], out, ("params[{}]", "grads[{}]"), None)
    empty = np.zeros(0)
    _core.chunk_sum_squares([], empty, ("params[{}]", "grads[{}]"), None)


def test_first_nonfinite():
    grads = [np.ones(10, np.float32), np.ones(CHUNK * 3), np.array([1.0, 2.0e30], np.float32)]
    labels = ("params[{}]", "grads[{}]")
    assert _core.first_nonfinite(grads, 1.0, labels, None) == -1
    assert _core.first_nonfinite(grads, 1e10, labels, None) == 2  # 2e40 overflows float32 only
    grads[1][CHUNK * 2 + 5] = np.nan
    assert _core.first_nonfinite(grads, 1.0, labels, None) == 1
    grads[0][3] = -np.inf
    assert _core.first_nonfinite(grads, -0.5, labels, None) == 0
    with pytest.raises(ValueError, match="grad_scale: expected a finite float"):
        _core.first_nonfinite(grads, math.inf, labels, None)


# ------------------------------------------------------------- random sequences


class FlatAgainstList(RuleBasedStateMachine):
    """Any mix of steps (finite or not, under nonfinite="skip"), state edits,
    group edits, loads and copies keeps a flat optimizer on the bits of a list
    optimizer that gets the same treatment."""

    SIZES = (7, 3, 0, 5, PAR_MIN + 9, 2)
    DTYPES = (np.float32, np.float32, np.float32, np.float64, np.float32, np.float64)

    @initialize(seed=st.integers(0, 2**16))
    def setup(self, seed):
        self.rng = np.random.default_rng(seed)
        params = [self.rng.uniform(-1, 1, n).astype(d) for n, d in zip(self.SIZES, self.DTYPES)]
        groups = [([0, 2, 3, 5], {}), ([1, 4], {"lr": 3e-3, "weight_decay": 0.0})]
        self.flat, self.opt_flat, self.copies, self.opt_list = make_pair(
            adamcpp.AdamW, params, groups, lr=1e-2, nonfinite="skip", max_grad_norm=5.0
        )
        self.n = len(params)
        self.order = [0, 2, 3, 5, 1, 4]  # optimizer index -> FlatParams index (the groups' order)

    def _views(self):
        return _ordered(self.flat.params, self.flat.keys)

    @rule(nan=st.booleans(), scale=st.sampled_from([1.0, 0.5, -2.0]))
    def step(self, nan, scale):
        grads = [self.rng.standard_normal(n).astype(d) for n, d in zip(self.SIZES, self.DTYPES)]
        if nan:
            grads[4][3] = np.nan
        run_both(self.flat, self.opt_flat, self.copies, self.opt_list, [grads], grad_scale=scale, check_each=False)

    @rule(i=st.integers(0, 5), step=st.integers(0, 30))
    def set_step(self, i, step):
        for opt in (self.opt_flat, self.opt_list):
            opt.state[i]["step"] = step

    @rule(i=st.integers(0, 5))
    def align_step(self, i):
        """Sets a parameter's count to its neighbour's (ranges may join again)."""
        j = (i + 1) % self.n
        for opt in (self.opt_flat, self.opt_list):
            opt.state[i]["step"] = opt.state[j]["step"]

    @rule(i=st.integers(0, 5))
    def replace_exp_avg(self, i):
        j = self.order[i]
        new = self.rng.standard_normal(self.SIZES[j]).astype(self.DTYPES[j])
        self.opt_flat.state[i]["exp_avg"] = new.copy()
        self.opt_list.state[i]["exp_avg"] = new.copy()

    @rule(g=st.integers(0, 1), lr=st.sampled_from([1e-3, 1e-2, 0.1]), amsgrad=st.booleans())
    def edit_group(self, g, lr, amsgrad):
        for opt in (self.opt_flat, self.opt_list):
            opt.param_groups[g]["lr"] = lr
            opt.param_groups[g]["amsgrad"] = amsgrad

    @rule()
    def reload(self):
        sd = self.opt_list.state_dict()
        self.opt_flat.load_state_dict(copy.deepcopy(sd))
        self.opt_list.load_state_dict(copy.deepcopy(sd))

    @rule()
    def copy_both(self):
        self.flat, self.opt_flat = copy.deepcopy((self.flat, self.opt_flat))
        self.copies, self.opt_list = pickle.loads(pickle.dumps((self.copies, self.opt_list)))

    @invariant()
    def same_bits(self):
        if not hasattr(self, "opt_flat"):
            return
        views = self._views()
        index_of = {id(v): i for i, v in enumerate(views)}
        order = [index_of[id(v)] for v in opt_order(self.opt_flat)]
        assert_same(self.opt_flat, [views[i] for i in order], self.opt_list, opt_order(self.opt_list))
        for i in order:
            assert_equal_nan_aware(views[i], self.copies[i], f"params[{i}]")


FlatAgainstList.TestCase.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestFlatAgainstList = FlatAgainstList.TestCase


# ------------------------------------------------------------ mixed precision


def _bf16():
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)


PRECISIONS = {
    "bf16-state": ((np.float32,), dict(state_dtype="bfloat16")),
    "bf16-state-nearest-amsgrad": ((np.float32,), dict(state_dtype="bfloat16", state_rounding="nearest", amsgrad=True)),
    "bf16-state-amsgrad-keras": ((np.float32,), dict(state_dtype="bfloat16", amsgrad=True, eps_style="keras")),
    "f16-master": ((np.float16,), dict()),
    "bf16-master-bf16-state": (("bf16",), dict(state_dtype="bfloat16")),
    "bf16-pure-stochastic": (("bf16",), dict(master_weights=False, state_dtype="bfloat16")),
    "f16-no-master-stochastic": ((np.float16,), dict(master_weights=False, param_rounding="stochastic")),
    "mixed-dtypes-bf16-state": ((np.float32, "bf16", np.float16), dict(state_dtype="bfloat16")),
}


@pytest.mark.parametrize("name", list(PRECISIONS))
@pytest.mark.parametrize("cls", [adamcpp.Adam, adamcpp.AdamW])
def test_precision_options_match_list_bitwise(name, cls):
    """Flat ranges join many parameters; stochastic rounding still keys every
    element by its parameter's index and its own index there (the pieces the
    native step takes), so the bits are the list optimizer's, 16-bit
    parameters, master copies and bfloat16 state included."""
    dtypes, kwargs = PRECISIONS[name]
    dtypes = tuple(_bf16() if d == "bf16" else np.dtype(d) for d in dtypes)
    params, grads = problem([*SHAPES, (40,), (3, 3), (CHUNK + 37,)], steps=5, dtypes=dtypes)
    flat, opt_flat, copies, opt_list = make_pair(cls, params, lr=3e-2, seed=17, **kwargs)
    assert len(opt_flat.layout.segments) == len(set(dtypes))  # one range per dtype: many parameters per range
    run_both(flat, opt_flat, copies, opt_list, grads, grad_scale=0.5)
    for st in opt_flat.state:
        assert st["exp_avg"].dtype == (_bf16() if kwargs.get("state_dtype") else np.float32)


def test_precision_groups_split_edits_and_threads(restore_threads):
    """Groups with their own seeds and layouts, a step-count edit that splits
    one parameter into a range of its own, and 1 or 2 threads over ranges
    larger than a chunk: still the list optimizer's bits."""
    bf16 = _bf16()
    params, grads = problem([(CHUNK + 5,), (300,), (2 * CHUNK + 1,), (7,)], steps=6, dtypes=(np.float32, bf16))
    groups = [([0, 2], dict(seed=3)), ([1, 3], dict(lr=1e-2, state_rounding="nearest"))]
    for threads in (1, 2):
        adamcpp.set_num_threads(threads)
        flat, opt_flat, copies, opt_list = make_pair(adamcpp.Adam, params, groups, lr=3e-2, state_dtype="bfloat16")
        run_both(flat, opt_flat, copies, opt_list, grads[:3])
        opt_flat.state[2]["step"] = 9
        opt_list.state[2]["step"] = 9
        run_both(flat, opt_flat, copies, opt_list, grads[3:])


def test_precision_checkpoints_and_copies_move_between_flat_and_list(tmp_path):
    """A flat bfloat16-state optimizer's checkpoint (in memory and through
    adamcpp.save) continues in a list optimizer, and a pickled copy in flat
    storage, with the bits of the original."""
    bf16 = _bf16()
    params, grads = problem([(50,), (3, 4), (CHUNK + 3,)], steps=6, dtypes=(bf16, np.float32))
    kwargs = dict(lr=2e-2, state_dtype="bfloat16", seed=5)
    flat, opt_flat, copies, opt_list = make_pair(adamcpp.AdamW, params, **kwargs)
    run_both(flat, opt_flat, copies, opt_list, grads[:3])
    path = tmp_path / "flat.safetensors"
    adamcpp.save(opt_flat.state_dict(), path)
    copies2 = [np.array(v) for v in flat.params]
    opt_list2 = adamcpp.AdamW(copies2, **kwargs)
    opt_list2.load_state_dict(adamcpp.load(path))
    flat3, opt_flat3 = pickle.loads(pickle.dumps((flat, opt_flat)))
    assert flat3.dtypes == flat.dtypes and opt_flat3.layout.mode == "flat"
    for gs in grads[3:]:
        feed(flat, gs)
        feed(flat3, gs)
        opt_flat.step(flat.grads)
        opt_flat3.step(flat3.grads)
        opt_list2.step([g.copy() for g in gs])
    assert_same(opt_flat3, list(flat3.params), opt_flat, list(flat.params))
    assert_same(opt_flat, list(flat.params), opt_list2, copies2)


@pytest.mark.parametrize(
    "rows",
    [
        np.zeros((0, 3), np.int64),
        np.array([[1, 0, 0]], np.int64),
        np.array([[0, 0, 0], [0, 1, 0]], np.int64),
        np.array([[0, 0, 0], [500, 1, 0]], np.int64),
        np.array([[0, -1, 0]], np.int64),
        np.array([[0, 0, 0]], np.int32),
        np.zeros((1, 2), np.int64),
    ],
    ids=["empty", "not-from-0", "not-increasing", "past-the-end", "negative", "int32", "two-columns"],
)
def test_malformed_rounding_pieces_are_refused_before_any_write(rows):
    """The native step's rounding pieces (what flat.py and distributed.py pass)
    are checked like every other argument: ValueError, nothing written."""
    bf16 = _bf16()
    params, grads = problem([(40,), (30,)], steps=2)
    flat, opt_flat, _, _ = make_pair(adamcpp.Adam, params, lr=1e-2, state_dtype="bfloat16")
    feed(flat, grads[0])
    opt_flat.step(flat.grads)
    before = [np.array(b) for b in flat.buffers] + [np.array(s["exp_avg"]) for s in opt_flat.state]
    opt_flat.layout.seg_pieces = [rows]
    with pytest.raises(ValueError, match=r"rounding_pieces\[0\]: "):
        opt_flat.step(flat.grads)
    after = [np.array(b) for b in flat.buffers] + [np.array(s["exp_avg"]) for s in opt_flat.state]
    for a, b in zip(before, after):
        assert a.dtype in (np.float32, bf16) and a.tobytes() == b.tobytes()
    assert [s["step"] for s in opt_flat.state] == [1, 1]
