"""Parameter groups and the parameter forms: the three accepted forms of
`params` turned into groups, the group and state dicts that notice their own
edits, each new group's rules, each step's hyperparameters and gradients.

Groups and state dicts are dict subclasses that notice their own edits; copies
of them (pickle, deepcopy, joblib) start fresh, so nothing a copy carries can
make a cache look current."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._validation import check_float

_INF = float("inf")
# Values that cannot change behind a group's back: a group whose
# hyperparameters are all of these keeps its validated tuple until it is edited.
_IMMUTABLE = (float, int, bool, str, type(None), np.number, np.bool_)


def _immutable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(isinstance(v, _IMMUTABLE) for v in value)
    return isinstance(value, _IMMUTABLE)


def normalize_params(params: Any) -> Tuple[List[Dict[str, Any]], Optional[Tuple[Any, ...]]]:
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
                raise ValueError(
                    f"param_groups[{gi}]: a group dict needs a 'params' entry (a list of dicts is a list of "
                    "parameter groups; params must be a list or dict of arrays: flatten nested parameters into a "
                    "list or a dict of arrays)"
                )
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

    def _before_edit(self) -> None:
        """What must happen before any edit (each subclass says)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        self._before_edit()
        super().__setitem__(key, value)
        self._edited()

    def __delitem__(self, key: Any) -> None:
        self._before_edit()
        super().__delitem__(key)
        self._edited()

    def __ior__(self, other: Any) -> Any:  # type: ignore[misc]  # returns the dict itself, as dict's does
        self.update(other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._before_edit()
        super().update(*args, **kwargs)
        self._edited()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._before_edit()
        self._edited()
        return super().setdefault(key, default)

    def pop(self, *args: Any) -> Any:
        self._before_edit()
        self._edited()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._before_edit()
        self._edited()
        return super().popitem()

    def clear(self) -> None:
        self._before_edit()
        super().clear()
        self._edited()

    def __reduce__(self) -> Any:
        return (type(self), (dict(self),))


class ParamGroup(_EditAwareDict):
    """A parameter group: a dict ("params" plus the hyperparameters) that keeps
    its validated hyperparameters until it is edited. A group holding a
    mutable value (a list or an array as betas) is validated at every step."""

    # The validated tuple (None until validated, and after any edit): read on every step, so a slot the
    # optimizer reads directly.
    __slots__ = ("validated_hyper",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.validated_hyper: Any = None

    def _edited(self) -> None:
        self.validated_hyper = None

    def validated(self, gi: int, check_hyper: Callable[[Mapping[str, Any], str], Any]) -> Any:
        """The validated hyperparameters: kept until an edit, unless a value is mutable (re-read every step)."""
        hyper = self.validated_hyper
        if hyper is None:
            hyper = check_hyper(self, f"param_groups[{gi}]")
            if all(_immutable(v) or (k == "lr" and callable(v)) for k, v in self.items() if k != "params"):
                self.validated_hyper = hyper
        return hyper


class ParamState(_EditAwareDict):
    """One parameter's state. `_reader` is the mark of the native owner that
    last read this dict (a `_core.StepCounts`); any edit clears it, so that
    owner reads the dict again at its next step. Full steps store "step" and
    state that starts late directly, keeping the mark; fast steps (the list
    mode's plan) keep the new count natively, and every read or edit of the
    dict through its methods first writes it in (`_reader.flush()`): whatever
    looks at a count sees the true one. A `values()` or `items()` view shows
    the counts as of the last such read or edit."""

    __slots__ = ("_reader",)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._reader: Any = None

    def _edited(self) -> None:
        self._reader = None

    def _current(self) -> None:
        reader = self._reader
        if reader is not None:
            reader.flush()

    # Reads: the counts written in first.
    def __getitem__(self, key: Any) -> Any:
        self._current()
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._current()
        return super().get(key, default)

    def __iter__(self) -> Any:  # also makes dict(s), {**s} and update(s) read through __getitem__
        self._current()
        return super().__iter__()

    def values(self) -> Any:
        self._current()
        return super().values()

    def items(self) -> Any:
        self._current()
        return super().items()

    def copy(self) -> Dict[Any, Any]:
        self._current()
        return dict(super().items())

    def __repr__(self) -> str:
        self._current()
        return super().__repr__()

    def __eq__(self, other: Any) -> bool:
        self._current()
        if isinstance(other, ParamState):
            other._current()
        return super().__eq__(other)

    def __ne__(self, other: Any) -> bool:
        self._current()
        if isinstance(other, ParamState):
            other._current()
        return super().__ne__(other)

    __hash__ = None  # type: ignore[assignment]  # as dict's

    def __or__(self, other: Any) -> Any:
        self._current()
        return super().__or__(other)

    def __ror__(self, other: Any) -> Any:
        self._current()
        return super().__ror__(other)

    # Edits (_EditAwareDict's methods): the counts written in first, so that an edit of "step" is the last word.
    _before_edit = _current


_core.set_state_type(ParamState)
_core.set_group_type(ParamGroup)


def label(i: int, keys: Optional[Tuple[Any, ...]]) -> str:
    """Parameter i's name in messages: params[3], or params['w'] for dict-form params."""
    return f"params[{keys[i]!r}]" if keys is not None and i < len(keys) else f"params[{i}]"


def group_params(ps: Any, gi: int) -> List[Any]:
    """A group's "params" entry as a list (one bare array is accepted)."""
    if isinstance(ps, np.ndarray):
        return [ps]
    if isinstance(ps, Mapping):
        raise TypeError(f"param_groups[{gi}]['params']: expected a list of arrays, got a dict")
    return list(ps)


def loose_params(groups: List[Dict[str, Any]]) -> List[Any]:
    """Every group's parameters in order, read without checking (the checks come after)."""
    out: List[Any] = []
    for g in groups:
        ps = g.get("params")
        if isinstance(ps, np.ndarray):
            out.append(ps)
        elif isinstance(ps, (list, tuple)):
            out.extend(ps)
        else:
            return []  # anything else is checked, and refused or read once, when its group is added
    return out


def check_new_params(
    params: Sequence[Any], keys: Optional[Tuple[Any, ...]], start: int, check_one: Callable[[Any, int], None]
) -> None:
    """The rules for parameters start, start + 1, ...: each valid (`check_one(p, i)`) and appearing once."""
    seen = {id(p) for p in params[:start]}
    for i in range(start, len(params)):
        p = params[i]
        check_one(p, i)
        if id(p) in seen:
            raise ValueError(f"{label(i, keys)}: the same array appears more than once in the optimizer")
        seen.add(id(p))


def check_new_arrays(params: Sequence[Any], keys: Optional[Tuple[Any, ...]], start: int, half: bool) -> None:
    """check_new_params for NumPy parameters: the native step's parameter rule (float16/bfloat16 too when `half`)."""
    check_new_params(params, keys, start, lambda p, i: _core.check_param(p, label(i, keys), half))


def validated_group(
    check_hyper: Callable[[Mapping[str, Any], str], Any],
    check_params: Callable[[Sequence[Any], Optional[Tuple[Any, ...]], int], None],
    defaults: Mapping[str, Any],
    param_group: Any,
    gi: int,
    flat: Sequence[Any],
    keys: Optional[Tuple[Any, ...]],
) -> Tuple[Dict[str, Any], List[Any]]:
    """add_param_group's rules and messages for a new group gi after the
    parameters `flat`: the group's dict ("params" a list, `defaults` filled in,
    every hyperparameter checked by `check_hyper`, the new parameters by
    `check_params(all, keys, start)`) and its parameters. Changes nothing."""
    if not isinstance(param_group, Mapping) or "params" not in param_group:
        raise TypeError("param_group: expected a dict with a 'params' entry")
    group = dict(param_group)
    ps = group_params(group["params"], gi)
    if not ps:
        raise ValueError(f"param_groups[{gi}]['params']: the group has no parameters")
    check_params([*flat, *ps], keys, len(flat))
    for key, value in defaults.items():
        group.setdefault(key, value)
    unknown = sorted(set(group) - set(defaults) - {"params"})
    if unknown:
        raise ValueError(f"param_groups[{gi}]: unknown hyperparameter(s) {unknown}; known: {sorted(defaults)}")
    check_hyper(group, f"param_groups[{gi}]")
    group["params"] = ps
    return group, ps


def group_hyper(g: Mapping[str, Any], gi: int, check_hyper: Callable[[Mapping[str, Any], str], Any]) -> Any:
    """Group gi's validated hyperparameters: a ParamGroup keeps its tuple
    until it is edited (unless it holds a mutable value, re-read every
    step); any other mapping is validated by `check_hyper` at every call."""
    if type(g) is ParamGroup:
        return g.validated(gi, check_hyper)
    return check_hyper(g, f"param_groups[{gi}]")


def scheduled_lr(lr: Callable[[int], Any], t: int, gi: int) -> float:
    """A schedule's value at t (updates already applied), checked like any lr."""
    value = lr(t)
    if type(value) is not float or not (0.0 <= value < _INF):
        value = check_float(value, f"param_groups[{gi}]['lr']({t})", minimum=0.0)
    return value


def grads_list(grads: Any, keys: Optional[Tuple[Any, ...]]) -> Any:
    """A step's gradients as a sequence in parameter order: a list or tuple as
    given, a dict matched to dict-form params by key."""
    kind = type(grads)
    if kind is list or kind is tuple:
        return grads
    if isinstance(grads, Mapping):
        if keys is None:
            raise TypeError("grads: a dict of gradients needs dict-form params; pass a list in parameter order")
        missing = [k for k in keys if k not in grads]
        if missing:
            raise ValueError(f"grads: missing gradient(s) for key(s) {missing}")
        if len(grads) != len(keys):
            extra = [k for k in grads if k not in set(keys)]
            raise ValueError(f"grads: unexpected key(s) {extra}")
        return [grads[k] for k in keys]
    if isinstance(grads, np.ndarray):
        raise TypeError("grads: expected a sequence of arrays (one per parameter), got a single ndarray")
    if isinstance(grads, (list, tuple)):
        return grads
    raise TypeError(f"grads: expected a list, tuple or dict of arrays, got {type(grads).__name__}")


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


class FixedGroups:
    """The groups of an optimizer whose parameters are fixed (flat mode, a
    ZeroRedundancyOptimizer). Between calls a group list or group dicts holding
    the same arrays in the same order are adopted; any other change of the
    parameters is refused (ValueError ending with `fixed`). With `as_tuples`
    each adopted group's "params" becomes a tuple (it cannot be edited in place)."""

    __slots__ = ("as_tuples", "fixed", "group_refs", "groups_ref", "params_refs")

    def __init__(self, groups: Any, fixed: str, as_tuples: bool = False):
        self.fixed = fixed
        self.as_tuples = as_tuples
        self.adopt(groups)

    def adopt(self, groups: Any) -> None:
        self.groups_ref = groups
        self.group_refs = list(groups)
        if self.as_tuples:
            for g in groups:
                if type(g.get("params")) is not tuple:
                    g["params"] = tuple(g["params"])
        self.params_refs = [g["params"] for g in groups]

    def follow(self, groups: Any) -> None:
        """Adopts `groups` (the optimizer's param_groups now) if they hold the same parameters, else raises."""
        if groups is self.groups_ref and len(groups) == len(self.group_refs):
            for g, r, p in zip(groups, self.group_refs, self.params_refs):
                if g is not r or g.get("params") is not p:
                    break
            else:
                return
        check_same_params(groups, self.params_refs, self.fixed)
        self.adopt(groups)


def group_entries(groups: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """The groups as a state dict holds them (PyTorch's layout): each group's hyperparameters and its
    parameters' indices in the optimizer's order."""
    entries = []
    index = 0
    for g in groups:
        entry = {k: v for k, v in g.items() if k != "params"}
        entry["params"] = list(range(index, index + len(g["params"])))
        index += len(g["params"])
        entries.append(entry)
    return entries
