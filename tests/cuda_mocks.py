"""Stand-ins for CUDA arrays that need no GPU: a DLPack producer whose capsules
are built with ctypes (with the producer's side of the capsule protocol, and a
count of the tensors it released), and a CUDA array interface exporter.

Their pointers are made up: the CUDA entries validate everything without
touching memory or CUDA, so a test can drive every rule, and see a valid call
reach the device stage (where, without a GPU, it stops with "CUDA is not
available").
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

KDL_CPU, KDL_CUDA, KDL_CUDA_HOST, KDL_CUDA_MANAGED = 1, 2, 3, 13
KDL_INT, KDL_UINT, KDL_FLOAT, KDL_BFLOAT = 0, 1, 2, 4
READ_ONLY = 1


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", DELETER)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", DELETER),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_api = ctypes.pythonapi
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, _CAPSULE_DESTRUCTOR]
_api.PyCapsule_IsValid.restype = ctypes.c_int
_api.PyCapsule_IsValid.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_api.PyCapsule_GetPointer.restype = ctypes.c_void_p
_api.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

VERSIONED = b"dltensor_versioned"
UNVERSIONED = b"dltensor"
MISSING = object()  # FakeInterface(version=MISSING): an interface without a 'version'
_addresses = itertools.count(1 << 32, 1 << 24)  # made-up device addresses, 16 MiB apart


def fake_address() -> int:
    return next(_addresses)


class Ledger:
    """What the producers made and released: every capsule must be released exactly once."""

    def __init__(self) -> None:
        self.made = 0
        self.released = 0
        self.calls: List[Dict[str, Any]] = []


LEDGER = Ledger()
_keep: Dict[int, Any] = {}  # the ctypes structures behind live capsules, by address


@DELETER
def _deleter(address: int) -> None:
    LEDGER.released += 1
    _keep.pop(address, None)


def _destroy(capsule: int) -> None:
    # The producer's side: a capsule nobody consumed still owns its tensor.
    for name, kind in ((VERSIONED, DLManagedTensorVersioned), (UNVERSIONED, DLManagedTensor)):
        if _api.PyCapsule_IsValid(capsule, name):
            address = _api.PyCapsule_GetPointer(capsule, name)
            kind.from_address(address).deleter(address)
            return


_destroy_capsule = _CAPSULE_DESTRUCTOR(_destroy)


class FakeDLPack:
    """A DLPack producer (like a torch CUDA tensor) of made-up device memory."""

    def __init__(
        self,
        shape: Sequence[int],
        dtype: Tuple[int, int] = (KDL_FLOAT, 32),
        *,
        device: int = 0,
        device_type: int = KDL_CUDA,
        address: Optional[int] = None,
        strides: Optional[Sequence[int]] = None,
        read_only: bool = False,
        versioned: bool = True,
        refuse: Optional[BaseException] = None,
        lanes: int = 1,
        byte_offset: int = 0,
    ) -> None:
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = device
        self.device_type = device_type
        self.address = fake_address() if address is None else address
        self.strides = strides
        self.read_only = read_only
        self.versioned = versioned
        self.refuse = refuse
        self.lanes = lanes
        self.byte_offset = byte_offset

    def __dlpack_device__(self) -> Tuple[int, int]:
        return (self.device_type, self.device)

    def __dlpack__(self, *, stream: Any = None, max_version: Any = None) -> Any:
        LEDGER.calls.append({"stream": stream, "max_version": max_version})
        if self.refuse is not None:
            raise self.refuse
        shape = (ctypes.c_int64 * max(1, len(self.shape)))(*self.shape)
        strides = None if self.strides is None else (ctypes.c_int64 * len(self.strides))(*self.strides)
        tensor = DLTensor(
            self.address,
            DLDevice(self.device_type, self.device),
            len(self.shape),
            DLDataType(self.dtype[0], self.dtype[1], self.lanes),
            ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64)),
            ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64)) if strides is not None else None,
            self.byte_offset,
        )
        if self.versioned and max_version is not None and max_version[0] >= 1:
            managed: Any = DLManagedTensorVersioned(DLPackVersion(1, 0), None, _deleter, READ_ONLY * self.read_only,
                                                    tensor)
            name = VERSIONED
        else:
            managed = DLManagedTensor(tensor, None, _deleter)
            name = UNVERSIONED
        address = ctypes.addressof(managed)
        _keep[address] = (managed, shape, strides)
        LEDGER.made += 1
        return _api.PyCapsule_New(address, name, _destroy_capsule)


class OldFakeDLPack(FakeDLPack):
    """A producer from before DLPack 1.0: no max_version keyword, unversioned capsules."""

    def __dlpack__(self, *, stream: Any = None) -> Any:  # type: ignore[override]
        return super().__dlpack__(stream=stream)


class FakeInterface:
    """A CUDA array interface exporter (like a Numba device array) of made-up device memory."""

    def __init__(
        self,
        shape: Sequence[int],
        typestr: str = "<f4",
        *,
        address: Optional[int] = None,
        strides: Optional[Sequence[int]] = None,
        read_only: bool = False,
        version: Any = 3,
        stream: Optional[int] = None,
        mask: Any = None,
    ) -> None:
        self.interface: Dict[str, Any] = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (fake_address() if address is None else address, read_only),
            "strides": None if strides is None else tuple(strides),
        }
        if version is not MISSING:
            self.interface["version"] = version
        if not isinstance(version, int) or version >= 3:
            self.interface["stream"] = stream
        if mask is not None:
            self.interface["mask"] = mask

    @property
    def __cuda_array_interface__(self) -> Dict[str, Any]:
        return dict(self.interface)


def like(a: np.ndarray, kind: str = "dlpack", **kwargs: Any) -> Any:
    """A fake device array with a's shape and dtype."""
    if kind == "dlpack":
        return FakeDLPack(a.shape, (KDL_FLOAT, a.dtype.itemsize * 8), **kwargs)
    return FakeInterface(a.shape, a.dtype.str, **kwargs)


class FakeJaxArray(FakeDLPack):
    """A DLPack producer whose type lives in JAX's modules, as a JAX CUDA array's does: adamcpp reads it as a
    gradient but refuses to write into it (recognised by the type's module; JAX is never imported)."""


FakeJaxArray.__module__ = "jaxlib.xla_extension"


class FakeJaxSrcArray(FakeDLPack):
    """The same stand-in under jax's own module name."""


FakeJaxSrcArray.__module__ = "jax._src.array"
