"""Loading a state dict in PyTorch's layout: its groups checked against an
optimizer's, its entries converted to what a parameter's state holds. Shared by
the optimizers (every layout) and ZeroRedundancyOptimizer's loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Dict, List, Tuple

import numpy as np

from . import _precision, cuda
from ._family import Family
from ._validation import check_step_count


def convert_hyper(key: str, value: Any) -> Any:
    """A saved hyperparameter as a group holds it (0-d arrays and tensors as numbers, lists as tuples)."""
    if callable(value) and key == "lr":
        return value
    if isinstance(value, (tuple, list)):
        return tuple(np.asarray(v).item() if hasattr(v, "__array__") else v for v in value)
    if hasattr(value, "__array__") and not isinstance(value, np.ndarray):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    return value


def convert_state(
    family: Family, entry: Any, p: Any, layout: Tuple[Tuple[int, ...], Any], group: Mapping[str, Any], where: str
) -> Dict[str, Any]:
    """A saved entry as the state of parameter `p` (shape and dtype `layout`) in `group`: the step count checked,
    each array checked against the parameter and copied in its state dtype; nothing shared with the entry."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected a dict")
    step = entry.get("step", 0)
    if cuda.is_cuda_array(step):  # torch's fused CUDA optimizers keep the count on the device
        step = cuda.to_numpy(step, f"{where}['step']")
    out: Dict[str, Any] = {"step": check_step_count(step, f"{where}['step']")}
    shape, param_dtype = layout
    for name, required in family.array_state.items():
        dtype = family.entry_dtype(name, param_dtype, group)
        if entry.get(name) is None:
            if required:
                raise ValueError(f"{where}: missing '{name}'")
            if name in family.nullable_state:
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
    family.complete_state(out, p, group)
    return out


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
                merged[key] = convert_hyper(key, saved[key])
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
