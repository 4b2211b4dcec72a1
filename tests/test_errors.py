"""Bad input gets a clear error and loses nothing.

Every refused call is checked three ways: the exception type (TypeError for a
wrong type or dtype, ValueError for shape/layout/read-only/alias/count/range),
the message (it names the offending parameter and says what was expected), and
the aftermath: every parameter and every piece of optimizer state is bitwise
unchanged. The central scenario is an optimizer over 50 tensors that has taken
a few good steps, where only the 50th tensor is bad: the first 49 must not
have been touched, i.e. all validation happens before any buffer is written.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import adamcpp
from adamcpp import Adam, AdamW
from adamcpp.functional import adam as functional_adam
from conftest import Snapshot, copy_value, same_bits

N = 50
LAST = N - 1
GOOD_STEPS = 3
SMALL_SHAPES = [(3,), (2, 2), (5,), (1,), (2, 1, 2), (), (4,)]


# --------------------------------------------------------------------------- helpers
def shape_of(i: int) -> tuple:
    # The last five tensors share shape (2, 3) so that aliasing between them
    # is shape-compatible; the rest cycle through small shapes incl. 0-d.
    return (2, 3) if i >= N - 5 else SMALL_SHAPES[i % len(SMALL_SHAPES)]


def dtype_of(i: int) -> np.dtype:
    # Odd indices (so the 50th tensor, index 49, and index 47) are float32.
    return np.dtype(np.float32) if i % 2 else np.dtype(np.float64)


def make_params(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape_of(i)).astype(dtype_of(i)) for i in range(N)]


def make_grads(params: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.shape).astype(p.dtype) for p in params]


def key(i: int) -> str:
    return f"w{i}"


FORMS = ["list", "dict", "groups"]
OPTIMIZERS = [Adam, AdamW]


def build(cls, form: str, params: list, *, amsgrad: bool = False, **kw):
    if form == "list":
        return cls(params, amsgrad=amsgrad, **kw)
    if form == "dict":
        return cls({key(i): p for i, p in enumerate(params)}, amsgrad=amsgrad, **kw)
    assert form == "groups"
    groups = [
        {"params": params[:17]},
        {"params": params[17:34], "lr": 2e-3, "weight_decay": 0.05, "eps_style": "keras"},
        # The last group (holding the 50th tensor) always runs amsgrad.
        {"params": params[34:], "amsgrad": True, "maximize": True, "betas": (0.8, 0.99)},
    ]
    return cls(groups, amsgrad=amsgrad, **kw)


def as_form(form: str, grads: list):
    return {key(i): g for i, g in enumerate(grads)} if form == "dict" else grads


def label(form: str, what: str, i: int = LAST) -> str:
    """The label adamcpp uses for tensor i: params[49] or params['w49']."""
    return f"{what}[{key(i)!r}]" if form == "dict" else f"{what}[{i}]"


def trained(cls, form: str, *, amsgrad: bool = False, seed: int = 0, **kw):
    params = make_params(seed)
    opt = build(cls, form, params, amsgrad=amsgrad, **kw)
    for s in range(GOOD_STEPS):
        assert opt.step(as_form(form, make_grads(params, 100 + s))) is True
    return opt, params


def check_raises(exc, fragments, fn):
    """Runs fn, expecting `exc` whose message contains every fragment."""
    other = ValueError if exc is TypeError else TypeError
    with pytest.raises(exc) as info:
        fn()
    assert not isinstance(info.value, other), f"{type(info.value).__name__} is also a {other.__name__}"
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in message {msg!r}"
    return msg


class TorchLike:
    """Quacks like a tensor (shape, dtype, __array__) but is not an ndarray:
    adamcpp must refuse it rather than convert (a conversion is a copy, and an
    in-place update of a copy is silently lost)."""

    def __init__(self, a):
        self._a = a
        self.shape = a.shape
        self.dtype = a.dtype

    def __array__(self, dtype=None, copy=None):
        return self._a


def misaligned_like(like: np.ndarray) -> np.ndarray:
    # A writeable buffer (bytearray, not bytes) viewed one byte off alignment.
    buf = bytearray(like.nbytes + like.itemsize + 1)
    a = np.frombuffer(buf, dtype=like.dtype, count=like.size, offset=1).reshape(like.shape)
    assert not a.flags.aligned and a.flags.writeable and a.flags.c_contiguous
    return a


def transposed_like(like: np.ndarray) -> np.ndarray:
    a = np.zeros(like.shape[::-1], like.dtype).T
    assert a.shape == like.shape and not a.flags.c_contiguous
    return a


def strided_like(like: np.ndarray) -> np.ndarray:
    a = np.zeros(like.shape[:-1] + (2 * like.shape[-1],), like.dtype)[..., ::2]
    assert a.shape == like.shape and not a.flags.c_contiguous
    return a


def readonly_like(like: np.ndarray) -> np.ndarray:
    a = like.copy()
    a.flags.writeable = False
    return a


# name -> (maker(like), exception, message fragments besides the label).
# `like` is always the (2, 3) float32 50th tensor.
BAD_ARRAYS = {
    "list": (lambda a: a.tolist(), TypeError, ["expected a numpy.ndarray", "list"]),
    "torch_like": (lambda a: TorchLike(a), TypeError, ["expected a numpy.ndarray", "TorchLike"]),
    "scalar": (lambda a: 1.0, TypeError, ["expected a numpy.ndarray", "float"]),
    "int64": (lambda a: a.astype(np.int64), TypeError, ["expected dtype", "float32", "int64"]),
    "float16": (lambda a: a.astype(np.float16), TypeError, ["expected dtype", "float32", "float16"]),
    "complex64": (lambda a: a.astype(np.complex64), TypeError, ["expected dtype", "float32", "complex64"]),
    "big_endian": (lambda a: a.astype(">f4"), TypeError, ["expected dtype", "float32", ">f4"]),
    "transposed": (transposed_like, ValueError, ["expected a C-contiguous array"]),
    "strided": (strided_like, ValueError, ["expected a C-contiguous array"]),
    "misaligned": (misaligned_like, ValueError, ["expected an aligned array"]),
}
# Only meaningful when the array must match an existing parameter.
BAD_LIKE = {
    "float64_for_float32": (lambda a: a.astype(np.float64), TypeError, ["expected dtype float32", "float64"]),
    "wrong_shape": (lambda a: np.zeros((3, 2), a.dtype), ValueError, ["expected shape (2, 3)", "(3, 2)"]),
    "wrong_size": (lambda a: np.zeros((7,), a.dtype), ValueError, ["expected shape (2, 3)", "(7,)"]),
    "0d_for_2d": (lambda a: np.zeros((), a.dtype), ValueError, ["expected shape (2, 3)", "()"]),
}
READONLY = {"readonly": (readonly_like, ValueError, ["expected a writeable array", "read-only"])}

# Gradients of any float dtype are accepted (converted in the kernel), and so
# are float16 parameters (mixed precision); state must have its exact dtype.
GRAD_CASES = {k: v for k, v in {**BAD_ARRAYS, **BAD_LIKE}.items() if k not in ("float16", "float64_for_float32")}
STATE_CASES = {**BAD_ARRAYS, **BAD_LIKE, **READONLY}
PARAM_REPLACE_CASES = {k: v for k, v in {**BAD_ARRAYS, **READONLY}.items() if k != "float16"}


# ------------------------------------------------------- the 50th gradient is bad
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_bad_50th_grad_changes_nothing(cls, form, case):
    opt, params = trained(cls, form)
    grads = make_grads(params, 7)
    maker, exc, fragments = GRAD_CASES[case]
    grads[LAST] = maker(grads[LAST])
    snap = Snapshot(opt, params)
    check_raises(exc, [label(form, "grads"), *fragments], lambda: opt.step(as_form(form, grads)))
    snap.assert_unchanged()
    # The failed call must not have poisoned anything: a good step still works.
    assert opt.step(as_form(form, make_grads(params, 8))) is True
    assert all(s["step"] == GOOD_STEPS + 1 for s in opt.state)


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_functional_bad_50th_grad_changes_nothing(case):
    params = make_params()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    for s in range(1, GOOD_STEPS + 1):
        functional_adam(params, make_grads(params, s), ms, vs, step=s, lr=1e-2)
    grads = make_grads(params, 9)
    maker, exc, fragments = GRAD_CASES[case]
    grads[LAST] = maker(grads[LAST])
    before = [a.copy() for a in params + ms + vs]
    check_raises(exc, ["grads[49]", *fragments],
                 lambda: functional_adam(params, grads, ms, vs, step=GOOD_STEPS + 1, lr=1e-2))
    assert all(same_bits(a, b) for a, b in zip(params + ms + vs, before))


# ------------------------------------------------ read-only gradients are accepted
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_readonly_grads_are_accepted(cls, form):
    opt_a, params_a = trained(cls, form)
    opt_b, params_b = trained(cls, form)
    grads = make_grads(params_a, 11)
    frozen = [readonly_like(g) for g in grads]
    assert opt_a.step(as_form(form, grads)) is True
    assert opt_b.step(as_form(form, frozen)) is True
    assert all(same_bits(a, b) for a, b in zip(params_a, params_b))
    assert all(same_bits(g, f) for g, f in zip(grads, frozen))  # gradients only read


def test_functional_readonly_grad_single_array_is_accepted():
    p = np.ones(4, np.float32)
    g = readonly_like(np.full(4, 0.5, np.float32))
    m, v = np.zeros_like(p), np.zeros_like(p)
    functional_adam(p, g, m, v, step=1, lr=0.1)
    assert np.all(p < 1)


def test_grads_may_alias_each_other():
    # Gradients are only read, so one buffer may serve several of them.
    opt, params = trained(Adam, "list")
    grads = make_grads(params, 12)
    grads[LAST] = grads[LAST - 2]
    assert opt.step(grads) is True


# ------------------------------------------- the 50th state array is replaced by a bad one
@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_bad_50th_state_array_changes_nothing(cls, form, name, case):
    opt, params = trained(cls, form, amsgrad=True)
    maker, exc, fragments = STATE_CASES[case]
    opt.state[LAST][name] = maker(opt.state[LAST][name])
    snap = Snapshot(opt, params)
    check_raises(exc, [f"{name} of {label(form, 'params')}", *fragments],
                 lambda: opt.step(as_form(form, make_grads(params, 13))))
    snap.assert_unchanged()


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
@pytest.mark.parametrize("form", FORMS)
def test_missing_50th_state_array_changes_nothing(form, name):
    opt, params = trained(Adam, form, amsgrad=True)
    del opt.state[LAST][name]
    if name == "max_exp_avg_sq":
        # A missing max_exp_avg_sq is legitimate (amsgrad switched on later):
        # it is created as zeros. Only the required entries are errors.
        assert opt.step(as_form(form, make_grads(params, 14))) is True
        assert name in opt.state[LAST]
        return
    snap = Snapshot(opt, params)
    check_raises(ValueError, [f"{name} of {label(form, 'params')}", "missing"],
                 lambda: opt.step(as_form(form, make_grads(params, 14))))
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "value, exc, fragments",
    [
        (-1, ValueError, ["step", "expected", ">= 0", "-1"]),
        (1.5, TypeError, ["step", "expected", "int"]),
        ("3", TypeError, ["step", "expected", "int"]),
    ],
    ids=["negative", "float", "str"],
)
def test_bad_50th_step_count_changes_nothing(value, exc, fragments):
    opt, params = trained(Adam, "list")
    opt.state[LAST]["step"] = value
    snap = Snapshot(opt, params)
    msg = check_raises(exc, fragments, lambda: opt.step(make_grads(params, 15)))
    assert "49" in msg
    snap.assert_unchanged()


@pytest.mark.parametrize("case", sorted(STATE_CASES))
@pytest.mark.parametrize("which", ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"])
def test_functional_bad_50th_state_array_changes_nothing(which, case):
    params = make_params()
    state = {w: [np.zeros_like(p) for p in params] for w in ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")}
    for s in range(1, GOOD_STEPS + 1):
        functional_adam(params, make_grads(params, s), state["exp_avgs"], state["exp_avg_sqs"], step=s, lr=1e-2,
                        amsgrad=True, max_exp_avg_sqs=state["max_exp_avg_sqs"])
    maker, exc, fragments = STATE_CASES[case]
    state[which][LAST] = maker(state[which][LAST])
    everything = params + state["exp_avgs"] + state["exp_avg_sqs"] + state["max_exp_avg_sqs"]
    before = [copy_value(a) for a in everything]
    check_raises(exc, [f"{which}[49]", *fragments],
                 lambda: functional_adam(params, make_grads(params, 9), state["exp_avgs"], state["exp_avg_sqs"],
                                         step=GOOD_STEPS + 1, lr=1e-2, amsgrad=True,
                                         max_exp_avg_sqs=state["max_exp_avg_sqs"]))
    assert all(same_bits(a, b) for a, b in zip(everything, before))


# --------------------------------------------------------- the 50th parameter is bad
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_50th_param_made_readonly_between_steps(cls, form):
    opt, params = trained(cls, form)
    params[LAST].flags.writeable = False
    snap = Snapshot(opt, params)
    check_raises(ValueError, [label(form, "params"), "expected a writeable array", "read-only"],
                 lambda: opt.step(as_form(form, make_grads(params, 16))))
    snap.assert_unchanged()
    params[LAST].flags.writeable = True
    assert opt.step(as_form(form, make_grads(params, 16))) is True


@pytest.mark.parametrize("case", sorted(PARAM_REPLACE_CASES))
@pytest.mark.parametrize("form", ["list", "groups"])
def test_50th_param_replaced_by_bad_array_between_steps(form, case):
    opt, params = trained(Adam, form)
    snap = Snapshot(opt, params)
    maker, exc, fragments = PARAM_REPLACE_CASES[case]
    opt.param_groups[-1]["params"][-1] = maker(params[LAST])
    check_raises(exc, ["params[49]", *fragments], lambda: opt.step(make_grads(params, 17)))
    snap.assert_unchanged()


@pytest.mark.parametrize("case", sorted(PARAM_REPLACE_CASES))
@pytest.mark.parametrize("form", FORMS)
def test_bad_50th_param_at_construction(form, case):
    params = make_params()
    maker, exc, fragments = PARAM_REPLACE_CASES[case]
    params[LAST] = maker(params[LAST])
    saved = [copy_value(p) for p in params]
    check_raises(exc, [label(form, "params"), *fragments], lambda: build(Adam, form, params))
    assert all(same_bits(a, b) for a, b in zip(params, saved))


@pytest.mark.parametrize("case", sorted(PARAM_REPLACE_CASES))
def test_functional_bad_50th_param(case):
    params = make_params()
    grads = make_grads(params, 1)
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    maker, exc, fragments = PARAM_REPLACE_CASES[case]
    params[LAST] = maker(params[LAST])
    everything = params + ms + vs
    before = [copy_value(a) for a in everything]
    check_raises(exc, ["params[49]", *fragments], lambda: functional_adam(params, grads, ms, vs, step=1, lr=1e-2))
    assert all(same_bits(a, b) for a, b in zip(everything, before))


@pytest.mark.parametrize("case", sorted(PARAM_REPLACE_CASES) + ["numpy_scalar"])
def test_bad_param_has_one_message_at_construction_and_in_the_step(case):
    """Construction checks a parameter with the native step's own rule
    (_core.check_param): the same text as the step's check of the same array."""
    maker, exc, _ = PARAM_REPLACE_CASES.get(case, (lambda a: np.float32(1), TypeError, []))
    params = make_params()
    params[LAST] = maker(params[LAST])
    with pytest.raises(exc) as at_construction:
        Adam(params)
    grads = make_grads(make_params(), 1)
    ms = [np.zeros_like(p) for p in grads]
    vs = [np.zeros_like(p) for p in grads]
    with pytest.raises(exc) as in_the_step:
        functional_adam(params, grads, ms, vs, step=1, lr=1e-2)
    assert str(at_construction.value) == str(in_the_step.value)


@pytest.mark.parametrize("value", [-1, 1.5, True, 2**63 - 1, 10**50])
def test_live_step_count_has_one_message_in_flat_mode_and_in_the_step(value):
    """Flat mode checks an edited step count with the native step's own rule
    (_core.check_step): the same text as a list optimizer's step."""
    messages = []
    for flat in (False, True):
        params = make_params()
        source = adamcpp.FlatParams(params) if flat else None
        opt = Adam(source if flat else params, lr=1e-2)
        opt.state[LAST]["step"] = value
        with pytest.raises((TypeError, ValueError)) as info:
            opt.step(source.grads if flat else make_grads(params, 1))
        messages.append((type(info.value), str(info.value)))
    assert messages[0] == messages[1]


# ------------------------------------------------------------------------ aliasing
def _alias_grad_is_param(opt, params, grads):
    grads[LAST] = params[LAST]
    return ["grads[49]", "params[49]", "shares memory"]


def _alias_grad_view_of_param(opt, params, grads):
    grads[LAST] = params[LAST][...]  # a distinct ndarray object over the same memory
    return ["grads[49]", "params[49]", "shares memory"]


def _alias_grad_is_state(opt, params, grads):
    grads[LAST] = opt.state[LAST]["exp_avg_sq"]
    return ["grads[49]", "exp_avg_sq of params[49]", "shares memory"]


def _alias_grad_is_other_param(opt, params, grads):
    grads[LAST] = params[LAST - 2]
    return ["grads[49]", "params[47]", "shares memory"]


def _alias_state_is_other_param(opt, params, grads):
    opt.state[LAST]["exp_avg"] = params[LAST - 2]
    return ["exp_avg of params[49]", "params[47]", "shares memory"]


def _alias_state_is_own_param(opt, params, grads):
    opt.state[LAST]["exp_avg"] = params[LAST]
    return ["exp_avg of params[49]", "params[49]", "shares memory"]


def _alias_state_is_own_state(opt, params, grads):
    opt.state[LAST]["exp_avg_sq"] = opt.state[LAST]["exp_avg"]
    return ["exp_avg_sq of params[49]", "exp_avg of params[49]", "shares memory"]


def _alias_state_is_other_state(opt, params, grads):
    opt.state[LAST]["exp_avg"] = opt.state[LAST - 2]["exp_avg"]
    return ["exp_avg of params[49]", "exp_avg of params[47]", "shares memory"]


def _alias_state_overlaps_param(opt, params, grads):
    # Partial overlap through a flat view: same shape, shifted by one row.
    base = np.zeros(12, np.float32)
    opt.state[LAST]["exp_avg"] = base[3:9].reshape(2, 3)
    opt.state[LAST - 2]["exp_avg"] = base[:6].reshape(2, 3)
    return ["exp_avg of params[", "shares memory", "49", "47"]


ALIASES = {
    "grad_is_param": _alias_grad_is_param,
    "grad_view_of_param": _alias_grad_view_of_param,
    "grad_is_state": _alias_grad_is_state,
    "grad_is_other_param": _alias_grad_is_other_param,
    "state_is_other_param": _alias_state_is_other_param,
    "state_is_own_param": _alias_state_is_own_param,
    "state_is_own_state": _alias_state_is_own_state,
    "state_is_other_state": _alias_state_is_other_state,
    "state_overlaps_other_state": _alias_state_overlaps_param,
}


@pytest.mark.parametrize("case", sorted(ALIASES))
def test_aliasing_is_refused_and_changes_nothing(case):
    opt, params = trained(Adam, "list")
    grads = make_grads(params, 18)
    fragments = ALIASES[case](opt, params, grads)
    snap = Snapshot(opt, params)
    check_raises(ValueError, fragments, lambda: opt.step(grads))
    snap.assert_unchanged()


def test_overlapping_params_are_refused_and_change_nothing():
    params = make_params()
    base = np.arange(12, dtype=np.float32)
    params[LAST - 2] = base[:6].reshape(2, 3)
    params[LAST] = base[3:9].reshape(2, 3)  # overlaps params[47] by three elements
    opt = Adam(params)
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["params[49]", "params[47]", "shares memory"], lambda: opt.step(make_grads(params, 1)))
    snap.assert_unchanged()
    assert np.array_equal(base, np.arange(12, dtype=np.float32))


def test_same_array_twice_at_construction():
    params = make_params()
    params[LAST] = params[LAST - 2]
    check_raises(ValueError, ["params[49]", "more than once"], lambda: Adam(params))


def test_same_array_twice_at_construction_dict():
    params = make_params()
    d = {key(i): p for i, p in enumerate(params)}
    d[key(LAST)] = params[LAST - 2]
    check_raises(ValueError, [label("dict", "params"), "more than once"], lambda: Adam(d))


def test_same_array_twice_across_groups_at_construction():
    params = make_params()
    check_raises(ValueError, ["params[50]", "more than once"],
                 lambda: Adam([{"params": params}, {"params": [params[LAST - 2]]}]))


@pytest.mark.parametrize("how", ["append", "add_param_group"])
def test_same_array_added_twice_between_steps(how):
    opt, params = trained(Adam, "list")
    snap = Snapshot(opt, params)
    if how == "append":
        opt.param_groups[0]["params"].append(params[LAST - 2])
        check_raises(ValueError, ["params[50]", "more than once"], lambda: opt.step(make_grads(params, 1) + [params[0]]))
    else:
        check_raises(ValueError, ["params[50]", "more than once"],
                     lambda: opt.add_param_group({"params": [params[LAST - 2]]}))
        assert len(opt.param_groups) == 1
    snap.assert_unchanged()


def test_functional_aliasing_is_refused():
    params = make_params()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    grads = make_grads(params, 2)
    cases = [
        (dict(params=params[:-1] + [params[LAST - 2]]), ["params[49]", "params[47]", "shares memory"]),
        (dict(exp_avgs=ms[:-1] + [params[LAST]]), ["exp_avgs[49]", "params[49]", "shares memory"]),
        (dict(exp_avg_sqs=vs[:-1] + [ms[LAST]]), ["exp_avg_sqs[49]", "exp_avgs[49]", "shares memory"]),
        (dict(grads=grads[:-1] + [vs[LAST]]), ["grads[49]", "exp_avg_sqs[49]", "shares memory"]),
    ]
    for override, fragments in cases:
        args = dict(params=params, grads=grads, exp_avgs=ms, exp_avg_sqs=vs)
        args.update(override)
        everything = params + ms + vs
        before = [a.copy() for a in everything]
        check_raises(ValueError, fragments, lambda: functional_adam(**args, step=1, lr=1e-2))
        assert all(same_bits(a, b) for a, b in zip(everything, before))


# ---------------------------------------------------------------- counts and keys
@pytest.mark.parametrize("form", ["list", "groups"])
@pytest.mark.parametrize("count", [0, N - 1, N + 1])
def test_wrong_number_of_grads(form, count):
    opt, params = trained(Adam, form)
    grads = make_grads(make_params() + make_params(), 3)[:count]
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["grads", "expected 50", f"got {count}"], lambda: opt.step(grads))
    snap.assert_unchanged()


def test_dict_grads_missing_key():
    opt, params = trained(Adam, "dict")
    grads = as_form("dict", make_grads(params, 3))
    del grads[key(LAST)]
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["grads", "missing", repr(key(LAST))], lambda: opt.step(grads))
    snap.assert_unchanged()


def test_dict_grads_extra_key():
    opt, params = trained(Adam, "dict")
    grads = as_form("dict", make_grads(params, 3))
    grads["zz"] = np.zeros(3)
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["grads", "unexpected", "'zz'"], lambda: opt.step(grads))
    snap.assert_unchanged()


def test_dict_grads_renamed_key():
    opt, params = trained(Adam, "dict")
    grads = as_form("dict", make_grads(params, 3))
    grads["zz"] = grads.pop(key(LAST))
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["grads", repr(key(LAST))], lambda: opt.step(grads))
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "grads, fragments",
    [
        (lambda ps: {key(i): g for i, g in enumerate(ps)}, ["grads", "dict"]),
        (lambda ps: ps[0], ["grads", "single ndarray"]),
        (lambda ps: None, ["grads", "NoneType"]),
        (lambda ps: iter(ps), ["grads", "expected"]),
    ],
    ids=["dict_for_list_params", "single_array", "none", "iterator"],
)
def test_grads_container_type(grads, fragments):
    opt, params = trained(Adam, "list")
    snap = Snapshot(opt, params)
    check_raises(TypeError, fragments, lambda: opt.step(grads(make_grads(params, 4))))
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "override, fragments",
    [
        (dict(grads=lambda g: g[:-1]), ["grads", "50", "49"]),
        (dict(exp_avgs=lambda m: m[:-1]), ["exp_avgs", "50", "49"]),
        (dict(exp_avg_sqs=lambda v: v + [np.zeros(1)]), ["exp_avg_sqs", "50", "51"]),
        (dict(step=lambda s: [1] * (N - 1)), ["step", "50", "49"]),
    ],
    ids=["grads", "exp_avgs", "exp_avg_sqs", "step"],
)
def test_functional_wrong_counts(override, fragments):
    params = make_params()
    args = dict(params=params, grads=make_grads(params, 1), exp_avgs=[np.zeros_like(p) for p in params],
                exp_avg_sqs=[np.zeros_like(p) for p in params], step=[1] * N)
    for k, f in override.items():
        args[k] = f(args[k])
    before = [a.copy() for a in params]
    check_raises(ValueError, fragments, lambda: functional_adam(**args, lr=1e-2))
    assert all(same_bits(a, b) for a, b in zip(params, before))


def test_functional_single_vs_list_mismatch():
    p = np.zeros(3)
    check_raises(TypeError, ["grads", "single array"],
                 lambda: functional_adam(p, [np.zeros(3)], np.zeros(3), np.zeros(3), step=1, lr=0.1))
    check_raises(TypeError, ["exp_avgs", "list"],
                 lambda: functional_adam([p], [np.zeros(3)], np.zeros(3), [np.zeros(3)], step=1, lr=0.1))
    assert not p.any()


@pytest.mark.parametrize(
    "step, exc, fragments",
    [
        (0, ValueError, ["step", "expected", ">= 1", "0"]),
        (-2, ValueError, ["step", "expected", ">= 1"]),
        (1.0, TypeError, ["step", "expected", "int"]),
        ([1] * (N - 1) + [0], ValueError, ["step[49]", ">= 1"]),
        ([1] * (N - 1) + [2.5], TypeError, ["step[49]", "int"]),
        ([1] * (N - 1) + [None], TypeError, ["step[49]", "int"]),
    ],
    ids=["zero", "negative", "float", "list_zero_last", "list_float_last", "list_none_last"],
)
def test_functional_bad_step(step, exc, fragments):
    params = make_params()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    everything = params + ms + vs
    before = [a.copy() for a in everything]
    check_raises(exc, fragments, lambda: functional_adam(params, make_grads(params, 1), ms, vs, step=step, lr=1e-2))
    assert all(same_bits(a, b) for a, b in zip(everything, before))


# ----------------------------------------------------------------- hyperparameters
NAN = float("nan")
INF = float("inf")

# (kwargs, exception, fragments) for the optimizer constructors and groups.
BAD_HYPERS = [
    (dict(lr=-1e-3), ValueError, ["lr", "expected a value >= 0"]),
    (dict(lr=NAN), ValueError, ["lr", "finite"]),
    (dict(lr=INF), ValueError, ["lr", "finite"]),
    (dict(lr="0.1"), TypeError, ["lr", "real number", "str"]),
    (dict(lr=None), TypeError, ["lr", "NoneType"]),
    (dict(betas=(1.0, 0.999)), ValueError, ["betas'][0]", "< 1"]),
    (dict(betas=(-0.1, 0.999)), ValueError, ["betas'][0]", ">= 0"]),
    (dict(betas=(0.9, 1.0)), ValueError, ["betas'][1]", "< 1"]),
    (dict(betas=(0.9, 1.5)), ValueError, ["betas'][1]", "< 1"]),
    (dict(betas=(0.9, NAN)), ValueError, ["betas'][1]", "finite"]),
    (dict(betas=0.9), TypeError, ["betas", "pair"]),
    (dict(betas=(0.9, 0.99, 0.999)), TypeError, ["betas", "pair"]),
    (dict(eps=-1e-8), ValueError, ["eps", ">= 0"]),
    (dict(eps=NAN), ValueError, ["eps", "finite"]),
    (dict(weight_decay=-0.1), ValueError, ["weight_decay", ">= 0"]),
    (dict(weight_decay=INF), ValueError, ["weight_decay", "finite"]),
    (dict(eps_style="pytorch"), ValueError, ["eps_style", "'torch'", "'keras'", "'pytorch'"]),
    (dict(eps_style=None), ValueError, ["eps_style", "'torch'", "'keras'"]),
    (dict(amsgrad=1), TypeError, ["amsgrad", "bool", "int"]),
    (dict(amsgrad="yes"), TypeError, ["amsgrad", "bool", "str"]),
    (dict(maximize=None), TypeError, ["maximize", "bool"]),
    (dict(maximize=1), TypeError, ["maximize", "bool", "int"]),
    (dict(state_dtype="float16"), ValueError, ["state_dtype", "'float16' state is not offered", "underflow"]),
    (dict(state_dtype="fp32"), ValueError, ["state_dtype", "'float32' or 'bfloat16'", "'fp32'"]),
    (dict(state_dtype=None), ValueError, ["state_dtype", "'float32' or 'bfloat16'"]),
    (dict(state_rounding="up"), ValueError, ["state_rounding", "'stochastic' or 'nearest'", "'up'"]),
    (dict(param_rounding="stochastic"), ValueError, ["param_rounding", "needs master_weights=False"]),
    (dict(param_rounding=1), ValueError, ["param_rounding", "'stochastic' or 'nearest'"]),
    (dict(master_weights=1), TypeError, ["master_weights", "bool", "int"]),
    (dict(master_weights="yes"), TypeError, ["master_weights", "bool", "str"]),
    (dict(seed=-1), ValueError, ["seed", "[0, 2**64 - 1]", "-1"]),
    (dict(seed=2**64), ValueError, ["seed", "[0, 2**64 - 1]"]),
    (dict(seed=1.5), TypeError, ["seed", "int", "float"]),
    (dict(seed=True), TypeError, ["seed", "int", "bool"]),
]
HYPER_IDS = [f"{next(iter(kw))}={next(iter(kw.values()))!r}" for kw, _, _ in BAD_HYPERS]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("kwargs, exc, fragments", BAD_HYPERS, ids=HYPER_IDS)
def test_bad_hyperparameter_at_construction(cls, kwargs, exc, fragments):
    params = make_params()
    saved = [p.copy() for p in params]
    check_raises(exc, fragments, lambda: cls(params, **kwargs))
    assert all(same_bits(a, b) for a, b in zip(params, saved))


@pytest.mark.parametrize("kwargs, exc, fragments", BAD_HYPERS, ids=HYPER_IDS)
def test_bad_hyperparameter_in_group_at_construction(kwargs, exc, fragments):
    params = make_params()
    groups = [{"params": params[:20]}, {"params": params[20:], **kwargs}]
    check_raises(exc, ["param_groups[1]", *fragments], lambda: Adam(groups))


@pytest.mark.parametrize("kwargs, exc, fragments", BAD_HYPERS, ids=HYPER_IDS)
def test_bad_hyperparameter_edited_between_steps(kwargs, exc, fragments):
    opt, params = trained(Adam, "groups")
    snap = Snapshot(opt, params)
    opt.param_groups[2].update(kwargs)
    check_raises(exc, ["param_groups[2]", *fragments], lambda: opt.step(make_grads(params, 20)))
    snap.retake_groups()
    snap.assert_unchanged()


def test_decoupled_weight_decay_must_be_bool():
    check_raises(TypeError, ["decoupled_weight_decay", "bool"],
                 lambda: Adam(make_params(), decoupled_weight_decay=1))


def test_unknown_group_hyperparameter():
    params = make_params()
    check_raises(ValueError, ["param_groups[1]", "lrr"],
                 lambda: Adam([{"params": params[:3]}, {"params": params[3:], "lrr": 0.1}]))


@pytest.mark.parametrize("value", ["ignore", "Skip", "", None, 1], ids=repr)
def test_bad_nonfinite_policy(value):
    params = make_params()
    check_raises(ValueError, ["nonfinite", "'propagate'", "'skip'", "'raise'"], lambda: Adam(params, nonfinite=value))


@pytest.mark.parametrize(
    "scale, exc, fragments",
    [
        (NAN, ValueError, ["grad_scale", "finite"]),
        (INF, ValueError, ["grad_scale", "finite"]),
        (-INF, ValueError, ["grad_scale", "finite"]),
        (np.float32("nan"), ValueError, ["grad_scale", "finite"]),
        (np.array(np.inf), ValueError, ["grad_scale", "finite"]),
        ("2", TypeError, ["grad_scale", "real number", "str"]),
        (None, TypeError, ["grad_scale", "NoneType"]),
        (True, TypeError, ["grad_scale", "bool"]),
        ([1.0], TypeError, ["grad_scale", "list"]),
    ],
    ids=["nan", "inf", "-inf", "f32nan", "0d_inf", "str", "none", "bool", "list"],
)
@pytest.mark.parametrize("form", FORMS)
def test_bad_grad_scale(form, scale, exc, fragments):
    opt, params = trained(Adam, form)
    snap = Snapshot(opt, params)
    check_raises(exc, fragments, lambda: opt.step(as_form(form, make_grads(params, 21)), grad_scale=scale))
    snap.assert_unchanged()


@pytest.mark.parametrize(
    "value, exc, fragments",
    [
        (-0.1, ValueError, [">= 0", "-0.1"]),
        (NAN, ValueError, ["finite", "nan"]),
        (INF, ValueError, ["finite"]),
        ("0.1", TypeError, ["real number", "str"]),
        (None, TypeError, ["real number", "NoneType"]),
    ],
    ids=["negative", "nan", "inf", "str", "none"],
)
@pytest.mark.parametrize("form", FORMS)
def test_callable_lr_returning_bad_value(form, value, exc, fragments):
    calls = []

    def schedule(t):
        calls.append(t)
        return 1e-3 if t < GOOD_STEPS else value

    opt, params = trained(Adam, form, lr=schedule)
    snap = Snapshot(opt, params)
    check_raises(exc, ["lr", f"({GOOD_STEPS})", *fragments], lambda: opt.step(as_form(form, make_grads(params, 22))))
    snap.assert_unchanged()
    assert GOOD_STEPS in calls


def test_callable_lr_raising_changes_nothing():
    def schedule(t):
        if t >= GOOD_STEPS:
            raise ZeroDivisionError("schedule exhausted")
        return 1e-3

    opt, params = trained(Adam, "groups", lr=schedule)
    snap = Snapshot(opt, params)
    with pytest.raises(ZeroDivisionError, match="schedule exhausted"):
        opt.step(make_grads(params, 23))
    snap.assert_unchanged()


def test_amsgrad_switched_on_then_failing_step_creates_no_state():
    # The step that would create max_exp_avg_sq fails on the 50th gradient:
    # no max_exp_avg_sq may be left behind.
    opt, params = trained(Adam, "list")
    snap = Snapshot(opt, params)
    opt.param_groups[0]["amsgrad"] = True
    grads = make_grads(params, 24)
    grads[LAST] = grads[LAST].astype(np.int32)
    check_raises(TypeError, ["grads[49]"], lambda: opt.step(grads))
    snap.retake_groups()
    snap.assert_unchanged()
    assert all("max_exp_avg_sq" not in s for s in opt.state)


# (override(**kwargs) for functional.adam, exception, fragments)
FUNCTIONAL_BAD_HYPERS = [
    (dict(lr=-1.0), ValueError, ["lr", ">= 0"]),
    (dict(lr=NAN), ValueError, ["lr", "finite"]),
    (dict(lr=lambda t: 1e-3), TypeError, ["lr", "real number"]),
    (dict(beta1=1.0), ValueError, ["beta1", "< 1"]),
    (dict(beta1=-0.5), ValueError, ["beta1", ">= 0"]),
    (dict(beta2=1.0), ValueError, ["beta2", "< 1"]),
    (dict(beta2=NAN), ValueError, ["beta2", "finite"]),
    (dict(eps=-1e-8), ValueError, ["eps", ">= 0"]),
    (dict(weight_decay=-1e-2), ValueError, ["weight_decay", ">= 0"]),
    (dict(eps_style="tf"), ValueError, ["eps_style", "'torch'", "'keras'"]),
    (dict(amsgrad=1), TypeError, ["amsgrad", "bool"]),
    (dict(amsgrad=True), ValueError, ["max_exp_avg_sqs", "amsgrad"]),
    (dict(maximize="no"), TypeError, ["maximize", "bool"]),
    (dict(decoupled_weight_decay=0), TypeError, ["decoupled_weight_decay", "bool"]),
    (dict(grad_scale=NAN), ValueError, ["grad_scale", "finite"]),
    (dict(grad_scale="1"), TypeError, ["grad_scale", "real number"]),
    (dict(state_dtype="float16"), ValueError, ["state_dtype", "not offered"]),
    (dict(state_rounding="down"), ValueError, ["state_rounding", "'stochastic' or 'nearest'"]),
    (dict(seed=-5), ValueError, ["seed", "2**64"]),
    (dict(state_dtype="bfloat16"), TypeError, ["params[0]", "state_dtype='bfloat16' needs", "float64"]),
]


def _stable_repr(value):
    """A test id that does not change between runs (no memory addresses)."""
    return "callable" if callable(value) else repr(value)


@pytest.mark.parametrize("kwargs, exc, fragments", FUNCTIONAL_BAD_HYPERS,
                         ids=[f"{next(iter(k))}={_stable_repr(next(iter(k.values())))}" for k, _, _ in FUNCTIONAL_BAD_HYPERS])
def test_functional_bad_hyperparameter(kwargs, exc, fragments):
    params = make_params()
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    everything = params + ms + vs
    before = [a.copy() for a in everything]
    args = dict(step=1, lr=1e-2)
    args.update(kwargs)
    msg = check_raises(exc, fragments, lambda: functional_adam(params, make_grads(params, 1), ms, vs, **args))
    name = next(iter(kwargs))
    if name in ("beta1", "beta2"):
        # The message must name the offending argument unambiguously.
        assert msg.startswith(name), msg
    assert all(same_bits(a, b) for a, b in zip(everything, before))


# ---------------------------------------------------------------- load_state_dict
def _other_state_dict(cls, form):
    """A valid state dict from a differently trained optimizer (so a partial
    load would be visible), with changed hyperparameters."""
    other, _ = trained(cls, form, seed=5, lr=0.25)
    sd = other.state_dict()
    for g in sd["param_groups"]:
        g["lr"] = 0.125
    return sd


def _drop_group(sd):
    sd["param_groups"].pop()


def _extra_group(sd):
    sd["param_groups"].append(dict(sd["param_groups"][-1], params=[1000]))


def _fewer_params(sd):
    sd["param_groups"][-1]["params"].pop()
    del sd["state"][LAST]


def _more_params(sd):
    sd["param_groups"][-1]["params"].append(1000)


def _wrong_shape(sd):
    sd["state"][LAST]["exp_avg"] = np.zeros((3, 2), np.float32)


def _wrong_size(sd):
    sd["state"][LAST]["exp_avg_sq"] = np.zeros(6, np.float32)


def _missing_exp_avg(sd):
    del sd["state"][LAST]["exp_avg"]


def _missing_exp_avg_sq(sd):
    del sd["state"][LAST]["exp_avg_sq"]


def _negative_step(sd):
    sd["state"][LAST]["step"] = -1


def _fractional_step(sd):
    sd["state"][LAST]["step"] = np.float32(2.5)


def _nan_step(sd):
    sd["state"][LAST]["step"] = np.array(np.nan, np.float32)


def _int_state(sd):
    sd["state"][LAST]["exp_avg"] = np.zeros((2, 3), np.int64)


def _unknown_id(sd):
    sd["state"][1000] = sd["state"][LAST]


def _bad_lr(sd):
    sd["param_groups"][-1]["lr"] = -1.0


def _bad_betas(sd):
    sd["param_groups"][-1]["betas"] = (0.9, 1.0)


def _bad_amsgrad(sd):
    sd["param_groups"][-1]["amsgrad"] = "yes"


def _no_state_key(sd):
    del sd["state"]


LOAD_CASES = {
    "drop_group": (_drop_group, ValueError, ["group"]),
    "extra_group": (_extra_group, ValueError, ["group"]),
    "fewer_params": (_fewer_params, ValueError, ["param_groups'][", "parameter"]),
    "more_params": (_more_params, ValueError, ["param_groups'][", "parameter"]),
    "wrong_shape": (_wrong_shape, ValueError, ["['state'][49]", "exp_avg", "shape (2, 3)", "(3, 2)"]),
    "wrong_size": (_wrong_size, ValueError, ["['state'][49]", "exp_avg_sq", "shape (2, 3)", "(6,)"]),
    "missing_exp_avg": (_missing_exp_avg, ValueError, ["['state'][49]", "missing", "'exp_avg'"]),
    "missing_exp_avg_sq": (_missing_exp_avg_sq, ValueError, ["['state'][49]", "missing", "'exp_avg_sq'"]),
    "negative_step": (_negative_step, ValueError, ["['state'][49]", "step", "non-negative integer"]),
    "fractional_step": (_fractional_step, ValueError, ["['state'][49]", "step", "integer"]),
    "nan_step": (_nan_step, ValueError, ["['state'][49]", "step", "integer"]),
    "int_state": (_int_state, TypeError, ["['state'][49]", "exp_avg", "floating", "int64"]),
    "unknown_id": (_unknown_id, ValueError, ["1000"]),
    "bad_lr": (_bad_lr, ValueError, ["param_groups'][", "lr", ">= 0"]),
    "bad_betas": (_bad_betas, ValueError, ["param_groups'][", "betas", "< 1"]),
    "bad_amsgrad": (_bad_amsgrad, TypeError, ["param_groups'][", "amsgrad", "bool"]),
    "no_state_key": (_no_state_key, ValueError, ["'state'"]),
}


@pytest.mark.parametrize("case", sorted(LOAD_CASES))
@pytest.mark.parametrize("form", ["list", "groups"])
def test_load_state_dict_failure_changes_nothing(form, case):
    opt, params = trained(Adam, form)
    sd = _other_state_dict(Adam, form)
    mutate, exc, fragments = LOAD_CASES[case]
    mutate(sd)
    snap = Snapshot(opt, params)
    check_raises(exc, fragments, lambda: opt.load_state_dict(sd))
    snap.assert_unchanged()
    # And the unmodified dict still loads.
    opt.load_state_dict(_other_state_dict(Adam, form))
    assert all(g["lr"] == 0.125 for g in opt.param_groups)


def test_load_state_dict_not_a_mapping():
    opt, params = trained(Adam, "list")
    snap = Snapshot(opt, params)
    with pytest.raises((TypeError, ValueError), match="state_dict"):
        opt.load_state_dict([1, 2, 3])
    snap.assert_unchanged()


# -------------------------------------------------------------- params container
@pytest.mark.parametrize(
    "params, exc, fragments",
    [
        (lambda: np.zeros(3), TypeError, ["params", "single ndarray"]),
        (lambda: [], ValueError, ["params", "empty"]),
        (lambda: {}, ValueError, ["params", "empty"]),
        (lambda: 3, TypeError, ["params", "int"]),
        (lambda: "w", TypeError, ["params", "str"]),
        (lambda: [{"lr": 0.1}], ValueError, ["param_groups[0]", "'params'"]),
        (lambda: [np.zeros(3), {"params": [np.zeros(3)]}], TypeError, ["params", "mix"]),
        (lambda: [{"params": []}], ValueError, ["param_groups[0]", "no parameters"]),
    ],
    ids=["ndarray", "empty_list", "empty_dict", "int", "str", "group_without_params", "mixed", "empty_group"],
)
def test_bad_params_container(params, exc, fragments):
    check_raises(exc, fragments, lambda: Adam(params()))


def test_add_param_group_bad_param_changes_nothing():
    opt, params = trained(Adam, "list")
    snap = Snapshot(opt, params)
    extra = [np.zeros(3, np.float32), np.zeros(4, np.int32)]
    check_raises(TypeError, ["params[51]", "int32"], lambda: opt.add_param_group({"params": extra}))
    assert len(opt.param_groups) == 1
    snap.assert_unchanged()
    assert opt.step(make_grads(params, 25)) is True


@pytest.mark.parametrize("n", [0, -1])
def test_set_num_threads_range(n):
    before = adamcpp.get_num_threads()
    check_raises(ValueError, ["n", ">= 1"], lambda: adamcpp.set_num_threads(n))
    assert adamcpp.get_num_threads() == before


@pytest.mark.parametrize("n", [1.0, "2", True])
def test_set_num_threads_type(n):
    before = adamcpp.get_num_threads()
    check_raises(TypeError, ["n", "int"], lambda: adamcpp.set_num_threads(n))
    assert adamcpp.get_num_threads() == before


def test_nothing_written_for_nonfinite_raise_policy():
    # FloatingPointError is the third documented error; it also changes nothing.
    opt, params = trained(Adam, "groups", nonfinite="raise")
    grads = make_grads(params, 26)
    grads[LAST][1, 2] = math.inf
    snap = Snapshot(opt, params)
    with pytest.raises(FloatingPointError, match=r"grads\[49\]"):
        opt.step(grads)
    snap.assert_unchanged()



# ----------------------------------------------------------- mixed precision
# The same scenario with 16-bit parameters and bfloat16 state: 50 tensors of
# float16, bfloat16 and float32 in three groups (float32 state with master
# copies; bfloat16 state with master copies; bfloat16 state without master,
# rounded stochastically), a few good steps, then something wrong with the
# 50th tensor only: refused with its label, and nothing anywhere changed.
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)


def mixed_dtype_of(i: int) -> np.dtype:
    return (F16, BF16, np.dtype(np.float32))[i % 3] if i < LAST else BF16


def mixed_trained(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(shape_of(i)).astype(mixed_dtype_of(i)) for i in range(N)]
    groups = [
        {"params": params[:17]},
        {"params": params[17:34], "state_dtype": "bfloat16"},
        {"params": params[34:], "state_dtype": "bfloat16", "master_weights": False, "param_rounding": "stochastic",
         "amsgrad": True},
    ]
    opt = Adam(groups, lr=1e-2, seed=7)
    for s in range(GOOD_STEPS):
        opt.step(mixed_grads(params, 100 + s))
    return opt, params


def mixed_grads(params: list, seed: int) -> list:
    rng = np.random.default_rng(seed)
    kinds = (np.float32, np.float64, F16, BF16)
    return [rng.standard_normal(p.shape).astype(kinds[i % 4]) for i, p in enumerate(params)]


def test_mixed_scenario_steps():
    opt, params = mixed_trained()
    assert all(s["step"] == GOOD_STEPS for s in opt.state)
    assert opt.state[LAST]["exp_avg"].dtype == BF16 and "master_param" not in opt.state[LAST]
    assert opt.state[0]["master_param"].dtype == np.float32


def _set(name, maker):
    def edit(opt, params):
        opt.state[LAST][name] = maker(opt.state[LAST], params[LAST])
    return edit


MIXED_CASES = {
    # bfloat16 state replaced by float32 state (the group says bfloat16)
    "state_float32": (_set("exp_avg", lambda s, p: s["exp_avg"].astype(np.float32)), TypeError,
                      ["exp_avg of params[49]", "expected dtype bfloat16 (state_dtype='bfloat16')", "float32"]),
    "state_float16": (_set("exp_avg_sq", lambda s, p: s["exp_avg_sq"].astype(F16)), TypeError,
                      ["exp_avg_sq of params[49]", "expected dtype bfloat16", "float16"]),
    "vmax_readonly": (_set("max_exp_avg_sq", lambda s, p: readonly_like(s["max_exp_avg_sq"])), ValueError,
                      ["max_exp_avg_sq of params[49]", "read-only"]),
    "state_transposed": (_set("exp_avg", lambda s, p: np.zeros((3, 2), BF16).T), ValueError,
                         ["exp_avg of params[49]", "C-contiguous"]),
    "state_is_param": (_set("exp_avg", lambda s, p: p), ValueError,
                       ["exp_avg of params[49]", "params[49]", "shares memory"]),
    "grad_int": (None, TypeError, ["grads[49]", "expected dtype float16, bfloat16, float32 or float64", "int16"]),
    "grad_shape": (None, ValueError, ["grads[49]", "expected shape (2, 3)", "(6,)"]),
    "grad_is_state": (None, ValueError, ["grads[49]", "exp_avg_sq of params[49]", "shares memory"]),
    "param_readonly": (lambda opt, params: setattr(params[LAST].flags, "writeable", False), ValueError,
                       ["params[49]", "read-only"]),
    "group_bf16_state_float64": (None, TypeError, ["params[49]", "state_dtype='bfloat16' needs a float32"]),
}


@pytest.mark.parametrize("case", sorted(MIXED_CASES))
def test_mixed_50th_tensor_bad_changes_nothing(case):
    opt, params = mixed_trained()
    edit, exc, fragments = MIXED_CASES[case]
    grads = mixed_grads(params, 30)
    if edit is not None:
        edit(opt, params)
    if case == "grad_int":
        grads[LAST] = np.ones((2, 3), np.int16)
    elif case == "grad_shape":
        grads[LAST] = np.ones(6, BF16)
    elif case == "grad_is_state":
        grads[LAST] = opt.state[LAST]["exp_avg_sq"]
    elif case == "group_bf16_state_float64":
        opt.param_groups[-1]["params"][-1] = params[LAST] = np.zeros((2, 3))
        grads[LAST] = np.ones((2, 3))
    snap = Snapshot(opt, params)
    check_raises(exc, fragments, lambda: opt.step(grads))
    snap.assert_unchanged()
    if case == "param_readonly":
        params[LAST].flags.writeable = True


MASTER_CASES = {
    "master_bfloat16": (lambda s, p: s["master_param"].astype(BF16), TypeError,
                        ["master_param of params[", "expected dtype float32 (a master copy is float32)", "bfloat16"]),
    "master_float64": (lambda s, p: s["master_param"].astype(np.float64), TypeError,
                       ["master_param of params[", "float32", "float64"]),
    "master_shape": (lambda s, p: np.zeros(7, np.float32), ValueError, ["master_param of params[", "shape"]),
    "master_readonly": (lambda s, p: readonly_like(s["master_param"]), ValueError,
                        ["master_param of params[", "read-only"]),
    "master_is_param_bytes": (lambda s, p: p.view(np.float16).view(np.uint16).view(np.float16).view(BF16)
                              .reshape(-1)[: 0].astype(np.float32), ValueError, ["master_param of params[", "shape"]),
    "master_f32_state_bf16": (lambda s, p: s["master_param"], None, []),
}


@pytest.mark.parametrize("case", sorted(MASTER_CASES))
def test_bad_master_copy_changes_nothing(case):
    """The last tensor with a master copy (group 1, tensor 33, bfloat16) gets a bad one."""
    opt, params = mixed_trained()
    i = 33
    maker, exc, fragments = MASTER_CASES[case]
    opt.state[i]["master_param"] = maker(opt.state[i], params[i])
    if exc is None:
        assert opt.step(mixed_grads(params, 31)) is True
        return
    snap = Snapshot(opt, params)
    check_raises(exc, [*fragments, f"params[{i}]"], lambda: opt.step(mixed_grads(params, 31)))
    snap.assert_unchanged()


def test_master_aliasing_is_refused():
    opt, params = mixed_trained()
    opt.state[33]["master_param"] = opt.state[19]["master_param"]
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["master_param of params[33]", "master_param of params[19]", "shares memory"],
                 lambda: opt.step(mixed_grads(params, 32)))
    snap.assert_unchanged()


def test_missing_master_copy_starts_at_the_parameter():
    opt, params = mixed_trained()
    del opt.state[19]["master_param"]
    before = params[19].astype(np.float32)
    assert opt.step(mixed_grads(params, 33)) is True
    assert opt.state[19]["master_param"].dtype == np.float32
    assert not np.array_equal(opt.state[19]["master_param"], before)  # it started from the parameter and moved


def test_float32_state_of_a_16_bit_parameter_must_be_float32():
    opt, params = mixed_trained()
    opt.state[15]["exp_avg"] = opt.state[15]["exp_avg"].astype(BF16)  # group 0 keeps float32 state
    snap = Snapshot(opt, params)
    check_raises(TypeError, ["exp_avg of params[15]", "expected dtype float32 (the state of a 16-bit parameter"],
                 lambda: opt.step(mixed_grads(params, 34)))
    snap.assert_unchanged()


def test_group_switched_to_bfloat16_state_refuses_float32_state():
    """Switching a group's state_dtype does not convert its state: the next
    step names the array and the dtype it needs (load_state_dict converts)."""
    opt, params = mixed_trained()
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    snap = Snapshot(opt, params)
    check_raises(TypeError, ["exp_avg of params[0]", "bfloat16", "float32"], lambda: opt.step(mixed_grads(params, 35)))
    snap.retake_groups()
    snap.assert_unchanged()
    opt.load_state_dict(opt.state_dict())  # converts every state array to the groups' dtypes
    assert opt.state[0]["exp_avg"].dtype == BF16 and opt.step(mixed_grads(params, 35)) is True


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_sgd_refuses_16_bit_parameters(dtype):
    check_raises(TypeError, ["params[0]", "expected dtype float32 or float64 (native byte order)", dtype.name],
                 lambda: adamcpp.SGD([np.zeros(3, dtype)]))


def test_bfloat16_state_of_float64_parameter_refused_at_construction():
    check_raises(TypeError, ["params[1]", "state_dtype='bfloat16' needs a float32, float16 or bfloat16 parameter"],
                 lambda: Adam([np.zeros(2, np.float32), np.zeros(2)], state_dtype="bfloat16"))


def test_functional_master_params_errors_change_nothing():
    rng = np.random.default_rng(3)
    params = [rng.standard_normal(4).astype(BF16), rng.standard_normal(4).astype(np.float32)]
    ms = [np.zeros(4, np.float32) for _ in params]
    vs = [np.zeros(4, np.float32) for _ in params]
    masters = [params[0].astype(np.float32), None]
    grads = [np.ones(4, BF16), np.ones(4, np.float32)]
    everything = params + ms + vs + [masters[0]]
    before = [a.copy() for a in everything]
    cases = [
        ([None, None], ValueError, ["master_params[0]", "needs a float32 master_param array"]),
        ([masters[0].astype(np.float64), None], TypeError, ["master_params[0]", "float32", "float64"]),
        ([masters[0], np.zeros(4, np.float32)], ValueError, ["master_params[1]", "expected None"]),
        ([masters[0]], ValueError, ["master_params", "expected 2"]),
    ]
    for bad, exc, fragments in cases:
        check_raises(exc, fragments, lambda: functional_adam(params, grads, ms, vs, step=1, lr=1e-2,
                                                             master_params=bad))
        assert all(same_bits(a, b) for a, b in zip(everything, before))
    functional_adam(params, grads, ms, vs, step=1, lr=1e-2, master_params=masters)  # the good call works


def test_load_state_dict_converts_and_checks_mixed_state():
    opt, params = mixed_trained()
    sd = opt.state_dict()
    sd["state"][LAST]["exp_avg"] = sd["state"][LAST]["exp_avg"].astype(np.float32)  # converted to bfloat16
    sd["state"][0]["master_param"] = np.zeros(7, np.float32)
    snap = Snapshot(opt, params)
    check_raises(ValueError, ["state_dict['state'][0]['master_param']", "expected shape"],
                 lambda: opt.load_state_dict(sd))
    snap.assert_unchanged()
    del sd["state"][0]["master_param"]  # a missing master copy starts at the parameter
    opt.load_state_dict(sd)
    assert opt.state[LAST]["exp_avg"].dtype == BF16
    assert np.array_equal(opt.state[0]["master_param"], params[0].astype(np.float32))


def test_torch_bfloat16_tensor_in_a_state_dict_names_the_conversion():
    torch = pytest.importorskip("torch")
    opt, params = mixed_trained()
    sd = opt.state_dict()
    sd["state"][LAST]["exp_avg"] = torch.zeros((2, 3), dtype=torch.bfloat16)
    snap = Snapshot(opt, params)
    check_raises(TypeError, ["state_dict['state'][49]['exp_avg']", "t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)"],
                 lambda: opt.load_state_dict(sd))
    snap.assert_unchanged()


# --------------------------------------------------------------------------- what to pass instead
def foreign(module: str, name: str, *, device_type=None, **attrs):
    """An object whose type claims to come from `module` (frameworks are recognised by their type's module,
    never imported), optionally with a __dlpack_device__ of `device_type`."""
    body = dict(attrs)
    if device_type is not None:
        body["__dlpack_device__"] = lambda self: (device_type, 0)
        body["__dlpack__"] = lambda self, **kw: None
    cls = type(name, (), body)
    cls.__module__ = module
    return cls()


def _message(call, *args):
    with pytest.raises(TypeError) as err:
        call(*args)
    return str(err.value)


CPU_TENSOR = foreign("torch", "Tensor", device_type=1)
JAX_CPU = foreign("jaxlib.xla_extension", "ArrayImpl", device_type=1)
JAX_ARRAY_API = foreign("jax._src.array", "ArrayImpl", device_type=1)
NESTED = {"tuple": (np.zeros(3),), "list": [np.zeros(3)], "dict": {"w": np.zeros(3)}}
JAX_PARAM = "JAX arrays are immutable: keep a writable NumPy copy (`np.array(x)`) and pass gradients as `np.asarray(g)`"


def test_a_torch_tensor_names_the_view_to_pass():
    assert _message(Adam, [CPU_TENSOR]) == (
        "params[0]: expected a numpy.ndarray, got torch.Tensor: pass `t.detach().numpy()` (a view: updated in "
        "place) for a CPU tensor"
    )
    opt = Adam([np.zeros(3)])
    assert _message(opt.step, [CPU_TENSOR]) == (
        "grads[0]: expected a numpy.ndarray, got torch.Tensor: pass `g.detach().numpy()` (a view, no copy) for a "
        "CPU tensor"
    )
    opt.state[0]["exp_avg"] = CPU_TENSOR
    assert _message(opt.step, [np.zeros(3)]).startswith("exp_avg of params[0]: expected a numpy.ndarray, got torch.Tensor: pass `t.detach().numpy()`")


def test_a_torch_cuda_tensor_on_the_cpu_path_says_where_it_runs():
    cuda_tensor = foreign("torch", "Tensor", device_type=2)
    text = _message(Adam, [np.zeros(3), cuda_tensor])
    if adamcpp.cuda.COMPILED:
        assert text == (
            "params[1]: expected a numpy.ndarray, got torch.Tensor on a CUDA device: an optimizer whose parameters "
            "are CUDA tensors steps them on their device (pass `t.detach()` for every parameter, gradient and state "
            "array); this one's parameters are NumPy arrays"
        )
    else:
        assert text.startswith("params[1]: expected a numpy.ndarray, got torch.Tensor on a CUDA device: this "
                               "adamcpp has no CUDA unit")


@pytest.mark.parametrize("jax_array", [JAX_CPU, JAX_ARRAY_API], ids=["jaxlib", "jax"])
def test_a_jax_array_is_never_a_parameter_and_a_gradient_only_through_np_asarray(jax_array):
    package = type(jax_array).__module__.partition(".")[0]
    what = f"{package}.ArrayImpl (a JAX array)"
    assert _message(Adam, [jax_array]) == f"params[0]: expected a numpy.ndarray, got {what}: {JAX_PARAM}"
    assert _message(Adam, {"w": np.zeros(3), "b": jax_array}) == (
        f"params['b']: expected a numpy.ndarray, got {what}: {JAX_PARAM}"
    )
    opt = Adam([np.zeros(3)])
    grad_fix = "pass `np.asarray(g)` (zero-copy; read-only is fine for a gradient)"
    assert _message(opt.step, [jax_array]) == f"grads[0]: expected a numpy.ndarray, got {what}: {grad_fix}"
    assert _message(adamcpp.global_norm, [jax_array]) == f"grads[0]: expected a numpy.ndarray, got {what}: {grad_fix}"
    z = np.zeros(3)
    assert _message(lambda: functional_adam(jax_array, z, z.copy(), z.copy(), step=1, lr=1e-3)) == (
        f"params[0]: expected a numpy.ndarray, got {what}: {JAX_PARAM}"
    )
    assert _message(lambda: functional_adam(z, jax_array, z.copy(), z.copy(), step=1, lr=1e-3)) == (
        f"grads[0]: expected a numpy.ndarray, got {what}: {grad_fix}"
    )


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_a_nested_structure_is_a_tree_at_the_top_and_refused_inside_a_group(kind):
    # At the top level a nesting is a parameter tree (tests/test_trees.py), its leaves named by path.
    wrong = np.zeros(3, np.int32)
    nested, inner = {"tuple": ((wrong,), "[0]"), "list": ([wrong], "[0]"), "dict": ({"w": wrong}, "['w']")}[kind]
    dtypes = "expected dtype float16, bfloat16, float32 or float64 (native byte order), got int32"
    assert _message(Adam, [nested]) == f"params[0]{inner}: {dtypes}"
    assert _message(Adam, {"mlp": nested}) == f"params['mlp']{inner}: {dtypes}"
    assert Adam([NESTED[kind]]).step(copy_value([NESTED[kind]]))
    # Inside a group's "params", and in the gradients of list-form params, a nesting is still refused.
    assert _message(Adam, [{"params": [NESTED[kind]]}]) == (
        f"params[0]: expected a numpy.ndarray, got {kind}: params must be a list or dict of arrays: flatten "
        "nested parameters into a list or a dict of arrays"
    )
    with pytest.raises(ValueError) as err:  # a dict beside groups reads as a group
        Adam([{"params": [np.zeros(3)]}, {"w": np.zeros(3)}])
    assert str(err.value) == (
        "param_groups[1]: a group dict needs a 'params' entry (a list of dicts is a list of parameter groups; "
        "params must be a list or dict of arrays: flatten nested parameters into a list or a dict of arrays)"
    )
    assert _message(Adam([np.zeros(3)]).step, [NESTED[kind]]) == (
        f"grads[0]: expected a numpy.ndarray, got {kind}: gradients mirror the parameters (a list or dict of "
        "arrays): flatten nested gradients the same way"
    )


def test_an_array_like_is_converted_once_and_kept():
    text = _message(Adam, [TorchLike(np.zeros(3))])
    assert text == (
        "params[0]: expected a numpy.ndarray, got TorchLike: convert it once with `np.asarray(x)` (check that the "
        "result is writeable) and keep that NumPy array as the parameter: adamcpp updates the array it is given, "
        "and an update of a temporary copy is lost"
    )
    assert _message(Adam([np.zeros(3)]).step, [TorchLike(np.zeros(3))]) == (
        "grads[0]: expected a numpy.ndarray, got TorchLike: pass `np.asarray(g)` (read-only is fine for a gradient)"
    )
    assert _message(Adam, [1.0]) == "params[0]: expected a numpy.ndarray, got float"  # nothing to suggest
