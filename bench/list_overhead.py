"""What a list-mode step costs per tensor beyond the element loop, counted by callgrind (instructions and, with
--cache-sim, cache misses): the measure of the list mode's bookkeeping.

Two optimizers over the same T tensors of N float32 elements step under `valgrind --tool=callgrind` in separate
processes: a list optimizer (T separate arrays) and a flat one (the same arrays as views of one FlatParams, stepped
as one range: the same element loop, bit for bit). Each process runs W warm-up steps and then S steps, once with
S = S1 and once with S = S2; the difference of the two totals divided by S2 - S1 is one step's count with the
interpreter's start, the imports and the warm-up cancelled. The list step's count minus the flat step's, divided
by T, is what each tensor costs on top of the element loop. With --breakdown the list step's functions are listed
by exclusive instructions per tensor (callgrind_annotate, difference of the two runs).

    python bench/list_overhead.py --tensors 1000 --elements 256 [--cache-sim] [--breakdown 15] [--json out.json]

One thread (OMP_NUM_THREADS=1): callgrind serialises threads anyway. Needs valgrind (Debian: apt-get install
valgrind).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

STEPPER = """
import sys
import numpy as np
import adamcpp

mode, tensors, elements, warmup, steps = sys.argv[1], *map(int, sys.argv[2:6])
rng = np.random.default_rng(0)
arrays = [rng.standard_normal(elements).astype(np.float32) for _ in range(tensors)]
if mode == "flat":
    flat = adamcpp.FlatParams(arrays)
    opt = adamcpp.Adam(flat, lr=1e-3)
    assert opt.layout.mode == "flat"
    for g in flat.grads:
        g[:] = 1e-3
    grads = flat.grads
else:
    opt = adamcpp.Adam(arrays, lr=1e-3)
    assert opt.layout.mode == "list"
    grads = [np.full(elements, 1e-3, np.float32) for _ in range(tensors)]
for _ in range(warmup + steps):
    opt.step(grads)
"""

EVENTS = ("Ir", "D1mr", "D1mw", "DLmr", "DLmw")


def _run(mode: str, tensors: int, elements: int, warmup: int, steps: int, cache_sim: bool, out: Path) -> Path:
    """One callgrind run; returns its output file."""
    script = out / "stepper.py"
    script.write_text(STEPPER)
    data = out / f"{mode}-{steps}.callgrind"
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={data}",
        f"--cache-sim={'yes' if cache_sim else 'no'}",
        sys.executable,
        str(script),
        mode,
        str(tensors),
        str(elements),
        str(warmup),
        str(steps),
    ]
    # No bytecode written: both runs of a mode compile (or load) exactly the same modules, so their difference is
    # the steps alone.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"callgrind run failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
    return data


def _totals(data: Path) -> Dict[str, int]:
    """The run's total of each event (callgrind's `totals:` / `summary:` line)."""
    events: List[str] = []
    totals: List[int] = []
    for line in data.read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("totals:", "summary:")):
            totals = [int(x) for x in line.split()[1:]]
    if not events or not totals:
        raise SystemExit(f"{data}: no totals in the callgrind output")
    return dict(zip(events, totals))


_COLUMN = re.compile(r"\s*(?:\(\s*[\d.]+%\)|[\d,]+|\.)")


def _by_function(data: Path) -> Dict[str, int]:
    """Exclusive instructions per function (callgrind_annotate's listing: the event columns, each a count with
    its share or ".", then the function's file:name, which may hold spaces)."""
    done = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(data)], capture_output=True, text=True
    )
    rows: Dict[str, int] = {}
    for line in done.stdout.splitlines():
        first = re.match(r"\s*([\d,]+)\s", line)
        if not first:
            continue
        pos = 0
        while True:
            m = _COLUMN.match(line, pos)
            if not m or m.end() == pos:
                break
            pos = m.end()
        name = line[pos:].strip()
        if ":" in name:
            rows[name] = rows.get(name, 0) + int(first.group(1).replace(",", ""))
    return rows


def measure(
    tensors: int, elements: int, warmup: int, s1: int, s2: int, cache_sim: bool, breakdown: int
) -> Dict[str, object]:
    per_step: Dict[str, Dict[str, float]] = {}
    functions: Dict[str, Dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="adamcpp-callgrind-") as tmp:
        out = Path(tmp)
        for mode in ("list", "flat"):
            runs = [_run(mode, tensors, elements, warmup, s, cache_sim, out) for s in (s1, s2)]
            a, b = (_totals(r) for r in runs)
            per_step[mode] = {e: (b[e] - a[e]) / (s2 - s1) for e in b if e in a}
            if breakdown and mode == "list":
                fa, fb = (_by_function(r) for r in runs)
                functions[mode] = {k: fb[k] - fa.get(k, 0) for k in fb}
    result: Dict[str, object] = {
        "tensors": tensors,
        "elements": elements,
        "steps": [s1, s2],
        "per_step": per_step,
        "per_tensor_beyond_flat": {
            e: (per_step["list"][e] - per_step["flat"][e]) / tensors for e in per_step["list"] if e in per_step["flat"]
        },
    }
    if breakdown:
        rows = sorted(functions["list"].items(), key=lambda kv: -kv[1])[:breakdown]
        result["list_functions_per_tensor"] = [(name, n / (s2 - s1) / tensors) for name, n in rows]
    return result


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=1000)
    ap.add_argument("--elements", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", default="2,6", help="S1,S2: the two step counts whose difference is measured")
    ap.add_argument("--cache-sim", action="store_true", help="also count D1 and last-level cache misses")
    ap.add_argument("--breakdown", type=int, default=0, help="list the list step's N costliest functions")
    ap.add_argument("--json", type=Path, help="write the result as JSON")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (Debian: apt-get install valgrind)")
    s1, s2 = (int(x) for x in args.steps.split(","))
    if not 0 <= s1 < s2:
        raise SystemExit(f"--steps: expected S1,S2 with 0 <= S1 < S2, got {args.steps}")
    r = measure(args.tensors, args.elements, args.warmup, s1, s2, args.cache_sim, args.breakdown)
    print(f"{args.tensors} tensors x {args.elements} float32 elements, Adam, 1 thread, steps {s1} -> {s2}")
    for mode in ("list", "flat"):
        row = r["per_step"][mode]  # type: ignore[index]
        print(f"  {mode:5} per step: " + ", ".join(f"{e} {row[e]:,.0f}" for e in EVENTS if e in row))
    extra = r["per_tensor_beyond_flat"]
    print("  per tensor beyond the flat step: " + ", ".join(f"{e} {extra[e]:,.1f}" for e in EVENTS if e in extra))
    for name, n in r.get("list_functions_per_tensor", []):  # type: ignore[union-attr]
        print(f"    {n:10,.1f}  {name}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
