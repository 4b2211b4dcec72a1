"""The machine under test: CPU, memory, versions, the optional torch/DeepSpeed imports, the bandwidth probe."""

from __future__ import annotations

import gc
import os
import platform
from importlib import import_module, metadata
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import adamcpp

from .cases import Case, Shape, usable_cores
from .contenders import TriadContender
from .timing import ProgressBar, seconds_per_call, summarize, warm_up


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


def meminfo(key: str) -> Optional[int]:
    """A /proc/meminfo entry in bytes ('MemTotal', 'MemAvailable'), or None where there is none."""
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
        return metadata.version(name)
    except Exception:
        return None


def load_optional(names: Sequence[str]) -> Dict[str, Any]:
    """Imports torch / DeepSpeed only when a contender needs them; records why not."""
    env: Dict[str, Any] = {}
    if any(n in names for n in ("torch-foreach", "torch-fused", "deepspeed")):
        try:
            env["torch"] = import_module("torch")
        except Exception as exc:  # ImportError, or a broken install
            env["torch_reason"] = f"torch is not importable ({type(exc).__name__}: {exc})"
    if "deepspeed" in names:
        try:
            env["deepspeed_cpu_adam"] = import_module("deepspeed.ops.adam").DeepSpeedCPUAdam
        except Exception as exc:
            env["deepspeed_reason"] = f"deepspeed is not importable ({type(exc).__name__})"
    return env


def unavailable_reasons(names: Sequence[str], env: Dict[str, Any]) -> Dict[str, Optional[str]]:
    """Each named contender -> why it cannot run here, or None where it can (from `load_optional`'s env)."""
    reasons: Dict[str, Optional[str]] = {n: None for n in names}
    if "torch" not in env:
        for n in ("torch-foreach", "torch-fused"):
            if n in reasons:
                reasons[n] = env.get("torch_reason", "torch is not importable")
    if "deepspeed" in reasons and ("deepspeed_cpu_adam" not in env or "torch" not in env):
        reasons["deepspeed"] = env.get("deepspeed_reason", env.get("torch_reason", "deepspeed is not importable"))
    return reasons


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages, where the OS has them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(env: Dict[str, Any]) -> Dict[str, Any]:
    torch = env.get("torch")
    info = adamcpp.build_info()
    return {
        "load_average_at_start": load_average(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_total_bytes": meminfo("MemTotal"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else _dist_version("torch"),
        "deepspeed": _dist_version("deepspeed"),
        "adamcpp": info,
        "isa": info["simd"],
    }


def bandwidth_probe(
    elements: int, threads: Sequence[int], repeats: int, min_time: float, progress: ProgressBar
) -> List[Dict[str, Any]]:
    """STREAM triad over 3 float64 arrays of `elements`, at each thread count."""
    out: List[Dict[str, Any]] = []
    probe = TriadContender(Case(Shape(1, elements), "float64", "adam"), elements=elements)
    try:
        for t in threads:
            progress.begin(f"memory bandwidth probe, {t} thread{'s' if t > 1 else ''}")
            adamcpp.set_num_threads(t)
            calls = warm_up(probe.step, min_time)
            samples = [seconds_per_call(probe.step, calls) for _ in range(repeats)]
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
            progress.update()
    finally:
        del probe
        gc.collect()
    return out
