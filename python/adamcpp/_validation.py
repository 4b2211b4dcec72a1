"""Input checks shared by the optimizers, flat mode, ZeRO, the functional API
and the schedules: hyperparameters, step counts, and the native indices of
option names.

Every check here runs before any buffer is written. Messages name the offending
parameter and say what was expected. The rules for the arrays a step updates in
place are the native step's own, bound as `_core.check_param` and
`_core.check_layout` (cpp/py/array_checks.cpp), and called as they are.
"""

from __future__ import annotations

import numbers
from math import isfinite as _isfinite
from typing import Any, Optional

import numpy as np

from . import _core

# The native core's names, index = the value it reads.
EPS_STYLES = _core.EPS_STYLES
NONFINITE_POLICIES = {name: i for i, name in enumerate(_core.NONFINITE_POLICIES)}
STATE_DTYPES = _core.STATE_DTYPES
ROUNDINGS = _core.ROUNDINGS
MAX_SEED = 2**64 - 1


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def describe_number(value: Any) -> str:
    """A number for a message: its repr, or its digit count when it is huge."""
    text = repr(value)
    if isinstance(value, numbers.Integral) and len(text) > 40:
        return f"an integer of {len(text.lstrip('-'))} digits"
    return text


def check_float(value: Any, where: str, *, minimum: Optional[float] = None, below: Optional[float] = None) -> float:
    """A finite real number in [minimum, below)."""
    kind = type(value)
    if kind is not float and kind is not int:  # the common cases are checked without ABCs
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if not _is_real(value):
            raise TypeError(f"{where}: expected a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{where}: expected a finite number, got {describe_number(value)}") from None
    if not _isfinite(v):
        raise ValueError(f"{where}: expected a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where}: expected a value >= {minimum}, got {v!r}")
    if below is not None and v >= below:
        raise ValueError(f"{where}: expected a value < {below}, got {v!r}")
    return v


def check_bool(value: Any, where: str) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{where}: expected a bool, got {type(value).__name__}")
    return bool(value)


def check_betas(value: Any, where: str) -> tuple[Any, Any]:
    """A pair (beta1, beta2), each still to be checked as a number."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where}: expected a pair (beta1, beta2), got {value!r}")
    return value[0], value[1]


def check_master_weights(value: Any, where: str) -> int:
    """The native code of master_weights: None (automatic) -1, False 0, True 1."""
    if value is None:
        return -1
    return int(check_bool(value, where))


def check_state_dtype(value: Any, where: str) -> int:
    """The native index of a state dtype name."""
    if value == "float16":
        raise ValueError(
            f"{where}: 'float16' state is not offered: it underflows (g**2 below float16's smallest subnormal, "
            "6e-8, i.e. |g| < 1.7e-4, and eps=1e-8 round to zero, so sqrt(v) + eps can be 0 and the update Inf or "
            "NaN); use 'bfloat16' (float32's exponent range in 16 bits) or 'float32'"
        )
    if not isinstance(value, str) or value not in STATE_DTYPES:
        raise ValueError(f"{where}: expected 'float32' or 'bfloat16', got {value!r}")
    return STATE_DTYPES.index(value)


def check_rounding(value: Any, where: str) -> int:
    """The native index of a rounding name."""
    if not isinstance(value, str) or value not in ROUNDINGS:
        raise ValueError(f"{where}: expected 'stochastic' or 'nearest', got {value!r}")
    return ROUNDINGS.index(value)


def check_seed(value: Any, where: str) -> int:
    """A seed: an int (a NumPy integer too) in [0, 2**64 - 1]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where}: expected an int seed, got {type(value).__name__}")
    v = int(value)
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"{where}: expected an integer in [0, 2**64 - 1], got {describe_number(v)}")
    return v


def check_eps_style(value: Any, where: str) -> int:
    """The native index of an eps style name."""
    if not isinstance(value, str) or value not in EPS_STYLES:
        raise ValueError(f"{where}: expected 'torch' or 'keras', got {value!r}")
    return EPS_STYLES.index(value)


def check_nonfinite(value: Any) -> int:
    """The native index of a non-finite policy name."""
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected 'propagate', 'skip' or 'raise', got {value!r}")
    return NONFINITE_POLICIES[value]


def check_grad_scale(value: Any) -> float:
    return check_float(value, "grad_scale")


def check_max_grad_norm(value: Optional[float]) -> float:
    """The native encoding of `max_grad_norm`: -1 for no clipping."""
    if value is None:
        return -1.0
    return check_float(value, "max_grad_norm", minimum=0.0)


def check_step_count(value: Any, where: str, *, live: bool = False) -> int:
    """A step count in [0, _core.MAX_STEP_COUNT] (signed 64-bit, and a step
    adds one), the one rule for every place that reads one.

    A live count (``live=True``: one in the state before a step, after an
    edit) is what the native step accepts, an int or an integer type with
    __index__: `_core.check_step`, the native step's own rule and messages
    (cpp/py/array_checks.cpp, as_step). A loaded count (the default: a state
    dict's, in load_state_dict) is any non-negative integral number: an int, a
    NumPy scalar or a 0-d array such as torch's float step tensor, whose upper
    bound is then the native rule's."""
    if live:
        return _core.check_step(value, where)
    if isinstance(value, int) and not isinstance(value, bool):
        v = value  # any size: NumPy could not hold the largest
    else:
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype.kind not in "iuf" or not np.isfinite(arr):
            raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
        x = arr.item()
        if float(x) != int(x):
            raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
        v = int(x)
    if v < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {value!r}")
    return _core.check_step(v, where)
