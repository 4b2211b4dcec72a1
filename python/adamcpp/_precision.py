"""Mixed precision and compact state in the Python layer: which dtype a
parameter's state has, whether it carries a float32 master copy, and the
bfloat16 dtype (ml_dtypes, an optional dependency imported only when bfloat16
state is asked for; its arrays are recognised by name everywhere else)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

INSTALL_HINT = "pip install ml_dtypes, or pip install 'adamcpp[bf16]'"


def is_bfloat16(dtype: np.dtype) -> bool:
    """ml_dtypes' bfloat16 (recognised by name: adamcpp never imports ml_dtypes for this)."""
    return dtype.name == "bfloat16" and dtype.itemsize == 2


def is_half(dtype: np.dtype) -> bool:
    """A 16-bit float dtype: float16 or bfloat16."""
    return dtype == np.float16 or is_bfloat16(dtype)


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 dtype; ImportError with the install command without it."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"bfloat16 state needs the ml_dtypes package ({INSTALL_HINT})") from None
    return np.dtype(ml_dtypes.bfloat16)


def bfloat16_available() -> bool:
    """Whether ml_dtypes can be imported (without importing it)."""
    import sys
    from importlib.util import find_spec

    if "ml_dtypes" in sys.modules:
        return sys.modules["ml_dtypes"] is not None
    try:
        return find_spec("ml_dtypes") is not None
    except (ImportError, ValueError):
        return False


def state_dtype(param_dtype: np.dtype, group: Mapping[str, Any]) -> np.dtype:
    """The dtype of exp_avg, exp_avg_sq and max_exp_avg_sq: bfloat16 with
    state_dtype='bfloat16', else float32 for a 16-bit parameter and the
    parameter's own for float32/float64."""
    if group.get("state_dtype", "float32") == "bfloat16":
        return bfloat16()
    return np.dtype(np.float32) if is_half(param_dtype) else np.dtype(param_dtype)


def has_master(param_dtype: np.dtype, group: Mapping[str, Any]) -> bool:
    """A 16-bit parameter keeps a float32 master copy unless master_weights is False."""
    return is_half(param_dtype) and group.get("master_weights") is not False


def check_state_layout(param_dtype: np.dtype, group: Mapping[str, Any], label: str) -> None:
    """bfloat16 state needs a float32 or 16-bit parameter (the native step's rule, checked early)."""
    if group.get("state_dtype", "float32") == "bfloat16" and param_dtype == np.float64:
        raise TypeError(
            f"{label}: state_dtype='bfloat16' needs a float32, float16 or bfloat16 parameter, got float64 "
            "(float64 parameters keep float64 state)"
        )


def entry_dtype(name: str, param_dtype: np.dtype, group: Mapping[str, Any]) -> Optional[np.dtype]:
    """The dtype a loaded Adam state entry takes, or None when the entry does
    not apply (a master copy of a parameter that has none)."""
    if name == "master_param":
        return np.dtype(np.float32) if has_master(param_dtype, group) else None
    return state_dtype(param_dtype, group)


def as_array(value: Any, where: str) -> np.ndarray:
    """np.asarray, with the conversion idiom for torch's bfloat16 tensors,
    which NumPy cannot hold."""
    if str(getattr(value, "dtype", "")) == "torch.bfloat16":
        raise TypeError(
            f"{where}: a torch bfloat16 tensor does not convert with np.asarray; convert it with "
            "t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)"
        )
    return np.asarray(value)


def is_loadable(dtype: np.dtype) -> bool:
    """A floating-point dtype a state array may be loaded from."""
    return dtype.kind == "f" or is_bfloat16(dtype)
