"""adamcpp on CUDA devices (the optional CUDA unit).

The optimizers, `functional.adam` and `global_norm` take CUDA arrays as well as
NumPy arrays: PyTorch CUDA tensors and CuPy arrays (read through DLPack), Numba
device arrays (the CUDA array interface) and adamcpp's own `DeviceArray`. They
are updated in place on their device, with the CPU path's rules and messages,
and the same bits. JAX arrays are read (as gradients) but never written: JAX
caches, donates and reuses its buffers. This module holds the device side's public names
and the helpers the optimizers use; see docs/api.md, "CUDA".

Nothing here touches CUDA until asked: `available()`, `info()` and the first
step on device arrays initialise the CUDA driver (not a context).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._core import CudaWorkspace, DeviceArray

#: Whether this build has the CUDA unit (nvcc was found when it was built). Every build has the CUDA entries of
#: adamcpp._core; without the unit they refuse to touch a device.
COMPILED: bool = bool(_core.cuda_compiled)

_NOT_COMPILED = (
    "adamcpp was built without the CUDA unit (no nvcc was found when it was built, or ADAMCPP_CUDA=OFF); "
    "reinstall with nvcc on the PATH (or CUDACXX set) to build it"
)
# DLPack device types of CUDA memory: kDLCUDA, kDLCUDAManaged.
_CUDA_DEVICE_TYPES = (2, 13)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def info() -> Dict[str, Any]:
    """What the CUDA unit is and found: `compiled`, `toolkit` (the nvcc that built it), `architectures`
    (sm_XY machine code, compute_XY PTX), `runtime_version`, `driver_version` (None without a driver),
    `device_count`, `devices` (index, name, compute capability, memory, usable), `available`, and
    `reason` (why not available, else None)."""
    if not COMPILED:
        return {
            "compiled": False,
            "toolkit": None,
            "architectures": [],
            "runtime_version": None,
            "driver_version": None,
            "device_count": 0,
            "devices": [],
            "available": False,
            "reason": _NOT_COMPILED,
        }
    return dict(_core.cuda_info())


def available() -> bool:
    """Whether CUDA arrays can be stepped here: the unit is compiled, a driver answers, and a visible
    device can run its code. `info()["reason"]` says why not."""
    return bool(info()["available"])


def require_compiled(what: str) -> None:
    """Refuses a CUDA array in a build without the CUDA unit, naming it."""
    if not COMPILED:
        raise TypeError(f"{what}: a CUDA array, but {_NOT_COMPILED}")


def is_cuda_array(obj: Any) -> bool:
    """Whether `obj` presents CUDA memory: a DeviceArray, an object whose `__dlpack_device__` is a CUDA
    device, or one with `__cuda_array_interface__`. Asks nothing of CUDA."""
    if isinstance(obj, np.ndarray):
        return False
    if DeviceArray is not None and type(obj) is DeviceArray:
        return True
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None:
        try:
            return int(device()[0]) in _CUDA_DEVICE_TYPES
        except Exception:
            return False
    try:
        return getattr(obj, "__cuda_array_interface__", None) is not None
    except Exception:  # an exporter that refuses (a torch tensor that requires grad) is still one
        return True


def is_jax_array(obj: Any) -> bool:
    """Whether `obj` is a JAX array, recognised by its type's module (jax or jaxlib; JAX is never imported)."""
    module = getattr(type(obj), "__module__", None)
    return isinstance(module, str) and module.partition(".")[0] in ("jax", "jaxlib")


def refuse_jax(obj: Any, label: str) -> None:
    """Refuses a JAX array as an array that a step writes (a parameter or a state array), naming it."""
    if is_jax_array(obj):
        raise TypeError(
            f"{label}: a JAX array cannot be updated in place (JAX arrays are immutable: JAX caches, donates and "
            "reuses their buffers, so writing into one is a correctness hazard); keep a writable copy as the "
            "parameter (`adamcpp.cuda.to_device(np.asarray(x))`, or a CuPy or torch array; `np.array(x)` on the "
            "CPU), pass it to JAX as `jnp.asarray(p)`, and pass JAX gradients as they are (they are only read)"
        )


def _dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in _FLOAT_DTYPES or not dt.isnative:
        raise TypeError(f"dtype: expected float32 or float64, got {dt}")
    return dt


def zeros(shape: Any, dtype: Any = np.float32, device: int = 0) -> DeviceArray:
    """A DeviceArray of zeros (float32 or float64) on CUDA device `device`."""
    require_compiled("zeros")
    return _core.cuda_zeros(shape, _dtype(dtype), device)


def empty(shape: Any, dtype: Any = np.float32, device: int = 0) -> DeviceArray:
    """An uninitialised DeviceArray."""
    require_compiled("empty")
    return _core.cuda_empty(shape, _dtype(dtype), device)


def to_device(array: Any, device: int = 0) -> DeviceArray:
    """A DeviceArray holding a copy of a float32/float64 array (copied to C order first if needed)."""
    require_compiled("to_device")
    host = np.asarray(array)
    _dtype(host.dtype)
    return _core.cuda_from_host(np.ascontiguousarray(host), device)


def to_numpy(array: Any, what: str = "array") -> np.ndarray:
    """A NumPy copy of a C-contiguous float32/float64 CUDA array (any of the accepted kinds); waits for it."""
    require_compiled(what)
    if DeviceArray is not None and type(array) is DeviceArray:
        return array.numpy()
    return _core.cuda_to_host(array, what)


def synchronize(device: int = 0) -> None:
    """Waits for everything queued on `device`."""
    require_compiled("synchronize")
    _core.cuda_synchronize(device)


def launch_counts() -> Dict[str, int]:
    """Kernel launches (and table uploads) of the CUDA unit since the process started, by kind: how many
    launches a step made is the difference of two readings."""
    return dict(_core.cuda_launch_counts()) if COMPILED else {}


def _rebuild_device_array(host: np.ndarray, device: int) -> DeviceArray:
    """How a pickled DeviceArray comes back (its contents were saved to the host)."""
    return to_device(host, device)


class OptimizerDevice:
    """What an optimizer of CUDA arrays owns besides the CPU optimizer's runtime: its workspace (a ring of
    upload slots, made on the first step) and the device of its parameters. Never copied."""

    def __init__(self, first_param: Any, label: str) -> None:
        require_compiled(label)
        self.first_param = first_param
        self.workspace: CudaWorkspace = _core.CudaWorkspace()
        self._device: Optional[int] = None

    @property
    def device(self) -> int:
        """The device of the optimizer's parameters (params[0]'s)."""
        if self._device is None:
            seen = _core.cuda_inspect(self.first_param)
            device = int(seen["device"])
            if device < 0:  # an interface pointer: only CUDA can tell
                device = int(_core.cuda_pointer_device(int(seen["ptr"])))
            self._device = device
        return self._device

    @staticmethod
    def check_param(p: Any, label: str) -> Dict[str, Any]:
        """The parameter rules; what the parser saw (device, shape, dtype, ...)."""
        return dict(_core.cuda_check_param(p, label))

    @staticmethod
    def layout(p: Any) -> Tuple[Tuple[int, ...], np.dtype]:
        """The shape and dtype of a device array (read without CUDA)."""
        seen = _core.cuda_inspect(p)
        return tuple(seen["shape"]), np.dtype(seen["dtype"])

    def upload(self, host: np.ndarray) -> DeviceArray:
        return _core.cuda_from_host(np.ascontiguousarray(host), self.device)

    def pending_norm(self) -> float:
        return float(self.workspace.pending_norm())


def same_device(seen: Dict[str, Any], first: Dict[str, Any], label: str) -> None:
    """The one-device rule at construction, where the producers said (an interface array's device is
    checked at the first step)."""
    if seen["device"] >= 0 and first["device"] >= 0 and seen["device"] != first["device"]:
        raise ValueError(
            f"{label}: expected an array on cuda:{first['device']} like params[0] (one device per optimizer), "
            f"got one on cuda:{seen['device']}"
        )


__all__: List[str] = [
    "COMPILED",
    "DeviceArray",
    "available",
    "empty",
    "info",
    "is_cuda_array",
    "is_jax_array",
    "launch_counts",
    "synchronize",
    "to_device",
    "to_numpy",
    "zeros",
]
