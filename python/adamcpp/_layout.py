"""The layout interface: where an optimizer's numbers live.

`Optimizer` (optim.py) holds the groups, hyperparameters, state, options and
the call lock; a layout object holds the rules of one storage mode and is the
only part that differs between them:

- `ListLayout` (_layout_list.py): separate NumPy arrays, state per parameter;
- `FlatLayout` (_layout_flat.py): views of one FlatParams, state in flat buffers
  stepped as a few long ranges;
- `DeviceLayout` (_layout_device.py): CUDA arrays (adamcpp.cuda), state on the device.

Adding a mode adds a file with a subclass; the optimizer has no `if` per mode.
A layout reaches its optimizer through its public members only (`param_groups`,
`state`) and the pieces it is given (the family, the native owner, the lock).
"""

from __future__ import annotations

import abc
from typing import Any, Container, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._family import Family
from ._lock import CallLock


class Layout(abc.ABC):
    """One optimizer's storage mode. `params` are the optimizer's parameters
    in order and `group_of` each one's group; `keys` the dict keys of
    dict-form params (None when the parameters were not given as a dict, or
    after their structure changed)."""

    mode = ""

    def __init__(self, opt: Any, family: Family, cache: Any, lock: CallLock, keys: Optional[Tuple[Any, ...]]):
        self.opt = opt
        self.family = family
        self.cache = cache  # the native owner (_core.StateCache)
        self.lock = lock
        self.keys = keys
        self.params: List[Any] = []
        self.group_of: List[int] = []
        # Set by a ZeroRedundancyOptimizer on its local optimizer: per tensor, the parameters whose random bits
        # its parts take (stochastic rounding keyed on the whole model's parameters, not the shard's tensors).
        self.rounding_pieces: Optional[List[Optional[np.ndarray]]] = None

    # -------------------------------------------------------------- each call
    @abc.abstractmethod
    def add_group(self, param_group: Mapping[str, Any]) -> None:
        """add_param_group: the group validated, appended with fresh state (refused where parameters are fixed)."""

    @abc.abstractmethod
    def sync(self) -> bool:
        """Follows the edits made between calls (param_groups, a replaced state list); True when state may
        have moved between parameters or groups (the master copies are checked again at the next step)."""

    @abc.abstractmethod
    def grads(self, grads: Any) -> Any:
        """A step's gradients, checked as far as this layout checks them before the native call."""

    @abc.abstractmethod
    def step(
        self, grads: Any, hypers: List[Any], scale: float, nonfinite: int, max_norm: float, stream: Any
    ) -> Tuple[bool, Optional[float], bool]:
        """The native step: (applied, the global norm when clipping and known now, whether it is pending)."""

    def check_stream(self) -> None:
        """Refuses a stream: only CUDA arrays take one."""
        raise TypeError("stream: only an optimizer of CUDA arrays takes a stream (its parameters are NumPy arrays)")

    def pending_norm(self) -> Optional[float]:
        """The norm a step left on the device (none here)."""
        return None

    @abc.abstractmethod
    def drop_entry(self, key: str, groups: Container[int]) -> None:
        """Removes `key` from the state of every parameter of `groups`."""

    # ------------------------------------------------------------------ state
    def fresh_state(self, p: Any, group: Mapping[str, Any]) -> Dict[str, Any]:
        """A new parameter's state."""
        return self.family.new_state(p, group)

    def layout_of(self, p: Any) -> Tuple[Tuple[int, ...], Any]:
        """A parameter's shape and dtype."""
        return tuple(p.shape), p.dtype

    @abc.abstractmethod
    def export_value(self, key: str, v: Any, i: int) -> Any:
        """A state value as state_dict() holds it (arrays as NumPy copies)."""

    def load_params(self) -> Sequence[Any]:
        """The parameters a loaded state is checked against, in order."""
        return self.params

    def staged(self, states: List[Any]) -> List[Any]:
        """Loaded states made ready to commit (everything that can fail happens here)."""
        return states

    @abc.abstractmethod
    def set_state(self, states: List[Any]) -> None:
        """Commits loaded states."""

    def copy_state(self, state: Dict[str, Any]) -> None:
        """Adds to (or changes in) an optimizer's pickled __dict__ what a copy of this layout needs."""
        return None
