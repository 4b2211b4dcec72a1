"""How steps are timed: timed loops, warm-up, interleaved rounds, derived figures, and the progress bar beside them."""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from tqdm import tqdm

import adamcpp

from .cases import Case
from .contenders import REFERENCES, Contender


class ProgressBar(tqdm):
    """The sweep's progress bar on stderr, one unit per case and thread count;
    it disappears when closed.

    tqdm's monitor thread is off: no other Python thread wakes up while a
    sample is being timed.
    """

    monitor_interval = 0

    def __init__(self, total: int, enabled: bool) -> None:
        super().__init__(
            total=total,
            disable=not enabled,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
        )

    def begin(self, label: str) -> None:
        """Names the work now under way (the detail shown after it is cleared)."""
        self.set_description_str(label, refresh=False)
        self.set_postfix_str("")


def seconds_per_call(fn: Callable[[], Any], calls: int) -> float:
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


def warm_up(
    fn: Callable[[], Any],
    min_time: float,
    per_call_of: Optional[Callable[[Callable[[], Any], int], float]] = None,
) -> int:
    """Runs fn at least twice and for at least min_time/2 (page faults, lazy
    state, caches, clocks), then returns the calls per sample so that one
    sample lasts at least min_time. `per_call_of(fn, calls)` times a batch
    (seconds_per_call by default; the GPU benchmark waits for the device)."""
    measure = seconds_per_call if per_call_of is None else per_call_of
    start = time.perf_counter()
    fastest = math.inf
    calls = 0
    batch = 1
    while True:
        per_call = measure(fn, batch)
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
        samples[name].append(seconds_per_call(contenders[name].step, calls[name]))


def summarize(samples: List[float]) -> Dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples)}


def run_case_threads(
    contenders: Dict[str, Contender],
    skipped: Dict[str, str],
    threads: int,
    repeats: int,
    min_time: float,
    progress: ProgressBar,
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
        progress.set_postfix_str(f"warm-up {name}")
        try:
            c.set_threads(threads)
            calls[name] = warm_up(c.step, min_time)
            live[name] = c
        except Exception as exc:
            skipped[name] = f"step failed: {type(exc).__name__}: {exc}"
    samples: Dict[str, List[float]] = {name: [] for name in live}
    for r in range(repeats):
        progress.set_postfix_str(f"repetition {r + 1}/{repeats}")
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
        entry["bytes_per_element"] = entry["bytes_per_call"] / entry["elements_per_call"]
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


def generator_cost(entries: Dict[str, Dict[str, Any]]) -> Any:
    """Nanoseconds per element the stochastic-rounding generator adds to the
    ceiling loop (ceiling minus ceiling-nogen, the same loop with fixed bits),
    or None when either is missing."""
    a, b = entries.get("ceiling", {}), entries.get("ceiling-nogen", {})
    if not (a.get("available") and b.get("available")):
        return None
    return (a["median_s"] - b["median_s"]) / a["elements_per_call"] * 1e9
