"""The optimizers: parameter groups, hyperparameters, state, options and the
call lock, over one layout object that holds where the numbers live (the list,
flat and device layouts, _layout.py); one native call per step for every tensor.

Ownership (docs/api.md, "Concurrency" and "Copies"): each optimizer has one
native owner (adamcpp._core.StateCache) for everything its steps reuse, and a
lock that runs its calls one at a time. Groups and state dicts are dict
subclasses that notice their own edits (_groups.py); copies of them (pickle,
deepcopy, joblib) start fresh, so nothing a copy carries can make a cache look
current.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _core, _family, _tree, cuda
from ._groups import (
    ParamGroup,
    ParamState,
    group_entries,
    group_hyper,
    group_params,
    label,
    loose_params,
    normalize_params,
    scheduled_lr,
)
from ._hyper import AdamHyper, SgdHyper
from ._layout import Layout
from ._layout_device import DeviceLayout
from ._layout_flat import FlatLayout
from ._layout_list import ListLayout
from ._lock import CallLock
from ._statedict import convert_state, read_state_dict
from ._validation import check_grad_scale, check_max_grad_norm, check_nonfinite
from .flat import FlatParams, common_source, unwrap

# A tree is any nesting of dicts, lists and tuples of arrays (docs/api.md section 2.2).
ParamsLike = Union[Sequence[Any], Mapping[str, Any], FlatParams]
GradsLike = Union[Sequence[Any], Mapping[str, Any]]
LR = Union[float, Callable[[int], float]]
Hyper = Union[AdamHyper, SgdHyper]

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "ParamGroup", "ParamState", "global_norm"]

_DEFAULTS_ONLY: Any = object()


def defaults_for(optimizer_class: Any, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """An optimizer class's defaults from its keyword arguments, validated with the class's own messages,
    without parameters or state (ZeroRedundancyOptimizer builds its local optimizer later, over its shard)."""
    return dict(optimizer_class(_DEFAULTS_ONLY, **kwargs).defaults)


class Optimizer:
    """Base class: groups, hyperparameters, state, checkpoints and copies; the
    layout (`layout`) holds where the numbers live and makes the native step.
    Each optimizer class registers its family (_family.py): its native step,
    hyperparameters and state."""

    # The step's fast path (_start_runtime); a parameter tree's flattens the gradient tree first.
    _fast_step: Callable[[Any, Any, float], Any]

    def __init__(
        self,
        params: ParamsLike,
        defaults: Dict[str, Any],
        nonfinite: str = "propagate",
        max_grad_norm: Optional[float] = None,
    ):
        check_nonfinite(nonfinite)
        check_max_grad_norm(max_grad_norm)
        self._family = _family.family_of(type(self))
        self._family.hyper(defaults, "defaults")
        self.defaults: Dict[str, Any] = dict(defaults)
        if params is _DEFAULTS_ONLY:
            return  # defaults_for: the class's defaults, validated; no parameters, state or runtime
        self._start_runtime()
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self._last_grad_norm: Optional[float] = None
        self._norm_pending = False
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Any = []  # one dict per parameter (a flat optimizer's: a tuple of mappings)
        # A parameter tree's structure (_tree.py), or None: the optimizer holds its leaves as the list form does.
        self._tree: Optional[_tree.Tree] = None
        params = unwrap(params)
        keys: Optional[Tuple[Any, ...]]
        if _tree.is_tree(params):
            self._tree, leaves = _tree.Tree.read(params)
            if not leaves:
                raise ValueError("params: the optimizer got a parameter tree without arrays")
            self._fast_step = self._tree.wrap_fast_step(self._fast_step)
            groups, keys = [{"params": leaves}], self._tree.names
        else:
            groups, keys = normalize_params(params)
        ps = groups[0]["params"] = group_params(groups[0]["params"], 0)  # an iterator is read once
        device = DeviceLayout.device_for(ps[0], keys) if ps else None
        if device is not None:
            self._layout: Layout = DeviceLayout(*self._parts(keys), device=device)
            self._layout.setup(groups)
            return
        source = common_source(loose_params(groups))
        if source is None:
            self._layout = ListLayout(*self._parts(keys))
            self._layout.setup(groups)
            return
        flat = FlatLayout(*self._parts(keys))
        flat.setup(groups, with_state=False)
        flat.start(*source)
        self._layout = flat

    def _parts(self, keys: Optional[Tuple[Any, ...]]) -> Tuple[Any, ...]:
        """What a layout is given: the optimizer, its family, native owner, lock and the params' dict keys."""
        return (self, self._family, self._state_cache, self._lock, keys)

    def _start_runtime(self) -> None:
        """What an optimizer owns at run time and never copies: its native
        owner and its call lock."""
        self._state_cache = _core.StateCache()
        self._lock = CallLock(type(self).__name__)
        # The step's fast path (cpp/py/list_plan.h): a list-layout optimizer's step from the plan its last full
        # step recorded, or None when the full step must run.
        self._fast_step = _core.list_stepper(self._state_cache, self._lock)
        # False once a group is validated again or the state changes hands: the next step that applies drops
        # the master copies that step left behind (_drop_stale_masters).
        self._masters_checked = False

    @property
    def layout(self) -> Layout:
        """Where the numbers live: `layout.mode` is "list" (separate NumPy arrays), "flat" (views of one
        FlatParams) or "device" (CUDA arrays). The object's other members are adamcpp's own."""
        return self._layout

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Adds a group (a dict with "params" and optional overrides), like torch."""
        if self._tree is not None:
            raise ValueError(
                "add_param_group: this optimizer's parameters are a tree (its leaves, matched to each step's "
                "gradient tree): a tree takes no further groups; make one optimizer per tree"
            )
        self._lock.enter()
        try:
            self._sync()
            self._layout.add_group(param_group)
        finally:
            self._lock.leave()

    def _sync(self) -> None:
        if self._layout.sync():
            self._masters_checked = False

    def _group_hypers(self) -> List[Hyper]:
        """Each group's hyperparameters for this step. A ParamGroup keeps its
        validated tuple until it is edited (unless it holds a mutable value);
        any other dict is validated at every step. A schedule is called at
        every step with t, the number of updates already applied to the
        group's first parameter."""
        hypers: List[Hyper] = []
        first = 0
        check = self._family.hyper
        for gi, g in enumerate(self.param_groups):
            hyper = g.validated_hyper if type(g) is ParamGroup else None
            if hyper is None:
                self._masters_checked = False
                hyper = group_hyper(g, gi, check)
            lr = g["lr"]
            size = len(g["params"])
            if callable(lr):
                t = self.state[first]["step"] if size else 0  # an emptied group updates nothing
                hyper = hyper._replace(lr=scheduled_lr(lr, t, gi))
            first += size
            hypers.append(hyper)
        return hypers

    # -------------------------------------------------------------------- step
    def step(self, grads: GradsLike, *, grad_scale: float = 1.0, stream: Any = None) -> bool:
        """Applies one update to every parameter in one native call.

        Returns True when the update was applied, False when `nonfinite="skip"`
        found a NaN/Inf gradient (then nothing changed). With `max_grad_norm`
        set, the global gradient norm (after `grad_scale`) is computed in the
        same native call, gradients are scaled by min(1, max_grad_norm /
        (norm + 1e-6)) inside the kernel, and the norm is kept in
        `last_grad_norm`. Calls on one optimizer run one at a time.

        `stream` (CUDA arrays only) is the CUDA stream the step is queued on:
        None (the legacy default stream), an int handle or a stream object.
        """
        if stream is None:
            applied = self._fast_step(self, grads, grad_scale)
            if applied is not None:
                return applied
        layout = self._layout
        if stream is not None:
            layout.check_stream()
        if self._tree is not None:  # a gradient tree matched to the parameters' structure, before any write
            grads = self._tree.flatten_grads(grads)
        self._lock.enter()
        try:
            if layout.sync():
                self._masters_checked = False
            nonfinite = check_nonfinite(self.nonfinite)
            max_norm = check_max_grad_norm(self.max_grad_norm)
            grad_list = layout.grads(grads)
            scale = check_grad_scale(grad_scale)
            hypers = self._group_hypers()
            applied, norm, pending = layout.step(grad_list, hypers, scale, nonfinite, max_norm, stream)
            if applied and not self._masters_checked:
                self._drop_stale_masters(hypers)
        finally:
            self._lock.leave()
        if norm is not None:
            self._last_grad_norm = norm
            self._norm_pending = False
        elif pending:
            self._norm_pending = True
        return bool(applied)

    def _drop_stale_masters(self, hypers: List[Hyper]) -> None:
        """After a step that applied: a group that stepped without master copies (master_weights=False) loses
        the copies its parameters still had, now older than their weights, so that master_weights=True again
        starts fresh ones from the weights. Runs once after a group was validated again or the state changed."""
        off = {gi for gi, h in enumerate(hypers) if getattr(h, "master_weights", None) == 0}
        if off:
            self._layout.drop_entry("master_param", off)
        self._masters_checked = True

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step that clipped (section 2.5 of docs/api.md). On CUDA the
        norm stays on the device until it is read here: reading it waits for that step."""
        if self._norm_pending:
            self._lock.enter()
            try:
                if self._norm_pending:
                    self._last_grad_norm = self._layout.pending_norm()
                    self._norm_pending = False
            finally:
                self._lock.leave()
        return self._last_grad_norm

    @last_grad_norm.setter
    def last_grad_norm(self, value: Optional[float]) -> None:
        self._last_grad_norm = value
        self._norm_pending = False

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """PyTorch's layout: {"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}.
        Arrays are copied; a callable `lr` is stored as the object itself."""
        self._lock.enter()
        try:
            self._sync()
            export = self._layout.export_value
            state = {i: {k: export(k, v, i) for k, v in s.items()} for i, s in enumerate(self.state)}
            groups = group_entries(self.param_groups)
        finally:
            self._lock.leave()
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict in PyTorch's layout (ours, or torch.optim's with
        tensors converted by np.asarray). Everything is validated first; on any
        error nothing changes."""
        self._lock.enter()
        try:
            self._sync()
            self._load(state_dict)
        finally:
            self._lock.leave()

    def _load(self, state_dict: Mapping[str, Any]) -> None:
        layout = self._layout
        new_groups, entries = read_state_dict(state_dict, self.param_groups, self.defaults, self._family.hyper)
        params = layout.load_params()
        group_of = layout.group_of
        new_state: List[Optional[Dict[str, Any]]] = [None] * len(params)
        for i, pid, entry in entries:
            p, group = params[i], new_groups[group_of[i]]
            where = f"state_dict['state'][{pid}]"
            new_state[i] = convert_state(self._family, entry, p, layout.layout_of(p), group, where)
        states = layout.staged(
            [
                ParamState(s if s is not None else layout.fresh_state(params[i], new_groups[group_of[i]]))
                for i, s in enumerate(new_state)
            ]
        )
        # Everything validated: commit.
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        layout.set_state(states)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> Dict[str, Any]:
        # The runtime (native owner, lock) and the layout are never copied: the layout is made again from
        # param_groups, so the copy's lists cannot disagree (joblib, for one, restores every array as a
        # distinct copy).
        self._lock.enter()
        try:
            self._sync()
            if self._norm_pending:  # a copy carries the number, not the device's copy
                self._last_grad_norm = self._layout.pending_norm()
                self._norm_pending = False
            state = self.__dict__.copy()
            layout = self._layout
            state["_keys"] = layout.keys
            if layout.rounding_pieces is not None:
                state["_rounding_pieces"] = layout.rounding_pieces
            layout.copy_state(state)
        finally:
            self._lock.leave()
        state["last_grad_norm"] = state.pop("_last_grad_norm")
        for key in ("_state_cache", "_lock", "_fast_step", "_masters_checked", "_norm_pending", "_layout", "_family"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        last_grad_norm = state.pop("last_grad_norm", None)
        flat_copy = state.pop("_flat_copy", None)
        keys = state.pop("_keys", None)
        pieces = state.pop("_rounding_pieces", None)
        self.__dict__.update(state)
        self._family = _family.family_of(type(self))
        self._start_runtime()
        self._norm_pending = False
        self.__dict__.setdefault("_tree", None)
        if self._tree is not None:
            self._fast_step = self._tree.wrap_fast_step(self._fast_step)
        if flat_copy is not None:
            self._layout = FlatLayout.restore(self, self._family, self._state_cache, self._lock, keys, flat_copy)
        else:
            first = next((p for g in self.param_groups for p in group_params(g["params"], 0)), None)
            device = DeviceLayout.device_for(first, keys) if first is not None else None
            if device is not None:
                self._layout = DeviceLayout(*self._parts(keys), device=device)
            else:
                self._layout = ListLayout(*self._parts(keys))
            self._layout.adopt()
        self._layout.rounding_pieces = pieces
        self.last_grad_norm = last_grad_norm

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]!r}")
            lines.append(f"    params: {len(g['params'])} array(s)")
        lines.append(")")
        return "\n".join(lines)


class Adam(Optimizer):
    """Adam (coupled L2 weight decay) with every variant of the numerics in
    docs/api.md, and mixed precision: float16/bfloat16 parameters (with a
    float32 master copy by default), bfloat16 state with stochastic rounding,
    gradients of any float dtype.

    Parameters are updated in place; `step(grads)` updates every tensor of every
    group in one native call with the GIL released.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: LR = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        eps_style: str = "torch",
        nonfinite: str = "propagate",
        max_grad_norm: Optional[float] = None,
        master_weights: Optional[bool] = None,
        state_dtype: str = "float32",
        state_rounding: str = "stochastic",
        param_rounding: str = "nearest",
        seed: int = 0,
    ):
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            eps_style=eps_style,
            master_weights=master_weights,
            state_dtype=state_dtype,
            state_rounding=state_rounding,
            param_rounding=param_rounding,
            seed=seed,
        )
        super().__init__(params, defaults, nonfinite, max_grad_norm)


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (p *= 1 - lr * weight_decay)."""

    def __init__(
        self,
        params: ParamsLike,
        lr: LR = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        eps_style: str = "torch",
        nonfinite: str = "propagate",
        max_grad_norm: Optional[float] = None,
        master_weights: Optional[bool] = None,
        state_dtype: str = "float32",
        state_rounding: str = "stochastic",
        param_rounding: str = "nearest",
        seed: int = 0,
    ):
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=True,
            eps_style=eps_style,
            nonfinite=nonfinite,
            max_grad_norm=max_grad_norm,
            master_weights=master_weights,
            state_dtype=state_dtype,
            state_rounding=state_rounding,
            param_rounding=param_rounding,
            seed=seed,
        )


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, with
    torch.optim.SGD's numerics:

        g = grad * grad_scale (negated when maximize);  g += weight_decay * p
        buf = g on the first momentum step, else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) or g = buf
        p = p - lr * g

    State per parameter: {"step": int, "momentum_buffer": array or None}.
    """

    def __init__(
        self,
        params: ParamsLike,
        lr: LR = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        *,
        nonfinite: str = "propagate",
        max_grad_norm: Optional[float] = None,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        super().__init__(params, defaults, nonfinite, max_grad_norm)


def global_norm(grads: GradsLike, *, stream: Any = None) -> float:
    """The L2 norm of all gradients taken together (as torch's clip_grad_norm_
    computes it), in one multi-threaded native pass accumulating in float64.
    Gradients may be float16, bfloat16, float32 or float64, read-only, of any
    shape; they must be C-contiguous. CUDA arrays (float32, float64) are summed
    on their device, in the same order (one reduction queued on `stream`, then a
    wait for its result). A tree of gradients (nested dicts, lists and tuples)
    is summed in its traversal order, its leaves named by path."""
    names: Optional[Tuple[Any, ...]] = None
    if isinstance(grads, Mapping):
        names = tuple(grads.keys())
        seq: Sequence[Any] = [grads[k] for k in names]
    elif isinstance(grads, np.ndarray):
        seq = [grads]
    else:
        seq = grads if isinstance(grads, (list, tuple)) else list(grads)
    try:
        return _global_norm(seq, names, stream)
    except TypeError:
        # Read as a tree only after the flat forms refused it: a list or dict of arrays pays nothing for trees.
        if not _tree.is_tree(grads):
            raise
    leaves, paths = _tree.flatten_any(grads)
    return _global_norm(leaves, paths, stream)


def _global_norm(seq: Sequence[Any], names: Optional[Tuple[Any, ...]], stream: Any) -> float:
    patterns = ("params[{}]", "grads[{}]")
    if seq and cuda.is_cuda_array(seq[0]):
        cuda.require_compiled(label(0, names).replace("params", "grads", 1))
        return float(_core.cuda_global_norm(seq, patterns, names, stream))
    if stream is not None:
        raise TypeError("stream: only CUDA arrays take a stream (these gradients are NumPy arrays)")
    return _core.global_norm(seq, patterns, names)


_family.register(Adam, _family.ADAM)
_family.register(SGD, _family.SGD)
