"""Float32 Adam against bfloat16-state Adam, timed in alternation (docs/api.md, "Mixed precision and compact state").

The two steps run one after the other in every round, over arrays of the same size, so slow phases of a shared
machine hit both; the result is the median of the per-round ratios (fp32 time / bf16-state time; > 1 means the
bfloat16-state step is faster) with its interquartile range, per size and thread count. Each round also times the
traffic probe (`adamcpp._core.traffic`: the same bytes, 28 and 20 per element, with one addition per array) for both
layouts: their ratio is the most any bfloat16-state step can gain over float32 on the machine at that moment, and
"of bound" is the step ratio's share of it.

    python bench/paired_precision.py --sizes 1e7,5e7 --threads 1,2 --rounds 25 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import adamcpp
from adamcpp import _core
from adamcpp._precision import bfloat16


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _iqr(x: np.ndarray) -> tuple:
    return float(np.percentile(x, 25)), float(np.percentile(x, 75))


def measure(n: int, threads: int, rounds: int, warmup: int = 3) -> dict:
    adamcpp.set_num_threads(threads)
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(n).astype(np.float32)
    pbf = p32.copy()
    g = rng.standard_normal(n).astype(np.float32)
    fp32 = adamcpp.Adam([p32], lr=1e-3)
    bf16 = adamcpp.Adam([pbf], lr=1e-3, state_dtype="bfloat16")
    bf16_dtype = bfloat16()
    tp = {
        "traffic28": (np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)),
        "traffic20": (np.zeros(n, np.float32), np.zeros(n, bf16_dtype), np.zeros(n, bf16_dtype)),
    }
    runs = {
        "fp32": lambda: fp32.step([g]),
        "bf16_state": lambda: bf16.step([g]),
        "traffic28": lambda: _core.traffic(tp["traffic28"][0], g, tp["traffic28"][1], tp["traffic28"][2]),
        "traffic20": lambda: _core.traffic(tp["traffic20"][0], g, tp["traffic20"][1], tp["traffic20"][2]),
    }
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict = {name: [] for name in runs}
    names = list(runs)
    for k in range(rounds):
        order = names if k % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(_timed(runs[name]))
    t = {name: np.array(v) for name, v in times.items()}
    ratios = t["fp32"] / t["bf16_state"]
    bound = t["traffic28"] / t["traffic20"]
    share = ratios / bound
    (ratio_q1, ratio_q3), (bound_q1, bound_q3) = _iqr(ratios), _iqr(bound)
    return {
        "elements": n,
        "threads": threads,
        "rounds": rounds,
        "fp32_ms_median": float(np.median(t["fp32"]) * 1e3),
        "bf16_state_ms_median": float(np.median(t["bf16_state"]) * 1e3),
        "ratio_median": float(np.median(ratios)),
        "ratio_q1": ratio_q1,
        "ratio_q3": ratio_q3,
        "fp32_gb_per_s": float(28 * n / np.median(t["fp32"]) / 1e9),
        "bf16_state_gb_per_s": float(20 * n / np.median(t["bf16_state"]) / 1e9),
        "traffic28_gb_per_s": float(28 * n / np.median(t["traffic28"]) / 1e9),
        "traffic20_gb_per_s": float(20 * n / np.median(t["traffic20"]) / 1e9),
        "bound_median": float(np.median(bound)),
        "bound_q1": bound_q1,
        "bound_q3": bound_q3,
        "share_of_bound_median": float(np.median(share)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1e7,5e7")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print(f"simd target {adamcpp.build_info()['simd']}; ratio = fp32 time / bf16-state time (> 1: bf16-state faster)")
    for size in args.sizes.split(","):
        for threads in args.threads.split(","):
            r = measure(int(float(size)), int(threads), args.rounds)
            rows.append(r)
            print(
                f"{r['elements']:>11,} elements, {r['threads']} thread(s): fp32 {r['fp32_ms_median']:.2f} ms "
                f"({r['fp32_gb_per_s']:.1f} GB/s), bf16-state {r['bf16_state_ms_median']:.2f} ms "
                f"({r['bf16_state_gb_per_s']:.1f} GB/s), ratio {r['ratio_median']:.2f}x "
                f"(IQR {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}); traffic bound {r['bound_median']:.2f}x "
                f"({r['traffic28_gb_per_s']:.1f} / {r['traffic20_gb_per_s']:.1f} GB/s), "
                f"{r['share_of_bound_median']:.0%} of it"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
