#!/usr/bin/env python3
"""Train the Adam article's MLP (mlp.py) in plain NumPy, with adamcpp.Adam doing every update.

    python3 examples/train_mlp.py                   # digits, Adam at 1e-3, batches of 32, 50 epochs: 97.2%
    python3 examples/train_mlp.py --data mnist.npz  # an MNIST-style .npz (x_train, y_train, x_test, y_test)

Forward and backward passes are NumPy; each update is one ``opt.step(model.grads)`` call that changes the
float32 parameters in place. ``--seed`` fixes the split, the initialisation, the shuffles and the dropout
masks: two runs with the same seed end with the same bits, which the last line shows as a digest.
train_mlp_resume.py adds checkpoints, train_mlp_mpi.py data parallelism; bench/mlp_study.py compares
optimizers, schedules and precisions on this model.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from typing import Optional, Sequence

# The matrices are tiny (batches of 32 x 64..128 units): a multi-threaded BLAS spends more time waking
# threads than multiplying (about 3x slower on 2 cores). One BLAS thread unless the user chose.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from mlp import MLP, batches, load_data, training_rng

import adamcpp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train the Adam article's MLP (Dense 64 relu, Dropout 0.2, Dense 128 relu, Dropout 0.2, "
        "Dense 10 softmax) in NumPy with adamcpp.Adam.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", metavar="NPZ", help="MNIST-style .npz; default: scikit-learn's bundled digits")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="fixes the split, the initialisation, shuffles and dropout")
    p.add_argument("--threads", type=int, help="threads of adamcpp's step (adamcpp.set_num_threads)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines; just the summary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs: expected an int >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size: expected an int >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        parser.error(f"--lr: expected a finite number >= 0, got {args.lr}")
    if args.threads is not None:
        try:
            adamcpp.set_num_threads(args.threads)
        except (TypeError, ValueError) as exc:
            parser.error(f"--threads: {exc}")
    try:
        data = load_data(args.data, seed=args.seed)
    except (RuntimeError, ValueError, OSError) as exc:
        parser.error(str(exc))

    model = MLP((data.n_features, 64, 128, data.n_classes), args.dropout, seed=args.seed)
    opt = adamcpp.Adam(model.params, lr=args.lr)  # updates model.params in place
    rng = training_rng(args.seed)  # shuffles and dropout masks
    info = adamcpp.build_info()
    print(f"data       {data.describe()}")
    print(f"model      {model!r}")
    print(f"training   Adam, lr {args.lr:g}, {args.epochs} epochs, batches of {args.batch_size}, seed {args.seed}")
    print(f"adamcpp    {info['version']}, SIMD {info['simd']}, {adamcpp.get_num_threads()} thread(s)")

    test_acc, step_time, updates = [], 0.0, 0
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        loss_sum = 0.0
        for idx in batches(len(data.y_train), args.batch_size, rng):
            loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx], rng=rng)  # fills model.grads
            t0 = time.perf_counter()
            opt.step(model.grads)
            step_time += time.perf_counter() - t0
            updates += 1
            loss_sum += loss * len(idx)
        train_loss = loss_sum / len(data.y_train)
        if not math.isfinite(train_loss):
            print(f"diverged: the loss became {train_loss} in epoch {epoch}; try a smaller --lr", file=sys.stderr)
            return 1
        test_loss, acc = model.evaluate(data.x_test, data.y_test)
        test_acc.append(acc)
        if not args.quiet:
            print(
                f"epoch {epoch:>3}/{args.epochs}  loss {train_loss:.4f}  test loss {test_loss:.4f}  test acc {acc:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - start

    best = int(np.argmax(test_acc))
    reached = next((e for e, a in enumerate(test_acc, start=1) if a >= 0.95), None)
    digest = hashlib.sha256(b"".join(p.tobytes() for p in model.params.values())).hexdigest()[:16]
    print("Summary")
    print(
        f"  final     train loss {train_loss:.4f}, test loss {test_loss:.4f}, test accuracy {test_acc[-1]:.4f} "
        f"(best {test_acc[best]:.4f} at epoch {best + 1})"
    )
    print(f"  95% test accuracy {f'first at epoch {reached}' if reached else 'not reached'}")
    print(
        f"  time      {wall:.2f} s total, {step_time:.3f} s inside opt.step ({100 * step_time / wall:.1f}%) "
        f"for {updates:,} updates ({1e6 * step_time / updates:.1f} us each)"
    )
    print(f"  weights   sha256 {digest} (the same on every run with this seed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
