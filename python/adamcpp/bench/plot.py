"""The throughput-vs-size plot of a report (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

import math
from typing import Any, Dict, List

from .contenders import CONTENDERS, REFERENCES


def write_plot(report: Dict[str, Any], path: str) -> None:
    """Throughput (Melem/s) vs total elements, log-log, one panel per
    (dtype, variant) and thread count; the band between the ceiling loop and
    the triad bound is shaded."""
    from matplotlib.figure import Figure

    results: List[Dict[str, Any]] = report["results"]
    names = [n for n in report["config"]["contenders"] if n not in REFERENCES]
    panels_rows = list(dict.fromkeys((r["dtype"], r["variant"], r.get("precision", "fp32")) for r in results))
    threads = list(dict.fromkeys(r["threads"] for r in results))
    if not panels_rows:
        panels_rows, threads = [("float32", "adam", "fp32")], threads or [1]
    fig = Figure(figsize=(5.2 * len(threads), 3.8 * len(panels_rows)), layout="constrained")
    axes = fig.subplots(len(panels_rows), len(threads), squeeze=False)
    colors = {n: f"C{i}" for i, n in enumerate(CONTENDERS)}
    markers = ["s", "D", "^", "v", "P", "X"]
    multi_shapes = list(dict.fromkeys(r["shape"]["label"] for r in results if r["shape"]["n_tensors"] > 1))
    for i, (dtype, variant, precision) in enumerate(panels_rows):
        for j, t in enumerate(threads):
            ax = axes[i][j]
            rs = [
                r
                for r in results
                if r["dtype"] == dtype
                and r["variant"] == variant
                and r.get("precision", "fp32") == precision
                and r["threads"] == t
            ]
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
            where = f"{dtype} {variant}" if precision == "fp32" else f"{precision} {variant}"
            ax.set_title(f"{where}, {t} thread{'s' if t > 1 else ''}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"adamcpp {m['adamcpp']['version']} Adam step throughput: {m['cpu']}, ISA {m['isa']}", fontsize=10)
    fig.savefig(path, dpi=120)
