"""Flat parameter storage: one contiguous, 64-byte-aligned buffer per dtype
holding a set of parameters, per-parameter views of it for the model, and a
matching gradient buffer (docs/api.md, "Flat storage").

An optimizer whose parameters are all views handed out by one FlatParams steps
in flat mode (the flat layout, _layout_flat.py). This module holds FlatParams
and its views only; everything else reads them through public accessors.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import _core, _tree

# Every buffer starts on a 64-byte boundary (a cache line, an AVX-512 vector).
ALIGNMENT = 64
# The largest array NumPy can make (bytes, and any one dimension), less the alignment slack of a buffer.
_MAX_DIM = int(np.iinfo(np.intp).max)
_MAX_BYTES = _MAX_DIM - ALIGNMENT

ArraysLike = Union[Sequence[Any], Mapping[Any, Any]]


# A parameter view or a gradient view -> the FlatParams that handed it out
# (keyed by id; the FlatParams holds its views, so an id cannot be reused
# while the entry lives, and the entry dies with the FlatParams).
_OWNERS: weakref.WeakValueDictionary[int, FlatParams] = weakref.WeakValueDictionary()


def aligned_zeros(count: int, dtype: np.dtype) -> np.ndarray:
    """A zero-filled 1-D array of `count` elements whose data starts on an ALIGNMENT boundary."""
    nbytes = count * dtype.itemsize
    raw = np.zeros(nbytes + ALIGNMENT, np.uint8)
    skip = (-raw.ctypes.data) % ALIGNMENT
    return raw[skip : skip + nbytes].view(dtype)


def _count_text(n: int) -> str:
    return str(n) if n.bit_length() <= 128 else f"2**{n.bit_length() - 1} or more"


def _shape_text(shape: Tuple[int, ...]) -> str:
    return "(" + ", ".join(map(_count_text, shape)) + ("," if len(shape) == 1 else "") + ")"


def _too_big(nbytes: int) -> str:
    return f"({_count_text(nbytes)} bytes), more than one array can hold (at most {_MAX_BYTES} bytes)"


def _shape_of(entry: Any, label: str) -> Tuple[int, ...]:
    """A shape given as an int or a tuple of ints."""
    dims = (entry,) if not isinstance(entry, tuple) else entry
    shape = []
    for d in dims:
        if isinstance(d, (bool, np.bool_)):
            raise TypeError(f"{label}: expected an array, or a shape (an int or a tuple of ints), got {entry!r}")
        try:
            n = operator.index(d)
        except TypeError:
            raise TypeError(
                f"{label}: expected an array, or a shape (an int or a tuple of ints), got {type(entry).__name__}"
            ) from None
        if n < 0:
            raise ValueError(f"{label}: expected a shape of non-negative sizes, got {entry!r}")
        shape.append(n)
    return tuple(shape)


class FlatViews(tuple):
    """The list form of `FlatParams.params` / `.grads`: a tuple of views.
    Copies (pickle, deepcopy, joblib) come back as the views of the copied
    FlatParams, so a model holding it keeps sharing the flat buffers."""

    _flat: FlatParams
    _kind: str

    def __new__(cls, views: Sequence[np.ndarray], flat: FlatParams, kind: str) -> FlatViews:
        self = super().__new__(cls, views)
        self._flat = flat
        self._kind = kind
        return self

    def __reduce__(self) -> Any:
        return (_views_of, (self._flat, self._kind))


class FlatViewsDict(dict):
    """The dict form of `FlatParams.params` / `.grads`: a read-only dict of
    views (its entries are the flat layout). Copies behave like FlatViews'."""

    _flat: FlatParams
    _kind: str

    def __init__(self, items: Any, flat: FlatParams, kind: str):
        super().__init__(items)
        self._flat = flat
        self._kind = kind

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("FlatParams views: the mapping is read-only (its entries are the flat layout)")

    __setitem__ = __delitem__ = update = setdefault = pop = popitem = clear = __ior__ = _refuse

    def __reduce__(self) -> Any:
        return (_views_of, (self._flat, self._kind))

    def copy(self) -> Dict[Any, np.ndarray]:
        """A plain (writable) dict of the same views."""
        return dict(self)


def _views_of(flat: FlatParams, kind: str) -> Any:
    return flat.grads if kind == "grads" else flat.params


class FlatParams:
    """A set of parameters in one contiguous, 64-byte-aligned buffer per dtype.

    ``FlatParams(arrays)`` copies the arrays of a list (or tuple) or a dict in;
    an entry may instead be a shape (an int or a tuple of ints), which starts
    at zero with dtype ``dtype`` (float32 by default). ``.params`` hands back
    views of the buffers in the same form (a tuple for a list, a read-only
    dict for a dict, the same structure for a parameter tree: _tree.py),
    ``.grads`` matching views of a zero-initialised gradient buffer.
    Parameters of one dtype lie in their order (a tree's leaf order), back to
    back.
    ``pad_to``: each buffer's memory extends, with zeros, to a multiple of this
    many elements (for a ZeroRedundancyOptimizer: its equal shards need it).
    """

    def __init__(self, arrays: ArraysLike, *, dtype: Any = None, pad_to: int = 1):
        if isinstance(arrays, np.ndarray):
            raise TypeError("arrays: expected a list or dict of arrays (or shapes), got a single ndarray (wrap it)")
        tree: Optional[_tree.Tree] = None
        keys: Optional[Tuple[Any, ...]]
        if _tree.is_tree(arrays):
            tree, entries = _tree.Tree.read(arrays)
            keys = tree.names
        elif isinstance(arrays, Mapping):
            keys = tuple(arrays.keys())
            entries = [arrays[k] for k in keys]
        elif isinstance(arrays, (str, bytes)) or not isinstance(arrays, (Sequence, tuple, list)):
            raise TypeError(f"arrays: expected a list or dict of arrays (or shapes), got {type(arrays).__name__}")
        else:
            keys = None
            entries = list(arrays)
        if not entries:
            raise ValueError("arrays: FlatParams got no arrays")
        if isinstance(pad_to, bool) or not isinstance(pad_to, (int, np.integer)) or pad_to < 1:
            raise ValueError(f"pad_to: expected an int >= 1, got {pad_to!r}")
        shape_dtype = np.dtype(np.float32 if dtype is None else dtype)
        labels = [f"arrays[{k!r}]" for k in keys] if keys is not None else [f"arrays[{i}]" for i in range(len(entries))]
        shapes: List[Tuple[int, ...]] = []
        dtypes: List[np.dtype] = []
        for entry, label in zip(entries, labels):
            if isinstance(entry, np.ndarray):
                shapes.append(tuple(entry.shape))
                dtypes.append(entry.dtype)
            else:
                shapes.append(_shape_of(entry, label))
                dtypes.append(shape_dtype)
        for dt, label in zip(dtypes, labels):
            _core.check_param(np.empty(0, dt), label)  # float16, bfloat16, float32 or float64
        self._build(keys, shapes, dtypes, int(pad_to), tree)
        for view, entry in zip(self._param_views, entries):
            if isinstance(entry, np.ndarray):
                np.copyto(view, entry, casting="no")

    @classmethod
    def from_layout(
        cls,
        keys: Optional[Tuple[Any, ...]],
        shapes: List[Tuple[int, ...]],
        dtypes: List[Any],
        pad_to: int = 1,
        tree: Optional[_tree.Tree] = None,
    ) -> Any:
        """A zero-filled FlatParams of the given layout (the keys, each parameter's shape and dtype, the tree)."""
        self = cls.__new__(cls)
        self._build(keys, [tuple(s) for s in shapes], [np.dtype(d) for d in dtypes], pad_to, tree)
        return self

    def _build(
        self,
        keys: Optional[Tuple[Any, ...]],
        shapes: List[Tuple[int, ...]],
        dtypes: List[np.dtype],
        pad_to: int,
        tree: Optional[_tree.Tree] = None,
    ) -> None:
        self._keys = keys
        self._tree = tree
        self.pad_to = pad_to
        self._shapes = shapes
        self.dtypes: Tuple[np.dtype, ...] = tuple(dict.fromkeys(dtypes))
        used = [0] * len(self.dtypes)
        labels = [f"arrays[{k!r}]" for k in keys] if keys is not None else [f"arrays[{i}]" for i in range(len(shapes))]
        # per parameter: (buffer index, first element, element count); sizes no array can hold are refused first
        self._slots: List[Tuple[int, int, int]] = []
        for shape, dt, label in zip(shapes, dtypes, labels):
            b = self.dtypes.index(dt)
            size = math.prod(shape)
            if size * dt.itemsize > _MAX_BYTES:
                raise ValueError(
                    f"{label}: shape {_shape_text(shape)} is {_count_text(size)} elements of {dt} "
                    + _too_big(size * dt.itemsize)
                )
            if any(d > _MAX_DIM for d in shape):
                raise ValueError(
                    f"{label}: shape {_shape_text(shape)} has a dimension larger than an array can have "
                    f"(at most {_MAX_DIM})"
                )
            if (used[b] + size) * dt.itemsize > _MAX_BYTES:
                raise ValueError(
                    f"{label}: shape {_shape_text(shape)} brings the {dt} buffer to {used[b] + size} elements "
                    + _too_big((used[b] + size) * dt.itemsize)
                )
            self._slots.append((b, used[b], size))
            used[b] += size
        # The whole memory of each buffer (padding included) and the parameters' part of it.
        padded = [-(-n // pad_to) * pad_to for n in used]
        for n, p, dt in zip(used, padded, self.dtypes):
            if p * dt.itemsize > _MAX_BYTES:
                raise ValueError(
                    f"pad_to: {pad_to} pads the {dt} buffer of {n} elements to {p} elements "
                    + _too_big(p * dt.itemsize)
                )
        self._padded = self._allocate(padded, labels, dtypes, "parameter")
        self._grad_padded = self._allocate(padded, labels, dtypes, "gradient")
        self.buffers: Tuple[np.ndarray, ...] = tuple(b[:n] for b, n in zip(self._padded, used))
        self.grad_buffers: Tuple[np.ndarray, ...] = tuple(b[:n] for b, n in zip(self._grad_padded, used))
        self._param_views = [self.buffers[b][o : o + n].reshape(s) for (b, o, n), s in zip(self._slots, shapes)]
        self._grad_views = [self.grad_buffers[b][o : o + n].reshape(s) for (b, o, n), s in zip(self._slots, shapes)]
        self._param_index = {id(v): i for i, v in enumerate(self._param_views)}
        self._grad_index = {id(v): i for i, v in enumerate(self._grad_views)}
        for v in (*self._param_views, *self._grad_views):
            _OWNERS[id(v)] = self
        if tree is not None:  # plain dicts, lists and tuples of views (a copy of them alone holds copies)
            self._params: Any = tree.unflatten(self._param_views)
            self._grads: Any = tree.unflatten(self._grad_views)
        elif keys is None:
            self._params = FlatViews(self._param_views, self, "params")
            self._grads = FlatViews(self._grad_views, self, "grads")
        else:
            self._params = FlatViewsDict(zip(keys, self._param_views), self, "params")
            self._grads = FlatViewsDict(zip(keys, self._grad_views), self, "grads")

    def _allocate(self, padded: List[int], labels: List[str], dtypes: List[np.dtype], kind: str) -> Tuple[Any, ...]:
        """One zeroed buffer per dtype; a MemoryError names the largest entry of the buffer that did not fit."""
        out = []
        for n, dt in zip(padded, self.dtypes):
            try:
                out.append(aligned_zeros(n, dt))
            except MemoryError:
                i = max((i for i, d in enumerate(dtypes) if d == dt), key=lambda i: self._slots[i][2])
                raise MemoryError(
                    f"{labels[i]}: out of memory for the {dt} {kind} buffer holding it (its largest entry, shape "
                    f"{_shape_text(self._shapes[i])}): {n} elements ({n * dt.itemsize} bytes)"
                ) from None
        return tuple(out)

    # ---------------------------------------------------------------- access
    @property
    def params(self) -> Any:
        """The parameter views, in the form given (a tuple, a read-only dict, or a tree of the given structure)."""
        return self._params

    @property
    def grads(self) -> Any:
        """The gradient views, in the form of `params`: write each step's gradients into them."""
        return self._grads

    @property
    def keys(self) -> Optional[Tuple[Any, ...]]:
        """The dict keys, or None for the list form (a tree's: its leaves' paths, as messages write them)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._param_views)

    @property
    def numel(self) -> int:
        """Elements of all parameters together."""
        return sum(int(b.size) for b in self.buffers)

    def layout(self) -> List[Tuple[int, int, Tuple[int, ...]]]:
        """Each parameter's (buffer index, first element in that buffer, shape)."""
        return [(b, o, s) for (b, o, _), s in zip(self._slots, self._shapes)]

    @property
    def slots(self) -> List[Tuple[int, int, int]]:
        """Each parameter's (buffer index, first element, element count)."""
        return self._slots

    @property
    def shapes(self) -> List[Tuple[int, ...]]:
        """Each parameter's shape, as laid out."""
        return self._shapes

    @property
    def param_views(self) -> List[np.ndarray]:
        """The parameter views in order (the list behind `params`)."""
        return self._param_views

    @property
    def grad_views(self) -> List[np.ndarray]:
        """The gradient views in order (the list behind `grads`)."""
        return self._grad_views

    @property
    def padded(self) -> Tuple[np.ndarray, ...]:
        """Each parameter buffer's whole memory, its `pad_to` padding included."""
        return self._padded

    @property
    def grad_padded(self) -> Tuple[np.ndarray, ...]:
        """Each gradient buffer's whole memory, its padding included."""
        return self._grad_padded

    def index_of(self, view: Any) -> Optional[int]:
        """The index of a parameter view this FlatParams handed out, else None."""
        i = self._param_index.get(id(view))
        return i if i is not None and self._param_views[i] is view else None

    def zero_grad(self) -> None:
        """Sets every gradient to zero (one fill per buffer)."""
        for g in self.grad_buffers:
            g.fill(0)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{b.size:,} {dt}" for b, dt in zip(self.buffers, self.dtypes))
        form = "tree" if self._tree is not None else "dict" if self._keys is not None else "list"
        return f"FlatParams({len(self)} arrays ({form}), {kinds})"

    # ------------------------------------------------------------------ copies
    def __reduce__(self) -> Any:
        # The layout and the buffers; the views are made again from them, so a
        # copy's views share its buffers (copying the views would unshare them).
        dtypes = [self.dtypes[b] for b, _, _ in self._slots]  # dtype objects: bfloat16's .str is only 'V2'
        args = (self._keys, self._shapes, dtypes, self.buffers, self.grad_buffers, self.pad_to)
        return (_restore_flat, args if self._tree is None else (*args, self._tree))


def _restore_flat(
    keys: Any,
    shapes: Any,
    dtypes: List[Any],
    buffers: Any,
    grad_buffers: Any,
    pad_to: int = 1,
    tree: Optional[_tree.Tree] = None,
) -> FlatParams:
    flat: FlatParams = FlatParams.from_layout(keys, shapes, dtypes, pad_to, tree)
    for dst, src in zip((*flat.buffers, *flat.grad_buffers), (*buffers, *grad_buffers)):
        np.copyto(dst, src, casting="no")
    return flat


def unwrap(params: Any) -> Any:
    """An optimizer's `params` argument with a FlatParams replaced by its views."""
    return params.params if isinstance(params, FlatParams) else params


def common_source(params: Sequence[Any]) -> Optional[Tuple[FlatParams, List[int]]]:
    """(the FlatParams, each parameter's index in it) when every parameter is
    a parameter view handed out by one FlatParams; None otherwise."""
    flat: Optional[FlatParams] = None
    indices = []
    for p in params:
        owner = _OWNERS.get(id(p))
        if owner is None or (flat is not None and owner is not flat):
            return None
        i = owner.index_of(p)
        if i is None:
            return None
        flat = owner
        indices.append(i)
    return (flat, indices) if flat is not None else None


MISSING = object()


class FlatParamState(MutableMapping):
    """One parameter's state in a flat optimizer (`fs`, its layout: _layout_flat.py): a mapping like the dicts of
    a list optimizer's `state`, whose arrays are views of the flat state
    buffers and whose "step" is the count of the range the parameter is
    stepped in. Writing an entry that differs from the range's (another step
    count, another array) gives the parameter a range of its own."""

    __slots__ = ("_fs", "_i")

    def __init__(self, fs: Any, i: int):
        self._fs = fs
        self._i = i

    def __getitem__(self, key: Any) -> Any:
        return self._fs.get(self._i, key)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._fs.state_of(self._i)))

    def __len__(self) -> int:
        return len(self._fs.state_of(self._i))

    def __contains__(self, key: Any) -> bool:
        return key in self._fs.state_of(self._i)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._fs.edit(self._i, key, value)

    def __delitem__(self, key: Any) -> None:
        if key not in self._fs.state_of(self._i):
            raise KeyError(key)
        self._fs.edit(self._i, key, MISSING)

    def copy(self) -> Dict[Any, Any]:
        """A plain dict of the same entries (arrays not copied)."""
        return dict(self.items())

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self) -> Any:
        return (dict, (dict(self.items()),))
