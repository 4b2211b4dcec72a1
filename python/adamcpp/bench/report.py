"""Reporting: the printed tables (header, bandwidth, one per case, summary) and the JSON report (adamcpp-bench/1)."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .cases import Case
from .contenders import DESCRIPTIONS, REFERENCES

SCHEMA = "adamcpp-bench/1"


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


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000)."""
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
        f"variant {', '.join(config['variants'])}; precision {', '.join(config.get('precisions', ['fp32']))}",
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
    return f"memory bandwidth (STREAM triad, 3 x {n:,} float64 = {format_bytes(3 * 8 * n)}): " + "; ".join(parts)


def format_case_table(result: Dict[str, Any], hide: Sequence[str] = ()) -> str:
    """One case at one thread count; `hide` names contenders already reported
    unavailable in the header (not repeated per case)."""
    mu = _mu()
    shape = result["shape"]
    tensors = "1 tensor" if shape["n_tensors"] == 1 else f"{shape['n_tensors']} tensors x {shape['tensor_elements']:,}"
    precision = result.get("precision", "fp32")
    title = (
        f"== {shape['label']}: {shape['elements']:,} elements ({tensors}), {result['dtype']}, {result['variant']}, "
        + ("" if precision == "fp32" else f"{precision}, ")
        + f"{result['threads']} thread{'s' if result['threads'] > 1 else ''}  "
        f"[{result['bytes_per_element']} B/element, {format_bytes(result['bytes_per_step'])}/step]"
    )
    head = (
        "contender",
        f"{mu}s/step",
        f"min..max {mu}s",
        "Melem/s",
        "B/elem",
        "GB/s",
        "%ceiling",
        "%triad",
        "adamcpp is",
    )
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
                _num(e.get("bytes_per_element")),
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
    cost = result.get("generator_ns_per_element")
    if cost is not None:
        notes.append(f"   the generator costs {cost:.3f} ns per element here (ceiling - ceiling-nogen)")
    return "\n".join(lines + notes)


def format_summary(results: List[Dict[str, Any]], names: Sequence[str]) -> str:
    others = [
        n
        for n in names
        if n != "adamcpp" and n not in REFERENCES and any(r["contenders"].get(n, {}).get("available") for r in results)
    ]
    # flat storage's own share of the ceiling, beside adamcpp's (its target is the ceiling loop)
    flat = "adamcpp-flat" in others
    head = ["case", "dtype", "variant", "precision", "thr", "B/elem", "adamcpp Melem/s", "GB/s", "%ceiling", "%triad"]
    head += ["flat %ceiling"] if flat else []
    head += [f"vs {n}" for n in others]
    rows = [head]
    for r in results:
        a = r["contenders"].get("adamcpp", {})
        if not a.get("available"):
            continue
        row = [
            r["shape"]["label"],
            r["dtype"],
            r["variant"],
            r.get("precision", "fp32"),
            str(r["threads"]),
            str(r["bytes_per_element"]),
            _num(a["melem_per_s"]),
            _num(a["gb_per_s"]),
            _pct(a.get("frac_ceiling")),
            _pct(a.get("frac_triad")),
        ]
        if flat:
            e = r["contenders"].get("adamcpp-flat", {})
            row.append(_pct(e.get("frac_ceiling")) if e.get("available") else "-")
        for n in others:
            e = r["contenders"].get(n, {})
            row.append(f"{e['adamcpp_speedup']:.2f}x" if e.get("available") and e.get("adamcpp_speedup") else "-")
        rows.append(row)
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["== summary: adamcpp per case (vs X = X's time / adamcpp's time; > 1 means adamcpp is faster)"]
    for row in rows:
        lines.append(
            "   " + "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
    return "\n".join(lines)


def case_result(case: Case, threads: int, entries: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The report's record of one case at one thread count; `entries` are the contenders' figures."""
    return {
        "shape": {
            "label": case.shape.label,
            "n_tensors": case.shape.n_tensors,
            "tensor_elements": case.shape.tensor_elements,
            "elements": case.shape.elements,
        },
        "dtype": case.dtype,
        "variant": case.variant,
        "precision": case.precision,
        "threads": threads,
        "bytes_per_element": case.bytes_per_element,
        "bytes_per_step": case.bytes_per_step,
        "contenders": entries,
    }


def build_report(
    machine: Dict[str, Any],
    config: Dict[str, Any],
    results: List[Dict[str, Any]],
    skipped_cases: List[Dict[str, Any]],
    nonfinite: List[str],
    interrupted: bool,
    duration_s: float,
) -> Dict[str, Any]:
    """The whole JSON report."""
    return {
        "schema": SCHEMA,
        "machine": machine,
        "config": config,
        "results": results,
        "skipped_cases": skipped_cases,
        "nonfinite": nonfinite,
        "interrupted": interrupted,
        "duration_s": duration_s,
    }


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
