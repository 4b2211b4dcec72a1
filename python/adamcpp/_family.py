"""The algorithm families (Adam, SGD): what distinguishes one optimizer class's
numbers from another's, apart from where they live (the layouts) and how the
native step is called (_native.py).

A family names its native step, its arrays' message labels (one per native
role), how a group's hyperparameters are validated and each parameter's state:
the entries it has, which a loaded state dict must carry, their dtypes. The
optimizer classes, ZeroRedundancyOptimizer and the loaders all ask the family,
so each rule is written once."""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

import numpy as np

from . import _core, _precision
from ._hyper import AdamHyper, SgdHyper, adam_hyper, sgd_hyper


def _state_patterns(roles: Tuple[str, ...]) -> Tuple[str, ...]:
    """Message labels of a family's arrays, one per native role."""
    return ("params[{}]", "grads[{}]", *(f"{role} of params[{{}}]" for role in roles[2:]))


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


class Family(abc.ABC):
    """The rules of one algorithm. `name` selects the native step ("adam",
    "sgd"); `array_state` maps each state array to whether a loaded state dict
    must have it (optional ones start on demand); `nullable_state` lists those
    kept as None until they start; `half_params` whether float16/bfloat16
    parameters are accepted; `rounding` whether the step keys stochastic
    rounding by parameter (rounding pieces)."""

    name = ""
    patterns: Tuple[str, ...] = ()
    half_params = False
    rounding = False
    array_state: ClassVar[Dict[str, bool]] = {}
    nullable_state: Tuple[str, ...] = ()

    @abc.abstractmethod
    def hyper(self, group: Mapping[str, Any], where: str) -> Any:
        """The group's validated hyperparameters (lr 0.0 while it is a schedule, whose value each step checks)."""

    @abc.abstractmethod
    def new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        """A new parameter's state (NumPy arrays)."""

    def entry_dtype(self, name: str, param_dtype: Any, group: Mapping[str, Any]) -> Optional[np.dtype]:
        """The dtype of a state entry of a parameter of `param_dtype` in `group` (None: the entry does not apply)."""
        return np.dtype(param_dtype)

    def complete_state(self, state: Dict[str, Any], p: Any, group: Mapping[str, Any]) -> None:
        """Adds to a loaded state what a parameter needs and the state dict lacked (nothing, here)."""
        return None

    def check_layout(self, p: np.ndarray, group: Mapping[str, Any], label: str) -> None:
        """Refuses a NumPy parameter that its group's options cannot store, before any state is made."""
        return None

    def device_state(self) -> Dict[str, Any]:
        """A new parameter's state on a device: its arrays start (there) at the first step that needs them."""
        return {"step": 0, **{k: None for k, req in self.array_state.items() if req or k in self.nullable_state}}


class AdamFamily(Family):
    name = "adam"
    patterns = _state_patterns(_core.ADAM_ROLES)
    half_params = True
    rounding = True
    array_state: ClassVar[Dict[str, bool]] = {
        "exp_avg": True,
        "exp_avg_sq": True,
        "max_exp_avg_sq": False,
        "master_param": False,
    }

    def hyper(self, group: Mapping[str, Any], where: str) -> AdamHyper:
        return adam_hyper({**group, "lr": _lr_value(group)}, _group_label(where))

    def new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        dtype = _precision.state_dtype(p.dtype, group)
        state: Dict[str, Any] = {"step": 0, "exp_avg": np.zeros(p.shape, dtype), "exp_avg_sq": np.zeros(p.shape, dtype)}
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = np.zeros(p.shape, dtype)
        self.complete_state(state, p, group)
        return state

    def entry_dtype(self, name: str, param_dtype: Any, group: Mapping[str, Any]) -> Optional[np.dtype]:
        return _precision.entry_dtype(name, np.dtype(param_dtype), group)

    def complete_state(self, state: Dict[str, Any], p: Any, group: Mapping[str, Any]) -> None:
        if isinstance(p, np.ndarray) and _precision.has_master(p.dtype, group) and state.get("master_param") is None:
            state["master_param"] = p.astype(np.float32)

    def check_layout(self, p: np.ndarray, group: Mapping[str, Any], label: str) -> None:
        _precision.check_state_layout(p.dtype, group, label)


class SgdFamily(Family):
    name = "sgd"
    patterns = _state_patterns(_core.SGD_ROLES)
    array_state: ClassVar[Dict[str, bool]] = {"momentum_buffer": False}
    nullable_state = ("momentum_buffer",)

    def hyper(self, group: Mapping[str, Any], where: str) -> SgdHyper:
        return sgd_hyper({**group, "lr": _lr_value(group)}, _group_label(where))

    def new_state(self, p: np.ndarray, group: Mapping[str, Any]) -> Dict[str, Any]:
        return {"step": 0, "momentum_buffer": None}


ADAM = AdamFamily()
SGD = SgdFamily()

_REGISTERED: List[Tuple[Type[Any], Family]] = []


def register(cls: Type[Any], family: Family) -> None:
    """Names the family of an optimizer class (and its subclasses)."""
    _REGISTERED.append((cls, family))


def family_of(cls: Type[Any]) -> Family:
    """The family of an optimizer class: the one registered for the nearest class in its MRO."""
    for base in cls.__mro__:
        for registered, family in _REGISTERED:
            if base is registered:
                return family
    raise TypeError(f"{cls.__qualname__}: not an adamcpp optimizer class (Adam, AdamW, SGD or a subclass)")
