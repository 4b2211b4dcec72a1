"""adamcpp's step beside the optimizers of the frameworks it is driven from, in one process, alternating, medians:

- JAX: optax.adam's update and apply_updates under one `jax.jit` (block_until_ready) against `adamcpp.Adam.step`
  on a NumPy copy of the same float32 parameter, for each size;
- Keras 3 (torch backend): `keras.optimizers.Adam.apply` against `adamcpp.keras.Adam.apply` on the seed's MLP
  (Flatten, Dense 64, Dense 128, Dense 10) with the same gradients.

    python bench/frameworks.py [--sizes 1e5,1e6] [--repeats 60] [--json out.json]

A part whose framework is not installed is skipped with the reason. Reports microseconds per call and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List

import numpy as np

import adamcpp


def _alternate(calls: Dict[str, Callable[[], Any]], repeats: int, inner: int) -> Dict[str, float]:
    """Median microseconds per call of each function, the functions timed in alternation, `inner` calls per sample."""
    samples: Dict[str, List[float]] = {k: [] for k in calls}
    for f in calls.values():  # warm-up (compilation, first-step state)
        for _ in range(3):
            f()
    for _ in range(repeats):
        for name, f in calls.items():
            t = time.perf_counter()
            for _ in range(inner):
                f()
            samples[name].append((time.perf_counter() - t) / inner * 1e6)
    return {k: statistics.median(v) for k, v in samples.items()}


def jax_part(sizes: List[int], repeats: int) -> Dict[str, Any]:
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError as exc:
        return {"skipped": f"jax/optax not installed ({exc})"}
    out: Dict[str, Any] = {"jax": jax.__version__, "optax": optax.__version__, "sizes": {}}
    for n in sizes:
        rng = np.random.default_rng(0)
        p0 = rng.standard_normal(n).astype(np.float32)
        g0 = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        tx = optax.adam(1e-3)
        params = jnp.asarray(p0)
        state = tx.init(params)
        grads = jnp.asarray(g0)

        @jax.jit
        def update(params: Any, state: Any, grads: Any) -> Any:
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        box = [params, state]

        def optax_step() -> None:
            box[0], box[1] = update(box[0], box[1], grads)
            box[0].block_until_ready()

        p = p0.copy()
        opt = adamcpp.Adam([p], lr=1e-3)
        g_np = np.asarray(grads)  # a zero-copy read-only view: how the guide passes JAX gradients

        def adamcpp_step() -> None:
            opt.step([g_np])

        inner = max(1, int(2e6 // n))
        med = _alternate({"optax (jit)": optax_step, "adamcpp": adamcpp_step}, repeats, inner)
        out["sizes"][str(n)] = {**med, "ratio": med["optax (jit)"] / med["adamcpp"]}
    return out


def keras_part(repeats: int) -> Dict[str, Any]:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
        import torch

        import adamcpp.keras as ak
    except Exception as exc:  # keras absent, or its backend cannot start
        return {"skipped": f"keras (torch backend) not available ({exc})"}
    if keras.backend.backend() != "torch":
        return {"skipped": f"keras runs on the {keras.backend.backend()} backend, adamcpp.keras needs torch"}

    def seed_model() -> Any:
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((8, 8)),
                keras.layers.Flatten(),
                keras.layers.Dense(64, activation="relu"),
                keras.layers.Dense(128, activation="relu"),
                keras.layers.Dense(10, activation="softmax"),
            ]
        )

    theirs_model, ours_model = seed_model(), seed_model()
    grads = [torch.full(tuple(v.shape), 1e-3) for v in theirs_model.trainable_variables]
    theirs, ours = keras.optimizers.Adam(1e-3), ak.Adam(1e-3)

    def keras_apply() -> None:
        theirs.apply(grads, theirs_model.trainable_variables)

    def adamcpp_apply() -> None:
        ours.apply(grads, ours_model.trainable_variables)

    med = _alternate({"keras.optimizers.Adam": keras_apply, "adamcpp.keras.Adam": adamcpp_apply}, repeats, 20)
    return {"keras": keras.__version__, **med, "ratio": med["keras.optimizers.Adam"] / med["adamcpp.keras.Adam"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6", help="parameter sizes (elements) of the JAX part")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    result = {
        "threads": adamcpp.get_num_threads(),
        "simd": adamcpp.build_info().get("simd"),
        "jax": jax_part(sizes, args.repeats),
        "keras": keras_part(args.repeats),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
