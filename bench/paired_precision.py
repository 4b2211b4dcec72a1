"""Float32 Adam against bfloat16-state Adam, timed in alternation (docs/api.md, "Mixed precision and compact state").

The two steps run one after the other in every round, over arrays of the same size, so slow phases of a shared
machine hit both; the result is the median of the per-round ratios (fp32 time / bf16-state time; > 1 means the
bfloat16-state step is faster) with its interquartile range, per size and thread count.

    python bench/paired_precision.py --sizes 1e7,5e7 --threads 1,2 --rounds 25 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import adamcpp


def measure(n: int, threads: int, rounds: int, warmup: int = 3) -> dict:
    adamcpp.set_num_threads(threads)
    rng = np.random.default_rng(0)
    p32 = rng.standard_normal(n).astype(np.float32)
    pbf = p32.copy()
    g = rng.standard_normal(n).astype(np.float32)
    fp32 = adamcpp.Adam([p32], lr=1e-3)
    bf16 = adamcpp.Adam([pbf], lr=1e-3, state_dtype="bfloat16")
    for _ in range(warmup):
        fp32.step([g])
        bf16.step([g])
    t32, tbf = [], []
    for k in range(rounds):
        order = (fp32, bf16) if k % 2 == 0 else (bf16, fp32)
        times = {}
        for opt in order:
            start = time.perf_counter()
            opt.step([g])
            times[id(opt)] = time.perf_counter() - start
        t32.append(times[id(fp32)])
        tbf.append(times[id(bf16)])
    ratios = np.array(t32) / np.array(tbf)
    return {
        "elements": n,
        "threads": threads,
        "rounds": rounds,
        "fp32_ms_median": float(np.median(t32) * 1e3),
        "bf16_state_ms_median": float(np.median(tbf) * 1e3),
        "ratio_median": float(np.median(ratios)),
        "ratio_q1": float(np.percentile(ratios, 25)),
        "ratio_q3": float(np.percentile(ratios, 75)),
        "fp32_gb_per_s": float(28 * n / np.median(t32) / 1e9),
        "bf16_state_gb_per_s": float(20 * n / np.median(tbf) / 1e9),
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
                f"(IQR {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
