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

The container (the file, the header, the checksum, the atomic write) is
``_safetensors.py``; the codec (the state dict to the document and its tensors,
and back) is ``_state_codec.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Dict

from . import _safetensors
from ._safetensors import FORMAT, FORMAT_VERSION, PathLike, Refused
from ._state_codec import decode_state_dict, encode_state_dict

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]


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
    document, tensors = encode_state_dict(state_dict)
    _safetensors.write(path, document, tensors)


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
        contents = _safetensors.read(path)
        return decode_state_dict(contents.document, contents.tensors, contents.arrays)
    except Refused as exc:
        raise ValueError(f"{label}: {exc}") from None
