"""The flat layout: every parameter is a view handed out by one FlatParams
(docs/api.md, "Flat storage").

The state lives in flat buffers laid out like the parameters, and one native
call steps a few long ranges (one per run of parameters that share a dtype, a
group and a step count) instead of one tensor per parameter. `opt.state` still
shows one mapping per parameter whose arrays are views of those buffers and
whose "step" is its range's counter; an edit that makes one parameter differ
from its neighbours splits it into a range of its own (per-parameter
stepping), and ranges that agree again are joined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core, _native
from ._family import Family
from ._groups import FixedGroups, ParamGroup, ParamState, grads_list
from ._layout_list import ListLayout
from ._lock import CallLock
from ._ranges import Range, rounding_pieces
from ._validation import NONFINITE_POLICIES, check_step_count
from .flat import MISSING, FlatParams, FlatParamState, aligned_zeros

_RAISE = NONFINITE_POLICIES["raise"]
_SKIP = NONFINITE_POLICIES["skip"]
_CHUNK = int(_core.chunk_elements)


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


class FlatLayout(ListLayout):
    """The flat mode of one optimizer: its ranges, their state dicts, the
    per-parameter mappings of `opt.state` and the lists the native step takes.
    Steps, loads and edits run with the optimizer's call lock held (or from
    code that a running call on this thread runs); reads take no lock."""

    mode = "flat"

    def start(self, flat: FlatParams, indices: List[int], states: Optional[Sequence[Mapping[str, Any]]] = None) -> None:
        """Lays the state out over `flat` (the FlatParams whose views are the parameters, `indices` each
        parameter's index in it): `states` (one per parameter) or fresh state, then opt.state is the
        per-parameter mappings."""
        self.flat = flat
        self.index = indices  # optimizer parameter i -> its index in the FlatParams
        self.slot = [(*flat.slots[j], tuple(flat.shapes[j])) for j in indices]  # (buffer, offset, size, shape)
        # Each parameter and gradient as laid out: shapes come from the layout, never from a view the model may
        # have reshaped in place (view.shape = ...: the same memory seen another way).
        self.own = [flat.buffers[b][o : o + n].reshape(s) for b, o, n, s in self.slot]
        self.own_grads = [flat.grad_buffers[b][o : o + n].reshape(s) for b, o, n, s in self.slot]
        if states is None:
            states = [self.family.new_state(p, self.opt.param_groups[gi]) for p, gi in zip(self.own, self.group_of)]
        self.norm_grads = tuple(flat.grad_views[j] for j in indices)
        keys = self.keys
        self.names: List[Any] = list(keys) if keys is not None else list(range(len(indices)))
        self.facades = tuple(FlatParamState(self, i) for i in range(len(indices)))
        # per parameter: state key -> (the range's array it was made from, the view handed out)
        self.views: List[Dict[Any, Tuple[np.ndarray, np.ndarray]]] = [{} for _ in indices]
        self.moved = False
        self.fixed = FixedGroups(
            self.opt.param_groups,
            "a flat optimizer steps a fixed set of FlatParams views in fixed groups: its parameters cannot be "
            "added, removed, replaced or regrouped (build a new optimizer)",
            as_tuples=True,
        )
        self.load(states)
        self.opt.state = self.facades

    @classmethod
    def restore(cls, opt: Any, family: Family, cache: Any, lock: CallLock, keys: Any, copied: Any) -> FlatLayout:
        """The layout of a copy (what copy_state saved): the copied FlatParams' views as parameters, the
        state laid out in new flat buffers."""
        source, index, states = copied
        views = [source.param_views[j] for j in index]
        start = 0
        for g in opt.param_groups:
            count = g["params"]
            g["params"] = views[start : start + count]
            start += count
        opt.state = []
        self = cls(opt, family, cache, lock, keys)
        self.adopt()
        self.start(source, index, states)
        return self

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
                    store[(k, b)] = aligned_zeros(self.flat.buffers[b].size, v.dtype)
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
            segments.append(Range(b, off, off + size, self.group_of[i], (i,), ParamState(entries)))
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

    def _joinable(self, a: Range, b: Range) -> bool:
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

    def _join(self, a: Range, b: Range) -> Range:
        count = b.stop - a.start
        entries: Dict[Any, Any] = {}
        for k, v in a.state.items():
            if k != "step" and v is not None:
                first = v if v.size or count == 0 else b.state[k]  # the memory starts at the first non-empty part
                v = _span(first, count) if count else v.reshape(0)
            entries[k] = v
        return Range(a.buffer, a.start, b.stop, a.group, a.members + b.members, ParamState(entries))

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
        joined: List[Range] = []
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

    def detach(self, i: int) -> Range:
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
            pieces.append(Range(s.buffer, lo, hi, s.group, members, ParamState(entries)))
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
        """`opt.state[i][key] = value` (or `del` for MISSING), one call at a
        time with the optimizer's other calls."""
        if self.lock.held_here():
            self._edit(i, key, value)  # from code a running call on this thread runs (a schedule)
            return
        self.lock.enter()
        try:
            self._edit(i, key, value)
        finally:
            self.lock.leave()

    def _edit(self, i: int, key: Any, value: Any) -> None:
        st = self.state_of(i)
        if value is not MISSING and key in st:
            current = self.get(i, key)
            if value is current or (key == "step" and type(value) is int and type(current) is int and value == current):
                return
        seg = self.detach(i)
        if value is MISSING:
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
    def add_group(self, param_group: Mapping[str, Any]) -> None:
        raise ValueError(
            "add_param_group: a flat optimizer steps a fixed set of FlatParams views; "
            "build another optimizer for more parameters"
        )

    def sync(self) -> bool:
        """Follows the edits made since the last call: a group list or group
        dicts holding the same parameters are adopted (any other change of the
        parameters is refused), and a replaced `opt.state` is taken in."""
        opt = self.opt
        self.fixed.follow(opt.param_groups)
        if opt.state is not self.facades:
            self._take_state(opt.state)
            opt.state = self.facades
        moved, self.moved = self.moved, False
        return moved

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
            seg.state = ParamState(entries)
            self.views[i].clear()
        self.dirty = True
        self.moved = True  # state may have moved into a group without master copies

    def grads(self, grads: Any) -> Any:
        """The gradients of a flat step are the FlatParams' gradient views:
        `flat.grads` itself, or a list, tuple or dict of exactly those views."""
        if grads is self.flat.grads:
            return grads
        grad_list = grads_list(grads, self.keys)
        n = len(self.norm_grads)
        if len(grad_list) != n:
            raise ValueError(f"grads: expected {n} gradients (one per parameter), got {len(grad_list)}")
        for i, (g, view) in enumerate(zip(grad_list, self.norm_grads)):
            if g is not view:
                raise ValueError(
                    f"{self.grad_label(i)}: a flat optimizer reads its gradients from its FlatParams' gradient "
                    "buffer: pass flat.grads (with the gradients written into its views), not other arrays"
                )
        return grads

    def grad_label(self, i: int) -> str:
        return self.family.patterns[1].format(repr(self.keys[i]) if self.keys is not None else i)

    def step(
        self, grads: Any, hypers: List[Any], scale: float, nonfinite: int, max_norm: float, stream: Any
    ) -> Tuple[bool, Optional[float], bool]:
        """One step over the ranges, in one native call; the same checks, in
        the same order, and the same results as a list optimizer's step."""
        if self.dirty:  # hypers ran the schedules, which may have edited the state
            self.normalize()
        # "raise" runs as "skip" here, so that the message can name the first
        # parameter (not the range) whose gradient is not finite.
        applied, norm, _ = _native.step(
            self.family,
            self.cache,
            self.seg_params,
            self.seg_grads,
            self.seg_states,
            self.seg_groups,
            hypers,
            scale,
            _SKIP if nonfinite == _RAISE else nonfinite,
            max_norm,
            self.family.patterns,
            self.seg_names,
            norm_grads=self.norm_grads if max_norm >= 0.0 else None,
            rounding_pieces=self.seg_pieces if self.family.rounding else None,
        )
        if not applied and nonfinite == _RAISE:
            raise FloatingPointError(self._nonfinite_message(scale, max_norm))
        return applied, norm, False

    def _nonfinite_message(self, scale: float, max_norm: float) -> str:
        """The list optimizer's message: the first parameter whose gradient, at the scale the check used
        (step_scalars.h's after-norm rule, through _core.after_norm, from the step's exact sum of squares), has
        a NaN or Inf. Runs on the error path only."""
        check_scale = scale
        if max_norm >= 0.0:
            total = sum(int(g.size) for g in self.norm_grads)
            parts = np.zeros(-(-total // _CHUNK))
            _core.chunk_sum_squares(self.norm_grads, parts, self.family.patterns, self.keys)
            sum_squares = 0.0
            for value in parts.tolist():  # in order, as the step adds them
                sum_squares += value
            found = _core.after_norm(sum_squares, scale, max_norm, _RAISE)[2]
            check_scale = scale if found is None else found
        first = _core.first_nonfinite(self.norm_grads, check_scale, self.family.patterns, self.keys)
        where = self.grad_label(max(int(first), 0))
        return f"{where}: non-finite gradient (NaN or Inf after grad_scale); nothing was updated"

    # ------------------------------------------------------------- state
    def load_params(self) -> Sequence[Any]:
        return self.own  # shaped as laid out

    def set_state(self, states: List[Any]) -> None:
        self.load(states)  # into new flat state buffers

    def copy_state(self, state: Dict[str, Any]) -> None:
        """A flat optimizer travels as its FlatParams (whose copy makes its views again), each parameter's
        index in it and plain state dicts (arrays: views, which a pickle copies); its copy lays the state
        out in new flat buffers."""
        state["_flat_copy"] = (self.flat, list(self.index), [dict(f.items()) for f in self.facades])
        state["param_groups"] = [ParamGroup({**g, "params": len(g["params"])}) for g in self.opt.param_groups]
        del state["state"]
