"""Stateless, in-place Adam: the same native step as the optimizers."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

import numpy as np

from . import _core, cuda
from ._hyper import adam_hyper
from ._validation import check_bool, check_grad_scale

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]

# Message label of each native array role: params[3], exp_avgs[3], ...
_PATTERNS = tuple(f"{role}s[{{}}]" for role in _core.ADAM_ROLES)


def _is_array(x: Any) -> bool:
    """One array rather than a list of them: an ndarray, a CUDA array, or another framework's array (taken as one
    array so that the array rules refuse it with what to pass instead)."""
    if isinstance(x, np.ndarray) or cuda.is_cuda_array(x):
        return True
    return not isinstance(x, (list, tuple)) and any(
        hasattr(x, name) for name in ("__dlpack__", "__array__", "__array_interface__")
    )


def _as_list(x: Any, name: str, single: bool) -> List[Any]:
    if single:
        if not _is_array(x):
            raise TypeError(f"{name}: params is a single array, so {name} must be one too, got {type(x).__name__}")
        return [x]
    if _is_array(x):
        raise TypeError(f"{name}: params is a list, so {name} must be a list of arrays too, got a single array")
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple of arrays, got {type(x).__name__}")
    return list(x)


def adam(
    params: ArrayOrList,
    grads: ArrayOrList,
    exp_avgs: ArrayOrList,
    exp_avg_sqs: ArrayOrList,
    *,
    step: Union[int, Sequence[int]],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    max_exp_avg_sqs: Optional[ArrayOrList] = None,
    maximize: bool = False,
    eps_style: str = "torch",
    grad_scale: float = 1.0,
    master_params: Optional[Union[np.ndarray, Sequence[Optional[np.ndarray]]]] = None,
    state_dtype: str = "float32",
    state_rounding: str = "stochastic",
    param_rounding: str = "nearest",
    seed: int = 0,
    stream: Any = None,
) -> None:
    """Applies Adam step number `step` (1-based) in place to every tensor.

    Each array argument is one array or a list of arrays (one per tensor).
    `step` is an int or a list of ints, one per tensor. Nothing is incremented.
    Every argument is validated before any buffer is written. CUDA arrays are
    updated on their device, queued on `stream` (None: the legacy default stream).

    Mixed precision as in the optimizers (NumPy arrays): `master_params` holds
    the float32 master copy of each 16-bit parameter (None for the others;
    without the list, 16-bit parameters have no master copy and are rounded as
    `param_rounding` says); the moments are of dtype `state_dtype`
    ("bfloat16": ml_dtypes' bfloat16 arrays, rounded as `state_rounding`
    says). Stochastic rounding is keyed on (seed, step, the tensor's position
    in the lists, element).
    """
    single = _is_array(params)
    ps = _as_list(params, "params", single)
    gs = _as_list(grads, "grads", single)
    ms = _as_list(exp_avgs, "exp_avgs", single)
    vs = _as_list(exp_avg_sqs, "exp_avg_sqs", single)
    amsgrad = check_bool(amsgrad, "amsgrad")
    vmaxs = None
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("max_exp_avg_sqs: amsgrad=True needs a max_exp_avg_sq array for every tensor")
        vmaxs = _as_list(max_exp_avg_sqs, "max_exp_avg_sqs", single)
    masters = None if master_params is None else _as_list(master_params, "master_params", single)
    if isinstance(step, (list, tuple)):
        steps = list(step)
    elif isinstance(step, np.ndarray):
        steps = step.tolist() if step.ndim else [step.item()] * len(ps)
    else:
        steps = [step] * len(ps)
    values = dict(
        lr=lr,
        betas=(beta1, beta2),
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        eps_style=eps_style,
        master_weights=masters is not None,
        state_dtype=state_dtype,
        state_rounding=state_rounding,
        param_rounding=param_rounding,
        seed=seed,
    )
    hyper = adam_hyper(values, str)
    if ps and cuda.is_cuda_array(ps[0]):
        for name, arrays in (("params", ps), ("exp_avgs", ms), ("exp_avg_sqs", vs), ("max_exp_avg_sqs", vmaxs)):
            for i, a in enumerate(arrays or ()):
                cuda.refuse_jax(a, f"{name}[{i}]")
        cuda.require_compiled("params[0]")
        if masters is not None or state_dtype != "float32":
            raise TypeError(
                "master_params, state_dtype: mixed precision is for NumPy arrays (the CUDA unit keeps float32 or "
                "float64 parameters and state)"
            )
        _core.cuda_adam_functional(ps, gs, ms, vs, vmaxs, steps, hyper, check_grad_scale(grad_scale), _PATTERNS, stream)
        return
    if stream is not None:
        raise TypeError("stream: only CUDA arrays take a stream (these parameters are NumPy arrays)")
    _core.adam_functional(ps, gs, ms, vs, vmaxs, masters, steps, hyper, check_grad_scale(grad_scale), _PATTERNS)
