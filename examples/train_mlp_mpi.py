#!/usr/bin/env python3
"""Train the Adam article's MLP data-parallel over MPI, with the optimizer state
sharded across the processes (adamcpp.distributed.ZeroRedundancyOptimizer).

    mpiexec -n 2 python3 -m mpi4py examples/train_mlp_mpi.py            # 2 processes on this machine
    mpiexec -n 4 -f hosts python3 -m mpi4py examples/train_mlp_mpi.py   # 4 processes over the machines in `hosts`

(`-m mpi4py`: a rank that fails, by an exception or sys.exit, aborts the whole job
instead of leaving the other ranks waiting for it.)

The model, data, loss and defaults are train_mlp.py's (mlp.py's MLP, digits by
default, Adam at 1e-3, batches of 32, 50 epochs). Every rank holds the whole model
in one FlatParams and sees the same shuffled batches; each takes its slice of every
batch of 32 (16 each with 2 ranks), computes the gradient of its slice, and
one `opt.step(flat.grads)` sums the slices' gradients over the ranks, steps
this rank's shard of the Adam state and gathers the updated parameters on
every rank. Each slice's mean gradient is weighted by its share of the batch,
so the step sees the gradient of the whole batch's mean loss, as one process
would. Every rank prints nothing but rank 0, which prints train_mlp.py's lines.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence

# One BLAS thread per rank: the matrices are tiny, and the ranks share the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from mlp import MLP, batches, load_data, training_rng

import adamcpp
from adamcpp.distributed import ZeroRedundancyOptimizer, padding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Data-parallel training of train_mlp.py's MLP over MPI with sharded Adam state "
        "(run it as mpiexec -n N python3 -m mpi4py train_mlp_mpi.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", metavar="NPZ", help="MNIST-style .npz; default: sklearn digits")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="the global batch, split over the ranks")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--clip-norm", type=float, metavar="NORM", help="clip the global gradient norm (max_grad_norm=)")
    p.add_argument("--seed", type=int, default=0, help="fixes the split, the initialisation and the shuffles")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines; just the summary")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mpi4py import MPI

    args = build_parser().parse_args(argv)
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    say = print if rank == 0 else (lambda *a, **k: None)

    data = load_data(args.data, seed=args.seed)
    model = MLP((data.n_features, 64, 128, data.n_classes), args.dropout, seed=args.seed)
    # The model's parameters and gradients become views of one flat buffer each: the optimizer
    # reduces, steps and gathers whole buffers, and nothing is copied per parameter. Padded for
    # `size` ranks, the buffers divide into equal shards (the faster block collectives).
    flat = adamcpp.FlatParams(model.params, pad_to=padding(size))
    model.params, model.grads = flat.params, flat.grads
    kwargs = {} if args.clip_norm is None else {"max_grad_norm": args.clip_norm}
    opt = ZeroRedundancyOptimizer(flat, adamcpp.Adam, comm=comm, lr=args.lr, **kwargs)

    n = len(data.y_train)
    say(f"ranks      {size} (MPI {'.'.join(map(str, MPI.Get_version()))}); each takes 1/{size} of every batch")
    say(f"data       {data.describe()}")
    say(f"model      {model!r}")
    say(
        f"training   {args.epochs} epochs x {math.ceil(n / args.batch_size)} batches of {args.batch_size}, "
        f"seed {args.seed}"
    )
    shard = sum(hi - lo for lo, hi in opt.shard)
    say(f"optimizer  Adam, lr {args.lr:g}, sharded: rank 0 holds the state of {shard:,} of {flat.numel:,}")

    shuffle = training_rng(args.seed)  # the same batches on every rank
    dropout = np.random.default_rng([args.seed, 2, rank])  # each rank its own dropout masks
    test_acc, step_time, updates = [], 0.0, 0
    start = time.perf_counter()
    counts = np.zeros(2)
    for epoch in range(1, args.epochs + 1):
        counts[:] = 0.0  # [sum of loss x samples, correct] over this rank's slices
        for batch in batches(n, args.batch_size, shuffle):
            mine = np.array_split(batch, size)[rank]
            if len(mine):
                loss, logits = model.loss_and_grad(data.x_train[mine], data.y_train[mine], rng=dropout)
                # Mean over the slice -> its part of the batch mean, times N (the step divides by N).
                weight = size * len(mine) / len(batch)
                if weight != 1.0:
                    for g in flat.grad_buffers:
                        g *= g.dtype.type(weight)
                counts[0] += loss * len(mine)
                counts[1] += np.count_nonzero(logits.argmax(axis=1) == data.y_train[mine])
            else:
                flat.zero_grad()
            t0 = time.perf_counter()
            opt.step(flat.grads)
            step_time += time.perf_counter() - t0
            updates += 1
        comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        test_loss, acc = model.evaluate(data.x_test, data.y_test)  # the same parameters on every rank
        test_acc.append(acc)
        if not args.quiet:
            say(
                f"epoch {epoch:>3}/{args.epochs}  loss {counts[0] / n:.4f}  train acc {counts[1] / n:.4f}  "
                f"test loss {test_loss:.4f}  test acc {acc:.4f}",
                flush=True,
            )
    wall = time.perf_counter() - start
    best = int(np.argmax(test_acc))
    reached = next((e for e, a in enumerate(test_acc, start=1) if a >= 0.95), None)
    say("Summary")
    say(
        f"  final     train loss {counts[0] / n:.4f}, test loss {test_loss:.4f}, "
        f"test acc {test_acc[-1]:.4f} (best {test_acc[best]:.4f} at epoch {best + 1})"
    )
    say(f"  95% test accuracy {f'first at epoch {reached}' if reached else 'not reached'}")
    say(
        f"  time      {wall:.2f} s total, {step_time:.3f} s inside opt.step on rank 0 "
        f"({1e6 * step_time / max(updates, 1):.1f} us each: reduce-scatter, local step, all-gather)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
