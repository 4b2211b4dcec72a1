"""The list layout: the optimizer's parameters are separate NumPy arrays, each
with its own state dict (docs/api.md, "Parameters and state").

Edits of `param_groups[i]["params"]` between calls are followed: state stays
with its array, and an array that takes the place of one that left (same
position, group, shape and dtype: a parameter replaced by an equal copy, as
after a reload) keeps that place's state."""

from __future__ import annotations

import copy
from typing import Any, Container, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _core, _native
from ._groups import ParamGroup, ParamState, check_new_arrays, grads_list, group_params, label, validated_group
from ._layout import Layout

# Each view of an owned block starts on a 64-byte boundary of the block (a whole cache line, the widest vector).
_ALIGN_BYTES = 64


def own_state(states: Sequence[Dict[str, Any]]) -> None:
    """Moves the arrays of new or loaded states into memory the optimizer owns: per entry and dtype, one block
    that holds every such array of `states` back to back (each starting on a cache line), and each state's
    entry a C-contiguous view of its part with the array's shape and values. Steps then stream each entry
    through one buffer instead of as many allocations as parameters. An array that is alone of its kind
    keeps its own memory."""
    kinds: Dict[Tuple[str, Any], List[Tuple[Dict[str, Any], np.ndarray]]] = {}
    for state in states:
        for key, value in state.items():
            if type(value) is np.ndarray and value.size > 0:
                kinds.setdefault((key, value.dtype), []).append((state, value))
    for (key, dtype), members in kinds.items():
        if len(members) < 2:
            continue
        line = max(1, _ALIGN_BYTES // dtype.itemsize)
        starts = []
        total = 0
        for _, value in members:
            starts.append(total)
            total += -(-value.size // line) * line
        block = np.empty(total + line, dtype)
        # The first element on a cache line of its own (NumPy aligns allocations to 16 bytes only).
        shift = (-block.ctypes.data % _ALIGN_BYTES) // dtype.itemsize
        for (state, value), start in zip(members, starts):
            view = block[shift + start : shift + start + value.size].reshape(value.shape)
            np.copyto(view, value)
            dict.__setitem__(state, key, view)


class ListLayout(Layout):
    mode = "list"
    workspace: Any = None  # a device layout's CUDA workspace

    def setup(self, groups: List[Dict[str, Any]], with_state: bool = True) -> None:
        """Adds the constructor's groups (validated in order, with fresh state unless `with_state` is False)."""
        self.cache.enable_plan()
        for group in groups:
            self.append_group(group, self.keys, with_state)

    def adopt(self) -> None:
        """Takes the optimizer's param_groups and state as they are (a copy being restored)."""
        self.cache.enable_plan()
        self.params, self.group_of = self.read_groups()

    # ------------------------------------------------------------- parameters
    def check_layout(self, p: Any, group: Mapping[str, Any], where: str) -> None:
        """Refuses a parameter that its group's options cannot store, before any state is made."""
        self.family.check_layout(p, group, where)

    def check_params(self, params: Sequence[Any], keys: Optional[Tuple[Any, ...]], start: int = 0) -> None:
        """The rules for parameters start, start + 1, ...: valid arrays, each appearing once in the optimizer."""
        check_new_arrays(params, keys, start, self.family.half_params)

    def append_group(self, param_group: Mapping[str, Any], keys: Optional[Tuple[Any, ...]], with_state: bool) -> None:
        opt = self.opt
        gi = len(opt.param_groups)
        group, ps = validated_group(
            self.family.hyper, self.check_params, opt.defaults, param_group, gi, self.params, keys
        )
        opt.param_groups.append(ParamGroup(group))
        for k, p in enumerate(ps):
            self.check_layout(p, group, label(len(self.params) + k, keys))
        states = [ParamState(self.fresh_state(p, group)) for p in ps] if with_state else []
        own_state(states)
        self.params.extend(ps)
        self.group_of.extend([gi] * len(ps))
        opt.state.extend(states)

    def add_group(self, param_group: Mapping[str, Any]) -> None:
        self.append_group(param_group, None, True)
        self.keys = None  # the parameters are no longer the dict's

    def read_groups(self) -> Tuple[List[Any], List[int]]:
        """The parameter list and each parameter's group, from param_groups."""
        params: List[Any] = []
        group_of: List[int] = []
        for gi, g in enumerate(self.opt.param_groups):
            ps = g["params"]
            if type(ps) is not list:
                ps = group_params(ps, gi)
                g["params"] = ps
            params.extend(ps)
            group_of.extend([gi] * len(ps))
        return params, group_of

    def sync(self) -> bool:
        opt = self.opt
        if _core.params_unchanged(opt.param_groups, self.params, self.group_of):
            return False
        params, group_of = self.read_groups()
        keys = self.keys if len(params) == len(self.params) else None
        self.check_params(params, keys)
        for i, (p, gi) in enumerate(zip(params, group_of)):
            self.check_layout(p, opt.param_groups[gi], label(i, keys))
        by_id = {id(p): s for p, s in zip(self.params, opt.state)}
        present = {id(p) for p in params}
        state = []
        for i, (p, gi) in enumerate(zip(params, group_of)):
            s = by_id.get(id(p))
            if s is None and i < len(self.params):
                old = self.params[i]
                if id(old) not in present and self.group_of[i] == gi and self.layout_of(old) == self.layout_of(p):
                    s = opt.state[i]
            state.append(s if s is not None else ParamState(self.fresh_state(p, opt.param_groups[gi])))
        self.params, self.group_of, opt.state = params, group_of, state
        self.keys = keys
        return True  # state may have moved into a group without master copies

    # ------------------------------------------------------------------- step
    def grads(self, grads: Any) -> Any:
        kind = type(grads)
        return grads if kind is list or kind is tuple else grads_list(grads, self.keys)

    def step(
        self, grads: Any, hypers: List[Any], scale: float, nonfinite: int, max_norm: float, stream: Any
    ) -> Tuple[bool, Optional[float], bool]:
        return _native.step(
            self.family,
            self.cache,
            self.params,
            grads,
            self.opt.state,
            self.group_of,
            hypers,
            scale,
            nonfinite,
            max_norm,
            self.family.patterns,
            self.keys,
            rounding_pieces=self.rounding_pieces,
            workspace=self.workspace,
            stream=stream,
        )

    def drop_entry(self, key: str, groups: Container[int]) -> None:
        for s, gi in zip(self.opt.state, self.group_of):
            if gi in groups and key in s:
                del s[key]

    # ------------------------------------------------------------------ state
    def export_value(self, key: str, v: Any, i: int) -> Any:
        if isinstance(v, np.ndarray):
            return v.copy()
        return copy.copy(v)

    def staged(self, states: List[Any]) -> List[Any]:
        own_state(states)  # loaded arrays are the load's own copies: moved into owned blocks
        return states

    def set_state(self, states: List[Any]) -> None:
        self.opt.state = states
