"""Validation helpers shared by the optimizers and the functional API.

Every check here runs before any buffer is written. Messages name the offending
parameter and say what was expected.
"""

from __future__ import annotations

import numbers
from math import isfinite as _isfinite
from typing import Any

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
EPS_STYLES = ("torch", "keras")
NONFINITE_POLICIES = {"propagate": 0, "skip": 1, "raise": 2}


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check_float(value: Any, where: str, *, minimum: float | None = None, below: float | None = None) -> float:
    """A finite real number in [minimum, below)."""
    kind = type(value)
    if kind is float or kind is int:  # the common case, checked without ABCs
        v = float(value)
    else:
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if not _is_real(value):
            raise TypeError(f"{where}: expected a real number, got {type(value).__name__}")
        v = float(value)
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


def check_betas(value: Any, where: str) -> tuple[float, float]:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{where}: expected a pair (beta1, beta2), got {value!r}")
    b1 = check_float(value[0], f"{where}[0]", minimum=0.0, below=1.0)
    b2 = check_float(value[1], f"{where}[1]", minimum=0.0, below=1.0)
    return (b1, b2)


def check_eps_style(value: Any, where: str) -> str:
    if value not in EPS_STYLES:
        raise ValueError(f"{where}: expected 'torch' or 'keras', got {value!r}")
    return str(value)


def check_nonfinite(value: Any) -> int:
    if not isinstance(value, str) or value not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite: expected 'propagate', 'skip' or 'raise', got {value!r}")
    return NONFINITE_POLICIES[value]


def check_grad_scale(value: Any) -> float:
    return check_float(value, "grad_scale")


def check_param_array(p: Any, label: str) -> np.ndarray:
    """The rules for a parameter: an in-place-updatable float array."""
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{label}: expected a numpy.ndarray, got {type(p).__name__}")
    if p.dtype not in FLOAT_DTYPES or not p.dtype.isnative:
        raise TypeError(f"{label}: expected dtype float32 or float64 (native byte order), got {p.dtype}")
    if not p.flags.c_contiguous:
        raise ValueError(
            f"{label}: expected a C-contiguous array, got a non-contiguous view "
            "(adamcpp updates buffers in place and never copies; pass a contiguous array)"
        )
    if not p.flags.aligned:
        raise ValueError(f"{label}: expected an aligned array, got a misaligned buffer")
    if not p.flags.writeable:
        raise ValueError(f"{label}: expected a writeable array, got a read-only one")
    return p
