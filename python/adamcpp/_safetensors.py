"""The checkpoint container: a safetensors file of named arrays and one JSON
document in its metadata, checksummed and written atomically.

The file's layout is described at the top of ``checkpoint.py``. This module
owns everything of it but the document's meaning: the dtype table, the header
(canonical JSON, the format marker and version, the checksum), the order and
alignment of the data, the atomic write through a temporary file (and the
removal of those a killed writer left), and a read that verifies everything
before it returns. What the document and the tensor names mean is the state
dict codec's (``_state_codec.py``); a change of that meaning raises
``FORMAT_VERSION`` here.

Problems with a file's content raise ``Refused``, which the caller prefixes
with the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import math
import os
import platform
import re
import secrets
import stat
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _core
from ._precision import INSTALL_HINT, is_bfloat16

FORMAT = "state_dict"
FORMAT_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]

# The name safetensors reserves for the metadata: no tensor may take it.
RESERVED_NAME = "__metadata__"

_KEY_FORMAT = "adamcpp.format"
_KEY_VERSION = "adamcpp.format_version"
_KEY_DOCUMENT = "adamcpp.state_dict"
_KEY_SHA256 = "adamcpp.sha256"
_MAX_HEADER = 100_000_000  # the safetensors limit
_MAX_DIM = 2**62
_CHUNK = 1 << 20  # the bytes write copies and hashes at a time, and read hashes before it reads into arrays
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

_HEX64 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9]{1,9}")
_TEMP_SUFFIX = re.compile(r"([0-9a-f]{8})-([0-9]{1,10})\.[0-9a-f]{8}\.tmp")  # machine, writer's pid, random


class Refused(ValueError):
    """A problem with the file's content; the caller prefixes the path."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _padding(header_len: int) -> int:
    return -(8 + header_len) % 8


def _byte_view(arr: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array (0-d and empty included)."""
    return arr.reshape(-1).view(np.uint8).data


# ---------------------------------------------------------------------- dtypes
def code_of(arr: np.ndarray) -> Optional[str]:
    """The safetensors dtype name an array is stored under, None for a dtype the table lacks."""
    if is_bfloat16(arr.dtype):
        return "BF16"
    return _CODE_OF.get((arr.dtype.kind, arr.dtype.itemsize)) if arr.dtype.kind in "biuf" else None


def as_stored(arr: np.ndarray, code: str) -> np.ndarray:
    """An array as the file holds it under `code` (code_of's): little-endian, C
    order, bfloat16 as its 16-bit patterns (a 0-d array stays 0-d)."""
    if code == "BF16":
        arr = np.asarray(arr, order="C").view(np.uint16)
    return np.asarray(arr, dtype=_DTYPES[code], order="C")


# --------------------------------------------------------------------- writing
def write(path: PathLike, document: Any, tensors: Dict[str, Tuple[str, np.ndarray]]) -> None:
    """Writes `document` (JSON, kept in its own key order) and `tensors` (name ->
    (code, as_stored's array)) to `path`, atomically. Each array is read once,
    1 MiB at a time, as it is written and hashed."""
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
    header[RESERVED_NAME] = metadata
    digest = hashlib.sha256(_canonical(header))  # the header without the checksum, then the data as written
    metadata[_KEY_SHA256] = "0" * 64  # its place, filled in once the data is written
    text = _canonical(header)
    text += b" " * _padding(len(text))
    # The only '"adamcpp.sha256":"' of the header: quotes inside the document's JSON string are escaped.
    at = 8 + text.index(b'"%s":"' % _KEY_SHA256.encode()) + len(_KEY_SHA256) + 4

    def write_file(fd: int) -> None:
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

    _write_atomic(path, write_file)


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


# --------------------------------------------------------------------- reading
def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise Refused(f"duplicate key {key!r} in JSON")
        out[key] = value
    return out


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise Refused(f"number {text} out of range in JSON")
    return v


def _reject_constant(text: str) -> Any:
    raise Refused(f"{text} is not allowed in JSON")


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(
            text, object_pairs_hook=_no_duplicates, parse_float=_finite_float, parse_constant=_reject_constant
        )
    except Refused as exc:
        raise Refused(f"{what} is damaged: {exc}") from None
    except RecursionError:
        raise Refused(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise Refused(f"{what} is not valid JSON (damaged?): {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TensorInfo:
    """A tensor of the header: its name, dtype name, shape and place in the data."""

    __slots__ = ("begin", "code", "end", "name", "shape")

    def __init__(self, name: str, info: Any):
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise Refused(f"tensor {name!r}: expected an entry with dtype, shape and data_offsets, got {info!r}")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in _DTYPES:
            raise Refused(f"tensor {name!r}: dtype {code!r} is not supported by this adamcpp")
        if not isinstance(shape, list) or not all(_is_int(n) and 0 <= n <= _MAX_DIM for n in shape):
            raise Refused(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise Refused(f"tensor {name!r}: bad data_offsets {offsets!r}")
        nbytes = math.prod(shape) * _DTYPES[code].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise Refused(
                f"tensor {name!r}: data_offsets {offsets} span {offsets[1] - offsets[0]} bytes, but its shape "
                f"{shape} and dtype {code} need {nbytes}"
            )
        self.name, self.code, self.shape = name, code, tuple(shape)
        self.begin, self.end = offsets


class Contents(NamedTuple):
    """What read returns: the document, the header's tensors (by offset) and their arrays."""

    document: Any
    tensors: Dict[str, TensorInfo]
    arrays: Dict[str, np.ndarray]


def _read_header(f: Any, size: int) -> Tuple[Dict[str, Any], List[TensorInfo], str]:
    """Validates everything before the data: (header, tensors by offset, recorded checksum)."""
    if size < 8:
        raise Refused(f"truncated: {size} byte(s), less than the 8-byte header length a safetensors file starts with")
    n = int.from_bytes(f.read(8), "little")
    if n > size - 8:
        raise Refused(
            f"truncated, or not a safetensors file: the header length field says {n} bytes, but only {size - 8} follow"
        )
    if n > _MAX_HEADER:
        raise Refused(f"not a safetensors file: a header of {n} bytes exceeds the format's limit of {_MAX_HEADER}")
    raw = f.read(n)
    if len(raw) != n:
        raise Refused("truncated while reading the header")
    if not raw.startswith(b"{"):
        raise Refused("not a safetensors file: the header does not start with '{'")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused("not a safetensors file, or a damaged one: the header is not UTF-8") from None
    header = _parse_json(text.rstrip(" "), "the header")
    if not isinstance(header, dict):
        raise Refused("not a safetensors file: the header is not a JSON object")
    metadata = header.get(RESERVED_NAME)
    if metadata is None or not isinstance(metadata, dict) or _KEY_FORMAT not in metadata:
        raise Refused(
            f"not an adamcpp checkpoint: the file's metadata has no {_KEY_FORMAT!r} entry "
            "(a safetensors file written by something else?)"
        )
    if not all(isinstance(v, str) for v in metadata.values()):
        raise Refused("damaged: the metadata must map strings to strings")
    if metadata[_KEY_FORMAT] != FORMAT:
        raise Refused(f"not an adamcpp state dict: {_KEY_FORMAT} is {metadata[_KEY_FORMAT]!r}, expected {FORMAT!r}")
    version = metadata.get(_KEY_VERSION)
    if version is None or not _VERSION.fullmatch(version) or int(version) < 1:
        raise Refused(f"damaged: {_KEY_VERSION} is {version!r}, expected a positive integer")
    if int(version) > FORMAT_VERSION:
        raise Refused(
            f"written in checkpoint format version {int(version)}, newer than this adamcpp ({_core.version}) reads "
            f"(up to {FORMAT_VERSION}): upgrade adamcpp (or the file is damaged)"
        )
    recorded = metadata.get(_KEY_SHA256)
    if recorded is None or not _HEX64.fullmatch(recorded):
        raise Refused(f"damaged: {_KEY_SHA256} is missing or malformed")
    if _KEY_DOCUMENT not in metadata:
        raise Refused(f"damaged: the metadata has no {_KEY_DOCUMENT!r} entry")
    canonical = _canonical(header)
    if raw != canonical + b" " * _padding(len(canonical)):
        raise Refused("damaged: the header is not in canonical form (edited, or a changed byte)")
    # by offset; an empty tensor sorts before a non-empty one at the same offset
    tensors = sorted(
        (TensorInfo(k, v) for k, v in header.items() if k != RESERVED_NAME), key=lambda t: (t.begin, t.end)
    )
    data_size = size - 8 - n
    position = 0
    for t in tensors:
        if t.begin != position:
            raise Refused(f"damaged: tensor {t.name!r} starts at byte {t.begin} of the data, expected {position}")
        position = t.end
    if position > data_size:
        raise Refused(f"truncated: the tensors need {position} bytes of data, the file has {data_size}")
    if position < data_size:
        raise Refused(f"damaged: {data_size - position} byte(s) after the last tensor")
    return header, tensors, recorded


def _read_into(f: Any, view: memoryview) -> None:
    while view.nbytes:
        got = f.readinto(view)
        if not got:
            raise Refused("truncated while reading the tensors (did the file change?)")
        view = view[got:]


def read(path: PathLike) -> Contents:
    """The document and the arrays of a file `write` wrote, everything verified
    first: the header, the tensor table, the checksum through a fixed buffer
    before any array is written to, then again as the data is read into the
    arrays. Arrays are new, writeable and native-endian; BF16 ones are
    ml_dtypes bfloat16 (Refused without ml_dtypes)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, infos, recorded = _read_header(f, size)  # the tensors' sizes add up to the file's
        metadata = header[RESERVED_NAME]
        bfloat16 = _bfloat16_for(infos)
        start = f.tell()
        arrays = {t.name: _allocate(t) for t in infos}  # address space: no page is written before the checksum
        buffer = memoryview(bytearray(min(_CHUNK, size - start)))
        pieces = (buffer[: min(_CHUNK, size - i)] for i in range(start, size, _CHUNK))
        if not hmac.compare_digest(_digest(f, header, pieces), recorded):
            raise Refused(
                "checksum mismatch: the file is damaged (the SHA-256 of its header and data differs from the "
                "one it records)"
            )
        f.seek(start)  # into the arrays, verified again: what is returned is what was verified
        if not hmac.compare_digest(_digest(f, header, (_byte_view(a) for a in arrays.values())), recorded):
            raise Refused("the file changed while it was read (its checksum held, then did not)")
    for t in infos:
        arr = arrays[t.name]
        arr = arr if arr.dtype.isnative else arr.astype(arr.dtype.newbyteorder("="))
        arrays[t.name] = arr.view(bfloat16) if t.code == "BF16" and bfloat16 is not None else arr
    document = _parse_json(metadata[_KEY_DOCUMENT], "the state dict document")
    return Contents(document, {t.name: t for t in infos}, arrays)


def _allocate(t: TensorInfo) -> np.ndarray:
    try:
        return np.empty(t.shape, dtype=_DTYPES[t.code])
    except (ValueError, MemoryError) as exc:  # more than memory holds, or a zero-size shape of absurd dimensions
        raise Refused(
            f"tensor {t.name!r}: {t.code} {list(t.shape)} ({t.end - t.begin} bytes) cannot be allocated ({exc})"
        ) from None


def _digest(f: Any, header: Dict[str, Any], views: Iterable[memoryview]) -> str:
    """The checksum of the header and of the data read into `views`, in order."""
    digest = hashlib.sha256(_canonical(_without_checksum(header)))
    for view in views:
        _read_into(f, view)
        digest.update(view)
    return digest.hexdigest()


def _bfloat16_for(infos: List[TensorInfo]) -> Optional[np.dtype]:
    """ml_dtypes' bfloat16 when the file holds BF16 tensors (refused without ml_dtypes)."""
    names = [t.name for t in infos if t.code == "BF16"]
    if not names:
        return None
    try:
        import ml_dtypes
    except ImportError:
        raise Refused(
            f"tensor {names[0]!r} is BF16 (bfloat16), which needs the ml_dtypes package to load ({INSTALL_HINT})"
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _without_checksum(header: Dict[str, Any]) -> Dict[str, Any]:
    """The header as the checksum sees it: without the adamcpp.sha256 entry."""
    return {**header, RESERVED_NAME: {k: v for k, v in header[RESERVED_NAME].items() if k != _KEY_SHA256}}
