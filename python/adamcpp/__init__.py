"""adamcpp: the fastest, most trustworthy Adam optimizer for NumPy.

Fused multi-tensor Adam/AdamW kernels (OpenMP + SIMD, chosen at run time) that
update NumPy parameters in place, under a thin Python layer that owns the
optimizer state and hyperparameters.
"""

from __future__ import annotations

import os as _os
from typing import Any, Dict, Optional

from . import _core, _precision, checkpoint, cuda, functional, schedules
from ._validation import describe_number as _describe_number
from .checkpoint import load, save
from .flat import FlatParams
from .optim import SGD, Adam, AdamW, Optimizer, global_norm

__version__: str = _core.version

# ADAMCPP_SIMD=<target> forces a SIMD target; an unknown name (ValueError) or a
# target this CPU lacks (RuntimeError) fails the import with that message.
_forced = _os.environ.get("ADAMCPP_SIMD", "").strip()
if _forced:
    _core.select_simd(_forced)


def get_num_threads() -> int:
    """Threads a step uses: the count given to set_num_threads, else OpenMP's limit for the calling thread
    (OMP_NUM_THREADS, threadpoolctl's threadpool_limits, else the number of cores), read at every step."""
    return _core.get_num_threads()


_MAX_THREADS = 2**31 - 1


def set_num_threads(n: Optional[int]) -> None:
    """Sets the threads a step uses (an int >= 1), or with None follows OpenMP's limit again (the default).
    Results do not depend on it."""
    if n is None:
        _core.set_num_threads(0)
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int >= 1 or None, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n: expected an int >= 1, got {n}")
    if n > _MAX_THREADS:
        raise ValueError(f"n: expected an int <= {_MAX_THREADS} (a native int), got {_describe_number(n)}")
    _core.set_num_threads(n)


def cuda_available() -> bool:
    """Whether CUDA arrays can be stepped here (the CUDA unit is compiled, a driver answers and a visible
    device can run its code); build_info()["cuda"]["reason"] says why not."""
    return cuda.available()


def build_info() -> Dict[str, Any]:
    """What was compiled and what was chosen at run time."""
    targets = list(_core.compiled_targets())
    return {
        "version": _core.version,
        "openmp": bool(_core.openmp),
        "simd_targets": targets,
        "simd_supported": [t for t in targets if _core.target_supported(t)],
        "simd": _core.simd(),
        "cuda": cuda.info(),
        "compiler": _core.compiler,
        "num_threads": _core.get_num_threads(),
        "chunk_elements": int(_core.chunk_elements),
        "parallel_min_elements": int(_core.parallel_min_elements),
        "precisions": {
            "param_dtypes": ["float16", "bfloat16", "float32", "float64"],
            "grad_dtypes": ["float16", "bfloat16", "float32", "float64"],
            "state_dtypes": list(_core.STATE_DTYPES),
            "roundings": list(_core.ROUNDINGS),
            "fused_layouts": ["bf16-state", "bf16-master", "bf16"],
            "bfloat16": _precision.bfloat16_available(),
        },
    }


__all__ = [
    "Adam",
    "AdamW",
    "SGD",
    "global_norm",
    "Optimizer",
    "FlatParams",
    "save",
    "load",
    "checkpoint",
    "functional",
    "schedules",
    "get_num_threads",
    "set_num_threads",
    "build_info",
    "cuda",
    "cuda_available",
    "__version__",
]
