"""Flat parameter storage: one contiguous, 64-byte-aligned buffer per dtype
holding a set of parameters, per-parameter views of it for the model, and a
matching gradient buffer (docs/api.md, "Flat storage").

An optimizer whose parameters are all views handed out by one FlatParams steps
in flat mode (`_FlatStorage` here): its state lives in flat buffers laid out
like the parameters, and one native call steps a few long ranges (one per run
of parameters that share a dtype, a group and a step count) instead of one
tensor per parameter. `opt.state` still shows one mapping per parameter whose
arrays are views of those buffers and whose "step" is its range's counter; an
edit that makes one parameter differ from its neighbours splits it into a range
of its own (per-parameter stepping), and ranges that agree again are joined.
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np

from . import _core
from ._validation import (
    NONFINITE_POLICIES,
    check_grad_scale,
    check_max_grad_norm,
    check_nonfinite,
    check_param_array,
    check_step_count,
)

if TYPE_CHECKING:
    from .optim import Optimizer

# Every buffer starts on a 64-byte boundary (a cache line, an AVX-512 vector).
ALIGNMENT = 64
# The largest array NumPy can make (bytes, and any one dimension), less the alignment slack of a buffer.
_MAX_DIM = int(np.iinfo(np.intp).max)
_MAX_BYTES = _MAX_DIM - ALIGNMENT

ArraysLike = Union[Sequence[Any], Mapping[Any, Any]]

_RAISE = NONFINITE_POLICIES["raise"]
_SKIP = NONFINITE_POLICIES["skip"]

# A parameter view or a gradient view -> the FlatParams that handed it out
# (keyed by id; the FlatParams holds its views, so an id cannot be reused
# while the entry lives, and the entry dies with the FlatParams).
_OWNERS: weakref.WeakValueDictionary[int, FlatParams] = weakref.WeakValueDictionary()


def check_same_params(groups: Any, params_refs: Sequence[Sequence[Any]], fixed: str) -> None:
    """An optimizer whose parameters are fixed (flat mode, a
    ZeroRedundancyOptimizer) accepts edited groups only if they hold the same
    arrays in the same order (`params_refs`, per group); else ValueError
    ending with `fixed`."""
    if not isinstance(groups, list) or len(groups) != len(params_refs):
        raise ValueError(f"param_groups: {fixed}")
    for gi, (g, old) in enumerate(zip(groups, params_refs)):
        if not isinstance(g, Mapping) or "params" not in g:
            raise ValueError(f"param_groups[{gi}]: expected a dict with a 'params' entry")
        ps = g["params"]
        ps = [ps] if isinstance(ps, np.ndarray) else list(ps)
        if len(ps) != len(old) or any(a is not b for a, b in zip(ps, old)):
            raise ValueError(f"param_groups[{gi}]['params']: {fixed}")


def rounding_pieces(parts: Sequence[Tuple[int, int, int, int]]) -> Optional[np.ndarray]:
    """The native step's rounding pieces of one tensor from its parameter parts
    (start in the tensor, parameter index, first element of the parameter,
    count), in tensor order: rows (start, parameter, first) of the non-empty
    parts, or None when the tensor has no elements."""
    rows = [(start, i, first) for start, i, first, count in parts if count > 0]
    return np.array(rows, dtype=np.int64).reshape(-1, 3) if rows else None


def _aligned_zeros(count: int, dtype: np.dtype) -> np.ndarray:
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

    def __reduce__(self) -> Any:
        return (_views_of, (self._flat, self._kind))


class FlatViewsDict(dict):
    """The dict form of `FlatParams.params` / `.grads`: a read-only dict of
    views (its entries are the flat layout). Copies behave like FlatViews'."""

    _flat: FlatParams
    _kind: str

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
    dict for a dict), ``.grads`` matching views of a zero-initialised gradient
    buffer. Parameters of one dtype lie in their order, back to back.
    ``pad_to``: each buffer's memory extends, with zeros, to a multiple of this
    many elements (for a ZeroRedundancyOptimizer: its equal shards need it).
    """

    def __init__(self, arrays: ArraysLike, *, dtype: Any = None, pad_to: int = 1):
        if isinstance(arrays, np.ndarray):
            raise TypeError("arrays: expected a list or dict of arrays (or shapes), got a single ndarray (wrap it)")
        if isinstance(arrays, Mapping):
            keys: Optional[Tuple[Any, ...]] = tuple(arrays.keys())
            entries = [arrays[k] for k in keys]  # type: ignore[union-attr]
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
            check_param_array(np.empty(0, dt), label)  # float16, bfloat16, float32 or float64
        self._build(keys, shapes, dtypes, int(pad_to))
        for view, entry in zip(self._param_views, entries):
            if isinstance(entry, np.ndarray):
                np.copyto(view, entry, casting="no")

    @classmethod
    def _from_layout(
        cls, keys: Optional[Tuple[Any, ...]], shapes: List[Tuple[int, ...]], dtypes: List[Any], pad_to: int = 1
    ) -> Any:
        flat = cls.__new__(cls)
        flat._build(keys, [tuple(s) for s in shapes], [np.dtype(d) for d in dtypes], pad_to)
        return flat

    def _build(
        self, keys: Optional[Tuple[Any, ...]], shapes: List[Tuple[int, ...]], dtypes: List[np.dtype], pad_to: int
    ) -> None:
        self._keys = keys
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
        if keys is None:
            self._params: Any = FlatViews(self._param_views)
            self._grads: Any = FlatViews(self._grad_views)
        else:
            self._params = FlatViewsDict(zip(keys, self._param_views))
            self._grads = FlatViewsDict(zip(keys, self._grad_views))
        for views, kind in ((self._params, "params"), (self._grads, "grads")):
            views._flat = self
            views._kind = kind

    def _allocate(self, padded: List[int], labels: List[str], dtypes: List[np.dtype], kind: str) -> Tuple[Any, ...]:
        """One zeroed buffer per dtype; a MemoryError names the largest entry of the buffer that did not fit."""
        out = []
        for n, dt in zip(padded, self.dtypes):
            try:
                out.append(_aligned_zeros(n, dt))
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
        """The parameter views, in the form given (a tuple, or a read-only dict)."""
        return self._params

    @property
    def grads(self) -> Any:
        """The gradient views, in the form of `params`: write each step's gradients into them."""
        return self._grads

    @property
    def keys(self) -> Optional[Tuple[Any, ...]]:
        """The dict keys, or None for the list form."""
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

    def zero_grad(self) -> None:
        """Sets every gradient to zero (one fill per buffer)."""
        for g in self.grad_buffers:
            g.fill(0)

    def _label(self, i: int) -> str:
        return f"params[{self._keys[i]!r}]" if self._keys is not None else f"params[{i}]"

    def __repr__(self) -> str:
        kinds = ", ".join(f"{b.size:,} {dt}" for b, dt in zip(self.buffers, self.dtypes))
        form = "dict" if self._keys is not None else "list"
        return f"FlatParams({len(self)} arrays ({form}), {kinds})"

    # ------------------------------------------------------------------ copies
    def __reduce__(self) -> Any:
        # The layout and the buffers; the views are made again from them, so a
        # copy's views share its buffers (copying the views would unshare them).
        dtypes = [self.dtypes[b] for b, _, _ in self._slots]  # dtype objects: bfloat16's .str is only 'V2'
        return (_restore_flat, (self._keys, self._shapes, dtypes, self.buffers, self.grad_buffers, self.pad_to))


def _restore_flat(
    keys: Any, shapes: Any, dtypes: List[Any], buffers: Any, grad_buffers: Any, pad_to: int = 1
) -> FlatParams:
    flat: FlatParams = FlatParams._from_layout(keys, shapes, dtypes, pad_to)
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
        i = owner._param_index.get(id(p))
        if i is None or owner._param_views[i] is not p:
            return None
        flat = owner
        indices.append(i)
    return (flat, indices) if flat is not None else None


# --------------------------------------------------------------------------
# Flat mode of an optimizer


def _owner(a: np.ndarray) -> Any:
    """The object that owns an array's memory (NumPy keeps a view's base at the owner)."""
    return a if a.base is None else a.base


def _address(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _span(first: np.ndarray, count: int) -> np.ndarray:
    """A 1-D view of `count` elements of first's dtype starting where `first` starts, in first's memory owner."""
    owner = _owner(first)
    return np.ndarray((count,), first.dtype, buffer=owner, offset=_address(first) - _address(owner))


def _follows(a: np.ndarray, b: np.ndarray, a_size: int, b_size: int) -> bool:
    """Whether b continues a in memory: same owner and dtype, both C-contiguous and writeable, of the given sizes.
    An empty array continues anything of its dtype (NumPy gives empty views no meaningful address)."""
    if a.dtype != b.dtype or a.size != a_size or b.size != b_size:
        return False
    if a_size == 0 or b_size == 0:
        return True
    return (
        a.flags.c_contiguous
        and b.flags.c_contiguous
        and a.flags.writeable
        and b.flags.writeable
        and _owner(a) is _owner(b)
        and isinstance(_owner(a), np.ndarray)
        and _address(a) + a.nbytes == _address(b)
    )


class _Span:
    """The name of a range of several parameters in messages: params[0..999]."""

    __slots__ = ("text",)

    def __init__(self, first: Any, last: Any):
        self.text = f"{first!r}..{last!r}"

    def __repr__(self) -> str:
        return self.text


class _Segment:
    """One native tensor of a flat step: parameters `members` (optimizer
    indices, in buffer order) lying back to back in buffer `buffer`, elements
    [start, stop), of group `group`, sharing the state dict `state` (its "step"
    and 1-D arrays over the range; shaped arrays when there is one member)."""

    __slots__ = ("buffer", "group", "members", "start", "state", "stop")

    def __init__(self, buffer: int, start: int, stop: int, group: int, members: Tuple[int, ...], state: Any):
        self.buffer = buffer
        self.start = start
        self.stop = stop
        self.group = group
        self.members = members
        self.state = state


_MISSING = object()


class FlatParamState(MutableMapping):
    """One parameter's state in a flat optimizer: a mapping like the dicts of
    a list optimizer's `state`, whose arrays are views of the flat state
    buffers and whose "step" is the count of the range the parameter is
    stepped in. Writing an entry that differs from the range's (another step
    count, another array) gives the parameter a range of its own."""

    __slots__ = ("_fs", "_i")

    def __init__(self, fs: _FlatStorage, i: int):
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
        self._fs.edit(self._i, key, _MISSING)

    def copy(self) -> Dict[Any, Any]:
        """A plain dict of the same entries (arrays not copied)."""
        return dict(self.items())

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __reduce__(self) -> Any:
        return (dict, (dict(self.items()),))


class _FlatStorage:
    """The flat mode of one optimizer: its ranges, their state dicts, the
    per-parameter mappings of `opt.state` and the lists the native step takes.
    Steps, loads and edits run with the optimizer's call lock held (or from
    code that a running call on this thread runs); reads take no lock."""

    def __init__(
        self, opt: Optimizer, flat: FlatParams, indices: List[int], states: Optional[Sequence[Mapping[str, Any]]] = None
    ):
        from .optim import ParamState

        self._state_type = ParamState
        self.opt = opt
        self.flat = flat
        self.index = indices  # optimizer parameter i -> its index in the FlatParams
        self.slot = [(*flat._slots[j], tuple(flat._shapes[j])) for j in indices]  # (buffer, offset, size, shape)
        # Each parameter and gradient as laid out: shapes come from the layout, never from a view the model may
        # have reshaped in place (view.shape = ...: the same memory seen another way).
        self.own = [flat.buffers[b][o : o + n].reshape(s) for b, o, n, s in self.slot]
        self.own_grads = [flat.grad_buffers[b][o : o + n].reshape(s) for b, o, n, s in self.slot]
        self.group_of = list(opt._group_of)
        if states is None:
            states = [opt._new_state(p, opt.param_groups[gi]) for p, gi in zip(self.own, self.group_of)]
        self.norm_grads = tuple(flat._grad_views[j] for j in indices)
        keys = opt._keys
        self.names: List[Any] = list(keys) if keys is not None else list(range(len(indices)))
        self.facades = tuple(FlatParamState(self, i) for i in range(len(indices)))
        # per parameter: state key -> (the range's array it was made from, the view handed out)
        self.views: List[Dict[Any, Tuple[np.ndarray, np.ndarray]]] = [{} for _ in indices]
        self._adopt_groups_from(opt.param_groups)
        self.load(states)
        opt.state = self.facades  # type: ignore[assignment]

    # ----------------------------------------------------------------- layout
    def load(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Replaces the whole state by per-parameter values: arrays shaped like
        their parameter are copied into new flat buffers (one per state entry
        and parameter buffer), anything else is kept as is; then parameters
        that agree are joined into ranges."""
        store: Dict[Tuple[Any, int], np.ndarray] = {}
        for i, st in enumerate(states):
            b, _, _, shape = self.slot[i]
            for k, v in st.items():
                if k != "step" and isinstance(v, np.ndarray) and v.shape == shape and (k, b) not in store:
                    store[(k, b)] = _aligned_zeros(self.flat.buffers[b].size, v.dtype)
        segments = []
        for i, st in enumerate(states):
            b, off, size, shape = self.slot[i]
            entries: Dict[Any, Any] = {}
            for k, v in st.items():
                buf = store.get((k, b)) if k != "step" and isinstance(v, np.ndarray) else None
                if buf is not None and v.shape == shape and v.dtype == buf.dtype:
                    view = buf[off : off + size].reshape(shape)
                    np.copyto(view, v, casting="no")
                    v = view
                entries[k] = v
            segments.append(_Segment(b, off, off + size, self.group_of[i], (i,), self._state_type(entries)))
        segments.sort(key=lambda s: (s.buffer, s.start, s.stop))
        self.segments = segments
        for cache in self.views:
            cache.clear()
        self.normalize()

    def _index_members(self) -> None:
        self.member_pos: List[Tuple[int, int]] = [(0, 0)] * len(self.slot)
        for si, s in enumerate(self.segments):
            pos = 0
            for m in s.members:
                self.member_pos[m] = (si, pos)
                pos += self.slot[m][2]

    def _joinable(self, a: _Segment, b: _Segment) -> bool:
        if a.buffer != b.buffer or a.stop != b.start or a.group != b.group:
            return False
        da, db = a.state, b.state
        if list(da) != list(db) or "step" not in da:
            return False
        sa, sb = da["step"], db["step"]
        if type(sa) is not int or type(sb) is not int or sa != sb:
            return False
        for k, va in da.items():
            if k == "step":
                continue
            vb = db[k]
            if va is None and vb is None:
                continue
            if not (isinstance(va, np.ndarray) and isinstance(vb, np.ndarray)):
                return False
            if not _follows(va, vb, a.stop - a.start, b.stop - b.start):
                return False
        return True

    def _join(self, a: _Segment, b: _Segment) -> _Segment:
        count = b.stop - a.start
        entries: Dict[Any, Any] = {}
        for k, v in a.state.items():
            if k != "step" and v is not None:
                first = v if v.size or count == 0 else b.state[k]  # the memory starts at the first non-empty part
                v = _span(first, count) if count else v.reshape(0)
            entries[k] = v
        return _Segment(a.buffer, a.start, b.stop, a.group, a.members + b.members, self._state_type(entries))

    def normalize(self) -> None:
        """Checks the step counts of ranges of one parameter (the only ones an
        edit reaches), joins neighbouring ranges that agree, and rebuilds the
        lists the native step takes."""
        for s in self.segments:
            if len(s.members) == 1:
                i = s.members[0]
                st = s.state
                if "step" not in st:
                    raise ValueError(f"state[{i}]['step']: missing from the optimizer state")
                step = st["step"]
                checked = check_step_count(step, f"state[{i}]['step']", live=True)
                if type(step) is not int:
                    st["step"] = checked  # an edit: the native owner re-reads
        joined: List[_Segment] = []
        for s in self.segments:
            if joined and self._joinable(joined[-1], s):
                joined[-1] = self._join(joined[-1], s)
            else:
                joined.append(s)
        self.segments = joined
        self._index_members()
        flat = self.flat
        self.seg_params: List[np.ndarray] = []
        self.seg_grads: List[np.ndarray] = []
        self.seg_names: List[Any] = []
        for s in joined:
            if len(s.members) == 1:
                self.seg_params.append(self.own[s.members[0]])
                self.seg_grads.append(self.own_grads[s.members[0]])
                self.seg_names.append(self.names[s.members[0]])
            else:
                self.seg_params.append(flat.buffers[s.buffer][s.start : s.stop])
                self.seg_grads.append(flat.grad_buffers[s.buffer][s.start : s.stop])
                self.seg_names.append(_Span(self.names[s.members[0]], self.names[s.members[-1]]))
        self.seg_states = [s.state for s in joined]
        self.seg_groups = [s.group for s in joined]
        # Stochastic rounding keys each parameter's elements as a list optimizer does (its index and
        # the element's index in it), whatever range the parameter is stepped in.
        self.seg_pieces = [
            rounding_pieces([(self.slot[m][1] - s.start, m, 0, self.slot[m][2]) for m in s.members]) for s in joined
        ]
        self.dirty = False

    def detach(self, i: int) -> _Segment:
        """Gives parameter i a range of its own (sharing the memory it had)."""
        si, _ = self.member_pos[i]
        s = self.segments[si]
        if len(s.members) == 1:
            return s
        pieces = []
        k = s.members.index(i)
        for members in (s.members[:k], (i,), s.members[k + 1 :]):
            if not members:
                continue
            lo = self.slot[members[0]][1]
            hi = self.slot[members[-1]][1] + self.slot[members[-1]][2]
            single = len(members) == 1
            entries: Dict[Any, Any] = {}
            for key, v in s.state.items():
                if key != "step" and isinstance(v, np.ndarray):
                    cached = self.views[members[0]].get(key) if single else None
                    if cached is not None and cached[0] is v:
                        v = cached[1]  # the view the parameter's mapping handed out: it keeps its identity
                    else:
                        v = v[lo - s.start : hi - s.start]
                        if single:
                            v = v.reshape(self.slot[members[0]][3])
                entries[key] = v
            pieces.append(_Segment(s.buffer, lo, hi, s.group, members, self._state_type(entries)))
        self.segments[si : si + 1] = pieces
        self._index_members()
        self.dirty = True
        return pieces[1] if pieces[0].members != (i,) else pieces[0]

    # ----------------------------------------------------- the per-parameter view
    def state_of(self, i: int) -> Any:
        return self.segments[self.member_pos[i][0]].state

    def get(self, i: int, key: Any) -> Any:
        si, pos = self.member_pos[i]
        s = self.segments[si]
        v = s.state[key]
        if key == "step" or len(s.members) == 1 or not isinstance(v, np.ndarray):
            return v
        cache = self.views[i]
        cached = cache.get(key)
        if cached is not None and cached[0] is v:
            return cached[1]
        _, _, size, shape = self.slot[i]
        if cached is not None:
            old = cached[1]
            if old.dtype == v.dtype and (
                size == 0 or (_owner(old) is _owner(v) and _address(old) == _address(v) + pos * v.itemsize)
            ):
                cache[key] = (v, old)  # the same memory in a joined range: keep the object handed out
                return old
        view = v[pos : pos + size].reshape(shape)
        cache[key] = (v, view)
        return view

    def edit(self, i: int, key: Any, value: Any) -> None:
        """`opt.state[i][key] = value` (or `del` for _MISSING), one call at a
        time with the optimizer's other calls."""
        opt = self.opt
        if opt._holder == threading.get_ident():
            self._edit(i, key, value)  # from code a running call on this thread runs (a schedule)
            return
        opt._enter()
        try:
            self._edit(i, key, value)
        finally:
            opt._leave()

    def _edit(self, i: int, key: Any, value: Any) -> None:
        st = self.state_of(i)
        if value is not _MISSING and key in st:
            current = self.get(i, key)
            if value is current or (key == "step" and type(value) is int and type(current) is int and value == current):
                return
        seg = self.detach(i)
        if value is _MISSING:
            del seg.state[key]
        else:
            seg.state[key] = value
        self.views[i].pop(key, None)
        self.dirty = True

    def drop_entry(self, key: str, groups: Any) -> None:
        """Removes `key` from the state of every range of `groups` (ranges that agree again join at the next step)."""
        for s in self.segments:
            if s.group in groups and key in s.state:
                del s.state[key]
                for m in s.members:
                    self.views[m].pop(key, None)
                self.dirty = True

    # ----------------------------------------------------------- each call
    def _adopt_groups_from(self, groups: Any) -> None:
        self.groups_ref = groups
        self.group_refs = list(groups)
        for g in groups:
            if type(g.get("params")) is not tuple:
                g["params"] = tuple(g["params"])
        self.params_refs = [g["params"] for g in groups]

    def check_structure(self) -> None:
        """Follows the edits made since the last call: a group list or group
        dicts holding the same parameters are adopted (any other change of the
        parameters is refused), and a replaced `opt.state` is taken in."""
        opt = self.opt
        groups = opt.param_groups
        same = groups is self.groups_ref and len(groups) == len(self.group_refs)
        if same:
            for g, r, p in zip(groups, self.group_refs, self.params_refs):
                if g is not r or g.get("params") is not p:
                    same = False
                    break
        if not same:
            self._check_same_params(groups)
            self._adopt_groups_from(groups)
        if opt.state is not self.facades:
            self._take_state(opt.state)
            opt.state = self.facades  # type: ignore[assignment]

    def _check_same_params(self, groups: Any) -> None:
        check_same_params(
            groups,
            self.params_refs,
            "a flat optimizer steps a fixed set of FlatParams views in fixed groups: its parameters cannot be "
            "added, removed, replaced or regrouped (build a new optimizer)",
        )

    def _take_state(self, new: Any) -> None:
        n = len(self.slot)
        if not isinstance(new, (list, tuple)):
            raise TypeError(f"state: expected a list or tuple, got {type(new).__name__}")
        if len(new) != n:
            raise ValueError(f"state: expected {n} entries (one per parameter), got {len(new)}")
        for i, e in enumerate(new):
            if e is not self.facades[i] and not isinstance(e, Mapping):
                raise TypeError(f"state[{i}]: expected a dict, got {type(e).__name__}")
        for i, e in enumerate(new):
            if e is self.facades[i]:
                continue
            entries = dict(e.items())
            seg = self.detach(i)
            seg.state = self._state_type(entries)
            self.views[i].clear()
        self.dirty = True
        self.opt._masters_checked = False

    def check_grads(self, grads: Any) -> None:
        """The gradients of a flat step are the FlatParams' gradient views:
        `flat.grads` itself, or a list, tuple or dict of exactly those views."""
        if grads is self.flat._grads:
            return
        opt = self.opt
        grad_list = opt._grads_list(grads)
        n = len(self.norm_grads)
        if len(grad_list) != n:
            raise ValueError(f"grads: expected {n} gradients (one per parameter), got {len(grad_list)}")
        for i, (g, view) in enumerate(zip(grad_list, self.norm_grads)):
            if g is not view:
                label = opt._patterns[1].format(repr(opt._keys[i]) if opt._keys is not None else i)
                raise ValueError(
                    f"{label}: a flat optimizer reads its gradients from its FlatParams' gradient buffer: pass "
                    "flat.grads (with the gradients written into its views), not other arrays"
                )

    def step(self, grads: Any, grad_scale: float) -> Tuple[bool, Optional[float]]:
        """One step over the ranges, in one native call; the same checks, in
        the same order, and the same results as a list optimizer's step."""
        opt = self.opt
        self.check_structure()
        nonfinite = check_nonfinite(opt.nonfinite)
        max_norm = check_max_grad_norm(opt.max_grad_norm)
        self.check_grads(grads)
        scale = check_grad_scale(grad_scale)
        hypers = opt._group_hypers()  # may run schedules, which may edit the state: normalize after
        if self.dirty:
            self.normalize()
        # "raise" runs as "skip" here, so that the message can name the first
        # parameter (not the range) whose gradient is not finite.
        native_policy = _SKIP if nonfinite == _RAISE else nonfinite
        extra = (self.seg_pieces,) if opt._native is _core.adam_step else ()  # Adam's rounding_pieces
        applied, norm = opt._native(
            opt._state_cache,
            self.seg_params,
            self.seg_grads,
            self.seg_states,
            self.seg_groups,
            hypers,
            scale,
            native_policy,
            max_norm,
            opt._patterns,
            self.seg_names,
            self.norm_grads if max_norm >= 0.0 else None,
            *extra,
        )
        if applied and not opt._masters_checked:
            opt._drop_stale_masters(hypers)
        if not applied and nonfinite == _RAISE:
            raise FloatingPointError(self._nonfinite_message(scale, max_norm, norm))
        return applied, norm

    def _nonfinite_message(self, scale: float, max_norm: float, norm: Optional[float]) -> str:
        """The list optimizer's message: the first parameter whose gradient,
        at the scale the check used, has a NaN or Inf."""
        check_scale = scale
        if max_norm >= 0.0 and norm is not None:
            ratio = max_norm / (norm + 1e-6)
            coef = ratio if ratio != ratio else min(1.0, ratio)
            if coef == coef:
                check_scale = scale * coef  # a finite coefficient was folded in before the check
        opt = self.opt
        first = _core.first_nonfinite(self.norm_grads, check_scale, opt._patterns, opt._keys)
        i = max(int(first), 0)
        label = opt._patterns[1].format(repr(opt._keys[i]) if opt._keys is not None else i)
        return f"{label}: non-finite gradient (NaN or Inf after grad_scale); nothing was updated"

    # ------------------------------------------------------------- copies
    def export(self) -> Tuple[FlatParams, List[int], List[Dict[str, Any]]]:
        """What a copy needs: the FlatParams, each parameter's index in it and
        its state as a plain dict (arrays: views, which a pickle copies)."""
        return self.flat, list(self.index), [dict(f.items()) for f in self.facades]
