"""The named contract with the native step: one named tuple of validated
hyperparameters per optimizer family, with exactly the fields (and order) that
adamcpp._core reads, each built by one function that the optimizers and the
functional API share."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

from . import _core
from ._validation import (
    check_betas,
    check_bool,
    check_eps_style,
    check_float,
    check_master_weights,
    check_rounding,
    check_seed,
    check_state_dtype,
)

# How a caller names a hyperparameter in its messages: canonical field -> label.
Label = Callable[[str], str]


class AdamHyper(NamedTuple):
    """One Adam group's hyperparameters, as the native step reads them."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled_weight_decay: bool
    amsgrad: bool
    maximize: bool
    eps_style: int  # index into adamcpp._core.EPS_STYLES
    master_weights: int  # -1: automatic (on for 16-bit parameters), 0: off, 1: on
    state_dtype: int  # index into adamcpp._core.STATE_DTYPES
    state_rounding: int  # index into adamcpp._core.ROUNDINGS
    param_rounding: int  # index into adamcpp._core.ROUNDINGS
    seed: int  # 0 <= seed < 2**64


class SgdHyper(NamedTuple):
    """One SGD group's hyperparameters, as the native step reads them."""

    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool


if AdamHyper._fields != _core.ADAM_HYPER_FIELDS or SgdHyper._fields != _core.SGD_HYPER_FIELDS:
    raise ImportError(
        "adamcpp: the Python layer and the native core disagree on the hyperparameter fields; rebuild the extension"
    )


# The storage options of a group and their defaults (mixed precision and compact state).
STORAGE_DEFAULTS: Mapping[str, Any] = {
    "master_weights": None,
    "state_dtype": "float32",
    "state_rounding": "stochastic",
    "param_rounding": "nearest",
    "seed": 0,
}


def adam_hyper(values: Mapping[str, Any], label: Label) -> AdamHyper:
    """Validates Adam hyperparameters: `values` holds lr (a number: a
    schedule's value is checked at each step), "betas" (a pair), eps,
    weight_decay, decoupled_weight_decay, amsgrad, maximize and eps_style,
    and optionally the storage options (master_weights, state_dtype,
    state_rounding, param_rounding, seed; STORAGE_DEFAULTS when absent);
    `label` names each field ("beta1"/"beta2" for the pair's entries) in
    messages."""
    lr = check_float(values["lr"], label("lr"), minimum=0.0)
    beta1, beta2 = check_betas(values["betas"], label("betas"))
    storage = {key: values.get(key, default) for key, default in STORAGE_DEFAULTS.items()}
    master_weights = check_master_weights(storage["master_weights"], label("master_weights"))
    param_rounding = check_rounding(storage["param_rounding"], label("param_rounding"))
    if param_rounding == 1 and master_weights != 0:
        raise ValueError(
            f"{label('param_rounding')}: 'stochastic' needs master_weights=False (a 16-bit parameter with a master "
            "copy is its master rounded to nearest)"
        )
    return AdamHyper(
        lr,
        check_float(beta1, label("beta1"), minimum=0.0, below=1.0),
        check_float(beta2, label("beta2"), minimum=0.0, below=1.0),
        check_float(values["eps"], label("eps"), minimum=0.0),
        check_float(values["weight_decay"], label("weight_decay"), minimum=0.0),
        check_bool(values["decoupled_weight_decay"], label("decoupled_weight_decay")),
        check_bool(values["amsgrad"], label("amsgrad")),
        check_bool(values["maximize"], label("maximize")),
        check_eps_style(values["eps_style"], label("eps_style")),
        master_weights,
        check_state_dtype(storage["state_dtype"], label("state_dtype")),
        check_rounding(storage["state_rounding"], label("state_rounding")),
        param_rounding,
        check_seed(storage["seed"], label("seed")),
    )


def sgd_hyper(values: Mapping[str, Any], label: Label) -> SgdHyper:
    """Validates SGD hyperparameters (lr, momentum, dampening, weight_decay,
    nesterov, maximize), each named in messages by `label`."""
    lr = check_float(values["lr"], label("lr"), minimum=0.0)
    momentum = check_float(values["momentum"], label("momentum"), minimum=0.0)
    dampening = check_float(values["dampening"], label("dampening"), minimum=0.0)
    if dampening > 1.0:
        raise ValueError(f"{label('dampening')}: expected a value in [0, 1], got {dampening!r}")
    weight_decay = check_float(values["weight_decay"], label("weight_decay"), minimum=0.0)
    nesterov = check_bool(values["nesterov"], label("nesterov"))
    maximize = check_bool(values["maximize"], label("maximize"))
    if nesterov and (momentum <= 0.0 or dampening != 0.0):
        raise ValueError(f"{label('nesterov')}: Nesterov momentum needs momentum > 0 and dampening == 0")
    return SgdHyper(lr, momentum, dampening, weight_decay, nesterov, maximize)
