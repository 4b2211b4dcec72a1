"""adamcpp-bench: Adam step throughput, side by side with the alternatives and
the machine's memory-bandwidth ceiling, measured in the same run.

An Adam step reads p, g, m, v and writes p, m, v: 7 values per element
(9 with amsgrad), so at any size beyond the caches it is bound by memory
bandwidth. Every contender is therefore shown next to two references measured
in the same run, on the same working-set size:

* ``ceiling``: the simplest ``omp parallel for simd`` float32 Adam loop over one
  buffer set (``adamcpp._core.ceiling_adam``), i.e. what a plain loop reaches;
* ``triad``: the STREAM triad ``a = b + s*c`` over float64 arrays
  (``adamcpp._core.triad``, 24 bytes per element), i.e. the memory bandwidth.

Method: for each case every buffer is allocated once; each contender is warmed
up, then calibrated so that one timed sample (k back-to-back steps) lasts at
least ``--min-time``; ``--repeats`` rounds follow in which every contender takes
one sample in turn (the order rotates each round). The median sample is
reported with its min and max.

Run ``adamcpp-bench --help`` (or ``python -m adamcpp.bench --help``); see
bench/README.md for what the columns mean.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import adamcpp
from adamcpp import _core

# ----------------------------------------------------------------- constants
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
ADAMW_WEIGHT_DECAY = 1e-2

DEFAULT_SIZES = "1e3,1e4,1e5,1e6,1e7,5e7,200x4096,1000x256"
QUICK_SIZES = "1e3,1e5,1e6,200x4096"
DEFAULT_REPEATS = 7
QUICK_REPEATS = 3
DEFAULT_MIN_TIME = 0.2
QUICK_MIN_TIME = 0.05
# The stand-alone bandwidth probe: 3 float64 arrays of this many elements
# (2**24 -> 403 MB, far beyond any last-level cache).
DEFAULT_STREAM_ELEMENTS = 1 << 24
QUICK_STREAM_ELEMENTS = 1 << 23

CONTENDERS = ("adamcpp", "numpy", "torch-foreach", "torch-fused", "deepspeed", "ceiling", "triad")
REFERENCES = ("ceiling", "triad")
DESCRIPTIONS = {
    "adamcpp": "adamcpp.Adam/AdamW: one opt.step(grads) call from Python",
    "numpy": "in-place NumPy Adam loop over the tensors (out= ufuncs, preallocated scratch; NumPy is single-threaded)",
    "torch-foreach": "torch.optim.Adam(foreach=True) on torch.from_numpy views",
    "torch-fused": "torch.optim.Adam(fused=True) on torch.from_numpy views",
    "deepspeed": "DeepSpeedCPUAdam on torch.from_numpy views",
    "ceiling": "simplest omp-parallel-for-simd float32 Adam loop, one buffer set of the same bytes",
    "triad": "STREAM triad a = b + s*c, float64, the same working-set bytes",
}
VARIANTS = {
    # name -> (weight_decay, decoupled, amsgrad)
    "adam": (0.0, False, False),
    "adamw": (ADAMW_WEIGHT_DECAY, True, False),
    "amsgrad": (0.0, False, True),
}
DTYPES = ("float32", "float64")

# Rough resident footprint of each contender in units of one parameter set
# (elements x itemsize), used to refuse cases that would not fit in memory.
_FOOTPRINT = {"adamcpp": 3, "numpy": 4, "torch-foreach": 5, "torch-fused": 3, "deepspeed": 3, "ceiling": 4, "triad": 4}


class Unavailable(Exception):
    """A contender cannot run here (not installed, or not for this case)."""


# --------------------------------------------------------------------- cases
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

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def amsgrad(self) -> bool:
        return VARIANTS[self.variant][2]

    @property
    def bytes_per_element(self) -> int:
        # read p, g, m, v; write p, m, v (+ read and write max_exp_avg_sq)
        return self.itemsize * (7 + (2 if self.amsgrad else 0))

    @property
    def bytes_per_step(self) -> int:
        return self.bytes_per_element * self.shape.elements

    @property
    def working_set_bytes(self) -> int:
        # p, g, m, v: what the references are sized to
        return 4 * self.itemsize * self.shape.elements


def _count_label(n: int) -> str:
    """1000 -> '1e3', 50000000 -> '5e7', 4096 -> '4096'."""
    if n >= 1000:
        exponent = int(math.floor(math.log10(n)))
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


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_threads(text: str) -> List[int]:
    out = []
    for token in _tokens(text):
        out.append(_usable_cores() if token.lower() in ("all", "max") else _parse_count(token, "--threads"))
    if not out:
        raise argparse.ArgumentTypeError("--threads: empty list")
    return list(dict.fromkeys(out))


def _parse_choices(text: str, what: str, choices: Sequence[str], aliases: Dict[str, Sequence[str]]) -> List[str]:
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


def _tokens(text: str) -> List[str]:
    return [t.strip() for t in text.replace(" ", ",").split(",") if t.strip()]


# ---------------------------------------------------------------- contenders
class Contender:
    """One way of taking an Adam step over a case's tensors.

    `step` is the zero-argument callable that is timed; `params` are the arrays
    checked for finiteness afterwards; `elements`/`bytes` describe one call.
    """

    name = ""
    step: Callable[[], Any]

    def __init__(self, case: Case) -> None:
        self.case = case
        self.elements = case.shape.elements
        self.bytes = case.bytes_per_step
        self.params: List[np.ndarray] = []

    def set_threads(self, n: int) -> None:
        """Threads for libraries with their own pool (adamcpp's is set globally)."""


class AdamcppContender(Contender):
    name = "adamcpp"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        self.params = [p.copy() for p in p0]
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = adamcpp.AdamW if decoupled else adamcpp.Adam
        self.opt = cls(self.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad)
        opt_step = self.opt.step
        self.step = lambda: opt_step(grads)


class NumpyContender(Contender):
    """A straightforward in-place NumPy Adam: out= ufuncs, one scratch buffer,
    no allocation per step."""

    name = "numpy"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        self.params = [p.copy() for p in p0]
        self.grads = grads
        self.exp_avgs = [np.zeros_like(p) for p in p0]
        self.exp_avg_sqs = [np.zeros_like(p) for p in p0]
        self.max_exp_avg_sqs = [np.zeros_like(p) for p in p0] if case.amsgrad else [None] * len(p0)
        scratch = np.empty(max(p.size for p in p0), dtype=case.dtype)
        self.scratch = [scratch[: p.size].reshape(p.shape) for p in p0]
        self.weight_decay, self.decoupled, self.amsgrad = VARIANTS[case.variant]
        self.t = 0

    def step(self) -> None:  # type: ignore[override]
        self.t += 1
        beta1, beta2 = BETAS
        bias_correction1 = 1.0 - beta1**self.t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.t)
        step_size = LR / bias_correction1
        decay_factor = 1.0 - LR * self.weight_decay
        # Python floats are "weak" scalars: float32 arrays stay float32.
        for p, g, m, v, vmax, tmp in zip(
            self.params, self.grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.scratch
        ):
            if self.decoupled:
                np.multiply(p, decay_factor, out=p)
            np.multiply(m, beta1, out=m)
            np.multiply(g, 1.0 - beta1, out=tmp)
            np.add(m, tmp, out=m)
            np.multiply(v, beta2, out=v)
            np.multiply(g, g, out=tmp)
            np.multiply(tmp, 1.0 - beta2, out=tmp)
            np.add(v, tmp, out=v)
            denom_src = v
            if vmax is not None:
                np.maximum(vmax, v, out=vmax)
                denom_src = vmax
            np.sqrt(denom_src, out=tmp)
            np.divide(tmp, bias_correction2_sqrt, out=tmp)
            np.add(tmp, EPS, out=tmp)
            np.divide(m, tmp, out=tmp)
            np.multiply(tmp, -step_size, out=tmp)
            np.add(p, tmp, out=p)


def _torch_views(torch: Any, params: List[np.ndarray], grads: List[np.ndarray]) -> List[Any]:
    """Leaf tensors sharing memory with the NumPy params, their .grad the NumPy grads."""
    tensors = []
    for p, g in zip(params, grads):
        t = torch.from_numpy(p).requires_grad_(True)
        t.grad = torch.from_numpy(g)
        tensors.append(t)
    return tensors


class TorchContender(Contender):
    fused = False

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        torch = env.get("torch")
        if torch is None:
            raise Unavailable(env.get("torch_reason", "torch is not importable"))
        self.torch = torch
        self.params = [p.copy() for p in p0]
        tensors = _torch_views(torch, self.params, grads)
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        mode = {"fused": True} if self.fused else {"foreach": True}
        self.opt = cls(tensors, lr=LR, betas=BETAS, eps=EPS, weight_decay=weight_decay, amsgrad=amsgrad, **mode)
        self.step = self.opt.step

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)


class TorchForeachContender(TorchContender):
    name = "torch-foreach"
    fused = False


class TorchFusedContender(TorchContender):
    name = "torch-fused"
    fused = True


class DeepSpeedContender(Contender):
    name = "deepspeed"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        cpu_adam = env.get("deepspeed_cpu_adam")
        torch = env.get("torch")
        if cpu_adam is None or torch is None:
            raise Unavailable(env.get("deepspeed_reason", "deepspeed is not importable"))
        weight_decay, decoupled, amsgrad = VARIANTS[case.variant]
        if amsgrad:
            raise Unavailable("DeepSpeedCPUAdam has no amsgrad")
        self.torch = torch
        self.params = [p.copy() for p in p0]
        tensors = _torch_views(torch, self.params, grads)
        self.opt = cpu_adam(
            tensors,
            lr=LR,
            betas=BETAS,
            eps=EPS,
            weight_decay=weight_decay,
            adamw_mode=decoupled,
            fp32_optimizer_states=True,
        )
        self.step = self.opt.step

    def set_threads(self, n: int) -> None:
        self.torch.set_num_threads(n)


class CeilingContender(Contender):
    """adamcpp._core.ceiling_adam over one float32 buffer set holding the same
    bytes as the case's p, g, m, v (so a float64 case gets 2N float32 elements)."""

    name = "ceiling"

    def __init__(self, case: Case, p0: List[np.ndarray], grads: List[np.ndarray], env: Dict[str, Any]) -> None:
        super().__init__(case)
        n = case.shape.elements * case.itemsize // 4
        rng = np.random.default_rng(1)
        param = rng.standard_normal(n, dtype=np.float32)
        grad = rng.standard_normal(n, dtype=np.float32)
        exp_avg = np.zeros(n, dtype=np.float32)
        exp_avg_sq = np.zeros(n, dtype=np.float32)
        self.params = [param]
        self.elements = n
        self.bytes = 28 * n
        # The scalars of step 10 of the default Adam; any fixed values do.
        step_size = LR / (1.0 - BETAS[0] ** 10)
        bias_correction2_sqrt = math.sqrt(1.0 - BETAS[1] ** 10)
        kernel = _core.ceiling_adam
        self.step = lambda: kernel(param, grad, exp_avg, exp_avg_sq, step_size, bias_correction2_sqrt)


class TriadContender(Contender):
    """STREAM triad over float64 arrays whose total size equals the case's
    p, g, m, v working set; 24 bytes per element (read b, c; write a)."""

    name = "triad"

    def __init__(self, case: Case, p0: Any = None, grads: Any = None, env: Any = None, elements: int = 0) -> None:
        super().__init__(case)
        n = elements or max(1, -(-case.working_set_bytes // 24))
        a = np.zeros(n)
        b = np.full(n, 1.0)
        c = np.full(n, 0.5)
        self.params = [a]
        self.elements = n
        self.bytes = 24 * n
        kernel = _core.triad
        self.step = lambda: kernel(a, b, c, 3.0)


FACTORIES = {
    "adamcpp": AdamcppContender,
    "numpy": NumpyContender,
    "torch-foreach": TorchForeachContender,
    "torch-fused": TorchFusedContender,
    "deepspeed": DeepSpeedContender,
    "ceiling": CeilingContender,
    "triad": TriadContender,
}


# ------------------------------------------------------------------- timing
def _timed(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls (GC off, like timeit)."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in itertools.repeat(None, calls):
            fn()
        return (time.perf_counter() - start) / calls
    finally:
        if gc_was_enabled:
            gc.enable()


def warm_up(fn: Callable[[], Any], min_time: float) -> int:
    """Runs fn at least twice and for at least min_time/2 (page faults, lazy
    state, caches, clocks), then returns the calls per sample so that one
    sample lasts at least min_time."""
    start = time.perf_counter()
    fastest = math.inf
    calls = 0
    batch = 1
    while True:
        per_call = _timed(fn, batch)
        calls += batch
        if calls > 1:  # the first call pays for page faults and lazy allocation
            fastest = min(fastest, per_call)
        if calls >= 2 and time.perf_counter() - start >= min_time / 2:
            break
        # grow the batch so tiny steps do not spend the warm-up in perf_counter
        if per_call * batch < min_time / 20:
            batch *= 2
    return max(1, math.ceil(min_time / max(fastest, 1e-9)))


def measure_round(
    contenders: Dict[str, Contender],
    calls: Dict[str, int],
    samples: Dict[str, List[float]],
    round_index: int,
) -> None:
    """One interleaved repetition: every contender takes one sample, in an
    order rotated by one each round."""
    names = list(contenders)
    shift = round_index % len(names)
    for name in names[shift:] + names[:shift]:
        samples[name].append(_timed(contenders[name].step, calls[name]))


# ----------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Processor", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _meminfo(key: str) -> Optional[int]:
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib import metadata

        return metadata.version(name)
    except Exception:
        return None


def load_optional(names: Sequence[str]) -> Dict[str, Any]:
    """Imports torch / DeepSpeed only when a contender needs them; records why not."""
    env: Dict[str, Any] = {}
    if any(n in names for n in ("torch-foreach", "torch-fused", "deepspeed")):
        try:
            import torch

            env["torch"] = torch
        except Exception as exc:  # ImportError, or a broken install
            env["torch_reason"] = f"torch is not importable ({type(exc).__name__}: {exc})"
    if "deepspeed" in names:
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            env["deepspeed_cpu_adam"] = DeepSpeedCPUAdam
        except Exception as exc:
            env["deepspeed_reason"] = f"deepspeed is not importable ({type(exc).__name__})"
    return env


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(env: Dict[str, Any]) -> Dict[str, Any]:
    torch = env.get("torch")
    info = adamcpp.build_info()
    return {
        "load_average_at_start": _load_average(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "memory_total_bytes": _meminfo("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else _dist_version("torch"),
        "deepspeed": _dist_version("deepspeed"),
        "adamcpp": info,
        "isa": info["simd"],
    }


# ---------------------------------------------------------------- progress
class Progress:
    """A small stderr progress bar: redrawn in place on a terminal, one line
    per unit otherwise."""

    def __init__(self, total: int, enabled: bool = True, stream: Any = None) -> None:
        self.total = max(1, total)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.label = ""
        self.detail = ""
        self.start = time.perf_counter()
        self._drawn = False

    def begin(self, label: str) -> None:
        self.label, self.detail = label, ""
        if not self.enabled:
            return
        if self.tty:
            self._draw()
        else:
            self.stream.write(f"[{self.done + 1}/{self.total}] {label}\n")
            self.stream.flush()

    def note(self, detail: str) -> None:
        self.detail = detail
        if self.tty:
            self._draw()

    def advance(self) -> None:
        self.done += 1
        if self.tty:
            self._draw()

    def clear(self) -> None:
        if self.tty and self._drawn:
            width = shutil.get_terminal_size((80, 20)).columns
            self.stream.write("\r" + " " * (width - 1) + "\r")
            self.stream.flush()
            self._drawn = False

    def _draw(self) -> None:
        width = shutil.get_terminal_size((80, 20)).columns - 1
        elapsed = time.perf_counter() - self.start
        frac = self.done / self.total
        eta = f" eta {_clock(elapsed / self.done * (self.total - self.done))}" if self.done else ""
        bar_width = 24
        filled = int(round(frac * bar_width))
        text = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] {self.done}/{self.total} "
            f"{_clock(elapsed)}{eta}  {self.label} {self.detail}"
        )
        self.stream.write("\r" + text[:width].ljust(width))
        self.stream.flush()
        self._drawn = True


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ----------------------------------------------------------------- figures
def summarize(samples: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}


def derive(case: Case, entries: Dict[str, Dict[str, Any]]) -> None:
    """Adds per-contender figures to `entries` (in place).

    Contenders are timed on the case itself. The references run on their own
    buffers, so their figures are expressed for this case's traffic: the time
    this case's bytes would take at the reference's measured bandwidth.
    """
    for entry in entries.values():
        if not entry.get("available"):
            continue
        bandwidth = entry["bytes_per_call"] / entry["median_s"]  # B/s
        scale = case.bytes_per_step / entry["bytes_per_call"]  # 1 for the contenders
        entry["time_s"] = entry["median_s"] * scale
        entry["time_min_s"] = entry["min_s"] * scale
        entry["time_max_s"] = entry["max_s"] * scale
        entry["gb_per_s"] = bandwidth / 1e9
        entry["melem_per_s"] = case.shape.elements / entry["time_s"] / 1e6
    for ref in REFERENCES:
        ref_entry = entries.get(ref, {})
        for entry in entries.values():
            if entry.get("available"):
                entry[f"frac_{ref}"] = (
                    (entry["gb_per_s"] / ref_entry["gb_per_s"]) if ref_entry.get("available") else None
                )
    base = entries.get("adamcpp", {})
    for entry in entries.values():
        if entry.get("available"):
            entry["adamcpp_speedup"] = (entry["time_s"] / base["time_s"]) if base.get("available") else None


# ---------------------------------------------------------------- the sweep
def _estimate_bytes(case: Case, names: Sequence[str]) -> int:
    unit = case.shape.elements * case.itemsize
    holders = ("adamcpp", "numpy", "torch-foreach", "torch-fused")
    total = 2 * unit  # shared gradients + the initial parameters copied by each contender
    for name in names:
        total += (_FOOTPRINT[name] + (1 if case.amsgrad and name in holders else 0)) * unit
    return total


def _allocate(
    case: Case, names: Sequence[str], env: Dict[str, Any], seed: int
) -> Tuple[Dict[str, Contender], Dict[str, str]]:
    rng = np.random.default_rng(seed)
    n, size = case.shape.n_tensors, case.shape.tensor_elements
    p0 = [rng.standard_normal(size, dtype=case.dtype) for _ in range(n)]
    grads = [rng.standard_normal(size, dtype=case.dtype) for _ in range(n)]
    contenders: Dict[str, Contender] = {}
    skipped: Dict[str, str] = {}
    for name in names:
        try:
            contenders[name] = FACTORIES[name](case, p0, grads, env)
        except Unavailable as exc:
            skipped[name] = str(exc)
        except Exception as exc:  # an optional library refusing this case
            skipped[name] = f"setup failed: {type(exc).__name__}: {exc}"
    return contenders, skipped


def run_case_threads(
    contenders: Dict[str, Contender],
    skipped: Dict[str, str],
    threads: int,
    repeats: int,
    min_time: float,
    progress: Progress,
) -> Dict[str, Dict[str, Any]]:
    """Measures every live contender at one thread count; a contender whose
    step raises is dropped (recorded with the reason)."""
    adamcpp.set_num_threads(threads)
    entries: Dict[str, Dict[str, Any]] = {}
    live: Dict[str, Contender] = {}
    calls: Dict[str, int] = {}
    for name, c in contenders.items():
        if name in skipped:
            continue
        progress.note(f"warm-up {name}")
        try:
            c.set_threads(threads)
            calls[name] = warm_up(c.step, min_time)
            live[name] = c
        except Exception as exc:
            skipped[name] = f"step failed: {type(exc).__name__}: {exc}"
    samples: Dict[str, List[float]] = {name: [] for name in live}
    for r in range(repeats):
        progress.note(f"repetition {r + 1}/{repeats}")
        if live:
            measure_round(live, calls, samples, r)
    for name in contenders:
        if name in live:
            c = live[name]
            entries[name] = {
                "available": True,
                "calls_per_sample": calls[name],
                "samples_s": samples[name],
                "elements_per_call": c.elements,
                "bytes_per_call": c.bytes,
                **summarize(samples[name]),
            }
        else:
            entries[name] = {"available": False, "reason": skipped[name]}
    for name, reason in skipped.items():
        entries.setdefault(name, {"available": False, "reason": reason})
    return entries


def bandwidth_probe(
    elements: int, threads: Sequence[int], repeats: int, min_time: float, progress: Progress
) -> List[Dict[str, Any]]:
    """STREAM triad over 3 float64 arrays of `elements`, at each thread count."""
    out: List[Dict[str, Any]] = []
    probe = TriadContender(Case(Shape(1, elements), "float64", "adam"), elements=elements)
    try:
        for t in threads:
            progress.begin(f"memory bandwidth probe, {t} thread{'s' if t > 1 else ''}")
            adamcpp.set_num_threads(t)
            calls = warm_up(probe.step, min_time)
            samples = [_timed(probe.step, calls) for _ in range(repeats)]
            stats = summarize(samples)
            out.append(
                {
                    "threads": t,
                    "elements": elements,
                    "bytes_per_call": probe.bytes,
                    "calls_per_sample": calls,
                    "samples_s": samples,
                    **stats,
                    "gb_per_s": probe.bytes / stats["median_s"] / 1e9,
                }
            )
            progress.advance()
    finally:
        del probe
        gc.collect()
    return out


# ------------------------------------------------------------------ output
def _mu() -> str:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "\u00b5".encode(encoding)
        return "\u00b5"
    except (UnicodeEncodeError, LookupError):
        return "u"


def _num(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _speedup(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if x >= 1:
        return f"{x:.2f}x faster"
    return f"{1 / x:.2f}x slower"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_header(machine: Dict[str, Any], config: Dict[str, Any], available: Dict[str, Optional[str]]) -> str:
    info = machine["adamcpp"]
    mem = machine.get("memory_total_bytes")
    lines = [
        f"adamcpp-bench  adamcpp {info['version']} ({info['compiler']}, OpenMP {'on' if info['openmp'] else 'off'})"
        f"  {config['started']}",
        f"machine    {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)"
        + (f", {mem / 2**30:.1f} GiB RAM" if mem else "")
        + f", {machine['platform']}",
        f"ISA        {machine['isa']} (supported: {', '.join(info['simd_supported'])};"
        f" compiled: {', '.join(info['simd_targets'])})",
        f"threads    {', '.join(str(t) for t in config['threads'])}"
        + (
            f"  (load average at start {machine['load_average_at_start'][0]:.2f})"
            if machine.get("load_average_at_start")
            else ""
        ),
        f"versions   python {machine['python']}, numpy {machine['numpy']}, "
        f"torch {machine['torch'] or 'not installed'}, deepspeed {machine['deepspeed'] or 'not installed'}",
        f"method     warm-up, then samples of k back-to-back steps lasting >= {config['min_time_s']:g} s; "
        f"median of {config['repeats']} interleaved repetitions (min..max shown)",
        f"cases      sizes {', '.join(config['sizes'])}; dtype {', '.join(config['dtypes'])}; "
        f"variant {', '.join(config['variants'])}",
    ]
    load = machine.get("load_average_at_start")
    if load and load[0] >= 0.5:
        lines.append(
            f"WARNING    the machine is busy (load average {load[0]:.2f} on {machine['usable_cores']} cores): "
            "figures at thread counts near the core count will suffer"
        )
    for name in config["contenders"]:
        reason = available.get(name)
        status = DESCRIPTIONS[name] if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name:<14} {status}")
    return "\n".join(lines)


def format_bandwidth(probes: List[Dict[str, Any]]) -> str:
    if not probes:
        return "memory bandwidth: not measured (--stream-elements 0)"
    n = probes[0]["elements"]
    parts = [f"{p['threads']} thread{'s' if p['threads'] > 1 else ''}: {p['gb_per_s']:.1f} GB/s" for p in probes]
    return f"memory bandwidth (STREAM triad, 3 x {n:,} float64 = {_bytes(3 * 8 * n)}): " + "; ".join(parts)


def format_case_table(result: Dict[str, Any], hide: Sequence[str] = ()) -> str:
    """One case at one thread count; `hide` names contenders already reported
    unavailable in the header (not repeated per case)."""
    mu = _mu()
    shape = result["shape"]
    tensors = "1 tensor" if shape["n_tensors"] == 1 else f"{shape['n_tensors']} tensors x {shape['tensor_elements']:,}"
    title = (
        f"== {shape['label']}: {shape['elements']:,} elements ({tensors}), {result['dtype']}, {result['variant']}, "
        f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}  "
        f"[{result['bytes_per_element']} B/element, {_bytes(result['bytes_per_step'])}/step]"
    )
    head = ("contender", f"{mu}s/step", f"min..max {mu}s", "Melem/s", "GB/s", "%ceiling", "%triad", "adamcpp is")
    rows = [head]
    notes = []
    for name, e in result["contenders"].items():
        if not e.get("available"):
            if name not in hide:
                notes.append(f"   {name}: skipped ({e['reason']})")
            continue
        flag = "" if e.get("finite", True) else "  NONFINITE PARAMS!"
        rows.append(
            (
                name,
                _num(e["time_s"] * 1e6),
                f"{_num(e['time_min_s'] * 1e6)}..{_num(e['time_max_s'] * 1e6)}",
                _num(e["melem_per_s"]),
                _num(e["gb_per_s"]),
                _pct(e.get("frac_ceiling")),
                _pct(e.get("frac_triad")),
                ("-" if name == "adamcpp" else _speedup(e.get("adamcpp_speedup"))) + flag,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [title]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])] + [r[-1]]
        lines.append("   " + "  ".join(cells))
    return "\n".join(lines + notes)


def format_summary(results: List[Dict[str, Any]], names: Sequence[str]) -> str:
    others = [
        n
        for n in names
        if n != "adamcpp" and n not in REFERENCES and any(r["contenders"].get(n, {}).get("available") for r in results)
    ]
    head = ["case", "dtype", "variant", "thr", "adamcpp Melem/s", "GB/s", "%ceiling", "%triad"] + [
        f"vs {n}" for n in others
    ]
    rows = [head]
    for r in results:
        a = r["contenders"].get("adamcpp", {})
        if not a.get("available"):
            continue
        row = [
            r["shape"]["label"],
            r["dtype"],
            r["variant"],
            str(r["threads"]),
            _num(a["melem_per_s"]),
            _num(a["gb_per_s"]),
            _pct(a.get("frac_ceiling")),
            _pct(a.get("frac_triad")),
        ]
        for n in others:
            e = r["contenders"].get(n, {})
            row.append(f"{e['adamcpp_speedup']:.2f}x" if e.get("available") and e.get("adamcpp_speedup") else "-")
        rows.append(row)
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["== summary: adamcpp per case (vs X = X's time / adamcpp's time; > 1 means adamcpp is faster)"]
    for r in rows:
        lines.append("   " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Throughput (Melem/s) vs total elements, log-log, one panel per
    (dtype, variant) and thread count; the band between the ceiling loop and
    the triad bound is shaded."""
    from matplotlib.figure import Figure

    results = [r for r in report["results"]]
    names = [n for n in report["config"]["contenders"] if n not in REFERENCES]
    panels_rows = list(dict.fromkeys((r["dtype"], r["variant"]) for r in results))
    threads = list(dict.fromkeys(r["threads"] for r in results))
    if not panels_rows:
        panels_rows, threads = [("float32", "adam")], threads or [1]
    fig = Figure(figsize=(5.2 * len(threads), 3.8 * len(panels_rows)), layout="constrained")
    axes = fig.subplots(len(panels_rows), len(threads), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(CONTENDERS)}
    markers = ["s", "D", "^", "v", "P", "X"]
    multi_shapes = list(dict.fromkeys(r["shape"]["label"] for r in results if r["shape"]["n_tensors"] > 1))
    for i, (dtype, variant) in enumerate(panels_rows):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            rs = [r for r in results if r["dtype"] == dtype and r["variant"] == variant and r["threads"] == t]
            single = sorted((r for r in rs if r["shape"]["n_tensors"] == 1), key=lambda r: r["shape"]["elements"])
            xs = [r["shape"]["elements"] for r in single]
            band = []
            for r in single:
                refs = [r["contenders"].get(n, {}) for n in REFERENCES]
                vals = [e["melem_per_s"] for e in refs if e.get("available")]
                band.append((min(vals), max(vals)) if vals else (math.nan, math.nan))
            if xs and any(math.isfinite(lo) for lo, _ in band):
                ax.fill_between(
                    xs, [b[0] for b in band], [b[1] for b in band], color="0.85", label="ceiling loop .. triad bound"
                )
            for n in names:
                pts = [
                    (r["shape"]["elements"], r["contenders"][n]["melem_per_s"])
                    for r in single
                    if r["contenders"].get(n, {}).get("available")
                ]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colors[n], label=n)
                for k, label in enumerate(multi_shapes):
                    for r in rs:
                        e = r["contenders"].get(n, {})
                        if r["shape"]["label"] == label and e.get("available"):
                            ax.plot(
                                [r["shape"]["elements"]],
                                [e["melem_per_s"]],
                                linestyle="none",
                                marker=markers[k % len(markers)],
                                mfc="none",
                                color=colors[n],
                            )
            for k, label in enumerate(multi_shapes):
                ax.plot(
                    [],
                    [],
                    linestyle="none",
                    marker=markers[k % len(markers)],
                    mfc="none",
                    color="0.3",
                    label=f"{label} (many tensors)",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("elements per step (total)")
            ax.set_ylabel("Melem/s")
            ax.set_title(f"{dtype} {variant}, {t} thread{'s' if t > 1 else ''}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"adamcpp {m['adamcpp']['version']} Adam step throughput: {m['cpu']}, ISA {m['isa']}", fontsize=10)
    fig.savefig(path, dpi=120)


# -------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamcpp-bench",
        description="Adam step throughput of adamcpp beside NumPy, torch.optim (foreach, fused), DeepSpeed's "
        "CPUAdam when installed, a plain-loop ceiling and the STREAM memory bandwidth, measured in one "
        "interleaved run.",
        epilog="Example: adamcpp-bench --quick --json out.json --plot out.png",
    )
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        metavar="LIST",
        help=f"comma list of N (one tensor of N elements) or TxN (T tensors of N); "
        f"default {DEFAULT_SIZES}; --quick: {QUICK_SIZES}",
    )
    parser.add_argument(
        "--threads",
        type=parse_threads,
        default=None,
        metavar="LIST",
        help="comma list of thread counts ('all' = every usable core); default 1,all",
    )
    parser.add_argument(
        "--dtype",
        type=lambda s: _parse_choices(s, "--dtype", DTYPES, {"f32": ["float32"], "f64": ["float64"]}),
        default=["float32"],
        metavar="LIST",
        help="float32, float64 or all; default float32",
    )
    parser.add_argument(
        "--variant",
        type=lambda s: _parse_choices(s, "--variant", tuple(VARIANTS), {}),
        default=["adam"],
        metavar="LIST",
        help="adam, adamw, amsgrad or all; default adam",
    )
    parser.add_argument(
        "--contenders",
        type=lambda s: _parse_choices(
            s, "--contenders", CONTENDERS, {"torch": ["torch-foreach", "torch-fused"], "stream": ["triad"]}
        ),
        default=list(CONTENDERS),
        metavar="LIST",
        help=f"comma list from {', '.join(CONTENDERS)} ('torch' = both torch modes); default all "
        "(those not installed are reported and skipped)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help=f"interleaved repetitions, median reported; default {DEFAULT_REPEATS} (--quick {QUICK_REPEATS})",
    )
    parser.add_argument(
        "--min-time",
        type=float,
        default=None,
        metavar="S",
        help=f"seconds each timed sample lasts at least; default {DEFAULT_MIN_TIME} (--quick {QUICK_MIN_TIME})",
    )
    parser.add_argument(
        "--stream-elements",
        type=int,
        default=None,
        metavar="N",
        help=f"float64 elements per array of the stand-alone bandwidth probe (0 = skip); "
        f"default {DEFAULT_STREAM_ELEMENTS} (--quick {QUICK_STREAM_ELEMENTS})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a run under a minute: few sizes, fewer repeats, shorter samples"
    )
    parser.add_argument("--json", metavar="PATH", help="write all raw samples, medians and machine info as JSON")
    parser.add_argument("--plot", metavar="PATH", help="save a throughput-vs-size plot (needs matplotlib)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random parameters and gradients")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sizes = args.sizes if args.sizes is not None else parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    threads = args.threads if args.threads is not None else parse_threads("1,all")
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    min_time = args.min_time if args.min_time is not None else (QUICK_MIN_TIME if args.quick else DEFAULT_MIN_TIME)
    stream_elements = args.stream_elements
    if stream_elements is None:
        stream_elements = QUICK_STREAM_ELEMENTS if args.quick else DEFAULT_STREAM_ELEMENTS
    if repeats < 1:
        parser.error("--repeats: must be >= 1")
    if not (min_time >= 0 and math.isfinite(min_time)):
        parser.error("--min-time: must be a finite number >= 0")
    if stream_elements < 0:
        parser.error("--stream-elements: must be >= 0")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "adamcpp-bench: --plot needs matplotlib, which is not importable here "
                "(pip install matplotlib, or pip install 'adamcpp[bench]'); nothing was run.",
                file=sys.stderr,
            )
            return 2

    names = list(args.contenders)
    env = load_optional(names)
    available: Dict[str, Optional[str]] = {n: None for n in names}
    if "torch" not in env:
        for n in ("torch-foreach", "torch-fused"):
            if n in available:
                available[n] = env.get("torch_reason", "torch is not importable")
    if "deepspeed" in available and ("deepspeed_cpu_adam" not in env or "torch" not in env):
        available["deepspeed"] = env.get("deepspeed_reason", env.get("torch_reason", "deepspeed is not importable"))
    runnable = [n for n in names if available[n] is None]

    started = datetime.datetime.now(datetime.timezone.utc).astimezone()
    config = {
        "sizes": [s.label for s in sizes],
        "shapes": [{"n_tensors": s.n_tensors, "tensor_elements": s.tensor_elements} for s in sizes],
        "threads": threads,
        "dtypes": list(args.dtype),
        "variants": list(args.variant),
        "contenders": names,
        "repeats": repeats,
        "min_time_s": min_time,
        "stream_elements": stream_elements,
        "quick": bool(args.quick),
        "seed": args.seed,
        "hyperparameters": {"lr": LR, "betas": list(BETAS), "eps": EPS, "adamw_weight_decay": ADAMW_WEIGHT_DECAY},
        "started": started.isoformat(timespec="seconds"),
    }
    machine = machine_info(env)
    print(format_header(machine, config, available), flush=True)

    cases = [Case(s, d, v) for s in sizes for d in args.dtype for v in args.variant]
    units = len(cases) * len(threads) + (len(threads) if stream_elements else 0)
    progress = Progress(units, enabled=not args.no_progress)
    results: List[Dict[str, Any]] = []
    skipped_cases: List[Dict[str, Any]] = []
    nonfinite: List[str] = []
    interrupted = False
    torch = env.get("torch")
    saved_threads = adamcpp.get_num_threads()
    saved_torch_threads = torch.get_num_threads() if torch is not None else None
    t_start = time.perf_counter()
    probes: List[Dict[str, Any]] = []
    try:
        if stream_elements:
            probes = bandwidth_probe(stream_elements, threads, repeats, min_time, progress)
        progress.clear()
        print(format_bandwidth(probes), flush=True)
        for case in cases:
            label = f"{case.shape.label} {case.dtype} {case.variant}"
            need = _estimate_bytes(case, runnable)
            avail_mem = _meminfo("MemAvailable")
            if avail_mem is not None and need > 0.8 * avail_mem:
                reason = f"needs about {_bytes(need)}, only {_bytes(avail_mem)} available"
                skipped_cases.append(
                    {"shape": case.shape.label, "dtype": case.dtype, "variant": case.variant, "reason": reason}
                )
                progress.clear()
                print(f"== {label}: skipped ({reason})", flush=True)
                progress.done += len(threads)
                continue
            progress.begin(f"{label}: allocating")
            contenders, skipped = _allocate(case, runnable, env, args.seed)
            skipped.update({n: r for n, r in available.items() if r is not None})
            case_results = []
            try:
                for t in threads:
                    progress.begin(f"{label}, {t} thread{'s' if t > 1 else ''}")
                    if torch is not None:
                        torch.set_num_threads(t)
                    entries = run_case_threads(contenders, dict(skipped), t, repeats, min_time, progress)
                    ordered = {n: entries[n] for n in names if n in entries}
                    derive(case, ordered)
                    case_results.append(
                        {
                            "shape": {
                                "label": case.shape.label,
                                "n_tensors": case.shape.n_tensors,
                                "tensor_elements": case.shape.tensor_elements,
                                "elements": case.shape.elements,
                            },
                            "dtype": case.dtype,
                            "variant": case.variant,
                            "threads": t,
                            "bytes_per_element": case.bytes_per_element,
                            "bytes_per_step": case.bytes_per_step,
                            "contenders": ordered,
                        }
                    )
                    progress.advance()
            finally:
                # Numerics are not measured here, but nonsense is caught: every
                # contender's parameters must still be finite after the run.
                finite = {n: all(bool(np.isfinite(p).all()) for p in c.params) for n, c in contenders.items()}
                for r in case_results:
                    for n, e in r["contenders"].items():
                        if e.get("available"):
                            e["finite"] = finite[n]
                nonfinite.extend(f"{label}: {n}" for n, ok in finite.items() if not ok)
                results.extend(case_results)
                progress.clear()
                for r in case_results:
                    print(format_case_table(r, hide=[n for n, why in available.items() if why]), flush=True)
                del contenders
                gc.collect()
    except KeyboardInterrupt:
        interrupted = True
        progress.clear()
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        progress.clear()
        adamcpp.set_num_threads(saved_threads)
        if torch is not None and saved_torch_threads is not None:
            torch.set_num_threads(saved_torch_threads)

    summary = format_summary(results, names)
    if summary:
        print(summary)
    if nonfinite:
        print("ERROR: non-finite parameters after the run: " + "; ".join(nonfinite), file=sys.stderr)

    machine["bandwidth"] = probes
    machine["load_average_at_end"] = _load_average()
    report = {
        "schema": "adamcpp-bench/1",
        "machine": machine,
        "config": config,
        "results": results,
        "skipped_cases": skipped_cases,
        "nonfinite": nonfinite,
        "interrupted": interrupted,
        "duration_s": time.perf_counter() - t_start,
    }
    status = 130 if interrupted else (1 if nonfinite else 0)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=_json_default)
            f.write("\n")
        print(f"wrote {args.json}")
    if args.plot:
        try:
            write_plot(report, args.plot)
            print(f"wrote {args.plot}")
        except ImportError as exc:
            print(f"adamcpp-bench: --plot needs matplotlib ({exc})", file=sys.stderr)
            status = status or 2
    return status


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


if __name__ == "__main__":
    sys.exit(main())
