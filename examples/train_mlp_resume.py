#!/usr/bin/env python3
"""train_mlp.py's training, with a checkpoint after every epoch and --resume to continue after a crash.

    python3 examples/train_mlp_resume.py --checkpoint run.safetensors --schedule cosine
    # ... killed at epoch 23 ...
    python3 examples/train_mlp_resume.py --checkpoint run.safetensors --schedule cosine --resume

A checkpoint is one file written by one atomic ``adamcpp.save``: the optimizer's state dict (moments, step
counts, hyperparameters, the schedule), the model's parameters, and the trainer's position (epochs done, the
shuffle and dropout generator's state, the curves so far, the settings). The resumed run continues bit for bit
like a run that was never interrupted. ``--epochs`` is the length of the whole run; the other settings must be
the saved run's (with a constant rate, ``--epochs`` may grow).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # tiny matrices: one BLAS thread is fastest
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from mlp import MLP, batches, load_data, training_rng

import adamcpp
from adamcpp import schedules

LR, BATCH_SIZE, DROPOUT = 1e-3, 32, 0.2


def save_checkpoint(
    path: str,
    model: MLP,
    opt: adamcpp.Optimizer,
    rng: np.random.Generator,
    epoch: int,
    curves: Dict[str, list],
    config: Dict[str, Any],
) -> None:
    """The optimizer's state dict plus the model (tensors ``model.W1``, ...) and the trainer's position."""
    checkpoint = opt.state_dict()
    checkpoint["model"] = dict(model.params)
    checkpoint["trainer"] = {"epoch": epoch, "rng": rng.bit_generator.state, "curves": curves, "config": config}
    adamcpp.save(checkpoint, path)  # to a temporary file, then renamed over `path`: never half written


def load_checkpoint(
    path: str, model: MLP, opt: adamcpp.Optimizer, config: Dict[str, Any]
) -> Tuple[int, np.random.Generator, Dict[str, list]]:
    """Restores the model (in place: the optimizer keeps its arrays), the optimizer and the generator;
    returns (epochs done, generator, curves). Raises ValueError, having changed nothing, for a damaged
    file, one that is not this script's, or one written with other settings."""
    checkpoint = adamcpp.load(path)  # checks the file's checksum
    saved, trainer = checkpoint.get("model"), checkpoint.get("trainer")
    if not isinstance(saved, dict) or not isinstance(trainer, dict):
        raise ValueError(f"{path}: not a train_mlp_resume.py checkpoint (no model parameters or trainer position)")
    for key, value in config.items():  # only --epochs may differ, and only at a constant rate
        if key == "epochs" and config["schedule"] == "constant":
            continue
        if trainer["config"].get(key) != value:
            raise ValueError(
                f"{path} was written by a run with {key} {trainer['config'].get(key)!r}, this run has "
                f"{value!r}; resume with the settings of the saved run"
            )
    if set(saved) != set(model.params) or any(saved[k].shape != p.shape for k, p in model.params.items()):
        raise ValueError(f"{path}: its parameters do not fit the model")
    opt.load_state_dict(checkpoint)  # validates everything before it changes anything
    for k, p in model.params.items():
        p[...] = saved[k]
    rng = np.random.default_rng()
    rng.bit_generator.state = trainer["rng"]
    return int(trainer["epoch"]), rng, trainer["curves"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", metavar="PATH", default="mlp.safetensors", help="written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    p.add_argument("--epochs", type=int, default=50, help="of the whole run, resumed or not")
    p.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="the learning rate: 1e-3 throughout, or cosine-decayed from 1e-3 to 0 over the run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs: expected an int >= 1")
    if args.resume and not os.path.isfile(args.checkpoint):
        p.error(f"--resume: no checkpoint file {args.checkpoint!r}")
    try:
        data = load_data(seed=args.seed)
    except RuntimeError as exc:
        p.error(str(exc))

    model = MLP((data.n_features, 64, 128, data.n_classes), DROPOUT, seed=args.seed)
    total = args.epochs * math.ceil(len(data.y_train) / BATCH_SIZE)  # updates in the whole run
    lr = LR if args.schedule == "constant" else schedules.CosineDecay(LR, total)  # a function of the step count
    opt = adamcpp.Adam(model.params, lr=lr)
    config = {"epochs": args.epochs, "schedule": args.schedule, "seed": args.seed}
    curves: Dict[str, list] = {"train_loss": [], "test_acc": []}  # per epoch, saved with the checkpoint
    rng, start = training_rng(args.seed), 0
    if args.resume:
        try:
            start, rng, curves = load_checkpoint(args.checkpoint, model, opt, config)
        except (TypeError, ValueError) as exc:
            p.error(f"--resume: {exc}")
        if start > args.epochs:
            p.error(f"--resume: {args.checkpoint} is at epoch {start}, past --epochs {args.epochs}")
        print(f"resumed    {args.checkpoint} after epoch {start}/{args.epochs}")

    for epoch in range(start + 1, args.epochs + 1):
        loss_sum = 0.0
        for idx in batches(len(data.y_train), BATCH_SIZE, rng):
            loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx], rng=rng)
            opt.step(model.grads)
            loss_sum += loss * len(idx)
        curves["train_loss"].append(loss_sum / len(data.y_train))
        curves["test_acc"].append(model.evaluate(data.x_test, data.y_test)[1])
        save_checkpoint(args.checkpoint, model, opt, rng, epoch, curves, config)
        if not args.quiet:
            print(
                f"epoch {epoch:>3}/{args.epochs}  loss {curves['train_loss'][-1]:.4f}  "
                f"test acc {curves['test_acc'][-1]:.4f}  saved {args.checkpoint}",
                flush=True,
            )
    print(f"done       {args.epochs} epochs, test accuracy {curves['test_acc'][-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
