"""The optimizers: parameter groups, state and checkpoints in Python; one native
call per step for every tensor.

Ownership (docs/api.md, "Concurrency" and "Copies"): each optimizer has one
native owner (adamcpp._core.StateCache) for everything its steps reuse, and a
lock that runs its calls one at a time. Groups and state dicts are dict
subclasses that notice their own edits; copies of them (pickle, deepcopy,
joblib) start fresh, so nothing a copy carries can make a cache look current.
"""

from __future__ import annotations

import abc
import copy
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from . import _core, _precision, cuda
from . import flat as _flat_storage
from ._hyper import AdamHyper, SgdHyper, adam_hyper, sgd_hyper
from ._validation import (
    check_float,
    check_grad_scale,
    check_max_grad_norm,
    check_nonfinite,
    check_param_array,
    check_step_count,
)

ParamsLike = Union[
    Sequence[np.ndarray], Mapping[str, np.ndarray], Sequence[Mapping[str, Any]], _flat_storage.FlatParams
]
GradsLike = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]
LR = Union[float, Callable[[int], float]]
Hyper = Union[AdamHyper, SgdHyper]

_INF = float("inf")
# Values that cannot change behind a group's back: a group whose
# hyperparameters are all of these keeps its validated tuple until it is edited.
_IMMUTABLE = (float, int, bool, str, type(None), np.number, np.bool_)


def _immutable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(v, _IMMUTABLE) for v in value)
    return isinstance(value, _IMMUTABLE)


def _state_patterns(roles: Tuple[str, ...]) -> Tuple[str, ...]:
    """Message labels of an optimizer's arrays, one per native role."""
    return ("params[{}]", "grads[{}]", *(f"{role} of params[{{}}]" for role in roles[2:]))


def _normalize_params(params: Any) -> Tuple[List[Dict[str, Any]], Optional[Tuple[Any, ...]]]:
    """Turns the three accepted forms into a list of group dicts (and the keys
    of dict-form params)."""
    if isinstance(params, np.ndarray):
        raise TypeError(
            "params: expected a sequence of arrays, a dict of arrays or a list of groups, "
            "got a single ndarray (wrap it in a list)"
        )
    if isinstance(params, Mapping):
        if "params" in params:
            raise TypeError("params: a single group must be passed inside a list: [{'params': [...], ...}]")
        keys = tuple(params.keys())
        if not keys:
            raise ValueError("params: the optimizer got an empty parameter dict")
        return [{"params": [params[k] for k in keys]}], keys
    if isinstance(params, (str, bytes)) or not isinstance(params, Iterable):
        raise TypeError(
            f"params: expected a sequence of arrays, a dict or a list of groups, got {type(params).__name__}"
        )
    items = list(params)
    if not items:
        raise ValueError("params: the optimizer got an empty parameter list")
    if all(isinstance(g, Mapping) for g in items):
        groups = []
        for gi, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"param_groups[{gi}]: a group dict needs a 'params' entry")
            groups.append(dict(g))
        return groups, None
    if any(isinstance(g, Mapping) for g in items):
        raise TypeError("params: mix of arrays and group dicts; pass either arrays or groups")
    return [{"params": items}], None


class _EditAwareDict(dict):
    """A dict that notices edits made through its methods (`_edited` runs after
    each). Its copies (pickle, deepcopy, joblib, copy.copy) hold the same
    items and start fresh: nothing noticed travels with them."""

    __slots__ = ()

    def _edited(self) -> None:
        """What an edit invalidates (each subclass says)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._edited()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._edited()

    def __ior__(self, other: Any) -> Any:  # type: ignore[misc]  # returns the dict itself, as dict's does
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._edited()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._edited()
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self._edited()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._edited()
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self._edited()

    def __reduce__(self) -> Any:
        return (type(self), (dict(self),))


class ParamGroup(_EditAwareDict):
    """A parameter group: a dict ("params" plus the hyperparameters) that keeps
    its validated hyperparameters until it is edited. A group holding a
    mutable value (a list or an array as betas) is validated at every step."""

    __slots__ = ("_hyper",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._hyper: Optional[Hyper] = None

    def _edited(self) -> None:
        self._hyper = None


class ParamState(_EditAwareDict):
    """One parameter's state. `_reader` is the mark of the native owner that
    last read this dict; any edit clears it, so that owner reads the dict again
    at its next step. Steps store "step" and state that starts late directly,
    keeping the mark."""

    __slots__ = ("_reader",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._reader: Any = None

    def _edited(self) -> None:
        self._reader = None


_core.set_state_type(ParamState)


class Optimizer(abc.ABC):
    """Base class: parameter forms, groups, the state list, checkpoints and the
    one native step.

    Each optimizer class names its native entry (`_native`), the labels of its
    arrays (`_patterns`, one per native role), how a group's hyperparameters are validated (`_hyper`) and its
    per-parameter state (`_new_state`, `_array_state`).
    """

    _native: Callable[..., Tuple[bool, Optional[float]]]
    # Set by a ZeroRedundancyOptimizer on its local optimizer: per tensor, the
    # parameters whose random bits its parts take (stochastic rounding keyed
    # on the whole model's parameters, not the shard's tensors).
    _rounding_pieces: Optional[List[Optional[np.ndarray]]] = None
    _cuda_native = ""  # the name of the native entry for CUDA arrays (adamcpp.cuda)
    _patterns: Tuple[str, ...] = ()  # message label of each native array role
    _half_params: ClassVar[bool] = False  # whether float16/bfloat16 parameters are accepted
    # name -> required in a loaded state dict (optional entries start on demand)
    _array_state: ClassVar[Dict[str, bool]] = {}
    # optional entries that the state keeps as None until they start
    _nullable_state: Tuple[str, ...] = ()

    def __init__(
        self,
        params: ParamsLike,
        defaults: Dict[str, Any],
        nonfinite: str = "propagate",
        max_grad_norm: Optional[float] = None,
    ):
        check_nonfinite(nonfinite)
        check_max_grad_norm(max_grad_norm)
        self._start_runtime()
        self.nonfinite = nonfinite
        self.max_grad_norm = max_grad_norm
        self._last_grad_norm: Optional[float] = None
        self._norm_pending = False
        self._hyper(defaults, "defaults")
        self.defaults: Dict[str, Any] = dict(defaults)
        self.param_groups: List[Dict[str, Any]] = []
        self.state: List[Dict[str, Any]] = []
        self._flat: List[np.ndarray] = []
        self._group_of: List[int] = []
        self._keys: Optional[Tuple[Any, ...]] = None
        # Flat mode (docs/api.md, "Flat storage"): every parameter is a view handed out by one FlatParams.
        self._fs: Optional[_flat_storage._FlatStorage] = None
        groups, keys = _normalize_params(_flat_storage.unwrap(params))
        self._cuda = self._device_for(groups, keys)
        source = _flat_storage.common_source(_loose_params(groups)) if self._cuda is None else None
        for group in groups:
            self._add_group(group, keys, with_state=source is None)
        self._keys = keys
        if source is not None:
            self._fs = _flat_storage._FlatStorage(self, source[0], source[1])

    def _start_runtime(self) -> None:
        """What an optimizer owns at run time and never copies: its native
        owner and its call lock."""
        self._state_cache = _core.StateCache()
        self._lock = threading.Lock()
        self._holder: Optional[int] = None  # the thread running a call
        # False once a group is validated again or the state changes hands: the next step that applies drops
        # the master copies that step left behind (_drop_stale_masters).
        self._masters_checked = False

    # ------------------------------------------------------------ one at a time
    def _enter(self) -> None:
        me = threading.get_ident()
        if not self._lock.acquire(False):
            if self._holder == me:
                raise RuntimeError(
                    f"{type(self).__name__}: called again while a call on this optimizer is running on the same "
                    "thread (from Python code that the call ran, such as a schedule); one call at a time"
                )
            self._lock.acquire()  # another thread's call: wait for it (the GIL is released meanwhile)
        self._holder = me

    def _leave(self) -> None:
        self._holder = None
        self._lock.release()

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Adds a group (a dict with "params" and optional overrides), like torch."""
        self._enter()
        try:
            self._sync_structure()
            if self._fs is not None:
                raise ValueError(
                    "add_param_group: a flat optimizer steps a fixed set of FlatParams views; "
                    "build another optimizer for more parameters"
                )
            self._add_group(param_group, None)
        finally:
            self._leave()

    @staticmethod
    def _label(i: int, keys: Optional[Tuple[Any, ...]]) -> str:
        return f"params[{keys[i]!r}]" if keys is not None and i < len(keys) else f"params[{i}]"

    @staticmethod
    def _group_params(ps: Any, gi: int) -> List[Any]:
        """A group's "params" entry as a list (one bare array is accepted)."""
        if isinstance(ps, np.ndarray):
            return [ps]
        if isinstance(ps, Mapping):
            raise TypeError(f"param_groups[{gi}]['params']: expected a list of arrays, got a dict")
        return list(ps)

    def _device_for(self, groups: List[Dict[str, Any]], keys: Optional[Tuple[Any, ...]]) -> Any:
        """The CUDA side of an optimizer whose first parameter is a CUDA array (adamcpp.cuda), else None:
        the first parameter decides where the optimizer runs."""
        ps = groups[0]["params"] = self._group_params(groups[0]["params"], 0)  # an iterator is read once
        if not ps or not cuda.is_cuda_array(ps[0]):
            return None
        return cuda.OptimizerDevice(ps[0], self._label(0, keys))

    def _check_new_params(self, flat: Sequence[Any], keys: Optional[Tuple[Any, ...]], start: int = 0) -> None:
        """The rules for the parameters of flat positions start, start + 1, ...:
        valid arrays (on the optimizer's device), each appearing once in the whole optimizer."""
        seen = {id(p) for p in flat[:start]}
        first: Optional[Dict[str, Any]] = None
        for i in range(start, len(flat)):
            p = flat[i]
            label = self._label(i, keys)
            if self._cuda is None:
                check_param_array(p, label, self._half_params)
            else:
                found = self._cuda.check_param(p, label)
                first = first if first is not None else self._cuda.check_param(flat[0], self._label(0, keys))
                cuda.same_device(found, first, label)
            if id(p) in seen:
                raise ValueError(f"{label}: the same array appears more than once in the optimizer")
            seen.add(id(p))

    def _add_group(
        self, param_group: Mapping[str, Any], keys: Optional[Tuple[Any, ...]], with_state: bool = True
    ) -> None:
        gi = len(self.param_groups)
        group, ps = validated_group(self, self.defaults, param_group, gi, self._flat, keys)
        self.param_groups.append(ParamGroup(group))
        for k, p in enumerate(ps):
            self._check_layout(p, group, self._label(len(self._flat) + k, keys))
        for p in ps:
            self._flat.append(p)
            self._group_of.append(gi)
            if with_state:
                self.state.append(ParamState(self._fresh_state(p, group)))
        self._keys = None

    def _layout(self) -> Tuple[List[np.ndarray], List[int]]:
        """The flat parameter list and each parameter's group, from param_groups."""
        flat: List[np.ndarray] = []
        group_of: List[int] = []
        for gi, g in enumerate(self.param_groups):
            ps = g["params"]
            if type(ps) is not list:
                ps = self._group_params(ps, gi)
                g["params"] = ps
            flat.extend(ps)
            group_of.extend([gi] * len(ps))
        return flat, group_of

    def _sync_structure(self) -> None:
        """Follows edits of `param_groups[i]["params"]` between calls. State
        stays with its array. An array new to the optimizer that takes the
        place of one that left (same position, group, shape and dtype: a
        parameter replaced by a copy, as after a reload) keeps that place's
        state; any other new array gets fresh state. A flat optimizer keeps its
        parameters and follows a replaced `state` list (flat.py)."""
        if self._fs is not None:
            self._fs.check_structure()
            return
        if _core.params_unchanged(self.param_groups, self._flat, self._group_of):
            return
        self._masters_checked = False  # state may have moved into a group without master copies
        flat, group_of = self._layout()
        keys = self._keys if len(flat) == len(self._flat) else None
        self._check_new_params(flat, keys)
        for i, (p, gi) in enumerate(zip(flat, group_of)):
            self._check_layout(p, self.param_groups[gi], self._label(i, keys))
        by_id = {id(p): s for p, s in zip(self._flat, self.state)}
        present = {id(p) for p in flat}
        state = []
        for i, (p, gi) in enumerate(zip(flat, group_of)):
            s = by_id.get(id(p))
            if s is None and i < len(self._flat):
                old = self._flat[i]
                if id(old) not in present and self._group_of[i] == gi and self._layout_of(old) == self._layout_of(p):
                    s = self.state[i]
            state.append(s if s is not None else ParamState(self._fresh_state(p, self.param_groups[gi])))
        self._flat, self._group_of, self.state = flat, group_of, state
        self._keys = keys

    def _group_hypers(self) -> List[Hyper]:
        """Each group's hyperparameters for this step. A ParamGroup keeps its
        validated tuple until it is edited (unless it holds a mutable value);
        any other dict is validated at every step. A schedule is called at
        every step with t, the number of updates already applied to the
        group's first parameter."""
        hypers: List[Hyper] = []
        first = 0
        for gi, g in enumerate(self.param_groups):
            if type(g) is not ParamGroup or g._hyper is None:
                self._masters_checked = False
            hyper = group_hyper(g, gi, self._hyper)
            lr = g["lr"]
            size = len(g["params"])
            if callable(lr):
                t = self.state[first]["step"] if size else 0  # an emptied group updates nothing
                hyper = hyper._replace(lr=scheduled_lr(lr, t, gi))
            first += size
            hypers.append(hyper)
        return hypers

    # -------------------------------------------------------------------- step
    def _grads_list(self, grads: Any) -> Any:
        kind = type(grads)
        if kind is list or kind is tuple:
            return grads
        if isinstance(grads, Mapping):
            if self._keys is None:
                raise TypeError("grads: a dict of gradients needs dict-form params; pass a list in parameter order")
            missing = [k for k in self._keys if k not in grads]
            if missing:
                raise ValueError(f"grads: missing gradient(s) for key(s) {missing}")
            if len(grads) != len(self._keys):
                extra = [k for k in grads if k not in set(self._keys)]
                raise ValueError(f"grads: unexpected key(s) {extra}")
            return [grads[k] for k in self._keys]
        if isinstance(grads, np.ndarray):
            raise TypeError("grads: expected a sequence of arrays (one per parameter), got a single ndarray")
        if isinstance(grads, (list, tuple)):
            return grads
        raise TypeError(f"grads: expected a list, tuple or dict of arrays, got {type(grads).__name__}")

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
        if stream is not None and self._cuda is None:
            raise TypeError("stream: only an optimizer of CUDA arrays takes a stream (its parameters are NumPy arrays)")
        self._enter()
        try:
            if self._fs is not None:
                applied, norm = self._fs.step(grads, grad_scale)
                if norm is not None:
                    self.last_grad_norm = norm
                return bool(applied)
            self._sync_structure()
            nonfinite = check_nonfinite(self.nonfinite)
            max_norm = check_max_grad_norm(self.max_grad_norm)
            grad_list = self._grads_list(grads)
            scale = check_grad_scale(grad_scale)
            hypers = self._group_hypers()
            if self._cuda is not None:
                return self._step_on_device(grad_list, hypers, scale, nonfinite, max_norm, stream)
            extra = () if self._rounding_pieces is None else (None, self._rounding_pieces)  # norm_grads, pieces
            applied, norm = self._native(
                self._state_cache,
                self._flat,
                grad_list,
                self.state,
                self._group_of,
                hypers,
                scale,
                nonfinite,
                max_norm,
                self._patterns,
                self._keys,
                *extra,
            )
            if applied and not self._masters_checked:
                self._drop_stale_masters(hypers)
        finally:
            self._leave()
        if norm is not None:
            self._last_grad_norm = norm
        return bool(applied)

    def _step_on_device(
        self, grad_list: Any, hypers: List[Hyper], scale: float, nonfinite: int, max_norm: float, stream: Any
    ) -> bool:
        """The native step of a CUDA optimizer (adamcpp.cuda); the lock is held."""
        assert self._cuda is not None
        native = getattr(_core, self._cuda_native)
        applied, norm, pending = native(
            self._state_cache,
            self._cuda.workspace,
            self._flat,
            grad_list,
            self.state,
            self._group_of,
            hypers,
            scale,
            nonfinite,
            max_norm,
            self._patterns,
            self._keys,
            stream,
        )
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
        if off and self._fs is not None:
            self._fs.drop_entry("master_param", off)
        elif off:
            for s, gi in zip(self.state, self._group_of):
                if gi in off and "master_param" in s:
                    del s["master_param"]
        self._masters_checked = True

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step that clipped (section 2.5 of docs/api.md). On CUDA the
        norm stays on the device until it is read here: reading it waits for that step."""
        if self._norm_pending:
            self._enter()
            try:
                if self._norm_pending and self._cuda is not None:
                    self._last_grad_norm = self._cuda.pending_norm()
                    self._norm_pending = False
            finally:
                self._leave()
        return self._last_grad_norm

    @last_grad_norm.setter
    def last_grad_norm(self, value: Optional[float]) -> None:
        self._last_grad_norm = value
        self._norm_pending = False

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """PyTorch's layout: {"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}.
        Arrays are copied; a callable `lr` is stored as the object itself."""
        self._enter()
        try:
            self._sync_structure()
            state = {}
            for i, s in enumerate(self.state):
                state[i] = {k: self._export_value(k, v, i) for k, v in s.items()}
            groups = []
            index = 0
            for g in self.param_groups:
                entry = {k: v for k, v in g.items() if k != "params"}
                entry["params"] = list(range(index, index + len(g["params"])))
                index += len(g["params"])
                groups.append(entry)
        finally:
            self._leave()
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict in PyTorch's layout (ours, or torch.optim's with
        tensors converted by np.asarray). Everything is validated first; on any
        error nothing changes."""
        self._enter()
        try:
            self._sync_structure()
            self._load(state_dict)
        finally:
            self._leave()

    def _load(self, state_dict: Mapping[str, Any]) -> None:
        new_groups, entries = read_state_dict(state_dict, self.param_groups, self.defaults, self._hyper)
        params = self._flat if self._fs is None else self._fs.own  # flat mode: shaped as laid out
        new_state: List[Optional[Dict[str, Any]]] = [None] * len(params)
        for i, pid, entry in entries:
            new_state[i] = self._convert_state(
                entry, params[i], new_groups[self._group_of[i]], f"state_dict['state'][{pid}]"
            )
        states = [
            ParamState(s if s is not None else self._fresh_state(params[i], new_groups[self._group_of[i]]))
            for i, s in enumerate(new_state)
        ]
        if self._cuda is not None:  # everything validated: the arrays go to the device (nothing changes if that fails)
            device = self._cuda
            states = [
                ParamState({k: device.upload(v) if isinstance(v, np.ndarray) else v for k, v in s.items()})
                for s in states
            ]
        # Everything validated: commit.
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        if self._fs is not None:
            self._fs.load(states)  # into new flat state buffers
        else:
            self.state = states  # type: ignore[assignment]

    @staticmethod
    def _convert_hyper(key: str, value: Any) -> Any:
        if callable(value) and key == "lr":
            return value
        if isinstance(value, (tuple, list)):
            return tuple(np.asarray(v).item() if hasattr(v, "__array__") else v for v in value)
        if hasattr(value, "__array__") and not isinstance(value, np.ndarray):
            value = np.asarray(value)
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return value.item()
        return value

    def _convert_state(self, entry: Any, p: Any, group: Mapping[str, Any], where: str) -> Dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a dict")
        step = entry.get("step", 0)
        if cuda.is_cuda_array(step):  # torch's fused CUDA optimizers keep the count on the device
            step = cuda.to_numpy(step, f"{where}['step']")
        out: Dict[str, Any] = {"step": check_step_count(step, f"{where}['step']")}
        shape, param_dtype = self._layout_of(p)
        for name, required in self._array_state.items():
            dtype = self._entry_dtype(name, param_dtype, group)
            if entry.get(name) is None:
                if required:
                    raise ValueError(f"{where}: missing '{name}'")
                if name in self._nullable_state:
                    out[name] = None
                continue
            if dtype is None:
                continue
            value = entry[name]
            if cuda.is_cuda_array(value):
                arr = cuda.to_numpy(value, f"{where}['{name}']")
            else:
                arr = _precision.as_array(value, f"{where}['{name}']")
            if arr.shape != shape:
                raise ValueError(f"{where}['{name}']: expected shape {shape} like its parameter, got {arr.shape}")
            if not _precision.is_loadable(arr.dtype):
                raise TypeError(f"{where}['{name}']: expected a floating-point array, got dtype {arr.dtype}")
            out[name] = np.array(arr, dtype=dtype, order="C", copy=True)
        self._complete_state(out, p, group)
        return out

    def _entry_dtype(self, name: str, param_dtype: Any, group: Mapping[str, Any]) -> Optional[np.dtype]:
        """The dtype of a state entry of a parameter of `param_dtype` in `group` (None: the entry does not apply)."""
        return np.dtype(param_dtype)

    def _complete_state(self, state: Dict[str, Any], p: Any, group: Mapping[str, Any]) -> None:
        """Adds to a loaded state what a parameter needs and the state dict lacked (nothing, here)."""
        return None

    def _check_layout(self, p: Any, group: Mapping[str, Any], label: str) -> None:
        """Refuses a parameter that its group's options cannot store, before any state is made (none, here)."""
        return None

    # ----------------------------------------------------------- the device
    def _layout_of(self, p: Any) -> Tuple[Tuple[int, ...], Any]:
        """A parameter's shape and dtype (read without CUDA for a device array)."""
        if self._cuda is None or isinstance(p, np.ndarray):
            return tuple(p.shape), p.dtype
        return self._cuda.layout(p)

    def _fresh_state(self, p: Any, group: Mapping[str, Any]) -> Dict[str, Any]:
        """A new parameter's state. On CUDA the arrays start (on the device) at the first step that
        needs them, so they are None until then."""
        if self._cuda is None:
            return self._new_state(p, group)
        return {"step": 0, **{k: None for k, req in self._array_state.items() if req or k in self._nullable_state}}

    def _export_value(self, key: str, v: Any, i: int) -> Any:
        """A state value as state_dict() holds it: arrays as NumPy copies (an unstarted CUDA moment as
        the zeros it starts from)."""
        if isinstance(v, np.ndarray):
            return v.copy()
        if self._cuda is not None:
            if v is None and self._array_state.get(key):
                shape, dtype = self._layout_of(self._flat[i])
                return np.zeros(shape, dtype)
            if v is not None and cuda.is_cuda_array(v):
                return cuda.to_numpy(v, f"state[{i}][{key!r}]")
        return copy.copy(v)

    # --------------------------------------------------------------- subclass
    @abc.abstractmethod
    def _hyper(self, group: Mapping[str, Any], where: str) -> Hyper:
        """The group's validated hyperparameters (lr 0.0 while it is a
        schedule, whose value each step checks)."""

    @abc.abstractmethod
    def _new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        """A new parameter's state."""

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> Dict[str, Any]:
        # The runtime (native owner, lock) is never copied, and the flat list is
        # derived from param_groups again, so the copy's lists cannot disagree
        # (joblib, for one, restores every array as a distinct copy).
        self._enter()
        try:
            self._sync_structure()
            if self._norm_pending and self._cuda is not None:  # a copy carries the number, not the device's copy
                self._last_grad_norm = self._cuda.pending_norm()
                self._norm_pending = False
            state = self.__dict__.copy()
            if self._fs is not None:
                # A flat optimizer travels as its FlatParams (whose copy makes its
                # views again), each parameter's index in it and plain state dicts;
                # its copy lays the state out in new flat buffers.
                state["_flat_copy"] = self._fs.export()
                state["param_groups"] = [ParamGroup({**g, "params": len(g["params"])}) for g in self.param_groups]
                del state["state"]
        finally:
            self._leave()
        state["last_grad_norm"] = state.pop("_last_grad_norm")
        runtime = ("_state_cache", "_lock", "_holder", "_masters_checked", "_norm_pending")
        for key in (*runtime, "_flat", "_group_of", "_cuda", "_fs"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        last_grad_norm = state.pop("last_grad_norm", None)
        flat_copy = state.pop("_flat_copy", None)
        self.__dict__.update(state)
        self._start_runtime()
        self._fs = None
        self._cuda = None
        if flat_copy is not None:
            source, index, states = flat_copy
            views = [source._param_views[j] for j in index]
            start = 0
            for g in self.param_groups:
                count = g["params"]
                g["params"] = views[start : start + count]
                start += count
            self.state = []
            self._flat, self._group_of = self._layout()
            self._fs = _flat_storage._FlatStorage(self, source, index, states)
        else:
            self._flat, self._group_of = self._layout()
            if self._flat and cuda.is_cuda_array(self._flat[0]):
                self._cuda = cuda.OptimizerDevice(self._flat[0], self._label(0, self._keys))
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


def validated_group(
    probe: Optimizer,
    defaults: Mapping[str, Any],
    param_group: Any,
    gi: int,
    flat: Sequence[Any],
    keys: Optional[Tuple[Any, ...]],
) -> Tuple[Dict[str, Any], List[Any]]:
    """add_param_group's rules and messages for a new group gi after the
    parameters `flat`: the group's dict ("params" a list, `defaults` filled in,
    every hyperparameter checked by `probe`) and its parameters. Changes nothing."""
    if not isinstance(param_group, Mapping) or "params" not in param_group:
        raise TypeError("param_group: expected a dict with a 'params' entry")
    group = dict(param_group)
    ps = probe._group_params(group["params"], gi)
    if not ps:
        raise ValueError(f"param_groups[{gi}]['params']: the group has no parameters")
    probe._check_new_params(list(flat) + ps, keys, start=len(flat))
    for key, value in defaults.items():
        group.setdefault(key, value)
    unknown = sorted(set(group) - set(defaults) - {"params"})
    if unknown:
        raise ValueError(f"param_groups[{gi}]: unknown hyperparameter(s) {unknown}; known: {sorted(defaults)}")
    probe._hyper(group, f"param_groups[{gi}]")
    group["params"] = ps
    return group, ps


def group_hyper(g: Mapping[str, Any], gi: int, check_hyper: Callable[[Mapping[str, Any], str], Any]) -> Any:
    """Group gi's validated hyperparameters: a ParamGroup keeps its tuple
    until it is edited (unless it holds a mutable value, re-read every
    step); any other mapping is validated by `check_hyper` at every call."""
    hyper = g._hyper if type(g) is ParamGroup else None
    if hyper is None:
        hyper = check_hyper(g, f"param_groups[{gi}]")
        if type(g) is ParamGroup and all(
            _immutable(v) or (k == "lr" and callable(v)) for k, v in g.items() if k != "params"
        ):
            g._hyper = hyper
    return hyper


def scheduled_lr(lr: Callable[[int], Any], t: int, gi: int) -> float:
    """A schedule's value at t (updates already applied), checked like any lr."""
    value = lr(t)
    if type(value) is not float or not (0.0 <= value < _INF):
        value = check_float(value, f"param_groups[{gi}]['lr']({t})", minimum=0.0)
    return value


def read_state_dict(
    state_dict: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
    defaults: Mapping[str, Any],
    check_hyper: Callable[[Mapping[str, Any], str], Any],
) -> Tuple[List[Dict[str, Any]], List[Tuple[int, int, Any]]]:
    """The layout of a state dict in PyTorch's form checked against an
    optimizer's groups (the messages of load_state_dict): each group merged
    with the saved values of the hyperparameters in `defaults` (checked by
    `check_hyper`, nothing committed), and (parameter index in the optimizer's
    order, saved id, entry) for every saved state entry. Shared by
    Optimizer.load_state_dict and ZeroRedundancyOptimizer's loads."""
    if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
        raise ValueError("state_dict: expected a mapping with 'state' and 'param_groups'")
    saved_groups = list(state_dict["param_groups"])
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict: has {len(saved_groups)} parameter group(s), the optimizer has {len(param_groups)}"
        )
    id_to_index: Dict[int, int] = {}
    new_groups = []
    index = 0
    for gi, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, Mapping) or "params" not in saved:
            raise ValueError(f"state_dict['param_groups'][{gi}]: expected a dict with 'params'")
        ids = list(saved["params"])
        if len(ids) != len(group["params"]):
            raise ValueError(
                f"state_dict['param_groups'][{gi}]: has {len(ids)} parameter(s), "
                f"the optimizer's group has {len(group['params'])}"
            )
        for pid in ids:
            id_to_index[int(pid)] = index
            index += 1
        merged = dict(group)
        for key in defaults:
            if key in saved:
                merged[key] = Optimizer._convert_hyper(key, saved[key])
        check_hyper(merged, f"state_dict['param_groups'][{gi}]")
        new_groups.append(merged)
    saved_state = state_dict["state"]
    if not isinstance(saved_state, Mapping):
        raise ValueError("state_dict['state']: expected a mapping from parameter id to state")
    entries = []
    for key, entry in saved_state.items():
        try:
            pid = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"state_dict['state']: bad parameter id {key!r}") from None
        if pid not in id_to_index:
            raise ValueError(f"state_dict['state']: parameter id {pid} is not in any parameter group")
        _check_second_moments(entry, f"state_dict['state'][{pid}]")
        entries.append((id_to_index[pid], pid, entry))
    return new_groups, entries


def _check_second_moments(entry: Any, where: str) -> None:
    """Refuses a negative or NaN exp_avg_sq / max_exp_avg_sq (its square root
    would make the next step NaN). Anything else wrong with the entry is the
    caller's to refuse."""
    for name in ("exp_avg_sq", "max_exp_avg_sq") if isinstance(entry, Mapping) else ():
        value = entry.get(name)
        if value is None:
            continue
        label = f"{where}['{name}']"
        arr = cuda.to_numpy(value, label) if cuda.is_cuda_array(value) else _precision.as_array(value, label)
        lowest = arr.min() if arr.size and _precision.is_loadable(arr.dtype) else 0.0  # NaN if any element is
        if not lowest >= 0:
            raise ValueError(f"{label}: a second moment must be >= 0 (not negative, not NaN); found {lowest}")


def _loose_params(groups: List[Dict[str, Any]]) -> List[Any]:
    """Every group's parameters in order, read without checking (the checks come after)."""
    out: List[Any] = []
    for g in groups:
        ps = g.get("params")
        if isinstance(ps, np.ndarray):
            out.append(ps)
        elif isinstance(ps, (list, tuple)):
            out.extend(ps)
        else:
            return []  # anything else is checked, and refused or read once, by _add_group
    return out


def _group_label(where: str) -> Callable[[str], str]:
    """Names a group's hyperparameter in messages: param_groups[0]['eps'], …['betas'][1]."""

    def label(field: str) -> str:
        if field in ("beta1", "beta2"):
            return f"{where}['betas'][{int(field[-1]) - 1}]"
        return f"{where}['{field}']"

    return label


def _lr_value(group: Mapping[str, Any]) -> Any:
    """A group's lr for validation: 0.0 stands in for a schedule."""
    lr = group["lr"]
    return 0.0 if callable(lr) else lr


class Adam(Optimizer):
    """Adam (coupled L2 weight decay) with every variant of the numerics in
    docs/api.md, and mixed precision: float16/bfloat16 parameters (with a
    float32 master copy by default), bfloat16 state with stochastic rounding,
    gradients of any float dtype.

    Parameters are updated in place; `step(grads)` updates every tensor of every
    group in one native call with the GIL released.
    """

    _native = _core.adam_step
    _cuda_native = "cuda_adam_step"
    _patterns = _state_patterns(_core.ADAM_ROLES)
    _half_params = True
    _array_state: ClassVar[Dict[str, bool]] = {
        "exp_avg": True,
        "exp_avg_sq": True,
        "max_exp_avg_sq": False,
        "master_param": False,
    }

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

    def _new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        dtype = _precision.state_dtype(p.dtype, group)
        state: Dict[str, Any] = {
            "step": 0,
            "exp_avg": np.zeros(p.shape, dtype),
            "exp_avg_sq": np.zeros(p.shape, dtype),
        }
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = np.zeros(p.shape, dtype)
        self._complete_state(state, p, group)
        return state

    def _entry_dtype(self, name: str, param_dtype: Any, group: Mapping[str, Any]) -> Optional[np.dtype]:
        return _precision.entry_dtype(name, np.dtype(param_dtype), group)

    def _complete_state(self, state: Dict[str, Any], p: Any, group: Mapping[str, Any]) -> None:
        if isinstance(p, np.ndarray) and _precision.has_master(p.dtype, group) and state.get("master_param") is None:
            state["master_param"] = p.astype(np.float32)

    def _check_layout(self, p: Any, group: Mapping[str, Any], label: str) -> None:
        if self._cuda is not None:
            if group.get("state_dtype", "float32") != "float32":
                raise TypeError(
                    f"{label}: state_dtype={group['state_dtype']!r} is not available for CUDA arrays (the CUDA unit "
                    "keeps float32 or float64 state)"
                )
            return
        _precision.check_state_layout(p.dtype, group, label)

    def _hyper(self, group: Mapping[str, Any], where: str) -> AdamHyper:
        return adam_hyper({**group, "lr": _lr_value(group)}, _group_label(where))


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

    _native = _core.sgd_step
    _cuda_native = "cuda_sgd_step"
    _patterns = _state_patterns(_core.SGD_ROLES)
    _array_state: ClassVar[Dict[str, bool]] = {"momentum_buffer": False}
    _nullable_state = ("momentum_buffer",)

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

    def _hyper(self, group: Mapping[str, Any], where: str) -> SgdHyper:
        return sgd_hyper({**group, "lr": _lr_value(group)}, _group_label(where))

    def _new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        return {"step": 0, "momentum_buffer": None}


def global_norm(grads: GradsLike, *, stream: Any = None) -> float:
    """The L2 norm of all gradients taken together (as torch's clip_grad_norm_
    computes it), in one multi-threaded native pass accumulating in float64.
    Gradients may be float16, bfloat16, float32 or float64, read-only, of any
    shape; they must be C-contiguous. CUDA arrays (float32, float64) are summed
    on their device, in the same order (one reduction queued on `stream`, then a
    wait for its result)."""
    names: Optional[Tuple[Any, ...]] = None
    if isinstance(grads, Mapping):
        names = tuple(grads.keys())
        seq: Sequence[Any] = [grads[k] for k in names]
    elif isinstance(grads, np.ndarray):
        seq = [grads]
    else:
        seq = grads if isinstance(grads, (list, tuple)) else list(grads)
    patterns = ("params[{}]", "grads[{}]")
    if seq and cuda.is_cuda_array(seq[0]):
        cuda.require_compiled(Optimizer._label(0, names).replace("params", "grads", 1))
        return float(_core.cuda_global_norm(seq, patterns, names, stream))
    if stream is not None:
        raise TypeError("stream: only CUDA arrays take a stream (these gradients are NumPy arrays)")
    return _core.global_norm(seq, patterns, names)
