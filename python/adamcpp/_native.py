"""The one caller of _core's step entries (docs/api.md §11).

Every layout (list, flat, device) and ZeroRedundancyOptimizer's local
optimizer reach the native step through `step` with one named payload,
`StepCall`; the family (Adam, SGD) and the device (a CUDA workspace or none)
pick the entry."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Tuple

from . import _core
from ._family import Family


class StepCall(NamedTuple):
    """What one native step reads, passed as it is (the entries read its fields
    by index: they are _core.STEP_FIELDS, in order): the tensors (params,
    grads, states, each tensor's group), the groups' validated hyperparameter
    tuples, the call's options (grad_scale, the nonfinite policy's code,
    max_grad_norm < 0 for none), the message patterns and names, the arrays
    whose norm decides the clipping when they are not the tensors' gradients
    (flat mode), and Adam's rounding pieces (per tensor, or None)."""

    params: Sequence[Any]
    grads: Sequence[Any]
    states: Sequence[Any]
    group_of: Sequence[int]
    groups: Sequence[Any]
    grad_scale: float
    nonfinite: int
    max_grad_norm: float
    patterns: Tuple[str, ...]
    names: Optional[Sequence[Any]]
    norm_grads: Optional[Sequence[Any]] = None
    rounding_pieces: Optional[Sequence[Any]] = None


def step(
    family: Family,
    cache: Any,
    params: Sequence[Any],
    grads: Sequence[Any],
    states: Sequence[Any],
    group_of: Sequence[int],
    groups: Sequence[Any],
    grad_scale: float,
    nonfinite: int,
    max_grad_norm: float,
    patterns: Tuple[str, ...],
    names: Optional[Sequence[Any]],
    norm_grads: Optional[Sequence[Any]] = None,
    rounding_pieces: Optional[Sequence[Any]] = None,
    workspace: Any = None,
    stream: Any = None,
) -> Tuple[bool, Optional[float], bool]:
    """One step: (applied, the global norm when clipping and known now, whether it is still on the device).
    The parameters after `cache` are StepCall's fields; the payload is built here, in their order, as a plain
    tuple (what a StepCall is to the entries, without a named tuple's construction on every step). With a
    CUDA `workspace` the step runs on the device, queued on `stream` (norm_grads and rounding_pieces None)."""
    call = (
        params,
        grads,
        states,
        group_of,
        groups,
        grad_scale,
        nonfinite,
        max_grad_norm,
        patterns,
        names,
        norm_grads,
        rounding_pieces,
    )
    if workspace is not None:
        entry = _core.cuda_adam_step if family.rounding else _core.cuda_sgd_step
        return entry(cache, workspace, call, stream)
    applied, norm = (_core.adam_step if family.rounding else _core.sgd_step)(cache, call)
    return applied, norm, False
