"""Changes made to an array behind an unchanged Python object are seen by the very next step.

A list-mode optimizer (separate NumPy arrays, list or dict form) meets the same objects at every step, but an
array's header (data pointer, shape, strides, dtype, flags) can change under the same object: `a.shape = ...`,
`a.strides = ...`, `a.dtype = ...`, `a.setflags(...)`, `a.resize(..., refcheck=False)`, `a.__setstate__(...)`.
The same goes for what the groups and the state dicts hold. Every such change to a parameter, to a gradient
object reused from the previous step, or to the state, before or after a first step, must be seen:

- a change that breaks a rule of docs/api.md (2.2, 2.3, 2.8) is refused with the exact message naming the array,
  and nothing is written: every parameter and state array is bitwise what it was, and so is every step count;
- undone, the next steps match a control optimizer that never saw the change, bit for bit (hidden parts of a
  buffer included: an undone header shows the whole buffer again);
- a change that breaks no rule is accepted, and the steps match the control bit for bit.

These pin the behaviour that a cache of per-array header snapshots, which skips re-validation when nothing
changed, must keep. Every comparison is bitwise against the control (same class, form and hyperparameters,
equal copies of the same parameters and gradients): each tensor's update depends on nothing but its own arrays,
so an optimizer that follows the arrays exactly gives identical bits and any stale pointer, shape or dtype shows.
"""

from __future__ import annotations

import copy
import re
import warnings

import numpy as np
import pytest

from adamcpp import SGD, Adam
from conftest import assert_bitwise_equal

SHAPES = [(3,), (2, 3), (1, 4), (2, 3)]
KEYS = ("w", "b", "u", "d")
V = 1  # the tensor that is changed, shape (2, 3); tensor 3 has its shape too (for aliasing)
FORMS = ["list", "dict"]
# (optimizer, good steps before the change); SGD's momentum buffer exists only after a first step.
SETUPS = [(Adam, 0), (Adam, 1), (SGD, 0), (SGD, 1)]
STATE_SETUPS = [(Adam, 0), (Adam, 1), (SGD, 1)]
setup_ids = [f"{c.__name__}-{n}steps" for c, n in SETUPS]
state_setup_ids = [f"{c.__name__}-{n}steps" for c, n in STATE_SETUPS]
CONTIG = ("expected a C-contiguous array, got a non-contiguous view (adamcpp updates buffers in place and never "
          "copies; pass a contiguous array)")
SHARED = "every parameter and state buffer must be distinct"
ANY_FLOAT = "float16, bfloat16, float32 or float64"


def arrays(shapes, seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def build(cls, form, params):
    extra = {"momentum": 0.9} if cls is SGD else {}
    return cls(dict(zip(KEYS, params)) if form == "dict" else list(params), lr=1e-2, **extra)


def as_form(form, grads):
    return dict(zip(KEYS, grads)) if form == "dict" else list(grads)


def moment(cls):
    return "exp_avg" if cls is Adam else "momentum_buffer"


def expected(table, case, cls, form, victim=V):
    """The outcome pinned for `case`: None (accepted), "restart" (accepted: the tensor starts fresh state) or
    (exception type, exact message) with the array names of `form` filled in."""
    outcome = table[case]
    if isinstance(outcome, dict):
        outcome = outcome[cls.__name__]
    if outcome is None or outcome == "restart":
        return outcome

    def name(what, i):
        return f"{what}[{KEYS[i]!r}]" if form == "dict" else f"{what}[{i}]"

    dtypes = ANY_FLOAT if cls is Adam else "float32 or float64"
    exc, template = outcome
    return exc, template.format(p=name("params", victim), g=name("grads", victim), p3=name("params", 3),
                                m=moment(cls), dtypes=dtypes)


class Pair:
    """The optimizer under test and its control, stepped together and compared bitwise after every step."""

    def __init__(self, cls, form, good_steps):
        self.cls, self.form, self.moment = cls, form, moment(cls)
        self.params = arrays(SHAPES, seed=0)
        self.twins = [p.copy() for p in self.params]
        self.opt, self.ctrl = build(cls, form, self.params), build(cls, form, self.twins)
        self.solo = {}  # tensor i -> a one-tensor optimizer that tensor i follows instead of the control's
        self.seed = 100
        for _ in range(good_steps):
            self.step()

    def live(self):
        return [p for g in self.opt.param_groups for p in g["params"]]

    def grads(self):
        """New float32 gradients shaped like the live parameters (as a user computes them)."""
        self.seed += 1
        return arrays([p.shape for p in self.live()], self.seed)

    def follow_fresh(self, i):
        """From now on tensor i must step like a new optimizer (fresh state) over a copy of its value now."""
        self.solo[i] = build(self.cls, "list", [self.live()[i].copy()])

    def step(self, grads=None):
        """One step of both: `grads` (a container of the form: the same object may serve every step) passed as it
        is to the optimizer under test, copies of its arrays to the control."""
        grads = as_form(self.form, self.grads()) if grads is None else grads
        seq = [grads[k] for k in KEYS] if isinstance(grads, dict) else grads
        ctrl_grads = [np.zeros_like(t) if i in self.solo else g.copy()
                      for i, (g, t) in enumerate(zip(seq, self.twins))]
        assert self.opt.step(grads) is True
        assert self.ctrl.step(as_form(self.form, ctrl_grads)) is True
        for i, solo in self.solo.items():
            assert solo.step([seq[i].copy()]) is True
        self.assert_agree()

    def assert_agree(self):
        live = self.live()
        assert len(live) == len(self.twins) == len(self.opt.state)
        for i, p in enumerate(live):
            if i in self.solo:
                model_p, model_s = self.solo[i].param_groups[0]["params"][0], self.solo[i].state[0]
            else:
                model_p, model_s = self.twins[i], self.ctrl.state[i]
            assert_bitwise_equal(p, model_p, f"params[{i}]")
            s = self.opt.state[i]
            assert s.keys() == model_s.keys(), f"state[{i}] keys"
            for k, v in model_s.items():
                if isinstance(v, np.ndarray):
                    assert_bitwise_equal(s[k], v, f"state[{i}][{k!r}]")
                elif k != "step" or i not in self.solo:  # a solo optimizer counts its own steps
                    assert s[k] == v, f"state[{i}][{k!r}]"

    def refuse(self, outcome, grads=None):
        """The next step raises exactly `outcome` = (type, message) and writes nothing."""
        exc, message = outcome
        grads = as_form(self.form, self.grads()) if grads is None else grads
        written = self.live() + [v for s in self.opt.state for v in s.values() if isinstance(v, np.ndarray)]
        before = [(a, a.copy()) for a in written]
        steps = [s.get("step") for s in self.opt.state]
        keys = [set(s) for s in self.opt.state]
        with pytest.raises(exc, match=f"^{re.escape(message)}$") as info:
            self.opt.step(grads)
        assert info.type is exc
        for a, saved in before:
            assert a.dtype == saved.dtype and a.shape == saved.shape
            assert np.array_equal(a.copy().reshape(-1).view(np.uint8), saved.reshape(-1).view(np.uint8))
        assert [s.get("step") for s in self.opt.state] == steps
        assert [set(s) for s in self.opt.state] == keys


# ------------------------------------------------------------------- in-place header changes of one array
# Each takes the array, changes it in place and returns how to undo the change (None: nothing to undo).
def _set_strides(a, strides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 2.4 deprecates assigning strides
        a.strides = strides


def _pickled(shape, dtype=np.float32, fortran=False):
    """What `__setstate__` takes: another array's (version, shape, dtype, Fortran order, bytes)."""
    q = arrays([shape], 7, dtype)[0]
    state = (np.asfortranarray(q) if fortran else q).__reduce__()[2]
    assert state[3] is fortran
    return state


def _restorer(a):
    saved = a.__reduce__()[2]  # a copy of the header and the values: put back with __setstate__ (a new buffer)
    return lambda: a.__setstate__(saved)


def _shape(a):
    a.shape = (3, 2)
    return lambda: setattr(a, "shape", (2, 3))


def _strides_fortran(a):
    _set_strides(a, (4, 8))  # the same buffer read column by column
    return lambda: _set_strides(a, (12, 4))


def _strides_zero(a):
    """Both rows are the first row, the second is hidden. NumPy allows no stride back to (12, 4) (an owning
    array's memory is measured through its strides), so the undo checks the hidden row through a view taken
    before and then puts the array back with __setstate__."""
    whole, saved = [a.view()], a.copy()
    _set_strides(a, (0, 4))

    def undo():
        assert_bitwise_equal(whole.pop(), saved, "the whole buffer, hidden row included")
        a.__setstate__(saved.__reduce__()[2])
    return undo


def _dtype(new):
    def change(a):
        a.dtype = new  # int32: the same size; float16: twice as many elements, shape (2, 6)
        return lambda: setattr(a, "dtype", np.float32)
    return change


def _read_only(a):
    a.setflags(write=False)
    return lambda: a.setflags(write=True)


def _misaligned_flag(a):
    a.setflags(align=False)  # the flag only: the data is still aligned
    return lambda: a.setflags(align=True)


def _resize_grow(a):
    a.resize(10, refcheck=False)  # may move the data; the first six values are kept
    return lambda: a.resize((2, 3), refcheck=False)


def _resize_shrink(a):
    undo = _restorer(a)
    a.resize(3, refcheck=False)
    return undo


def _setstate(shape, dtype=np.float32, fortran=False):
    def change(a):
        undo = _restorer(a)
        a.__setstate__(_pickled(shape, dtype, fortran))
        return undo
    return change


def _unit_dim_strides(a):
    assert a.shape == (1, 4)
    _set_strides(a, (4, 4))  # the stride of a dimension of size 1 is never used: still C-contiguous
    assert a.flags.c_contiguous
    return None


def _resize_round_trip(a):
    a.resize(1 << 16, refcheck=False)  # the data moves (most likely), then comes back to six values
    a.resize((2, 3), refcheck=False)
    return None


def _setstate_new_values(a):
    a.__setstate__(_pickled((2, 3)))  # the same header over a new buffer with other values
    return None


# name -> (index of the array changed, change)
CHANGES = {
    "shape": (V, _shape),
    "strides_fortran": (V, _strides_fortran),
    "strides_zero": (V, _strides_zero),
    "dtype_int32": (V, _dtype(np.int32)),
    "dtype_float16": (V, _dtype(np.float16)),
    "read_only": (V, _read_only),
    "misaligned_flag": (V, _misaligned_flag),
    "resize_grow": (V, _resize_grow),
    "resize_shrink": (V, _resize_shrink),
    "setstate_shape": (V, _setstate((3, 2))),
    "setstate_float64": (V, _setstate((2, 3), np.float64)),
    "setstate_fortran": (V, _setstate((2, 3), fortran=True)),
    "unit_dim_strides": (2, _unit_dim_strides),
    "resize_round_trip": (V, _resize_round_trip),
    "setstate_new_values": (V, _setstate_new_values),
}
ACCEPTED = {"unit_dim_strides": None, "resize_round_trip": None, "setstate_new_values": None}

# A parameter's state no longer matching it is named after the state array. SGD before its first step has no
# momentum buffer to mismatch: the new layout is taken and the buffer starts with it ("restart", see the test).
PARAM_OUTCOMES = {
    "shape": (ValueError, "{m} of {p}: expected shape (3, 2) like {p}, got (2, 3)"),
    "strides_fortran": (ValueError, "{p}: " + CONTIG),
    "strides_zero": (ValueError, "{p}: " + CONTIG),
    "dtype_int32": (TypeError, "{p}: expected dtype {dtypes} (native byte order), got int32"),
    "dtype_float16": {"Adam": (ValueError, "exp_avg of {p}: expected shape (2, 6) like {p}, got (2, 3)"),
                      "SGD": (TypeError, "{p}: expected dtype float32 or float64 (native byte order), got float16")},
    "read_only": (ValueError, "{p}: expected a writeable array, got a read-only one"),
    "misaligned_flag": (ValueError, "{p}: expected an aligned array, got a misaligned buffer"),
    "resize_grow": (ValueError, "{m} of {p}: expected shape (10,) like {p}, got (2, 3)"),
    "resize_shrink": (ValueError, "{m} of {p}: expected shape (3,) like {p}, got (2, 3)"),
    "setstate_shape": (ValueError, "{m} of {p}: expected shape (3, 2) like {p}, got (2, 3)"),
    "setstate_float64": (TypeError, "{m} of {p}: expected dtype float64 like {p}, got float32"),
    "setstate_fortran": (ValueError, "{p}: " + CONTIG),
    **ACCEPTED,
}
# Gradients are only read: read-only ones and float64 ones (converted as read) are accepted.
GRAD_OUTCOMES = {
    "shape": (ValueError, "{g}: expected shape (2, 3) like {p}, got (3, 2)"),
    "strides_fortran": (ValueError, "{g}: " + CONTIG),
    "strides_zero": (ValueError, "{g}: " + CONTIG),
    "dtype_int32": (TypeError, "{g}: expected dtype " + ANY_FLOAT + " (native byte order), got int32"),  # SGD too
    "dtype_float16": (ValueError, "{g}: expected shape (2, 3) like {p}, got (2, 6)"),
    "read_only": None,
    "misaligned_flag": (ValueError, "{g}: expected an aligned array, got a misaligned buffer"),
    "resize_grow": (ValueError, "{g}: expected shape (2, 3) like {p}, got (10,)"),
    "resize_shrink": (ValueError, "{g}: expected shape (2, 3) like {p}, got (3,)"),
    "setstate_shape": (ValueError, "{g}: expected shape (2, 3) like {p}, got (3, 2)"),
    "setstate_float64": None,
    "setstate_fortran": (ValueError, "{g}: " + CONTIG),
    **ACCEPTED,
}
STATE_ARRAY_OUTCOMES = {
    "shape": (ValueError, "{m} of {p}: expected shape (2, 3) like {p}, got (3, 2)"),
    "strides_fortran": (ValueError, "{m} of {p}: " + CONTIG),
    "strides_zero": (ValueError, "{m} of {p}: " + CONTIG),
    "dtype_int32": (TypeError, "{m} of {p}: expected dtype float32 like {p}, got int32"),
    "dtype_float16": (TypeError, "{m} of {p}: expected dtype float32 like {p}, got float16"),
    "read_only": (ValueError, "{m} of {p}: expected a writeable array, got a read-only one"),
    "misaligned_flag": (ValueError, "{m} of {p}: expected an aligned array, got a misaligned buffer"),
    "resize_grow": (ValueError, "{m} of {p}: expected shape (2, 3) like {p}, got (10,)"),
    "resize_shrink": (ValueError, "{m} of {p}: expected shape (2, 3) like {p}, got (3,)"),
    "setstate_shape": (ValueError, "{m} of {p}: expected shape (2, 3) like {p}, got (3, 2)"),
    "setstate_float64": (TypeError, "{m} of {p}: expected dtype float32 like {p}, got float64"),
    "setstate_fortran": (ValueError, "{m} of {p}: " + CONTIG),
    **ACCEPTED,
}


@pytest.mark.parametrize("case", sorted(CHANGES))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, good_steps", SETUPS, ids=setup_ids)
def test_param_header_change(cls, good_steps, form, case):
    pair = Pair(cls, form, good_steps)
    victim, change = CHANGES[case]
    p = pair.params[victim]
    undo = change(p)
    outcome = expected(PARAM_OUTCOMES, case, cls, form, victim)
    if cls is SGD and good_steps == 0 and outcome is not None and outcome[1].startswith("momentum_buffer of"):
        outcome = "restart"
    if outcome is None:
        np.copyto(pair.twins[victim], p)  # the control takes the same values (only __setstate__ gives new ones)
    elif outcome == "restart":
        pair.follow_fresh(victim)  # SGD, no buffer yet: the step takes the new layout, the buffer starts in it
    else:
        pair.refuse(outcome)
        undo()
        pair.assert_agree()  # undone: exactly as before, the parts the change hid included
    pair.step()
    pair.step()
    assert all(s["step"] == good_steps + 2 for s in pair.opt.state)
    if outcome == "restart":
        buf = pair.opt.state[victim]["momentum_buffer"]
        assert (buf.shape, buf.dtype) == (p.shape, p.dtype) != ((2, 3), np.float32)


@pytest.mark.parametrize("case", sorted(CHANGES))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", [Adam, SGD], ids=lambda c: c.__name__)
def test_reused_grad_header_change(cls, form, case):
    """The same gradient objects, in the same container, serve every step; one is changed in place after the first."""
    pair = Pair(cls, form, 0)
    grads = pair.grads()
    container = as_form(form, grads)
    pair.step(container)
    victim, change = CHANGES[case]
    undo = change(grads[victim])
    outcome = expected(GRAD_OUTCOMES, case, cls, form, victim)
    if outcome is not None:
        pair.refuse(outcome, container)
        undo()
    pair.step(container)  # the control gets copies of the gradients as they are now
    pair.step(container)
    assert all(s["step"] == 3 for s in pair.opt.state)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", [Adam, SGD], ids=lambda c: c.__name__)
def test_reused_grad_container_edited_in_place(cls, form):
    """The container that served the last step gets another array in place of one of its gradients."""
    pair = Pair(cls, form, 0)
    grads = pair.grads()
    container = as_form(form, grads)
    pair.step(container)
    slot = KEYS[V] if form == "dict" else V
    container[slot] = np.zeros((3, 2), np.float32)
    wrong_shape = (ValueError, "{g}: expected shape (2, 3) like {p}, got (3, 2)")
    pair.refuse(expected({"c": wrong_shape}, "c", cls, form), container)
    container[slot] = arrays([(2, 3)], 9)[0]  # a valid new array with other values
    pair.step(container)
    container[slot] = grads[V]  # the first array again, as it was
    pair.step(container)
    assert all(s["step"] == 3 for s in pair.opt.state)


# ------------------------------------------------------------------- a parameter replaced in its group
def _replaced_by_copy_read_only(pair):
    new = pair.live()[V].copy()
    new.setflags(write=False)
    return new


# name -> (the new array for place V, outcome): None keeps the place's state (same shape and dtype), "fresh"
# starts fresh state (docs/api.md 2.10).
REPLACEMENTS = {
    "equal_copy": (lambda pair: pair.live()[V].copy(), None),
    "view_of_itself": (lambda pair: pair.live()[V].view(), None),
    "other_shape": (lambda pair: arrays([(3, 2)], 5)[0], "fresh"),
    "other_dtype": (lambda pair: arrays([(2, 3)], 5, np.float64)[0], "fresh"),
    "read_only_copy": (_replaced_by_copy_read_only,
                       (ValueError, "{p}: expected a writeable array, got a read-only one")),
    "view_of_other_param": (lambda pair: pair.live()[3].view(), (ValueError, "{p3} shares memory with {p}; " + SHARED)),
}


@pytest.mark.parametrize("case", sorted(REPLACEMENTS))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, good_steps", SETUPS, ids=setup_ids)
def test_param_replaced_in_group(cls, good_steps, form, case):
    pair = Pair(cls, form, good_steps)
    make, outcome = REPLACEMENTS[case]
    old, old_state = pair.live()[V], pair.opt.state[V]
    old_before = old.copy()
    new = make(pair)
    pair.opt.param_groups[0]["params"][V] = new
    if outcome == "fresh":
        pair.follow_fresh(V)
        pair.step()
        assert pair.opt.state[V] is not old_state and pair.opt.state[V]["step"] == 1
        assert_bitwise_equal(old, old_before, "the parameter that left")  # no longer written
    elif outcome is None:
        pair.step()
        assert pair.opt.state[V] is old_state and old_state["step"] == good_steps + 1
        # The array that left is no longer written, unless it is the same buffer.
        assert_bitwise_equal(old, pair.twins[V] if np.shares_memory(old, new) else old_before, "old")
    else:
        pair.refuse(expected({case: outcome}, case, cls, form))
        pair.opt.param_groups[0]["params"][V] = old
        pair.assert_agree()
        pair.step()
        assert pair.opt.state[V] is old_state
    pair.step()


# ------------------------------------------------------------------- the state edited through opt.state
def _put(value_of):
    def edit(pair):
        s, m = pair.opt.state[V], pair.moment
        old = s[m]
        s[m] = value_of(pair)
        return lambda: s.__setitem__(m, old)
    return edit


def _read_only_copy(pair):
    a = pair.opt.state[V][pair.moment].copy()
    a.setflags(write=False)
    return a


def _deleted(pair):
    s, m = pair.opt.state[V], pair.moment
    old = s.pop(m)
    return lambda: s.__setitem__(m, old)


def _dict_replaced(new_of):
    def edit(pair):
        old = pair.opt.state[V]
        pair.opt.state[V] = new_of(old)
        return lambda: pair.opt.state.__setitem__(V, old)
    return edit


def _state_list_deep_copied(pair):
    pair.opt.state = copy.deepcopy(pair.opt.state)


# name -> (edit, outcome); "restart": accepted, SGD's momentum starts again from the next gradient.
STATE_EDITS = {
    "wrong_shape": (_put(lambda pair: np.zeros((3, 2), np.float32)),
                    (ValueError, "{m} of {p}: expected shape (2, 3) like {p}, got (3, 2)")),
    "wrong_dtype": (_put(lambda pair: np.zeros((2, 3), np.float64)),
                    (TypeError, "{m} of {p}: expected dtype float32 like {p}, got float64")),
    "read_only": (_put(_read_only_copy), (ValueError, "{m} of {p}: expected a writeable array, got a read-only one")),
    "aliases_own_param": (_put(lambda pair: pair.live()[V]),
                          (ValueError, "{m} of {p} shares memory with {p}; " + SHARED)),
    "aliases_other_param": (_put(lambda pair: pair.live()[3]),
                            (ValueError, "{p3} shares memory with {m} of {p}; " + SHARED)),
    "aliases_other_state": (_put(lambda pair: pair.opt.state[3][pair.moment]),
                            (ValueError, "{m} of {p3} shares memory with {m} of {p}; " + SHARED)),
    "deleted": (_deleted, {"Adam": (ValueError, "exp_avg of {p}: missing from the optimizer state"), "SGD": "restart"}),
    "set_to_none": (_put(lambda pair: None),
                    {"Adam": (ValueError, "exp_avg of {p}: missing from the optimizer state"), "SGD": "restart"}),
    # The state entries are named by position, in the dict form too.
    "dict_emptied": (_dict_replaced(lambda old: {}),
                     (ValueError, "state[1]['step']: missing from the optimizer state")),
    "dict_plain_copy": (_dict_replaced(dict), None),
    "state_list_deep_copied": (_state_list_deep_copied, None),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, good_steps", STATE_SETUPS, ids=state_setup_ids)
def test_state_edit(cls, good_steps, form, case):
    pair = Pair(cls, form, good_steps)
    edit, _ = STATE_EDITS[case]
    undo = edit(pair)
    outcome = expected({k: v[1] for k, v in STATE_EDITS.items()}, case, cls, form)
    if outcome == "restart":
        pair.follow_fresh(V)
    elif outcome is not None:
        pair.refuse(outcome)
        undo()
        pair.assert_agree()
    pair.step()
    pair.step()
    assert all(s["step"] == good_steps + 2 for s in pair.opt.state)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls, good_steps", STATE_SETUPS, ids=state_setup_ids)
def test_state_array_replaced_by_equal_copy_is_used_from_then_on(cls, good_steps, form):
    pair = Pair(cls, form, good_steps)
    s, m = pair.opt.state[V], pair.moment
    old = s[m]
    before = old.copy()
    new = s[m] = old.copy()
    pair.step()  # compares the new array with the control's
    pair.step()
    assert s[m] is new and not np.array_equal(new, before)  # the new array is the one updated in place
    assert_bitwise_equal(old, before, "the replaced array")  # and the old one is written no more


# ------------------------------------------------------------------- header edits of the state arrays
class TestStateArrayHeaders:
    """Header changes made in place to a state array taken from opt.state (`opt.state[i]["exp_avg"].shape = ...`,
    `.setflags(write=False)`, a resize, `__setstate__`, ...). The step reads the arrays the state dicts hold and
    validates them at every step like any array assigned there: a changed header is refused with the message of a
    wrong array, and a header that still fits is used as it is. Adam's state starts as views of blocks the
    optimizer owns (docs/api.md, "Parameters and state"): NumPy refuses to resize such a view (it does not own
    its data), so nothing changes; `__setstate__` gives the array a buffer of its own, which is then validated
    like an assigned array. SGD's momentum buffer starts at the first step as an array of its own."""

    @pytest.mark.parametrize("case", sorted(CHANGES))
    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("cls, good_steps", STATE_SETUPS, ids=state_setup_ids)
    def test_header_change(self, cls, good_steps, form, case):
        pair = Pair(cls, form, good_steps)
        victim, change = CHANGES[case]
        a = pair.opt.state[victim][pair.moment]
        if case.startswith("resize") and a.base is not None:
            before = a.copy()
            with pytest.raises(ValueError, match="does not own its data"):
                change(a)  # a view of the optimizer's block: refused by NumPy, the header unchanged
            assert a.shape == before.shape and np.array_equal(a, before)
            pair.step()
            pair.assert_agree()
            return
        undo = change(a)
        outcome = expected(STATE_ARRAY_OUTCOMES, case, cls, form, victim)
        if outcome is None:
            np.copyto(pair.ctrl.state[victim][pair.moment], a)  # the control's array takes the same values
        else:
            pair.refuse(outcome)
            undo()
            pair.assert_agree()
        pair.step()
        assert pair.opt.state[victim][pair.moment] is a  # the changed array itself is the one updated
        pair.step()

    @pytest.mark.parametrize("form", FORMS)
    @pytest.mark.parametrize("good_steps", [0, 1])
    def test_param_and_its_state_reshaped_together_are_accepted(self, good_steps, form):
        pair = Pair(Adam, form, good_steps)
        together = [pair.params[V], pair.opt.state[V]["exp_avg"], pair.opt.state[V]["exp_avg_sq"]]
        for a in together:
            a.shape = (3, 2)
        grads = pair.grads()
        assert grads[V].shape == (3, 2)
        assert pair.opt.step(as_form(form, grads)) is True
        assert pair.ctrl.step(as_form(form, [g.reshape(t.shape) for g, t in zip(grads, pair.twins)])) is True
        for a in together:
            a.shape = (2, 3)
        pair.assert_agree()  # elementwise updates: the same bits in either shape
        pair.step()
