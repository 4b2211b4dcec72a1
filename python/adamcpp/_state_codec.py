"""The state dict codec: a state dict to a JSON document and the named arrays
it refers to, and back, as described at the top of ``checkpoint.py``.

Encoding validates the state dict's layout and refuses what a checkpoint
cannot hold (a plain callable, an unknown type, a dtype the container's table
lacks), naming where it is. Decoding trusts nothing of the document: every
value, tensor reference and schedule is checked, and refused with
``_safetensors.Refused``. Where the bytes go is the container's
(``_safetensors.py``).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, Dict, Iterator, Set, Tuple

import numpy as np

from . import schedules as _schedules
from ._safetensors import RESERVED_NAME, Refused, TensorInfo, as_stored, code_of

_MAX_DEPTH = 64  # nesting of a document value (lists, tuples, dicts, schedules)

# NumPy scalars stored by type and value (their .item() is exact)
_SCALAR_TYPES = frozenset(
    ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")
)

_SCHEDULES: Dict[str, type] = {
    name: getattr(_schedules, name)
    for name in _schedules.__all__
    if name != "Schedule" and isinstance(getattr(_schedules, name), type)
}

_CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")


class _Nested:
    """The depth of the value being coded, bounded by _MAX_DEPTH (a cycle, or a hostile document)."""

    def __init__(self) -> None:
        self._depth = 0

    @contextlib.contextmanager
    def _deeper(self, where: str, error: type) -> Iterator[None]:
        """One level deeper into a value; `error` past _MAX_DEPTH levels."""
        if self._depth >= _MAX_DEPTH:
            raise error(f"{where}: nested too deeply (more than {_MAX_DEPTH} levels: a cycle?)")
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


# -------------------------------------------------------------------- encoding
class _Encoder(_Nested):
    """Turns a state dict into the JSON document and the tensors it refers to."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: Dict[str, Tuple[str, np.ndarray]] = {}  # name -> (code, little-endian C-order data)
        self._where: Dict[str, str] = {}

    def value(self, value: Any, where: str, name: str) -> Any:
        with self._deeper(where, ValueError):
            return self._value(value, where, name)

    def _value(self, value: Any, where: str, name: str) -> Any:
        if value is None or value is True or value is False:
            return value
        if isinstance(value, np.ndarray):
            return self._tensor(value, where, name)
        if isinstance(value, np.generic):
            if value.dtype.name not in _SCALAR_TYPES:
                raise TypeError(f"{where}: a NumPy {value.dtype} scalar cannot be stored in a checkpoint")
            return {"numpy": [value.dtype.name, self.value(value.item(), where, name)]}
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            v = float(value)
            if math.isfinite(v):
                return v
            return {"float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
        if isinstance(value, str):
            return str(value)
        if isinstance(value, _schedules.Schedule):
            return self._schedule(value, where, name)
        if isinstance(value, tuple):
            return {"tuple": [self.value(v, f"{where}[{i}]", f"{name}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.value(v, f"{where}[{i}]", f"{name}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            return {"dict": self.mapping(value, where, name)}
        if callable(value):
            raise TypeError(
                f"{where}: a plain callable ({type(value).__name__}) cannot be saved in a checkpoint; use a schedule "
                "object from adamcpp.schedules (they are saved by their fields), or save without it (a number in "
                "its place) and set it again after loading"
            )
        raise TypeError(
            f"{where}: a {type(value).__name__} cannot be stored in a checkpoint (supported: arrays, numbers, "
            "strings, None, lists, tuples, dicts with str keys and adamcpp.schedules objects)"
        )

    def mapping(self, value: Mapping, where: str, name: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {key!r} ({type(key).__name__})")
            out[key] = self.value(v, f"{where}[{key!r}]", f"{name}.{key}" if name else key)
        return out

    def _schedule(self, value: _schedules.Schedule, where: str, name: str) -> Any:
        cls = type(value)
        if _SCHEDULES.get(cls.__name__) is not cls:
            raise TypeError(
                f"{where}: {cls.__qualname__} is not one of the adamcpp.schedules classes; only those are saved by "
                "their fields (save without it and set it again after loading)"
            )
        fields = {f: self.value(getattr(value, f), f"{where}.{f}", f"{name}.{f}") for f in cls._fields}
        return {"schedule": {"type": cls.__name__, "fields": fields}}

    def _tensor(self, arr: np.ndarray, where: str, name: str) -> Any:
        if isinstance(arr, np.ma.MaskedArray):
            raise TypeError(f"{where}: a masked array cannot be stored in a checkpoint (its mask would be lost)")
        code = code_of(arr)
        if code is None:
            raise TypeError(
                f"{where}: arrays of dtype {arr.dtype} cannot be stored (supported: bfloat16, float16, float32, "
                "float64, signed and unsigned integers, bool)"
            )
        if name == RESERVED_NAME or name in self.tensors:
            other = self._where.get(name, "the file's metadata")
            raise ValueError(f"{where}: its tensor name {name!r} is already taken by {other}; rename one of them")
        self._where[name] = where
        self.tensors[name] = (code, as_stored(arr, code))
        return {"tensor": {"name": name, "dtype": code, "shape": [int(n) for n in arr.shape]}}


def encode_state_dict(state_dict: Any) -> Tuple[Dict[str, Any], Dict[str, Tuple[str, np.ndarray]]]:
    """The document and the tensors (name -> (code, stored array)) of a state dict, validating its layout."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict: expected a mapping (opt.state_dict()), got {type(state_dict).__name__}")
    if "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(
            "state_dict: expected the layout of opt.state_dict(): a mapping with 'state' and 'param_groups'"
        )
    enc = _Encoder()
    groups = state_dict["param_groups"]
    if isinstance(groups, (str, bytes, Mapping)) or not isinstance(groups, (list, tuple)):
        raise TypeError(f"state_dict['param_groups']: expected a list of dicts, got {type(groups).__name__}")
    doc_groups = []
    for gi, group in enumerate(groups):
        where = f"state_dict['param_groups'][{gi}]"
        if not isinstance(group, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{where}: a group needs a 'params' entry")
        doc_groups.append(enc.mapping(group, where, f"param_groups.{gi}"))
    state = state_dict["state"]
    if not isinstance(state, Mapping):
        raise TypeError(f"state_dict['state']: expected a dict from parameter id to state, got {type(state).__name__}")
    doc_state: Dict[str, Any] = {}
    for pid, entry in state.items():
        if isinstance(pid, (bool, np.bool_)) or not isinstance(pid, numbers.Integral) or int(pid) < 0:
            raise TypeError(f"state_dict['state']: parameter ids must be ints >= 0, got {pid!r}")
        where = f"state_dict['state'][{int(pid)}]"
        if str(int(pid)) in doc_state:
            raise ValueError(f"{where}: the parameter id appears twice")
        if not isinstance(entry, Mapping):
            raise TypeError(f"{where}: expected a dict, got {type(entry).__name__}")
        doc_state[str(int(pid))] = enc.mapping(entry, where, f"state.{int(pid)}")
    doc_extra: Dict[str, Any] = {}
    for key, value in state_dict.items():
        if key in ("state", "param_groups"):
            continue
        if not isinstance(key, str):
            raise TypeError(f"state_dict: top-level keys must be strings, got {key!r} ({type(key).__name__})")
        doc_extra[key] = enc.value(value, f"state_dict[{key!r}]", key)
    return {"param_groups": doc_groups, "state": doc_state, "extra": doc_extra}, enc.tensors


# -------------------------------------------------------------------- decoding
class _Decoder(_Nested):
    """The state dict from the JSON document and the tensors read."""

    def __init__(self, tensors: Dict[str, TensorInfo], arrays: Dict[str, np.ndarray]):
        super().__init__()
        self.tensors, self.arrays = tensors, arrays
        self.used: Set[str] = set()

    def mapping(self, doc: Any, where: str) -> Dict[str, Any]:
        if not isinstance(doc, dict):
            raise Refused(f"{where}: expected a JSON object")
        return {key: self.value(v, f"{where}[{key!r}]") for key, v in doc.items()}

    def value(self, doc: Any, where: str) -> Any:
        with self._deeper(where, Refused):
            return self._value(doc, where)

    def _value(self, doc: Any, where: str) -> Any:
        if doc is None or isinstance(doc, (bool, int, float, str)):
            return doc
        if isinstance(doc, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(doc)]
        if not isinstance(doc, dict) or len(doc) != 1:
            raise Refused(f"{where}: expected an encoded value, got {doc!r:.80}")
        ((tag, body),) = doc.items()
        if tag == "tuple" and isinstance(body, list):
            return tuple(self.value(v, f"{where}[{i}]") for i, v in enumerate(body))
        if tag == "dict":
            return self.mapping(body, where)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "numpy" and isinstance(body, list) and len(body) == 2 and body[0] in _SCALAR_TYPES:
            item, dtype = self.value(body[1], where), np.dtype(body[0])
            # save writes the exact value (.item()) of the scalar's own Python type; nothing else is one
            exact = type(item) is {"b": bool, "f": float}.get(dtype.kind, int)
            if exact and dtype.kind in "iu":
                exact = np.iinfo(body[0]).min <= item <= np.iinfo(body[0]).max
            if exact:
                with np.errstate(all="ignore"):
                    scalar = dtype.type(item)
                if scalar.item() == item or (item != item and scalar != scalar):  # the value, or NaN
                    return scalar
            raise Refused(f"{where}: {item!r} is not a NumPy {body[0]} (out of range, or not exactly representable)")
        if tag == "tensor":
            return self._tensor(body, where)
        if tag == "schedule":
            return self._schedule(body, where)
        raise Refused(f"{where}: unknown encoding {doc!r:.80}")

    def _tensor(self, body: Any, where: str) -> np.ndarray:
        if not isinstance(body, dict) or set(body) != {"name", "dtype", "shape"}:
            raise Refused(f"{where}: bad tensor reference {body!r:.80}")
        name = body["name"]
        t = self.tensors.get(name) if isinstance(name, str) else None
        if t is None:
            raise Refused(f"{where}: missing tensor {name!r} (the metadata refers to it, the file does not hold it)")
        if name in self.used:
            raise Refused(f"{where}: tensor {name!r} is referred to twice")
        if body["dtype"] != t.code:
            raise Refused(f"{where}: tensor {name!r} is {t.code} in the file, the metadata says {body['dtype']!r}")
        if body["shape"] != list(t.shape):
            raise Refused(
                f"{where}: tensor {name!r} has shape {list(t.shape)} in the file, the metadata says {body['shape']!r}"
            )
        self.used.add(name)
        return self.arrays[name]

    def _schedule(self, body: Any, where: str) -> Any:
        if not isinstance(body, dict) or set(body) != {"type", "fields"} or not isinstance(body["fields"], dict):
            raise Refused(f"{where}: bad schedule {body!r:.80}")
        cls = _SCHEDULES.get(body["type"]) if isinstance(body["type"], str) else None
        if cls is None:
            raise Refused(f"{where}: unknown schedule type {body['type']!r}")
        fields = body["fields"]
        if set(fields) != set(cls._fields):  # type: ignore[attr-defined]
            raise Refused(f"{where}: a {cls.__name__} needs the fields {list(cls._fields)}, got {list(fields)}")  # type: ignore[attr-defined]
        values = {k: self.value(v, f"{where}.{k}") for k, v in fields.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise Refused(f"{where}: invalid {cls.__name__}: {exc}") from None


def decode_state_dict(document: Any, tensors: Dict[str, TensorInfo], arrays: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The state dict of a document and the file's tensors (name -> header entry, name -> array), each
    tensor referred to exactly once; Refused for anything else."""
    decoder = _Decoder(tensors, arrays)
    if not isinstance(document, dict) or set(document) != {"param_groups", "state", "extra"}:
        raise Refused("damaged: the state dict document needs exactly 'param_groups', 'state' and 'extra'")
    groups = document["param_groups"]
    state = document["state"]
    extra = document["extra"]
    if not isinstance(groups, list) or not isinstance(state, dict) or not isinstance(extra, dict):
        raise Refused("damaged: bad layout of the state dict document")
    out: Dict[str, Any] = {"state": {}}
    for key, entry in state.items():
        if not _CANONICAL_ID.fullmatch(key):
            raise Refused(f"state: bad parameter id {key!r}")
        out["state"][int(key)] = decoder.mapping(entry, f"state[{key}]")
    out["param_groups"] = []
    for gi, group in enumerate(groups):
        decoded = decoder.mapping(group, f"param_groups[{gi}]")
        if "params" not in decoded:
            raise Refused(f"param_groups[{gi}]: no 'params' entry")
        out["param_groups"].append(decoded)
    for key, value in extra.items():
        if key in ("state", "param_groups"):
            raise Refused(f"extra: {key!r} is not an extra entry")
        out[key] = decoder.value(value, f"[{key!r}]")
    unused = [name for name in tensors if name not in decoder.used]
    if unused:
        raise Refused(f"tensor(s) {unused[:5]} are in the file but not in the metadata")
    return out
