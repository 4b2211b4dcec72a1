"""The step entries' one payload: `_native.StepCall`, read by the native entries by index.

The field names are defined once, in C++ (`_core.STEP_FIELDS`); the Python layer's named tuple must list the same
fields in the same order, or the entries would read one field as another. An entry refuses anything but a tuple of
exactly those fields with a TypeError naming `call` (or the field), before it takes the optimizer's owner or reads
any list: nothing is held, nothing written.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import adamcpp
from adamcpp import _core, _native

FIELDS = ", ".join(_core.STEP_FIELDS)


def test_step_call_fields_are_the_native_ones():
    assert _native.StepCall._fields == _core.STEP_FIELDS
    assert _core.STEP_FIELDS == (
        "params",
        "grads",
        "states",
        "group_of",
        "groups",
        "grad_scale",
        "nonfinite",
        "max_grad_norm",
        "patterns",
        "names",
        "norm_grads",
        "rounding_pieces",
    )


def test_the_native_caller_builds_the_payload_from_the_named_fields():
    """_native.step names the payload's fields as its parameters, in StepCall's order (it builds the payload as a
    plain tuple in that order), then the device it may run on."""
    import inspect

    step = list(inspect.signature(_native.step).parameters)
    assert step[:2] == ["family", "cache"] and step[-2:] == ["workspace", "stream"]
    assert tuple(step[2:-2]) == _core.STEP_FIELDS


def _call(**fields: Any) -> _native.StepCall:
    """A StepCall whose lists are empty (a step of no tensor), with `fields` replaced."""
    base = _native.StepCall([], [], [], [], [], 1.0, 0, -1.0, ("params[{}]", "grads[{}]"), None)
    return base._replace(**fields)


def _entries():
    """Each entry with the arguments around its call."""
    cache, workspace = _core.StateCache(), _core.CudaWorkspace()
    return {
        "adam_step": lambda call: _core.adam_step(cache, call),
        "sgd_step": lambda call: _core.sgd_step(cache, call),
        "cuda_adam_step": lambda call: _core.cuda_adam_step(cache, workspace, call, None),
        "cuda_sgd_step": lambda call: _core.cuda_sgd_step(cache, workspace, call, None),
    }


@pytest.mark.parametrize("entry", ["adam_step", "sgd_step", "cuda_adam_step", "cuda_sgd_step"])
@pytest.mark.parametrize(
    "call, message",
    [
        ([], f"call: expected a StepCall, a tuple of the 12 fields ({FIELDS}), got list"),
        (None, f"call: expected a StepCall, a tuple of the 12 fields ({FIELDS}), got NoneType"),
        (
            tuple(_call())[:10],
            f"call: expected a StepCall, a tuple of the 12 fields ({FIELDS}), got a tuple of 10 fields",
        ),
        (
            (*tuple(_call()), None),
            f"call: expected a StepCall, a tuple of the 12 fields ({FIELDS}), got a tuple of 13 fields",
        ),
        (_call(grad_scale="1.0"), "call.grad_scale: expected a float, got str"),
        (_call(max_grad_norm=None), "call.max_grad_norm: expected a float, got NoneType"),
        (_call(nonfinite=1.0), "call.nonfinite: expected an int, got float"),
        (_call(nonfinite="skip"), "call.nonfinite: expected an int, got str"),
    ],
    ids=["list", "None", "short", "long", "grad_scale", "max_grad_norm", "nonfinite-float", "nonfinite-str"],
)
def test_anything_but_a_step_call_is_refused(entry, call, message):
    with pytest.raises(TypeError) as err:
        _entries()[entry](call)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "entry, field",
    [
        ("sgd_step", "rounding_pieces"),
        ("cuda_adam_step", "norm_grads"),
        ("cuda_adam_step", "rounding_pieces"),
        ("cuda_sgd_step", "norm_grads"),
        ("cuda_sgd_step", "rounding_pieces"),
    ],
)
def test_a_field_the_entry_has_no_use_for_must_be_none(entry, field):
    with pytest.raises(TypeError) as err:
        _entries()[entry](_call(**{field: []}))
    assert str(err.value) == f"call.{field}: expected None ({entry} takes no {field}), got list"


@pytest.mark.parametrize("entry", ["adam_step", "sgd_step"])
def test_a_plain_tuple_and_numbers_float_takes_are_a_call(entry):
    """The entries read a tuple by index: a StepCall, or the same fields in a plain tuple; an int grad_scale is a
    float. A step of no tensor applies."""
    assert _entries()[entry](tuple(_call(grad_scale=2, max_grad_norm=np.float64(1.0)))) == (True, 0.0)
    assert _entries()[entry](_call()) == (True, None)


def test_a_refused_call_changes_nothing():
    """A refused payload is refused before any list is read: the optimizer's parameters and state are untouched
    and its next step runs."""
    p = np.linspace(-1, 1, 7).astype(np.float32)
    opt = adamcpp.Adam([p], lr=0.1)
    assert opt.step([np.ones_like(p)])
    before = p.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[0].items()}
    with pytest.raises(TypeError, match=r"^call: expected a StepCall"):
        _core.adam_step(_core.StateCache(), (list(opt.param_groups[0]["params"]),))
    np.testing.assert_array_equal(p, before[0])
    assert opt.step([np.ones_like(p)]) and not np.array_equal(p, before[0])
