"""Checkpoint files: ``save(state_dict, path)`` and ``load(path)`` in safetensors,
written atomically and checksummed, without pickle; nothing else (optimizers
make and take the state dicts).

File layout: a plain safetensors file, so any safetensors reader (NumPy,
PyTorch, JAX) sees the tensors under readable names:

    8 bytes   N, the header's length (little-endian unsigned 64-bit)
    N bytes   the header: canonical JSON (below), padded with spaces so that the
              data starts at a multiple of 8 bytes
    the rest  the tensors' bytes, little-endian, C order, back to back with no
              gap, largest element size first, then by name, so that every
              tensor starts at a multiple of its element size

The header maps each tensor name to ``{"dtype": "F32", "shape": [...],
"data_offsets": [begin, end]}`` and holds ``"__metadata__"``, a map of strings:

    adamcpp.format          "state_dict" (the marker: a file without it is refused)
    adamcpp.format_version  "1", an integer; a reader refuses a newer version
    adamcpp.state_dict      a JSON document: everything of the state dict that is not
                            an array (step counts, hyperparameters of every group,
                            the group layout, entries that are None, schedules, any
                            other top-level entries), with each array replaced by a
                            reference to its tensor
    adamcpp.sha256          the checksum, 64 lowercase hex digits

Canonical JSON is ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True, allow_nan=False)`` encoded as ASCII. The checksum is the
SHA-256 of the canonical JSON of the header without the ``adamcpp.sha256``
entry, followed by the data bytes. A reader accepts a header only if it is,
byte for byte, the canonical JSON of what it parses to, followed by the padding.
So every bit of the file is covered: a change in the header either breaks the
JSON, makes it non-canonical or changes its content (and so the checksum); a
change in the length field moves the boundary between header and data; a
change in the data changes the checksum.

The document ``adamcpp.state_dict`` is ``{"param_groups": [{key: value, ...},
...], "state": {"<id>": {entry: value, ...}, ...}, "extra": {key: value,
...}}`` ("extra": the state dict's other top-level entries, if any), in the
state dict's own order. Values are encoded as:

    None, bool, int, finite float (shortest repr), str, list   themselves
    tuple, dict (str keys)       {"tuple": [...]}, {"dict": {...}}
    non-finite float             {"float": "nan" | "inf" | "-inf"}
    NumPy scalar                 {"numpy": ["float32", value]}
    array                        {"tensor": {"name": ..., "dtype": "F32", "shape": [...]}}
    adamcpp.schedules object     {"schedule": {"type": "WarmupCosineDecay", "fields": {...}}}

Tensor names: ``state.{id}.{entry}`` (``state.0.exp_avg``),
``param_groups.{g}.{key}`` and ``{key}`` for other top-level entries, with
``.{index}`` or ``.{key}`` appended inside tuples, lists and dicts.

bfloat16 arrays (ml_dtypes' bfloat16: bfloat16 state, 16-bit parameters) are
stored as safetensors' "BF16" (the upper halves of float32, little-endian), and
read back as ml_dtypes bfloat16 arrays; a file holding them needs ml_dtypes to
load. The float32 master copy of a 16-bit parameter is the state entry
"master_param", one more tensor under its name.

Growth without a format break: a new state entry is one more tensor under its
name; a new dtype is one more entry in the table, which a reader that predates
it refuses by naming the dtype. ``adamcpp.format_version`` rises only if the
meaning of what is already there changes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import math
import numbers
import os
import platform
import re
import secrets
import stat
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import schedules as _schedules
from ._common import is_bfloat16

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "state_dict"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

_KEY_FORMAT = "adamcpp.format"
_KEY_VERSION = "adamcpp.format_version"
_KEY_DOCUMENT = "adamcpp.state_dict"
_KEY_SHA256 = "adamcpp.sha256"
_METADATA = "__metadata__"
_MAX_HEADER = 100_000_000  # the safetensors limit
_MAX_DIM = 2**62
_MAX_DEPTH = 64  # nesting of a document value (lists, tuples, dicts, schedules)
_CHUNK = 1 << 20  # the bytes save copies and hashes at a time, and load hashes before it reads into arrays
_NAME_MAX = 255  # the longest file name (bytes) of common file systems

# safetensors dtype name -> NumPy dtype as stored (little-endian). Element sizes
# decide the order of the data (largest first), which keeps every tensor aligned.
# "BF16" is stored as its 16-bit patterns and viewed as ml_dtypes' bfloat16 once read.
_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
    "BF16": np.dtype("<u2"),
}
_CODE_OF: Dict[Tuple[str, int], str] = {(dt.kind, dt.itemsize): code for code, dt in _DTYPES.items() if code != "BF16"}
# NumPy scalars stored by type and value (their .item() is exact)
_SCALAR_TYPES = frozenset(
    ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")
)

_SCHEDULES: Dict[str, type] = {
    name: getattr(_schedules, name)
    for name in _schedules.__all__
    if name != "Schedule" and isinstance(getattr(_schedules, name), type)
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9]{1,9}")
_CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")
_TEMP_SUFFIX = re.compile(r"([0-9a-f]{8})-([0-9]{1,10})\.[0-9a-f]{8}\.tmp")  # machine, writer's pid, random


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _padding(header_len: int) -> int:
    return -(8 + header_len) % 8


def _byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array (0-d and empty included)."""
    return arr.reshape(-1).view(np.uint8).data


# ------------------------------------------------------------------- encoding
class _Encoder:
    """Turns a state dict into the JSON document and the tensors it refers to."""

    def __init__(self) -> None:
        self.tensors: Dict[str, Tuple[str, np.ndarray]] = {}  # name -> (code, little-endian C-order data)
        self._where: Dict[str, str] = {}
        self._depth = 0

    def value(self, value: Any, where: str, name: str) -> Any:
        with _nesting(self, where, ValueError):
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
        if is_bfloat16(arr.dtype):
            code: Optional[str] = "BF16"
            arr = np.asarray(arr, order="C").view(np.uint16)  # the 16-bit patterns (a 0-d array stays 0-d)
        else:
            code = _CODE_OF.get((arr.dtype.kind, arr.dtype.itemsize)) if arr.dtype.kind in "biuf" else None
        if code is None:
            raise TypeError(
                f"{where}: arrays of dtype {arr.dtype} cannot be stored (supported: bfloat16, float16, float32, "
                "float64, signed and unsigned integers, bool)"
            )
        if name == _METADATA or name in self.tensors:
            other = self._where.get(name, "the file's metadata")
            raise ValueError(f"{where}: its tensor name {name!r} is already taken by {other}; rename one of them")
        self._where[name] = where
        self.tensors[name] = (code, np.asarray(arr, dtype=_DTYPES[code], order="C"))
        return {"tensor": {"name": name, "dtype": code, "shape": [int(n) for n in arr.shape]}}


@contextlib.contextmanager
def _nesting(coder: Any, where: str, error: type) -> Iterator[None]:
    """One level deeper into a value; `error` past _MAX_DEPTH levels (a cycle, or a hostile document)."""
    if coder._depth >= _MAX_DEPTH:
        raise error(f"{where}: nested too deeply (more than {_MAX_DEPTH} levels: a cycle?)")
    coder._depth += 1
    try:
        yield
    finally:
        coder._depth -= 1


def _encode_state_dict(state_dict: Any) -> Tuple[Dict[str, Any], Dict[str, Tuple[str, np.ndarray]]]:
    """The document and the tensors of a state dict, validating its layout."""
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


# --------------------------------------------------------------------- saving
def save(state_dict: Mapping[str, Any], path: PathLike) -> None:
    """Writes a state dict (``opt.state_dict()``, or a torch.optim one with its
    tensors converted by ``np.asarray``) to ``path`` as a safetensors file.

    Arrays become tensors (``state.0.exp_avg``, ...); step counts,
    hyperparameters, the group layout and ``adamcpp.schedules`` objects (by
    their fields) go into the file's metadata, with a SHA-256 checksum over
    everything. Other top-level entries are stored the same way (arrays as
    tensors), so a training script may add its model parameters and position.

    The write is atomic: a temporary file in the same directory is written,
    flushed to disk and renamed over ``path`` (then the directory is flushed),
    so ``path`` always holds the old file or the new one; on any error the
    temporary file is removed and the error propagates (temporary files of
    ``path`` left by killed writers of this machine are removed first). A
    symbolic link at ``path`` is followed: its target is replaced.

    Nothing is written before the whole state dict is encoded; each array is
    then read once, 1 MiB at a time, as it is written and hashed, so an array
    another thread updates meanwhile is stored as read (a torn snapshot that
    loads) and memory beyond the arrays stays bounded.

    Raises TypeError for a value that cannot be stored (a plain callable ``lr``:
    use a schedule object), ValueError for a malformed state dict (or a value
    nested deeper than 64 levels), IsADirectoryError for a path ending in or
    naming a directory, PermissionError for a write-protected file (no write
    bit, whoever the caller is), OSError for I/O errors.
    """
    document, tensors = _encode_state_dict(state_dict)
    names = sorted(tensors, key=lambda n: (-tensors[n][1].dtype.itemsize, n))
    header: Dict[str, Any] = {}
    offset = 0
    for name in names:
        code, data = tensors[name]
        header[name] = {"dtype": code, "shape": list(data.shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    metadata = {
        _KEY_FORMAT: FORMAT,
        _KEY_VERSION: str(FORMAT_VERSION),
        _KEY_DOCUMENT: json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False),
    }
    header[_METADATA] = metadata
    digest = hashlib.sha256(_canonical(header))  # the header without the checksum, then the data as written
    metadata[_KEY_SHA256] = "0" * 64  # its place, filled in once the data is written
    text = _canonical(header)
    text += b" " * _padding(len(text))
    # The only '"adamcpp.sha256":"' of the header: quotes inside the document's JSON string are escaped.
    at = 8 + text.index(b'"%s":"' % _KEY_SHA256.encode()) + len(_KEY_SHA256) + 4

    def write(fd: int) -> None:
        _write_all(fd, len(text).to_bytes(8, "little") + text)
        buffer = np.empty(min(_CHUNK, offset), np.uint8)
        for name in names:
            data = tensors[name][1].reshape(-1).view(np.uint8)
            for i in range(0, data.size, _CHUNK):
                piece = buffer[: min(_CHUNK, data.size - i)]
                piece[...] = data[i : i + _CHUNK]  # one read of a live array: the bytes hashed are the bytes written
                digest.update(piece.data)
                _write_all(fd, piece)
        os.lseek(fd, at, os.SEEK_SET)
        _write_all(fd, digest.hexdigest().encode("ascii"))

    _write_atomic(path, write)


def _write_all(fd: int, chunk: Any) -> None:
    view = memoryview(chunk)
    while view.nbytes:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _write_atomic(path: PathLike, write: Callable[[int], None]) -> None:
    """Temporary file in the target's directory, write, fsync, rename over the
    target, fsync the directory; the temporary file never outlives an error."""
    label = os.fsdecode(os.fspath(path))
    if os.path.basename(label) in ("", ".", ".."):
        raise IsADirectoryError(
            errno.EISDIR, f"{label}: the path ends in a directory (a trailing separator, '.' or '..'); name a file"
        )
    target = os.path.realpath(label)
    try:
        old: Optional[os.stat_result] = os.stat(target)
    except FileNotFoundError:
        old = None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"{target}: is a directory; name the checkpoint file")
    if old is not None and (not old.st_mode & 0o222 or not os.access(target, os.W_OK)):
        raise PermissionError(
            errno.EACCES,
            f"{target}: write-protected (mode {oct(stat.S_IMODE(old.st_mode))}); adamcpp.save replaces only a file "
            "that could be written (chmod u+w it, or save elsewhere)",
        )
    directory, base = os.path.split(target)
    prefix = _temp_prefix(base)
    machine = hashlib.sha256(platform.node().encode()).hexdigest()[:8]
    _remove_stale(directory, prefix, machine)
    tmp = os.path.join(directory, f"{prefix}{machine}-{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never reuse an existing file; mode 0o666 minus the umask, like open(path, "wb").
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            if old is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, stat.S_IMODE(old.st_mode))  # replacing a file keeps its permissions, as writing would
            write(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _temp_prefix(base: str) -> str:
    """Where a target's temporary file names start: '.{base}.', or a digest of
    a name too long to take the 34 bytes at most that a temporary name adds."""
    if len(os.fsencode(base)) <= _NAME_MAX - 40:
        return f".{base}."
    return f".{hashlib.sha256(os.fsencode(base)).hexdigest()[:32]}.long."


def _remove_stale(directory: str, prefix: str, machine: str) -> None:
    """Removes the temporary files of the same target written on this machine
    by a process that no longer runs (a killed save). Not on Windows, where
    os.kill cannot ask whether a process exists."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            m = _TEMP_SUFFIX.fullmatch(name[len(prefix) :]) if name.startswith(prefix) else None
            if m is not None and m[1] == machine and not _running(int(m[2])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process, or not a pid: left alone
        return True
    return True


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable. Windows cannot open a directory for this, and
    some file systems do not support it (EINVAL): there the rename is all."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


# -------------------------------------------------------------------- loading
class _Refused(ValueError):
    """A problem with the file's content; `load` prefixes the path."""


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {key!r} in JSON")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise _Refused(f"number {text} out of range in JSON")
    return v


def _reject_constant(text: str) -> Any:
    raise _Refused(f"{text} is not allowed in JSON")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_reject_constant
        )
    except _Refused as exc:
        raise _Refused(f"{what} is damaged: {exc}") from None
    except RecursionError:
        raise _Refused(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise _Refused(f"{what} is not valid JSON (damaged?): {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _TensorInfo:
    __slots__ = ("begin", "code", "end", "name", "shape", "used")

    def __init__(self, name: str, info: Any):
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise _Refused(f"tensor {name!r}: expected an entry with dtype, shape and data_offsets, got {info!r}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _DTYPES:
            raise _Refused(f"tensor {name!r}: dtype {code!r} is not supported by this adamcpp")
        if not isinstance(shape, list) or not all(_is_int(n) and 0 <= n <= _MAX_DIM for n in shape):
            raise _Refused(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise _Refused(f"tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _Refused(
                f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but its shape "
                f"{shape} and dtype {code} need {nbytes}"
            )
        self.name, self.code, self.shape = name, code, tuple(shape)
        self.begin, self.end = offsets
        self.used = False


def _read_header(f: Any, size: int) -> Tuple[Dict[str, Any], List[_TensorInfo], str]:
    """Validates everything before the data: (header, tensors by offset, recorded checksum)."""
    if size < 8:
        raise _Refused(f"truncated: {size} byte(s), less than the 8-byte header length a safetensors file starts with")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise _Refused(
            f"truncated, or not a safetensors file: the header length field says {n} bytes, but only {size - 8} follow"
        )
    if n > _MAX_HEADER:
        raise _Refused(f"not a safetensors file: a header of {n} bytes exceeds the format's limit of {_MAX_HEADER}")
    raw = f.read(n)
    if len(raw) != n:
        raise _Refused("truncated while reading the header")
    if not raw.startswith(b"{"):
        raise _Refused("not a safetensors file: the header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused("not a safetensors file, or a damaged one: the header is not UTF-8") from None
    header = _parse_json(text.rstrip(" "), "the header")
    if not isinstance(header, dict):
        raise _Refused("not a safetensors file: the header is not a JSON object")
    metadata = header.get(_METADATA)
    if metadata is None or not isinstance(metadata, dict) or _KEY_FORMAT not in metadata:
        raise _Refused(
            f"not an adamcpp checkpoint: the file's metadata has no {_KEY_FORMAT!r} entry "
            "(a safetensors file written by something else?)"
        )
    if not all(isinstance(v, str) for v in metadata.values()):
        raise _Refused("damaged: the metadata must map strings to strings")
    if metadata[_KEY_FORMAT] != FORMAT:
        raise _Refused(f"not an adamcpp state dict: {_KEY_FORMAT} is {metadata[_KEY_FORMAT]!r}, expected {FORMAT!r}")
    version = metadata.get(_KEY_VERSION)
    if version is None or not _VERSION.fullmatch(version) or int(version) < 1:
        raise _Refused(f"damaged: {_KEY_VERSION} is {version!r}, expected a positive integer")
    if int(version) > FORMAT_VERSION:
        from . import __version__

        raise _Refused(
            f"written in checkpoint format version {int(version)}, newer than this adamcpp ({__version__}) reads "
            f"(up to {FORMAT_VERSION}): upgrade adamcpp (or the file is damaged)"
        )
    recorded = metadata.get(_KEY_SHA256)
    if recorded is None or not _HEX64.fullmatch(recorded):
        raise _Refused(f"damaged: {_KEY_SHA256} is missing or malformed")
    if _KEY_DOCUMENT not in metadata:
        raise _Refused(f"damaged: the metadata has no {_KEY_DOCUMENT!r} entry")
    canonical = _canonical(header)
    if raw != canonical + b" " * _padding(len(canonical)):
        raise _Refused("damaged: the header is not in canonical form (edited, or a changed byte)")
    # by offset; an empty tensor sorts before a non-empty one at the same offset
    tensors = sorted((_TensorInfo(k, v) for k, v in header.items() if k != _METADATA), key=lambda t: (t.begin, t.end))
    data_size = size - 8 - n
    position = 0
    for t in tensors:
        if t.begin != position:
            raise _Refused(f"damaged: tensor {t.name!r} starts at byte {t.begin} of the data, expected {position}")
        position = t.end
    if position > data_size:
        raise _Refused(f"truncated: the tensors need {position} bytes of data, the file has {data_size}")
    if position < data_size:
        raise _Refused(f"damaged: {data_size - position} byte(s) after the last tensor")
    return header, tensors, recorded


def _read_into(f: Any, view: memoryview) -> None:
    while view.nbytes:
        got = f.readinto(view)
        if not got:
            raise _Refused("truncated while reading the tensors (did the file change?)")
        view = view[got:]


class _Decoder:
    """The state dict from the JSON document and the tensors read."""

    def __init__(self, tensors: Dict[str, _TensorInfo], arrays: Dict[str, np.ndarray]):
        self.tensors, self.arrays = tensors, arrays
        self._depth = 0

    def mapping(self, doc: Any, where: str) -> Dict[str, Any]:
        if not isinstance(doc, dict):
            raise _Refused(f"{where}: expected a JSON object")
        return {key: self.value(v, f"{where}[{key!r}]") for key, v in doc.items()}

    def value(self, doc: Any, where: str) -> Any:
        with _nesting(self, where, _Refused):
            return self._value(doc, where)

    def _value(self, doc: Any, where: str) -> Any:
        if doc is None or isinstance(doc, (bool, int, float, str)):
            return doc
        if isinstance(doc, list):
            return [self.value(v, f"{where}[{i}]") for i, v in enumerate(doc)]
        if not isinstance(doc, dict) or len(doc) != 1:
            raise _Refused(f"{where}: expected an encoded value, got {doc!r:.80}")
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
            raise _Refused(f"{where}: {item!r} is not a NumPy {body[0]} (out of range, or not exactly representable)")
        if tag == "tensor":
            return self._tensor(body, where)
        if tag == "schedule":
            return self._schedule(body, where)
        raise _Refused(f"{where}: unknown encoding {doc!r:.80}")

    def _tensor(self, body: Any, where: str) -> np.ndarray:
        if not isinstance(body, dict) or set(body) != {"name", "dtype", "shape"}:
            raise _Refused(f"{where}: bad tensor reference {body!r:.80}")
        name = body["name"]
        t = self.tensors.get(name) if isinstance(name, str) else None
        if t is None:
            raise _Refused(f"{where}: missing tensor {name!r} (the metadata refers to it, the file does not hold it)")
        if t.used:
            raise _Refused(f"{where}: tensor {name!r} is referred to twice")
        if body["dtype"] != t.code:
            raise _Refused(f"{where}: tensor {name!r} is {t.code} in the file, the metadata says {body['dtype']!r}")
        if body["shape"] != list(t.shape):
            raise _Refused(
                f"{where}: tensor {name!r} has shape {list(t.shape)} in the file, the metadata says {body['shape']!r}"
            )
        t.used = True
        return self.arrays[name]

    def _schedule(self, body: Any, where: str) -> Any:
        if not isinstance(body, dict) or set(body) != {"type", "fields"} or not isinstance(body["fields"], dict):
            raise _Refused(f"{where}: bad schedule {body!r:.80}")
        cls = _SCHEDULES.get(body["type"]) if isinstance(body["type"], str) else None
        if cls is None:
            raise _Refused(f"{where}: unknown schedule type {body['type']!r}")
        fields = body["fields"]
        if set(fields) != set(cls._fields):  # type: ignore[attr-defined]
            raise _Refused(f"{where}: a {cls.__name__} needs the fields {list(cls._fields)}, got {list(fields)}")  # type: ignore[attr-defined]
        values = {k: self.value(v, f"{where}.{k}") for k, v in fields.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise _Refused(f"{where}: invalid {cls.__name__}: {exc}") from None


def _decode_state_dict(document: Any, decoder: _Decoder) -> Dict[str, Any]:
    if not isinstance(document, dict) or set(document) != {"param_groups", "state", "extra"}:
        raise _Refused("damaged: the state dict document needs exactly 'param_groups', 'state' and 'extra'")
    groups = document["param_groups"]
    state = document["state"]
    extra = document["extra"]
    if not isinstance(groups, list) or not isinstance(state, dict) or not isinstance(extra, dict):
        raise _Refused("damaged: bad layout of the state dict document")
    out: Dict[str, Any] = {"state": {}}
    for key, entry in state.items():
        if not _CANONICAL_ID.fullmatch(key):
            raise _Refused(f"state: bad parameter id {key!r}")
        out["state"][int(key)] = decoder.mapping(entry, f"state[{key}]")
    out["param_groups"] = []
    for gi, group in enumerate(groups):
        decoded = decoder.mapping(group, f"param_groups[{gi}]")
        if "params" not in decoded:
            raise _Refused(f"param_groups[{gi}]: no 'params' entry")
        out["param_groups"].append(decoded)
    for key, value in extra.items():
        if key in ("state", "param_groups"):
            raise _Refused(f"extra: {key!r} is not an extra entry")
        out[key] = decoder.value(value, f"[{key!r}]")
    unused = [name for name, t in decoder.tensors.items() if not t.used]
    if unused:
        raise _Refused(f"tensor(s) {unused[:5]} are in the file but not in the metadata")
    return out


def load(path: PathLike) -> Dict[str, Any]:
    """Reads a state dict written by ``save``: ``opt.load_state_dict(adamcpp.load(path))``.

    Everything is verified before anything is returned: the format marker and
    version, the header's canonical form, the tensor table, the SHA-256 checksum
    over metadata, table and data, and that the metadata and the tensors agree.
    The checksum is verified through a fixed buffer before any array is written
    to, then again as the data is read into the arrays (the data is read twice).
    A truncated, damaged or foreign file, or one in a newer format version, or
    one announcing tensors that cannot be allocated, raises ValueError naming
    the file and the problem (OSError for I/O errors).
    Arrays are new, writeable and owned by the returned dict (never views of
    the file); schedules are rebuilt from their fields. No pickle, no np.load.
    """
    label = os.fsdecode(os.fspath(path))
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, infos, recorded = _read_header(f, size)  # the tensors' sizes add up to the file's
            metadata = header[_METADATA]
            bfloat16 = _bfloat16_for(infos)
            start = f.tell()
            arrays = {t.name: _allocate(t) for t in infos}  # address space: no page is written before the checksum
            buffer = memoryview(bytearray(min(_CHUNK, size - start)))
            pieces = (buffer[: min(_CHUNK, size - i)] for i in range(start, size, _CHUNK))
            if not hmac.compare_digest(_digest(f, header, pieces), recorded):
                raise _Refused(
                    "checksum mismatch: the file is damaged (the SHA-256 of its header and data differs from the "
                    "one it records)"
                )
            f.seek(start)  # into the arrays, verified again: what is returned is what was verified
            if not hmac.compare_digest(_digest(f, header, (_byte_view(a) for a in arrays.values())), recorded):
                raise _Refused("the file changed while it was read (its checksum held, then did not)")
        for t in infos:
            arr = arrays[t.name]
            arr = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
            arrays[t.name] = arr.view(bfloat16) if t.code == "BF16" and bfloat16 is not None else arr
        document = _parse_json(metadata[_KEY_DOCUMENT], "the state dict document")
        return _decode_state_dict(document, _Decoder({t.name: t for t in infos}, arrays))
    except _Refused as exc:
        raise ValueError(f"{label}: {exc}") from None


def _allocate(t: _TensorInfo) -> np.ndarray:
    try:
        return np.empty(t.shape, dtype=_DTYPES[t.code])
    except (ValueError, MemoryError) as exc:  # more than memory holds, or a zero-size shape of absurd dimensions
        raise _Refused(
            f"tensor {t.name!r}: {t.code} {list(t.shape)} ({t.end - t.begin} bytes) cannot be allocated ({exc})"
        ) from None


def _digest(f: Any, header: Dict[str, Any], views: Iterable[memoryview]) -> str:
    """The checksum of the header and of the data read into `views`, in order."""
    digest = hashlib.sha256(_canonical(_without_checksum(header)))
    for view in views:
        _read_into(f, view)
        digest.update(view)
    return digest.hexdigest()


def _bfloat16_for(infos: List[_TensorInfo]) -> Optional[np.dtype]:
    """ml_dtypes' bfloat16 when the file holds BF16 tensors (refused without ml_dtypes)."""
    names = [t.name for t in infos if t.code == "BF16"]
    if not names:
        return None
    try:
        import ml_dtypes
    except ImportError:
        raise _Refused(
            f"tensor {names[0]!r} is BF16 (bfloat16), which needs the ml_dtypes package to load "
            "(pip install ml_dtypes, or pip install 'adamcpp[bf16]')"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _without_checksum(header: Dict[str, Any]) -> Dict[str, Any]:
    """The header as the checksum sees it: without the adamcpp.sha256 entry."""
    return {**header, _METADATA: {k: v for k, v in header[_METADATA].items() if k != _KEY_SHA256}}
