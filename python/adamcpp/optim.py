"""The optimizers: parameter groups, state and checkpoints in Python; one native
call per step for every tensor."""

from __future__ import annotations

import abc
import copy
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from . import _core
from ._common import (
    check_betas,
    check_bool,
    check_eps_style,
    check_float,
    check_grad_scale,
    check_nonfinite,
    check_param_array,
)

ParamsLike = Union[Sequence[np.ndarray], Mapping[str, np.ndarray], Sequence[Mapping[str, Any]]]
GradsLike = Union[Sequence[np.ndarray], Mapping[str, np.ndarray]]
LR = Union[float, Callable[[int], float]]

_INF = float("inf")


def _max_grad_norm_arg(value: Optional[float]) -> float:
    """The native encoding of `max_grad_norm`: -1 for no clipping."""
    if value is None:
        return -1.0
    return check_float(value, "max_grad_norm", minimum=0.0)


def _group_lr(group: Dict[str, Any], where: str) -> float:
    """A group's validated lr; 0.0 stands in for a schedule, which each step calls."""
    lr = group["lr"]
    return 0.0 if callable(lr) else check_float(lr, f"{where}['lr']", minimum=0.0)


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


class ParamGroup(dict):
    """A parameter group: a plain dict that counts its edits, so that a step
    re-validates a group's hyperparameters only after they changed."""

    __slots__ = ("version",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.version = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self.version += 1

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self.version += 1

    def __ior__(self, other: Any) -> "ParamGroup":
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.version += 1

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.version += 1
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self.version += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.version += 1
        return super().popitem()

    def clear(self) -> None:
        super().clear()
        self.version += 1

    def __reduce__(self) -> Any:
        return (ParamGroup, (dict(self),))


class _EditCount:
    """How many times an optimizer's state dicts were edited (shared by them)."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class ParamState(dict):
    """One parameter's state: a plain dict that counts its edits, so that a
    step reads the state dicts again only after one of them changed (the
    native step keeps what it read). Steps update "step" and add late state
    without counting an edit."""

    __slots__ = ("_edits",)

    def __init__(self, data: Mapping[str, Any], edits: _EditCount):
        super().__init__(data)
        self._edits = edits

    def _edited(self) -> None:
        self._edits.count += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._edited()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._edited()

    def __ior__(self, other: Any) -> "ParamState":
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
        # Copies keep counting into the (copied) counter they share with their optimizer.
        return (ParamState, (dict(self), self._edits))


_core.set_counted_state_type(ParamState)


class Optimizer(abc.ABC):
    """Base class: parameter forms, groups, the state list and checkpoints.

    Subclasses define the hyperparameters (`_group_scalars`, which validates
    them), the per-tensor state (`_new_state`, `_array_state`) and the native
    step (`_native_step`).
    """

    # name -> required in a loaded state dict (optional entries are created on demand)
    _array_state: Dict[str, bool] = {}
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
        self.nonfinite = nonfinite
        _max_grad_norm_arg(max_grad_norm)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Optional[float] = None
        self._hyper_cache: List[Any] = []
        self._edits = _EditCount()
        self._state_cache = _core.StateCache()
        self._validate_group(dict(defaults), "defaults")
        self.defaults: Dict[str, Any] = dict(defaults)
        self.param_groups: List[Dict[str, Any]] = []
        self.state: List[Dict[str, Any]] = []
        self._flat: List[np.ndarray] = []
        self._group_of: List[int] = []
        self._keys: Optional[Tuple[Any, ...]] = None
        groups, keys = _normalize_params(params)
        for group in groups:
            self._add_group(group, keys)
        self._keys = keys

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Mapping[str, Any]) -> None:
        """Adds a group (a dict with "params" and optional overrides), like torch."""
        self._add_group(param_group, None)

    @staticmethod
    def _label(i: int, keys: Optional[Tuple[Any, ...]]) -> str:
        return f"params[{keys[i]!r}]" if keys is not None and i < len(keys) else f"params[{i}]"

    def _add_group(self, param_group: Mapping[str, Any], keys: Optional[Tuple[Any, ...]]) -> None:
        if not isinstance(param_group, Mapping) or "params" not in param_group:
            raise TypeError("param_group: expected a dict with a 'params' entry")
        gi = len(self.param_groups)
        group = dict(param_group)
        ps = group["params"]
        if isinstance(ps, np.ndarray):
            ps = [ps]
        elif isinstance(ps, Mapping):
            raise TypeError(f"param_groups[{gi}]['params']: expected a list of arrays, got a dict")
        ps = list(ps)
        if not ps:
            raise ValueError(f"param_groups[{gi}]['params']: the group has no parameters")
        base = len(self._flat)
        seen = {id(p) for p in self._flat}
        for j, p in enumerate(ps):
            label = self._label(base + j, keys)
            check_param_array(p, label)
            if id(p) in seen:
                raise ValueError(f"{label}: the same array appears more than once in the optimizer")
            seen.add(id(p))
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        unknown = sorted(set(group) - set(self.defaults) - {"params"})
        if unknown:
            raise ValueError(f"param_groups[{gi}]: unknown hyperparameter(s) {unknown}; known: {sorted(self.defaults)}")
        self._validate_group(group, f"param_groups[{gi}]")
        group["params"] = ps
        self.param_groups.append(ParamGroup(group))
        for p in ps:
            self._flat.append(p)
            self._group_of.append(gi)
            self.state.append(ParamState(self._new_state(p, group), self._edits))
        self._keys = None

    def _sync_structure(self) -> None:
        """Follows edits of `param_groups[i]["params"]` between steps: state stays
        with its array; new arrays get fresh state."""
        if _core.params_unchanged(self.param_groups, self._flat, self._group_of):
            return
        flat: List[np.ndarray] = []
        group_of: List[int] = []
        for gi, g in enumerate(self.param_groups):
            ps = g["params"]
            flat.extend(ps)
            group_of.extend([gi] * len(ps))
        if (
            len(flat) == len(self._flat)
            and group_of == self._group_of
            and all(a is b for a, b in zip(flat, self._flat))
        ):
            return
        old = {id(p): s for p, s in zip(self._flat, self.state)}
        keys = self._keys if len(flat) == len(self._flat) else None
        seen = set()
        state = []
        for i, (p, gi) in enumerate(zip(flat, group_of)):
            label = self._label(i, keys)
            check_param_array(p, label)
            if id(p) in seen:
                raise ValueError(f"{label}: the same array appears more than once in the optimizer")
            seen.add(id(p))
            state.append(
                old[id(p)] if id(p) in old else ParamState(self._new_state(p, self.param_groups[gi]), self._edits)
            )
        for g in self.param_groups:
            g["params"] = list(g["params"])
        self._flat, self._group_of, self.state = flat, group_of, state
        self._keys = None

    def _group_hypers(self) -> List[tuple]:
        """Each group's scalars for this step. A group's schedule position t is
        the number of updates already applied to its first parameter.

        Validated scalars are reused until the group is edited (a ParamGroup
        counts its edits; any other dict is validated at every step); a
        callable lr is called and checked every step."""
        hypers = []
        first = 0
        cache = self._hyper_cache
        if len(cache) != len(self.param_groups):
            cache[:] = [None] * len(self.param_groups)
        for gi, g in enumerate(self.param_groups):
            size = len(g["params"])
            t = self.state[first]["step"] if size else 0  # an emptied group updates nothing
            first += size
            hit = cache[gi]
            version = getattr(g, "version", None)
            if hit is not None and hit[0] is g and version is not None and hit[1] == version:
                scalars = hit[2]
            else:
                scalars = self._group_scalars(g, f"param_groups[{gi}]")
                cache[gi] = (g, version, scalars)
            lr = g["lr"]
            if callable(lr):
                value = lr(t)
                if type(value) is not float or not (0.0 <= value < _INF):
                    value = check_float(value, f"param_groups[{gi}]['lr']({t})", minimum=0.0)
                scalars = (value,) + scalars[1:]
            hypers.append(scalars)
        return hypers

    # -------------------------------------------------------------------- step
    def _grads_list(self, grads: Any) -> List[Any]:
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
            return grads  # type: ignore[return-value]
        raise TypeError(f"grads: expected a list, tuple or dict of arrays, got {type(grads).__name__}")

    def step(self, grads: GradsLike, *, grad_scale: float = 1.0) -> bool:
        """Applies one update to every parameter in one native call.

        Returns True when the update was applied, False when `nonfinite="skip"`
        found a NaN/Inf gradient (then nothing changed). With `max_grad_norm`
        set, the global gradient norm (after `grad_scale`) is computed in the
        same native call, gradients are scaled by min(1, max_grad_norm /
        (norm + 1e-6)) inside the kernel, and the norm is kept in
        `last_grad_norm`.
        """
        self._sync_structure()
        nonfinite = check_nonfinite(self.nonfinite)
        max_norm = _max_grad_norm_arg(self.max_grad_norm)
        grad_list = self._grads_list(grads)
        scale = check_grad_scale(grad_scale)
        hypers = self._group_hypers()
        applied, norm = self._native_step(grad_list, hypers, scale, nonfinite, max_norm)
        if norm is not None:
            self.last_grad_norm = norm
        return bool(applied)

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """PyTorch's layout: {"state": {i: {...}}, "param_groups": [{..., "params": [i, ...]}]}.
        Arrays are copied; a callable `lr` is stored as the object itself."""
        self._sync_structure()
        state = {}
        for i, s in enumerate(self.state):
            state[i] = {k: (v.copy() if isinstance(v, np.ndarray) else copy.copy(v)) for k, v in s.items()}
        groups = []
        index = 0
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k != "params"}
            entry["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Loads a state dict in PyTorch's layout (ours, or torch.optim's with
        tensors converted by np.asarray). Everything is validated first; on any
        error nothing changes."""
        self._sync_structure()
        if not isinstance(state_dict, Mapping) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("state_dict: expected a mapping with 'state' and 'param_groups'")
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict: has {len(saved_groups)} parameter group(s), the optimizer has {len(self.param_groups)}"
            )
        id_to_index: Dict[int, int] = {}
        new_groups = []
        index = 0
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
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
            for key in self.defaults:
                if key in saved:
                    merged[key] = self._convert_hyper(key, saved[key])
            self._validate_group(merged, f"state_dict['param_groups'][{gi}]")
            new_groups.append(merged)

        saved_state = state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError("state_dict['state']: expected a mapping from parameter id to state")
        new_state: List[Optional[Dict[str, Any]]] = [None] * len(self._flat)
        for key, entry in saved_state.items():
            try:
                pid = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"state_dict['state']: bad parameter id {key!r}") from None
            if pid not in id_to_index:
                raise ValueError(f"state_dict['state']: parameter id {pid} is not in any parameter group")
            i = id_to_index[pid]
            new_state[i] = self._convert_state(entry, self._flat[i], f"state_dict['state'][{pid}]")
        for i, s in enumerate(new_state):
            if s is None:
                s = self._new_state(self._flat[i], new_groups[self._group_of[i]])
            new_state[i] = ParamState(s, self._edits)
        # Everything validated: commit.
        for group, merged in zip(self.param_groups, new_groups):
            group.update(merged)
        self.state = new_state  # type: ignore[assignment]

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

    def _convert_state(self, entry: Any, p: np.ndarray, where: str) -> Dict[str, Any]:
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: expected a dict")
        out: Dict[str, Any] = {}
        step = entry.get("step", 0)
        step_arr = np.asarray(step)
        if step_arr.ndim != 0 or step_arr.dtype.kind not in "iuf" or not np.isfinite(step_arr):
            raise ValueError(f"{where}['step']: expected a non-negative integer, got {step!r}")
        step_val = step_arr.item()
        if step_val < 0 or float(step_val) != int(step_val):
            raise ValueError(f"{where}['step']: expected a non-negative integer, got {step!r}")
        out["step"] = int(step_val)
        for name, required in self._array_state.items():
            if entry.get(name) is None:
                if required:
                    raise ValueError(f"{where}: missing '{name}'")
                if name in self._nullable_state:
                    out[name] = None
                continue
            arr = np.asarray(entry[name])
            if arr.shape != p.shape:
                raise ValueError(f"{where}['{name}']: expected shape {p.shape} like its parameter, got {arr.shape}")
            if arr.dtype.kind != "f":
                raise TypeError(f"{where}['{name}']: expected a floating-point array, got dtype {arr.dtype}")
            out[name] = np.array(arr, dtype=p.dtype, order="C", copy=True)
        return out

    # --------------------------------------------------------------- subclass
    def _validate_group(self, group: Dict[str, Any], where: str) -> None:
        """Refuses a group with a missing or out-of-range hyperparameter."""
        self._group_scalars(group, where)

    @abc.abstractmethod
    def _new_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        """Implemented by each optimizer."""

    @abc.abstractmethod
    def _group_scalars(self, group: Dict[str, Any], where: str) -> tuple:
        """Implemented by each optimizer: the group's validated native tuple,
        lr first (0.0 stands in for a callable lr, evaluated per step)."""

    @abc.abstractmethod
    def _native_step(
        self, grads: List[Any], hypers: List[tuple], grad_scale: float, nonfinite: int, max_grad_norm: float
    ) -> Tuple[bool, Optional[float]]:
        """Implemented by each optimizer: one native call; returns (applied, grad_norm).
        State that starts late (max_exp_avg_sq when amsgrad is switched on, a
        momentum buffer) is created by the native call and stored only if the
        step applies."""

    def __getstate__(self) -> Dict[str, Any]:
        # The native cache is a view of this object's dicts: a copy gets its own.
        state = self.__dict__.copy()
        del state["_state_cache"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._state_cache = _core.StateCache()

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


_STATE_PATTERNS = (
    "params[{}]",
    "grads[{}]",
    "exp_avg of params[{}]",
    "exp_avg_sq of params[{}]",
    "max_exp_avg_sq of params[{}]",
)


class Adam(Optimizer):
    """Adam (coupled L2 weight decay) with every variant of the numerics in API.md.

    Parameters are updated in place; `step(grads)` updates every tensor of every
    group in one native call with the GIL released.
    """

    _array_state = {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": False}

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
        )
        super().__init__(params, defaults, nonfinite, max_grad_norm)

    def _new_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        state: Dict[str, Any] = {"step": 0, "exp_avg": np.zeros_like(p), "exp_avg_sq": np.zeros_like(p)}
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = np.zeros_like(p)
        return state

    def _group_scalars(self, group: Dict[str, Any], where: str) -> tuple:
        lr = _group_lr(group, where)
        beta1, beta2 = check_betas(group["betas"], f"{where}['betas']")
        eps = check_float(group["eps"], f"{where}['eps']", minimum=0.0)
        weight_decay = check_float(group["weight_decay"], f"{where}['weight_decay']", minimum=0.0)
        amsgrad = check_bool(group["amsgrad"], f"{where}['amsgrad']")
        maximize = check_bool(group["maximize"], f"{where}['maximize']")
        decoupled = check_bool(group["decoupled_weight_decay"], f"{where}['decoupled_weight_decay']")
        keras = check_eps_style(group["eps_style"], f"{where}['eps_style']") == "keras"
        return (lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, keras)

    def _native_step(self, grads, hypers, grad_scale, nonfinite, max_grad_norm):
        return _core.adam_step(
            self._flat,
            grads,
            None,
            None,
            None,
            None,
            self.state,
            self._group_of,
            hypers,
            grad_scale,
            nonfinite,
            max_grad_norm,
            _STATE_PATTERNS,
            self._keys,
            self._state_cache,
            self._edits.count,
        )


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
        )


_SGD_PATTERNS = ("params[{}]", "grads[{}]", "momentum_buffer of params[{}]")


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, with
    torch.optim.SGD's numerics:

        g = grad * grad_scale (negated when maximize);  g += weight_decay * p
        buf = g on the first momentum step, else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) or g = buf
        p = p - lr * g

    State per parameter: {"step": int, "momentum_buffer": array or None}.
    """

    _array_state = {"momentum_buffer": False}
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

    def _group_scalars(self, group: Dict[str, Any], where: str) -> tuple:
        lr = _group_lr(group, where)
        momentum = check_float(group["momentum"], f"{where}['momentum']", minimum=0.0)
        dampening = check_float(group["dampening"], f"{where}['dampening']", minimum=0.0)
        if dampening > 1.0:
            raise ValueError(f"{where}['dampening']: expected a value in [0, 1], got {dampening!r}")
        weight_decay = check_float(group["weight_decay"], f"{where}['weight_decay']", minimum=0.0)
        nesterov = check_bool(group["nesterov"], f"{where}['nesterov']")
        maximize = check_bool(group["maximize"], f"{where}['maximize']")
        if nesterov and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError(f"{where}['nesterov']: Nesterov momentum needs momentum > 0 and dampening == 0")
        return (lr, momentum, dampening, weight_decay, nesterov, maximize)

    def _new_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": 0, "momentum_buffer": None}

    def _native_step(self, grads, hypers, grad_scale, nonfinite, max_grad_norm):
        return _core.sgd_step(
            self._flat,
            grads,
            self.state,
            self._group_of,
            hypers,
            grad_scale,
            nonfinite,
            max_grad_norm,
            _SGD_PATTERNS,
            self._keys,
            self._state_cache,
            self._edits.count,
        )


def global_norm(grads: GradsLike) -> float:
    """The L2 norm of all gradients taken together (as torch's clip_grad_norm_
    computes it), in one multi-threaded native pass accumulating in float64.
    Gradients may be float32 or float64, read-only, of any shape; they must be
    C-contiguous."""
    if isinstance(grads, Mapping):
        names: Optional[Tuple[Any, ...]] = tuple(grads.keys())
        seq: Sequence[Any] = [grads[k] for k in names]
    elif isinstance(grads, np.ndarray):
        names, seq = None, [grads]
    else:
        names, seq = None, grads if isinstance(grads, (list, tuple)) else list(grads)
    return _core.global_norm(seq, ("params[{}]", "grads[{}]"), names)
