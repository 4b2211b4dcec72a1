"""What a benchmark case is (shape, dtype, Adam variant) and the parsers of the options that list cases and threads."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

# The hyperparameters every contender steps with.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
ADAMW_WEIGHT_DECAY = 1e-2

VARIANTS = {
    # name -> (weight_decay, decoupled, amsgrad)
    "adam": (0.0, False, False),
    "adamw": (ADAMW_WEIGHT_DECAY, True, False),
    "amsgrad": (0.0, False, True),
}
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Precision:
    """A storage layout of --precision: the parameter's and gradient's dtypes,
    the optimizer options, and the bytes one element moves (without amsgrad;
    `amsgrad_bytes` more with it)."""

    param: str  # "float32" (the --dtype), or "bfloat16"
    grad: str
    options: Tuple[Tuple[str, Any], ...]
    bytes_per_element: Optional[int]  # None: 7 values of the --dtype
    amsgrad_bytes: int
    layout: Optional[int]  # index into adamcpp._core.FUSED_LAYOUTS (None: the float32/float64 loop)
    description: str


PRECISIONS: Dict[str, Precision] = {
    "fp32": Precision("float32", "float32", (), None, 0, None, "parameters, gradients and state of --dtype"),
    # read p, g (4 each), m, v (2 each); write p (4), m, v (2 each)
    "bf16-state": Precision(
        "float32",
        "float32",
        (("state_dtype", "bfloat16"),),
        20,
        4,
        0,
        "float32 parameters and gradients, bfloat16 state (stochastic rounding)",
    ),
    # read the master (4), g (2), m, v (2 each); write the master (4), p (2), m, v (2 each)
    "bf16-master": Precision(
        "bfloat16",
        "bfloat16",
        (("state_dtype", "bfloat16"),),
        20,
        4,
        1,
        "bfloat16 parameters and gradients, float32 master copy, bfloat16 state (stochastic rounding)",
    ),
    # read p, g, m, v; write p, m, v: 2 bytes each
    "bf16": Precision(
        "bfloat16",
        "bfloat16",
        (("state_dtype", "bfloat16"), ("master_weights", False), ("param_rounding", "stochastic")),
        14,
        4,
        2,
        "bfloat16 parameters, gradients and state, no master copy (stochastic rounding)",
    ),
}


@dataclass(frozen=True)
class Shape:
    n_tensors: int
    tensor_elements: int

    @property
    def elements(self) -> int:
        return self.n_tensors * self.tensor_elements

    @property
    def label(self) -> str:
        if self.n_tensors == 1:
            return _count_label(self.tensor_elements)
        return f"{self.n_tensors}x{_count_label(self.tensor_elements)}"


@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    variant: str
    precision: str = "fp32"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def amsgrad(self) -> bool:
        return VARIANTS[self.variant][2]

    @property
    def storage(self) -> Precision:
        return PRECISIONS[self.precision]

    @property
    def label(self) -> str:
        suffix = "" if self.precision == "fp32" else f" {self.precision}"
        return f"{self.shape.label} {self.dtype} {self.variant}{suffix}"

    @property
    def bytes_per_element(self) -> int:
        # read p, g, m, v; write p, m, v (+ read and write max_exp_avg_sq); fewer bytes with 16-bit storage
        p = self.storage
        if p.bytes_per_element is None:
            return self.itemsize * (7 + (2 if self.amsgrad else 0))
        return p.bytes_per_element + (p.amsgrad_bytes if self.amsgrad else 0)

    @property
    def bytes_per_step(self) -> int:
        return self.bytes_per_element * self.shape.elements

    @property
    def working_set_bytes(self) -> int:
        # p, g, m, v (and a master copy): what the references are sized to
        p = self.storage
        if p.bytes_per_element is None:
            return 4 * self.itemsize * self.shape.elements
        per = np.dtype("float32").itemsize * (1 if p.param == "float32" else 0) + 2 * 2
        per += 4 if p.grad == "float32" else 2
        per += 2 if p.param == "bfloat16" else 0
        per += 4 if p.layout == 1 else 0
        return per * self.shape.elements


def _count_label(n: int) -> str:
    """1000 -> '1e3', 50000000 -> '5e7', 4096 -> '4096'."""
    if n >= 1000:
        exponent = math.floor(math.log10(n))
        mantissa = n / 10**exponent
        if mantissa == int(mantissa):
            return f"{int(mantissa)}e{exponent}"
    return str(n)


def _parse_count(text: str, what: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{what}: {text!r} is not a positive integer")
    return int(value)


def _tokens(text: str) -> List[str]:
    return [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]


def parse_sizes(text: str) -> List[Shape]:
    """'1e3,1e6,200x4096' -> shapes (N elements in one tensor, or T tensors x N)."""
    shapes = []
    for token in _tokens(text):
        if "x" in token.lower():
            count, size = token.lower().split("x", 1)
            shapes.append(Shape(_parse_count(count, "--sizes"), _parse_count(size, "--sizes")))
        else:
            shapes.append(Shape(1, _parse_count(token, "--sizes")))
    if not shapes:
        raise argparse.ArgumentTypeError("--sizes: empty list")
    unique = list(dict.fromkeys(shapes))
    # Ascending total size: the memory peak comes last, and only one case is alive at a time.
    return sorted(unique, key=lambda s: (s.elements, s.n_tensors))


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_threads(text: str) -> List[int]:
    """'1,all' -> thread counts ('all' or 'max' = every usable core), duplicates dropped."""
    out = []
    for token in _tokens(text):
        out.append(usable_cores() if token.lower() in ("all", "max") else _parse_count(token, "--threads"))
    if not out:
        raise argparse.ArgumentTypeError("--threads: empty list")
    return list(dict.fromkeys(out))


def parse_choices(text: str, what: str, choices: Sequence[str], aliases: Dict[str, Sequence[str]]) -> List[str]:
    """A comma list of names from `choices` ('all' = every one; an alias stands for several), duplicates dropped."""
    out: List[str] = []
    for token in _tokens(text):
        key = token.lower()
        if key == "all":
            out.extend(choices)
        elif key in aliases:
            out.extend(aliases[key])
        elif key in choices:
            out.append(key)
        else:
            raise argparse.ArgumentTypeError(f"{what}: unknown {token!r}; choose from {', '.join(choices)} or 'all'")
    if not out:
        raise argparse.ArgumentTypeError(f"{what}: empty list")
    return list(dict.fromkeys(out))
