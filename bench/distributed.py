#!/usr/bin/env python3
"""Step time of adamcpp.distributed.ZeroRedundancyOptimizer split into its
parts, with the bytes each rank sends and the optimizer state each rank holds,
for N ranks on this machine; then a projection to 8, 64 and 512 ranks from the
latency and bandwidth measured in the same run.

    python3 bench/distributed.py                          # N = 1, 2, 3 at 1e6 and 1e7 float32 parameters
    python3 bench/distributed.py --ranks 1,2 --sizes 1e6 --steps 10 --json out.json

The script launches itself under `mpiexec -n N` for each N (one OpenMP thread
per rank: `OMP_NUM_THREADS=1`), so it needs the mpi extra (pip install
'adamcpp[mpi]'). Each rank holds one FlatParams of the case's float32
parameters (one tensor), padded to padding(N) so that the shards are equal,
and steps Adam with `opt.step(flat.grads)`: no copy in or out. Per step, the
optimizer records (opt.timings):

    reduce_scatter   the sum of the gradients, each rank receiving its shard
    agreement        the decisions every rank must share (none here beyond the all-reduce before the step)
    local_step       the fused Adam step over this rank's shard
    all_gather       the updated parameters, gathered in place on every rank

Steps are separated by a barrier; the median over the timed steps of the
slowest rank is reported, beside one all-reduce of the same gradients (what
replicated data parallelism sends instead). Latency: the median of 8-byte
all-reduces.
Bandwidth: the reduce-scatter's bytes over its time less the latency terms,
at the largest N that fits on the cores. On more ranks than cores the ranks
share cores (times then include waiting to be scheduled).

Bytes sent per rank per step are those of the ring algorithms (each rank sends
(N-1)/N of the buffer in a reduce-scatter and again in an all-gather), the
lower bound that MPICH's large-message algorithms reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

PROJECT_RANKS = (8, 64, 512)


def parse_counts(text: str) -> List[int]:
    return [int(float(t)) for t in text.split(",") if t.strip()]


# ------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    import adamcpp
    from adamcpp.distributed import ZeroRedundancyOptimizer, padding

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    result: Dict[str, Any] = {"rank": rank, "size": size, "threads": adamcpp.get_num_threads(), "cases": []}
    # Latency: 8-byte all-reduces.
    word = np.zeros(1, np.float64)
    lat = []
    for _ in range(200):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, word, op=MPI.SUM)
        lat.append(time.perf_counter() - t)
    result["allreduce_8B_s"] = statistics.median(lat[20:])
    for n in args.sizes:
        rng = np.random.default_rng(0)
        flat = adamcpp.FlatParams([rng.standard_normal(n, dtype=np.float32)], pad_to=padding(size))
        flat.grads[0][:] = rng.standard_normal(n, dtype=np.float32)
        zero = ZeroRedundancyOptimizer(flat, adamcpp.Adam, comm=comm, lr=1e-3)
        for _ in range(args.warmup):
            zero.step(flat.grads)
        rows = []
        for _ in range(args.steps):
            comm.Barrier()
            t = time.perf_counter()
            zero.step(flat.grads)
            total = time.perf_counter() - t
            rows.append({"step": total, **zero.timings})
        state_bytes = sum(v.nbytes for s in zero.optim.state for v in s.values() if isinstance(v, np.ndarray))
        # for comparison: one all-reduce of the same gradients (what replicated data parallelism sends)
        summed = np.empty_like(flat.grad_buffers[0])
        reduce_times = []
        for _ in range(max(3, args.steps // 2)):
            comm.Barrier()
            t = time.perf_counter()
            comm.Allreduce(flat.grad_buffers[0], summed, op=MPI.SUM)
            reduce_times.append(time.perf_counter() - t)
        del summed
        lo, hi = zero.shard[0]
        # the same step without MPI: a single-process flat optimizer over the same elements
        alone = None
        if size == 1:
            single = adamcpp.Adam(flat, lr=1e-3)
            for _ in range(args.warmup):
                single.step(flat.grads)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                single.step(flat.grads)
                times.append(time.perf_counter() - t)
            alone = statistics.median(times)
        result["cases"].append(
            {
                "elements": n,
                "shard_elements": hi - lo,
                "state_bytes": state_bytes,
                "medians_s": {k: statistics.median(r[k] for r in rows) for k in rows[0]},
                "single_process_step_s": alone,
                "allreduce_s": statistics.median(reduce_times),
            }
        )
        del zero, flat
    gathered = comm.gather(result, root=0)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)


# ------------------------------------------------------------------------- driver


def mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if not found:
        sys.exit("bench/distributed.py: no mpiexec (pip install 'adamcpp[mpi]')")
    return found


def run_ranks(n: int, args: argparse.Namespace, out: str) -> List[Dict[str, Any]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT=str(args.timeout))
    cmd = [
        mpiexec(), "-n", str(n), sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
        "--sizes", ",".join(str(s) for s in args.sizes), "--steps", str(args.steps), "--warmup", str(args.warmup),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mpiexec -n {n} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    with open(out) as f:
        return json.load(f)


def ms(x: float) -> str:
    return f"{1e3 * x:,.3f}" if x < 0.1 else f"{1e3 * x:,.1f}"


def mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def summarize(runs: Dict[int, List[Dict[str, Any]]], cores: int) -> Dict[str, Any]:
    """Per (size, N): the slowest rank's medians; the model's latency and bandwidth."""
    table = []
    for n_ranks, ranks in sorted(runs.items()):
        for k, case in enumerate(ranks[0]["cases"]):
            per_rank = [r["cases"][k] for r in ranks]
            slowest = {key: max(c["medians_s"][key] for c in per_rank) for key in per_rank[0]["medians_s"]}
            n = case["elements"]
            table.append(
                {
                    "ranks": n_ranks,
                    "elements": n,
                    "times_s": slowest,
                    "sent_bytes_per_rank": 2 * (n_ranks - 1) / n_ranks * 4 * n,
                    "state_bytes_per_rank": max(c["state_bytes"] for c in per_rank),
                    "shard_elements": [c["shard_elements"] for c in per_rank],
                    "single_process_step_s": case["single_process_step_s"],
                    "allreduce_s": max(c["allreduce_s"] for c in per_rank),
                }
            )
    latency = {n: max(r["allreduce_8B_s"] for r in ranks) for n, ranks in runs.items() if n > 1}
    # bandwidth from the largest case at the largest N that has a core per rank
    fit = [n for n in runs if 1 < n <= cores]
    model: Dict[str, Any] = {"latency_s": None, "bandwidth_Bps": None, "from_ranks": None}
    if fit:
        n_ranks = max(fit)
        rows = [t for t in table if t["ranks"] == n_ranks]
        big = max(rows, key=lambda t: t["elements"])
        alpha = latency[n_ranks] / max(1, (n_ranks - 1))  # per ring hop
        moved = (n_ranks - 1) / n_ranks * 4 * big["elements"]
        beta = moved / max(1e-9, big["times_s"]["reduce_scatter"] - (n_ranks - 1) * alpha)
        model = {"latency_s": alpha, "bandwidth_Bps": beta, "from_ranks": n_ranks, "from_elements": big["elements"]}
    return {"table": table, "allreduce_8B_s": latency, "model": model}


def project(summary: Dict[str, Any], alpha: float, beta: float) -> List[Dict[str, Any]]:
    """Step time and memory per rank at PROJECT_RANKS from the ring model:
    reduce-scatter and all-gather each (N-1)·alpha + (N-1)/N·4n/beta, the
    local step measured at N = 1 scaled by 1/N, plus the agreement's
    all-reduce (log2 N hops)."""
    out = []
    ones = {t["elements"]: t for t in summary["table"] if t["ranks"] == 1}
    for n, one in sorted(ones.items()):
        local_1 = one["times_s"]["local_step"]
        for ranks in PROJECT_RANKS:
            comm = (ranks - 1) * alpha + (ranks - 1) / ranks * 4 * n / beta
            agreement = max(1, (ranks - 1).bit_length()) * alpha
            local = local_1 / ranks
            out.append(
                {
                    "ranks": ranks,
                    "elements": n,
                    "reduce_scatter_s": comm,
                    "all_gather_s": comm,
                    "agreement_s": agreement,
                    "local_step_s": local,
                    "step_s": 2 * comm + agreement + local,
                    "state_bytes_per_rank": 8 * n / ranks,
                    "params_and_grads_bytes_per_rank": 8 * n,
                    "sent_bytes_per_rank": 2 * (ranks - 1) / ranks * 4 * n,
                }
            )
    return out


def report(summary: Dict[str, Any], projection: List[Dict[str, Any]], cores: int) -> str:
    lines = [
        f"adamcpp bench/distributed.py  {platform.machine()}, {cores} cores, Python {platform.python_version()}",
        "Adam, float32, one FlatParams, opt.step(flat.grads); medians of the slowest rank, ms",
        "",
        f"{'elements':>10} {'N':>3} {'step':>9} {'red-scat':>9} {'agree':>8} {'local':>9} {'all-gath':>9} "
        f"{'sent MB/rank':>13} {'state MB/rank':>14} {'1 process':>10} {'all-reduce':>11}",
    ]
    for t in summary["table"]:
        s = t["times_s"]
        alone = t["single_process_step_s"]
        lines.append(
            f"{t['elements']:>10,} {t['ranks']:>3} {ms(s['step']):>9} {ms(s['reduce_scatter']):>9} "
            f"{ms(s['agreement']):>8} {ms(s['local_step']):>9} {ms(s['all_gather']):>9} "
            f"{mb(t['sent_bytes_per_rank']):>13} {mb(t['state_bytes_per_rank']):>14} "
            f"{(ms(alone) if alone else '-'):>10} {ms(t['allreduce_s']):>11}"
            + ("   (ranks share cores)" if t["ranks"] > cores else "")
        )
    lat = ", ".join(f"N={n}: {1e6 * v:.1f} us" for n, v in sorted(summary["allreduce_8B_s"].items()))
    lines += ["", f"8-byte all-reduce: {lat}"]
    m = summary["model"]
    if m["latency_s"] is not None:
        lines.append(
            f"model (from N={m['from_ranks']}): latency {1e6 * m['latency_s']:.1f} us per hop, bandwidth "
            f"{m['bandwidth_Bps'] / 1e9:.2f} GB/s per rank"
        )
        lines += [
            "",
            "projection (ring reduce-scatter and all-gather at the measured latency and bandwidth, local step "
            "at N=1 / N), ms and MB",
            f"{'elements':>10} {'N':>4} {'step':>9} {'red-scat':>9} {'local':>9} {'all-gath':>9} "
            f"{'sent MB/rank':>13} {'state MB/rank':>14} {'p+g MB/rank':>12}",
        ]
        for p in projection:
            lines.append(
                f"{p['elements']:>10,} {p['ranks']:>4} {ms(p['step_s']):>9} {ms(p['reduce_scatter_s']):>9} "
                f"{ms(p['local_step_s']):>9} {ms(p['all_gather_s']):>9} {mb(p['sent_bytes_per_rank']):>13} "
                f"{mb(p['state_bytes_per_rank']):>14} {mb(p['params_and_grads_bytes_per_rank']):>12}"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=parse_counts, default=[1, 2, 3], help="comma list of N (default 1,2,3)")
    parser.add_argument("--sizes", type=parse_counts, default=[10**6, 10**7], help="elements (default 1e6,1e7)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (default 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="MPIEXEC_TIMEOUT per launch, seconds")
    parser.add_argument("--json", metavar="PATH", help="write the measurements, the model and the projection")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            print(f"mpiexec -n {n} ...", file=sys.stderr, flush=True)
            runs[n] = run_ranks(n, args, os.path.join(tmp, f"ranks{n}.json"))
    summary = summarize(runs, cores)
    m = summary["model"]
    projection = project(summary, m["latency_s"], m["bandwidth_Bps"]) if m["latency_s"] is not None else []
    print(report(summary, projection, cores))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "summary": summary, "projection": projection, "cores": cores}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
