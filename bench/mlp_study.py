#!/usr/bin/env python3
"""Studies on the examples' MLP (examples/mlp.py, digits by default): optimizers, schedules, clipping, precisions.

    python3 bench/mlp_study.py --compare --plot docs/compare.png   # Adam, AdamW, SGD, momentum from one init
    python3 bench/mlp_study.py --compare-precision --seeds 3       # every precision from one init, per seed
    python3 bench/mlp_study.py --optimizer sgd --schedule cosine --clip-norm 1 --plot curves.png   # one variant

Every run of a comparison starts from the same initialisation and sees the same batches and dropout masks
(the same seed drives them), so the rows differ by the optimizer or the storage alone. The model is
examples/mlp.py, the one the examples train (this study imports it from there; nothing imports the example
scripts); a plain ``--optimizer adam`` run is examples/train_mlp.py's, bit for bit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

if __name__ == "__main__":  # tiny matrices: a multi-threaded BLAS only wakes threads (about 3x slower on 2 cores)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from tqdm import tqdm

import adamcpp
from adamcpp import schedules

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from mlp import MLP, Dataset, batches, load_data, training_rng

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine", "warmup-cosine", "step")
# Default learning rates, each the best mean final test accuracy (digits, 50 epochs, constant rate, seeds 0-3)
# on a small grid: Adam/AdamW {3e-4, 1e-3, 3e-3} -> 1e-3 (also the article's and Keras' default), SGD {0.02,
# 0.05, 0.1, 0.2, 0.5} -> 0.1, momentum 0.9 {0.002, 0.005, 0.01, 0.02, 0.05} -> 0.01. With these, all four end
# within about half a point of each other (mean final 0.979-0.981) and reach 95% in a similar number of epochs.
# Adam's edge here is robustness: its default needed no search, while plain SGD at 0.02 (5x below its best)
# needs 19-24 epochs to reach 95% test accuracy against Adam's 5-11.
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.1, "momentum": 0.01}
TARGET_ACCURACY = 0.95

# --precision: how the parameters, gradients and Adam's state are stored. The passes compute in float32 either
# way (a bfloat16 weight converts exactly); 16-bit gradients are the float32 ones rounded to nearest.
#   name -> (parameter and gradient dtype, Adam options)
PRECISIONS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "fp32": ("float32", {}),
    "bf16-state": ("float32", {"state_dtype": "bfloat16"}),
    "bf16-master": ("bfloat16", {"state_dtype": "bfloat16"}),
    "bf16": ("bfloat16", {"state_dtype": "bfloat16", "master_weights": False, "param_rounding": "stochastic"}),
    # round-to-nearest variants of the compact layouts, for contrast
    "bf16-state-nearest": ("float32", {"state_dtype": "bfloat16", "state_rounding": "nearest"}),
    "bf16-nearest": ("bfloat16", {"state_dtype": "bfloat16", "state_rounding": "nearest", "master_weights": False}),
}


def precision_dtype(name: str) -> np.dtype:
    """The parameters' and gradients' dtype of a precision (bfloat16 needs ml_dtypes)."""
    if PRECISIONS[name][0] == "float32":
        return np.dtype(np.float32)
    try:
        import ml_dtypes
    except ImportError:
        raise RuntimeError(f"--precision {name} needs ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def bytes_per_parameter(precision: str) -> int:
    """What a parameter costs in memory with Adam: weight, gradient, m, v (and a master copy)."""
    dtype, options = PRECISIONS[precision]
    weight = 4 if dtype == "float32" else 2
    state = 2 if options.get("state_dtype") == "bfloat16" else 4
    master = 4 if dtype != "float32" and options.get("master_weights", True) else 0
    return 2 * weight + 2 * state + master


def make_optimizer(
    name: str,
    params: Dict[str, np.ndarray],
    lr: Any,
    *,
    weight_decay: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    precision: str = "fp32",
    seed: int = 0,
) -> adamcpp.Optimizer:
    """adam -> Adam, adamw -> AdamW, sgd -> SGD(lr), momentum -> SGD(lr, momentum=0.9).

    ``weight_decay=None`` keeps each optimizer's default (AdamW 1e-2, the others 0); ``precision`` sets Adam's
    storage options; ``seed`` keys its stochastic rounding."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    if precision != "fp32" and name not in ("adam", "adamw"):
        raise ValueError(f"precision {precision}: mixed precision and compact state are Adam/AdamW options")
    kwargs: Dict[str, Any] = {}
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if max_grad_norm is not None:
        kwargs["max_grad_norm"] = max_grad_norm
    if precision != "fp32":
        kwargs.update(PRECISIONS[precision][1], seed=seed)
    if name == "momentum":
        kwargs["momentum"] = 0.9
    cls = {"adam": adamcpp.Adam, "adamw": adamcpp.AdamW}.get(name, adamcpp.SGD)
    return cls(params, lr=lr, **kwargs)


def make_schedule(kind: str, lr: float, *, epochs: int, steps_per_epoch: int) -> Union[float, schedules.Schedule]:
    """The ``--schedule`` choices, in updates (t = updates already applied):

    constant       lr
    cosine         CosineDecay from lr to 0 over the whole run
    warmup-cosine  linear warmup from 0 over one epoch (at most 10% of the run), then cosine to 0
    step           StepDecay: x0.2 every third of the run (rounded to whole epochs)
    """
    total = epochs * steps_per_epoch
    if kind == "constant":
        return lr
    if kind == "cosine":
        return schedules.CosineDecay(lr, total)
    if kind == "warmup-cosine":
        warmup = max(1, min(steps_per_epoch, total // 10))
        return schedules.WarmupCosineDecay(lr, warmup, max(total, warmup + 1))
    if kind == "step":
        return schedules.StepDecay(lr, max(1, math.ceil(epochs / 3)) * steps_per_epoch, 0.2)
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {kind!r}")


def current_lr(opt: adamcpp.Optimizer) -> float:
    """The rate the next update will use (a schedule evaluated at the step count)."""
    lr = opt.param_groups[0]["lr"]
    return float(lr(int(opt.state[0].get("step", 0)) if opt.state else 0)) if callable(lr) else float(lr)


@dataclass
class History:
    """Per-epoch curves and totals of one training run."""

    optimizer: str
    train_loss: List[float] = field(default_factory=list)  # mean over the epoch's batches (dropout on)
    test_loss: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    lr_at_end: List[float] = field(default_factory=list)
    wall_time: float = 0.0  # whole run, evaluation included
    step_time: float = 0.0  # inside opt.step only
    updates: int = 0

    def epochs_to(self, accuracy: float) -> Optional[int]:
        """First epoch (1-based) whose test accuracy is >= accuracy, or None."""
        return next((i for i, a in enumerate(self.test_acc, start=1) if a >= accuracy), None)

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else math.nan


def train(
    model: MLP,
    opt: adamcpp.Optimizer,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = 32,
    seed: int = 0,
    name: str = "",
    progress: bool = False,
    quiet: bool = True,
) -> History:
    """Mini-batch training, train_mlp.py's loop timed and recorded. ``seed`` fixes the shuffles and dropout
    masks, so runs from the same initial parameters with the same seed see the same batches in the same order.
    ``progress`` draws a bar on stderr (erased at the end of each epoch); ``quiet=False`` prints a line an epoch."""
    rng, history = training_rng(seed), History(optimizer=name)
    n = len(data.y_train)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        loss_sum = 0.0
        with tqdm(
            total=math.ceil(n / batch_size),
            desc=f"{name or 'train'} {epoch:>3}/{epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ) as bar:
            for idx in batches(n, batch_size, rng):
                loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx], rng=rng)
                t0 = time.perf_counter()
                opt.step(model.grads)
                history.step_time += time.perf_counter() - t0
                history.updates += 1
                loss_sum += loss * len(idx)
                bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
                bar.update()
        history.train_loss.append(loss_sum / n)
        test_loss, test_acc = model.evaluate(data.x_test, data.y_test)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        history.lr_at_end.append(current_lr(opt))
        if not math.isfinite(history.train_loss[-1]):
            raise FloatingPointError(f"{name or 'training'}: the loss became {history.train_loss[-1]} in epoch {epoch}")
        if not quiet:
            print(
                f"epoch {epoch:>3}/{epochs}  loss {history.train_loss[-1]:.4f}  test loss {test_loss:.4f}  "
                f"test acc {test_acc:.4f}  lr {history.lr_at_end[-1]:.2e}",
                flush=True,
            )
    history.wall_time = time.perf_counter() - start
    return history


def plot_histories(histories: Sequence[History], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for h in histories:
        epochs = np.arange(1, len(h.train_loss) + 1)
        ax_loss.plot(epochs, h.train_loss, label=h.optimizer)
        ax_acc.plot(epochs, h.test_acc, label=h.optimizer)
    ax_loss.set(xlabel="epoch", ylabel="training loss (mean over batches)", yscale="log", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy")
    ax_acc.axhline(TARGET_ACCURACY, color="grey", lw=0.8, ls="--")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", metavar="NPZ", help="MNIST-style .npz (x_train, y_train, x_test, y_test); default: digits")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    rates = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    p.add_argument("--lr", type=float, help=f"default per optimizer: {rates}")
    p.add_argument("--weight-decay", type=float, help="default: the optimizer's own (AdamW 1e-2, others 0)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--clip-norm", type=float, metavar="NORM", help="clip the global gradient norm (max_grad_norm=)")
    p.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="fp32",
        help="storage: fp32; bf16-state (float32 weights, bfloat16 Adam state); bf16-master (bfloat16 "
        "weights and gradients, float32 master copy, bfloat16 state); bf16 (bfloat16 everywhere, no "
        "master copy); stochastic rounding unless a -nearest variant",
    )
    p.add_argument("--threads", type=int, help="threads for adamcpp's step (adamcpp.set_num_threads)")
    p.add_argument("--seed", type=int, default=0, help="fixes the split, the initialisation, shuffles and dropout")
    p.add_argument("--compare", action="store_true", help="train every optimizer from the same initialisation")
    p.add_argument(
        "--compare-precision",
        action="store_true",
        help="train every precision from the same initialisation for --seeds seeds; tabulate the final loss",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of --compare-precision (--seed, --seed + 1, ...)")
    p.add_argument("--plot", metavar="PNG", help="save loss and test-accuracy curves (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines; just the tables")
    return p


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuses, by parser.error, what the study cannot run, before anything trains."""
    for flag, value, ok, expected in [
        ("--epochs", args.epochs, args.epochs >= 1, "an int >= 1"),
        ("--batch-size", args.batch_size, args.batch_size >= 1, "an int >= 1"),
        ("--dropout", args.dropout, 0.0 <= args.dropout < 1.0, "a rate in [0, 1)"),
        ("--lr", args.lr, args.lr is None or 0 <= args.lr < math.inf, "a finite number >= 0"),
        (
            "--clip-norm",
            args.clip_norm,
            args.clip_norm is None or 0 <= args.clip_norm < math.inf,
            "a finite number >= 0",
        ),
        ("--seeds", args.seeds, args.seeds >= 1, "an int >= 1"),
    ]:
        if not ok:
            parser.error(f"{flag}: expected {expected}, got {value}")
    if args.compare and args.compare_precision:
        parser.error("--compare and --compare-precision: choose one")
    if args.compare and args.lr is not None:
        parser.error("--lr applies to one optimizer; --compare uses each optimizer's default rate")
    if args.compare_precision and args.optimizer not in ("adam", "adamw"):
        parser.error("--compare-precision compares Adam/AdamW's storage options: use --optimizer adam or adamw")
    if args.precision != "fp32" and (args.optimizer not in ("adam", "adamw") or args.compare):
        parser.error(f"--precision {args.precision} is an Adam/AdamW option (not with --compare or SGD)")
    try:
        for precision in PRECISIONS if args.compare_precision else [args.precision]:
            precision_dtype(precision)
    except RuntimeError as exc:
        parser.error(str(exc))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install matplotlib)")
    if args.threads is not None:
        try:
            adamcpp.set_num_threads(args.threads)
        except (TypeError, ValueError) as exc:
            parser.error(f"--threads: {exc}")


def run(
    args: argparse.Namespace, data: Dataset, init: MLP, name: str, precision: str, seed: int, progress: bool
) -> History:
    """One optimizer at one precision from ``init`` (rounded to the precision's dtype)."""
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    lr0 = args.lr if args.lr is not None else DEFAULT_LR[name]
    lr = make_schedule(args.schedule, lr0, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
    model = init.astype(precision_dtype(precision))
    opt = make_optimizer(
        name,
        model.params,
        lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.clip_norm,
        precision=precision,
        seed=seed,
    )
    single = not (args.compare or args.compare_precision)
    h = train(
        model,
        opt,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=seed,
        name=name if not args.compare_precision else f"{precision} seed {seed}",
        progress=progress,
        quiet=args.quiet or not single,
    )
    h.optimizer = name if not args.compare_precision else precision  # the curve's label
    return h


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    try:
        data = load_data(args.data, seed=args.seed)
    except (RuntimeError, ValueError, OSError) as exc:
        parser.error(str(exc))
    progress = not args.quiet and sys.stderr.isatty()
    info = adamcpp.build_info()
    print(f"data       {data.describe()}")
    print(
        f"training   {args.epochs} epochs, batches of {args.batch_size}, schedule {args.schedule}, seed {args.seed}"
        + (f", clip-norm {args.clip_norm:g}" if args.clip_norm is not None else "")
    )
    print(f"adamcpp    {info['version']}, SIMD {info['simd']}, {adamcpp.get_num_threads()} thread(s)")
    seeds = [args.seed + k for k in range(args.seeds)] if args.compare_precision else [args.seed]
    names = list(OPTIMIZERS) if args.compare else [args.optimizer]
    precisions = list(PRECISIONS) if args.compare_precision else [args.precision]
    results: Dict[Tuple[str, str], List[History]] = {}
    for seed in seeds:
        init = MLP((data.n_features, 64, 128, data.n_classes), args.dropout, seed=seed)
        for name in names:
            for precision in precisions:
                try:
                    h = run(args, data, init, name, precision, seed, progress)
                except (TypeError, ValueError) as exc:  # an option the optimizer refuses
                    parser.error(f"{name}: {exc}")
                except FloatingPointError as exc:
                    print(f"diverged: {exc}; try a smaller --lr", file=sys.stderr)
                    if not args.compare_precision:
                        return 1
                    h = History(optimizer=name, train_loss=[math.nan], test_acc=[math.nan])
                results.setdefault((name, precision), []).append(h)
                if (args.compare or args.compare_precision) and not args.quiet:
                    print(
                        f"  {name} {precision} seed {seed}: final training loss {h.train_loss[-1]:.5f}, "
                        f"test acc {h.final_test_acc:.4f} in {h.wall_time:.2f} s",
                        flush=True,
                    )
    print()
    if args.compare_precision:
        print_precision_table(args, seeds, results)
    else:
        print_optimizer_table(args, [results[(name, args.precision)][0] for name in names])
    if args.plot:
        plot_histories([hs[0] for hs in results.values()], args.plot)
        print(f"curves written to {args.plot}")
    return 0


def print_optimizer_table(args: argparse.Namespace, histories: List[History]) -> None:
    print(
        f"Optimizers (same initialisation, batches and dropout masks; {args.epochs} epochs, schedule "
        f"{args.schedule}, precision {args.precision})"
    )
    header = (
        f"{'optimizer':<10} {'lr':>8} {'final test acc':>15} {'best':>7} {'epochs to 95%':>14} "
        f"{'wall s':>8} {'opt.step s':>11}"
    )
    print(header)
    print("-" * len(header))
    for h in histories:
        lr0 = args.lr if args.lr is not None else DEFAULT_LR[h.optimizer]
        print(
            f"{h.optimizer:<10} {lr0:>8g} {h.final_test_acc:>15.4f} {max(h.test_acc):>7.4f} "
            f"{h.epochs_to(TARGET_ACCURACY) or '-':>14} {h.wall_time:>8.2f} {h.step_time:>11.3f}"
        )


def print_precision_table(
    args: argparse.Namespace, seeds: List[int], results: Dict[Tuple[str, str], List[History]]
) -> None:
    name = args.optimizer
    print(
        f"Precisions ({name}, lr {args.lr if args.lr is not None else DEFAULT_LR[name]:g}, {args.epochs} epochs, "
        f"schedule {args.schedule}; the same initialisation, batches and dropout masks per seed; final training "
        "loss = mean over the last epoch)"
    )
    header = (
        f"{'precision':<19} {'B/param':>7} "
        + " ".join(f"{'seed ' + str(sd):>11}" for sd in seeds)
        + f" {'mean':>9} {'x fp32':>7} {'test acc':>9}"
    )
    print(header)
    print("-" * len(header))
    base = float(np.mean([h.train_loss[-1] for h in results[(name, "fp32")]]))
    for precision in PRECISIONS:
        losses = [h.train_loss[-1] for h in results[(name, precision)]]
        mean = float(np.mean(losses))
        acc = float(np.mean([h.final_test_acc for h in results[(name, precision)]]))
        print(
            f"{precision:<19} {bytes_per_parameter(precision):>7} "
            + " ".join(f"{loss:>11.5f}" for loss in losses)
            + f" {mean:>9.5f} {mean / base:>6.2f}x {acc:>9.4f}"
        )


if __name__ == "__main__":
    sys.exit(main())
