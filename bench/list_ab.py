"""One side of an A/B timing of the list mode: run it under two builds in alternation (separate processes, one
per build and round) and compare the medians of the same case.

    python bench/list_ab.py CASE THREADS REPEATS

CASE is `list:TxN` (T float32 arrays of N elements, Adam, new gradient arrays every step), `reuse:TxN` (the same
gradient arrays every step), `flat:TxN` (the same arrays through one FlatParams) or `ceiling:TxN` (the plain
ceiling loop over one buffer of T*N elements: the bound the list mode is measured against). Prints one JSON line:
the case, threads, the median step time in microseconds over REPEATS timed batches, and adamcpp's SIMD target.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

import adamcpp
from adamcpp import _core


def main() -> None:
    case, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    kind, shape = case.split(":")
    tensors, elements = (int(float(x)) for x in shape.split("x"))
    adamcpp.set_num_threads(threads)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(elements).astype(np.float32) for _ in range(tensors)]
    grads = [np.full(elements, 1e-3, np.float32) for _ in range(tensors)]
    if kind == "ceiling":
        n = tensors * elements
        bufs = [np.zeros(n, np.float32) for _ in range(3)] + [np.full(n, 1e-3, np.float32)]

        def run() -> None:
            _core.ceiling_adam(bufs[0], bufs[3], bufs[1], bufs[2], 1e-3, 0.5)

    elif kind == "flat":
        flat = adamcpp.FlatParams(arrays)
        opt = adamcpp.Adam(flat, lr=1e-3)
        for g in flat.grads:
            g[:] = 1e-3

        def run() -> None:
            opt.step(flat.grads)

    else:
        opt = adamcpp.Adam(arrays, lr=1e-3)
        if kind == "list":
            fresh = [[g.copy() for g in grads] for _ in range(4)]  # new arrays every step, made outside the timing
            it = iter(range(1 << 62))

            def run() -> None:
                opt.step(fresh[next(it) & 3])

        else:

            def run() -> None:
                opt.step(grads)

    # Batches of about 20 ms each.
    for _ in range(20):
        run()
    t0 = time.perf_counter()
    k = 0
    while time.perf_counter() - t0 < 0.02:
        run()
        k += 1
    batch = max(k, 1)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batch):
            run()
        times.append((time.perf_counter() - t) / batch * 1e6)
    print(json.dumps({"case": case, "threads": threads, "us": statistics.median(times), "simd": _core.simd()}))


if __name__ == "__main__":
    main()
