#!/usr/bin/env python3
"""Train the Adam article's MLP in plain NumPy, with adamcpp doing the updates.

The model is the article's Keras network, written out by hand:

    Flatten -> Dense 64 relu -> Dropout 0.2 -> Dense 128 relu -> Dropout 0.2 -> Dense 10 softmax

trained on mini-batches of 32 with softmax cross-entropy. Forward and backward
passes are NumPy; each update is one ``opt.step(grads)`` call that changes the
float32 parameters in place.

Data: scikit-learn's bundled 8x8 digits by default (1,797 images, 20% held out
with a seeded stratified split; runs offline), or ``--data mnist.npz`` with the
standard MNIST arrays ``x_train, y_train, x_test, y_test``.

    python3 examples/train_mlp.py                      # Adam on digits
    python3 examples/train_mlp.py --compare            # Adam, AdamW, SGD, momentum from one init
    python3 examples/train_mlp.py --optimizer sgd --schedule cosine --plot curves.png
    python3 examples/train_mlp.py --save run.safetensors      # a checkpoint after every epoch
    python3 examples/train_mlp.py --save run.safetensors --resume run.safetensors   # after a crash
    python3 examples/train_mlp.py --precision bf16               # bfloat16 weights, gradients and state
    python3 examples/train_mlp.py --compare-precision --seeds 3  # every precision from one init, per seed

The pieces (``load_data``, ``MLP``, ``make_optimizer``, ``make_schedule``,
``train``, ``save_checkpoint``, ``load_checkpoint``) are importable: put this
directory on ``sys.path`` and ``import train_mlp``.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

if __name__ == "__main__":
    # The matrices here are tiny (batches of 32 x 64..128 units): a multi-threaded
    # BLAS spends more time waking threads than multiplying (about 3x slower on 2
    # cores). Run as a script, default BLAS to one thread unless the user chose.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from tqdm import tqdm

import adamcpp
from adamcpp import schedules

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")

# --precision: how the parameters, gradients and Adam's state are stored. The
# forward and backward passes compute in float32 either way (a bfloat16 weight
# converts exactly); 16-bit gradients are the float32 ones rounded to nearest.
#   name -> (parameter and gradient dtype, Adam options)
PRECISIONS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "fp32": ("float32", {}),
    "bf16-state": ("float32", {"state_dtype": "bfloat16"}),
    "bf16-master": ("bfloat16", {"state_dtype": "bfloat16"}),
    "bf16": ("bfloat16", {"state_dtype": "bfloat16", "master_weights": False, "param_rounding": "stochastic"}),
}
# --compare-precision adds the round-to-nearest variants of the compact layouts, for contrast.
CONTRASTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "bf16-state-nearest": ("float32", {"state_dtype": "bfloat16", "state_rounding": "nearest"}),
    "bf16-nearest": ("bfloat16", {"state_dtype": "bfloat16", "state_rounding": "nearest", "master_weights": False}),
}
ALL_PRECISIONS = {**PRECISIONS, **CONTRASTS}


def precision_dtype(name: str) -> np.dtype:
    """The parameters' and gradients' dtype of a precision (bfloat16 needs ml_dtypes)."""
    kind = ALL_PRECISIONS[name][0]
    if kind == "float32":
        return np.dtype(np.float32)
    try:
        import ml_dtypes
    except ImportError:
        raise RuntimeError(f"--precision {name} needs ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)

# Default learning rates, each the best mean final test accuracy (digits, 50 epochs,
# constant rate, seeds 0-3) on a small grid: Adam/AdamW {3e-4, 1e-3, 3e-3} -> 1e-3
# (also the article's and Keras' default), SGD {0.02, 0.05, 0.1, 0.2, 0.5} -> 0.1,
# momentum 0.9 {0.002, 0.005, 0.01, 0.02, 0.05} -> 0.01. With these, all four end
# within about half a point of each other on digits (mean final 0.979-0.981) and
# reach 95% in a similar number of epochs. Adam's edge here is robustness: its
# default needed no search, while plain SGD at 0.02 (5x below its best) needs
# 19-24 epochs to reach 95% test accuracy against Adam's 5-11.
DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "sgd": 0.1, "momentum": 0.01}
SCHEDULES = ("constant", "cosine", "warmup-cosine", "step")
# Adam (1e-3, constant) on digits: >= 0.97 test accuracy at epoch 50 for seeds 0-7.
DEFAULT_EPOCHS = 50
TARGET_ACCURACY = 0.95


# ----------------------------------------------------------------------- data
@dataclass
class Dataset:
    """Flattened float inputs in [0, 1] and integer labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    def describe(self) -> str:
        return (
            f"{self.name} ({len(self.y_train):,} train / {len(self.y_test):,} test, "
            f"{self.n_features} features, {self.n_classes} classes)"
        )


def _flatten(x: np.ndarray, dtype: Any) -> np.ndarray:
    x = np.asarray(x)
    scale = 255.0 if x.dtype == np.uint8 or x.max() > 1.0 else 1.0
    return np.ascontiguousarray(x.reshape(len(x), -1), dtype=dtype) / np.asarray(scale, dtype=dtype)


def load_data(path: Optional[str] = None, *, test_size: float = 0.2, seed: int = 0, dtype: Any = np.float32) -> Dataset:
    """The bundled digits (``path=None``) or an MNIST-style ``.npz``.

    Digits: ``sklearn.datasets.load_digits`` (8x8 images, pixels 0..16 scaled to
    [0, 1]), split by ``train_test_split(test_size, stratify=y, random_state=seed)``.
    ``.npz``: arrays ``x_train, y_train, x_test, y_test``; images of any shape are
    flattened (the Flatten layer) and uint8 pixels scaled by 1/255.
    """
    if path is None:
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "the default data set needs scikit-learn (pip install scikit-learn), or pass --data mnist.npz"
            ) from exc
        digits = load_digits()
        x = (digits.data / 16.0).astype(dtype)
        y = digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed)
        return Dataset(
            "digits 8x8",
            np.ascontiguousarray(x_train),
            np.ascontiguousarray(y_train),
            np.ascontiguousarray(x_test),
            np.ascontiguousarray(y_test),
            10,
        )
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing array(s) {missing}; expected x_train, y_train, x_test, y_test")
        x_train, x_test = _flatten(f["x_train"], dtype), _flatten(f["x_test"], dtype)
        y_train, y_test = f["y_train"].astype(np.int64).ravel(), f["y_test"].astype(np.int64).ravel()
    if x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"{path}: x_train has {x_train.shape[1]} features per sample, x_test {x_test.shape[1]}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError(f"{path}: image and label counts differ")
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    name = os.path.basename(path)
    return Dataset(name, x_train, y_train, x_test, y_test, n_classes)


# ---------------------------------------------------------------------- model
def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its
    gradient with respect to the logits.

    Stable form: with z = logits - max(logits) per row, log softmax = z - log(sum exp z),
    so no exp overflows and the log never sees 0. Gradient: (softmax - onehot) / batch.
    """
    n = logits.shape[0]
    z = logits - logits.max(axis=1, keepdims=True)
    exp_z = np.exp(z)
    sum_exp = exp_z.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(sum_exp[:, 0]) - z[rows, labels]))
    dlogits = exp_z / sum_exp
    dlogits[rows, labels] -= 1.0
    dlogits /= n
    return loss, dlogits


class MLP:
    """Dense layers with ReLU and inverted dropout between them, softmax output.

    ``sizes = (inputs, hidden..., classes)``; the article's network is
    ``MLP((784, 64, 128, 10), dropout=0.2)``. Weights are He-normal
    (std sqrt(2 / fan_in)), biases zero. ``params`` and ``grads`` are dicts
    ``W1, b1, W2, b2, ...`` of C-contiguous arrays of ``dtype``; ``backward``
    writes into the preallocated ``grads`` arrays, and an optimizer updates
    ``params`` in place. With a 16-bit ``dtype`` (``astype``) the passes
    compute in float32 and the gradients are rounded to ``dtype``.
    """

    def __init__(
        self,
        sizes: Sequence[int] = (64, 64, 128, 10),
        dropout: float = 0.2,
        *,
        seed: Union[int, np.random.Generator] = 0,
        dtype: Any = np.float32,
    ):
        if len(sizes) < 2:
            raise ValueError("sizes: expected at least (inputs, classes)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a rate in [0, 1), got {dropout}")
        self.sizes = tuple(int(s) for s in sizes)
        self.dropout = float(dropout)
        self.dtype = np.dtype(dtype)
        self.compute_dtype = np.dtype(np.float32) if self.dtype.itemsize == 2 else self.dtype
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.params: Dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            std = math.sqrt(2.0 / fan_in)
            w = np.ascontiguousarray(rng.standard_normal((fan_in, fan_out)) * std, dtype=self.compute_dtype)
            self.params[f"W{i}"] = w.astype(self.dtype)
            self.params[f"b{i}"] = np.zeros(fan_out, dtype=self.dtype)
        self.grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._cache: List[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []

    @property
    def n_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def n_params(self) -> int:
        return sum(p.size for p in self.params.values())

    def copy(self) -> MLP:
        """A model with the same architecture and a copy of these parameters."""
        return self.astype(self.dtype)

    def astype(self, dtype: Any) -> MLP:
        """A model with the same architecture and these parameters in ``dtype``
        (float32 -> bfloat16 rounds to nearest)."""
        other = MLP.__new__(MLP)
        other.sizes, other.dropout, other.dtype = self.sizes, self.dropout, np.dtype(dtype)
        other.compute_dtype = np.dtype(np.float32) if other.dtype.itemsize == 2 else other.dtype
        other.params = {k: v.astype(other.dtype) for k, v in self.params.items()}
        other.grads = {k: np.zeros_like(v) for k, v in other.params.items()}
        other._cache = []
        return other

    def _weight(self, key: str) -> np.ndarray:
        """A parameter in the compute dtype (a view when it already is)."""
        p = self.params[key]
        return p if p.dtype == self.compute_dtype else p.astype(self.compute_dtype)

    def forward(self, x: np.ndarray, *, train: bool = False, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Logits for a batch. ``train=True`` caches the activations for ``backward``
        and, when ``rng`` is given, applies inverted dropout after each hidden layer
        (keep a unit with probability 1-p and scale it by 1/(1-p), so inference needs
        no rescaling). ``train=False`` is inference: no cache, no dropout."""
        self._cache = []
        a = x
        for i in range(1, self.n_layers + 1):
            z = a @ self._weight(f"W{i}")
            z += self._weight(f"b{i}")
            if i == self.n_layers:
                if train:
                    self._cache.append((a, z, None))
                return z
            h = np.maximum(z, 0)
            mask = None
            if train and rng is not None and self.dropout > 0.0:
                cd = self.compute_dtype
                keep = rng.random(h.shape, dtype=cd) >= cd.type(self.dropout)
                mask = keep.astype(cd) * cd.type(1.0 / (1.0 - self.dropout))
                h *= mask
            if train:
                self._cache.append((a, z, mask))
            a = h
        raise AssertionError("unreachable")

    def backward(self, dlogits: np.ndarray) -> None:
        """Back-propagates d loss / d logits through the cached training forward
        pass into ``self.grads``."""
        if len(self._cache) != self.n_layers:
            raise RuntimeError("backward needs a training forward pass first (forward(x, train=True))")
        delta = dlogits
        for i in range(self.n_layers, 0, -1):
            a_in, _, _ = self._cache[i - 1]
            if self.dtype == self.compute_dtype:
                np.matmul(a_in.T, delta, out=self.grads[f"W{i}"])
                np.sum(delta, axis=0, out=self.grads[f"b{i}"])
            else:  # computed in float32, stored rounded to the parameters' dtype
                self.grads[f"W{i}"][...] = a_in.T @ delta
                self.grads[f"b{i}"][...] = np.sum(delta, axis=0)
            if i == 1:
                break
            delta = delta @ self._weight(f"W{i}").T  # d loss / d (output of layer i-1, after dropout)
            _, z_prev, mask_prev = self._cache[i - 2]
            if mask_prev is not None:
                delta *= mask_prev
            delta *= z_prev > 0  # ReLU'(z) (0 at z = 0)
        self._cache = []

    def loss_and_grad(
        self, x: np.ndarray, y: np.ndarray, *, rng: Optional[np.random.Generator] = None
    ) -> Tuple[float, np.ndarray]:
        """Training forward + backward on one batch: fills ``grads`` and returns
        (mean loss, logits). ``rng`` drives dropout; ``None`` turns dropout off."""
        logits = self.forward(x, train=True, rng=rng)
        loss, dlogits = softmax_cross_entropy(logits, y)
        self.backward(dlogits)
        return loss, logits

    def predict(self, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        return np.concatenate(
            [self.forward(x[i : i + batch_size]).argmax(axis=1) for i in range(0, len(x), batch_size)]
        )

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> Tuple[float, float]:
        """(mean loss, accuracy) in inference mode."""
        total, correct = 0.0, 0
        for i in range(0, len(x), batch_size):
            logits = self.forward(x[i : i + batch_size])
            loss, _ = softmax_cross_entropy(logits, y[i : i + batch_size])
            total += loss * len(logits)
            correct += int(np.count_nonzero(logits.argmax(axis=1) == y[i : i + batch_size]))
        return total / len(x), correct / len(x)

    def __repr__(self) -> str:
        return f"MLP({'-'.join(map(str, self.sizes))}, dropout={self.dropout}, {self.n_params:,} params, {self.dtype})"


# ------------------------------------------------------------------ optimizers
def optimizer_available(name: str) -> bool:
    return name in ("adam", "adamw") or hasattr(adamcpp, "SGD")


def supports_clipping(name: str) -> bool:
    cls = _optimizer_class(name)
    return cls is not None and "max_grad_norm" in inspect.signature(cls).parameters


def _optimizer_class(name: str) -> Optional[type]:
    return {"adam": adamcpp.Adam, "adamw": adamcpp.AdamW}.get(name, getattr(adamcpp, "SGD", None))


def make_optimizer(
    name: str,
    params: Dict[str, np.ndarray],
    lr: Union[float, Callable[[int], float]],
    *,
    weight_decay: Optional[float] = None,
    max_grad_norm: Optional[float] = None,
    precision: str = "fp32",
    seed: int = 0,
) -> adamcpp.Optimizer:
    """adam -> Adam, adamw -> AdamW, sgd -> SGD(lr), momentum -> SGD(lr, momentum=0.9).

    ``weight_decay=None`` keeps each optimizer's default (AdamW 1e-2, the others 0);
    like torch and Keras, it then applies to every parameter. ``precision``
    (PRECISIONS, CONTRASTS) sets Adam's storage options; ``seed`` keys its
    stochastic rounding.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    if precision not in ALL_PRECISIONS:
        raise ValueError(f"precision: expected one of {tuple(ALL_PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and name not in ("adam", "adamw"):
        raise ValueError(f"precision {precision}: mixed precision and compact state are Adam/AdamW options")
    if not optimizer_available(name):
        raise RuntimeError(
            f"--optimizer {name} needs adamcpp.SGD, which this adamcpp ({adamcpp.__version__}) does not provide; "
            "use adam or adamw"
        )
    kwargs: Dict[str, Any] = {}
    if weight_decay is not None:
        kwargs["weight_decay"] = weight_decay
    if max_grad_norm is not None:
        if not supports_clipping(name):
            raise RuntimeError(
                f"--clip-norm needs the max_grad_norm= option of adamcpp.{_optimizer_class(name).__name__}, "
                f"which this adamcpp ({adamcpp.__version__}) does not provide"
            )
        kwargs["max_grad_norm"] = max_grad_norm
    if precision != "fp32":
        kwargs.update(ALL_PRECISIONS[precision][1], seed=seed)
    if name == "adam":
        return adamcpp.Adam(params, lr=lr, **kwargs)
    if name == "adamw":
        return adamcpp.AdamW(params, lr=lr, **kwargs)
    if name == "sgd":
        return adamcpp.SGD(params, lr=lr, **kwargs)
    return adamcpp.SGD(params, lr=lr, momentum=0.9, **kwargs)


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
    """The rate the next update will use (evaluates a schedule at the step count)."""
    lr = opt.param_groups[0]["lr"]
    if not callable(lr):
        return float(lr)
    t = int(opt.state[0].get("step", 0)) if opt.state else 0
    return float(lr(t))


# -------------------------------------------------------------------- training
def training_rng(seed: int) -> np.random.Generator:
    """The stream of shuffles and dropout masks, independent of the initialisation's (seed)."""
    return np.random.default_rng([seed, 1])


@dataclass
class History:
    """Per-epoch curves and totals of one training run."""

    optimizer: str
    lr: Any
    train_loss: List[float] = field(default_factory=list)  # mean over the epoch's batches (dropout on)
    train_acc: List[float] = field(default_factory=list)  # on the epoch's batches (dropout on)
    test_loss: List[float] = field(default_factory=list)
    test_acc: List[float] = field(default_factory=list)
    lr_at_end: List[float] = field(default_factory=list)
    wall_time: float = 0.0  # whole run, evaluation included
    step_time: float = 0.0  # inside opt.step only
    updates: int = 0

    def epochs_to(self, accuracy: float) -> Optional[int]:
        """First epoch (1-based) whose test accuracy is >= accuracy, or None."""
        for i, a in enumerate(self.test_acc, start=1):
            if a >= accuracy:
                return i
        return None

    @property
    def final_test_acc(self) -> float:
        return self.test_acc[-1] if self.test_acc else float("nan")

    _CURVES = ("train_loss", "train_acc", "test_loss", "test_acc", "lr_at_end")
    _TOTALS = ("wall_time", "step_time", "updates")

    def to_dict(self) -> Dict[str, Any]:
        """The curves and totals (not ``lr``: the optimizer's state holds it)."""
        return {k: getattr(self, k) for k in ("optimizer", *self._CURVES, *self._TOTALS)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any], lr: Any) -> History:
        return cls(lr=lr, **{k: d[k] for k in ("optimizer", *cls._CURVES, *cls._TOTALS)})


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
    on_epoch: Optional[Callable[[int, History], None]] = None,
    rng: Optional[np.random.Generator] = None,
    history: Optional[History] = None,
    start_epoch: int = 0,
) -> History:
    """Mini-batch training. ``seed`` fixes the shuffles and dropout masks, so two
    runs from the same initial parameters with the same seed are bit-identical
    (and different optimizers see the same batches in the same order).

    A resumed run passes what ``load_checkpoint`` returns: the generator in its
    saved state (else ``training_rng(seed)``), the history so far and the
    number of epochs already done; it then continues exactly where the saved
    run was."""
    rng = training_rng(seed) if rng is None else rng
    history = History(optimizer=name, lr=opt.param_groups[0]["lr"]) if history is None else history
    n = len(data.y_train)
    steps_per_epoch = math.ceil(n / batch_size)
    start = time.perf_counter() - history.wall_time
    for epoch in range(start_epoch + 1, epochs + 1):
        order = rng.permutation(n)
        loss_sum, correct = 0.0, 0
        # on stderr, erased at the end of the epoch; no-ops when progress is False
        with tqdm(
            total=steps_per_epoch,
            desc=f"{name or 'train'} {epoch:>3}/{epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ) as bar:
            for b in range(steps_per_epoch):
                idx = order[b * batch_size : (b + 1) * batch_size]
                xb, yb = data.x_train[idx], data.y_train[idx]
                loss, logits = model.loss_and_grad(xb, yb, rng=rng)
                t0 = time.perf_counter()
                opt.step(model.grads)
                history.step_time += time.perf_counter() - t0
                history.updates += 1
                loss_sum += loss * len(idx)
                correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
                seen = min(n, (b + 1) * batch_size)
                bar.set_postfix_str(f"loss {loss_sum / seen:.4f}  acc {correct / seen:.4f}", refresh=False)
                bar.update()
        history.train_loss.append(loss_sum / n)
        history.train_acc.append(correct / n)
        test_loss, test_acc = model.evaluate(data.x_test, data.y_test)
        history.test_loss.append(test_loss)
        history.test_acc.append(test_acc)
        history.lr_at_end.append(current_lr(opt))
        if not math.isfinite(history.train_loss[-1]):
            history.wall_time = time.perf_counter() - start
            raise FloatingPointError(f"{name or 'training'}: the loss became {history.train_loss[-1]} in epoch {epoch}")
        if on_epoch is not None:
            on_epoch(epoch, history)
    history.wall_time = time.perf_counter() - start
    return history


# ----------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: str,
    model: MLP,
    opt: adamcpp.Optimizer,
    rng: np.random.Generator,
    history: History,
    epoch: int,
    config: Dict[str, Any],
) -> None:
    """One file with everything a resumed run needs: the optimizer's state dict,
    plus the model's parameters (stored as tensors ``model.W1``, ...) and the
    trainer's position (epochs done, the shuffle/dropout generator's state, the
    history so far, the settings), all in one atomic ``adamcpp.save``."""
    checkpoint = opt.state_dict()
    checkpoint["model"] = dict(model.params)
    checkpoint["trainer"] = {
        "epoch": epoch,
        "rng": rng.bit_generator.state,
        "history": history.to_dict(),
        "config": config,
    }
    adamcpp.save(checkpoint, path)


def load_checkpoint(
    path: str, model: MLP, opt: adamcpp.Optimizer
) -> Tuple[int, np.random.Generator, History, Dict[str, Any]]:
    """Restores the model's parameters (in place, so the optimizer keeps them)
    and the optimizer from ``save_checkpoint``'s file; returns (epochs done,
    the generator, the history, the settings). Raises ValueError (nothing
    changed) for a damaged file or one that does not fit the model."""
    checkpoint = adamcpp.load(path)
    saved = checkpoint.get("model")
    if not isinstance(saved, dict) or "trainer" not in checkpoint:
        raise ValueError(f"{path}: not a train_mlp.py checkpoint (no model parameters or trainer position)")
    for k, p in model.params.items():
        if k not in saved or saved[k].shape != p.shape or saved[k].dtype != p.dtype:
            raise ValueError(f"{path}: parameter {k!r} is missing or differs in shape or dtype from the model's")
    if set(saved) != set(model.params):
        raise ValueError(f"{path}: parameters {sorted(saved)} do not match the model's {sorted(model.params)}")
    trainer = checkpoint["trainer"]
    opt.load_state_dict(checkpoint)  # validates everything before it changes anything
    for k, p in model.params.items():
        p[...] = saved[k]
    rng = np.random.default_rng()
    rng.bit_generator.state = trainer["rng"]
    history = History.from_dict(trainer["history"], opt.param_groups[0]["lr"])
    return int(trainer["epoch"]), rng, history, trainer["config"]


# ------------------------------------------------------------------------- CLI
def _fmt_epochs(e: Optional[int]) -> str:
    return "-" if e is None else str(e)


def _describe_lr(lr: Any) -> str:
    return f"{lr:g}" if isinstance(lr, float) else repr(lr)


def _epoch_line(epoch: int, epochs: int, h: History) -> str:
    return (
        f"epoch {epoch:>3}/{epochs}  loss {h.train_loss[-1]:.4f}  train acc {h.train_acc[-1]:.4f}  "
        f"test loss {h.test_loss[-1]:.4f}  test acc {h.test_acc[-1]:.4f}  lr {h.lr_at_end[-1]:.2e}"
    )


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
        description="Train the Adam article's MLP (Dense 64 relu, Dropout 0.2, Dense 128 relu, Dropout 0.2, "
        "Dense 10 softmax) in NumPy with adamcpp.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", metavar="NPZ", help="MNIST-style .npz (x_train, y_train, x_test, y_test); default: sklearn digits"
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate (default per optimizer: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
    )
    p.add_argument("--weight-decay", type=float, help="default: the optimizer's own (AdamW 1e-2, others 0)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--schedule", choices=SCHEDULES, default="constant")
    p.add_argument("--clip-norm", type=float, metavar="NORM", help="clip the global gradient norm (max_grad_norm=)")
    p.add_argument("--threads", type=int, help="threads for adamcpp's step (adamcpp.set_num_threads)")
    p.add_argument("--seed", type=int, default=0, help="fixes the split, the initialisation, shuffles and dropout")
    p.add_argument(
        "--compare", action="store_true", help="train every optimizer from the same initialisation and tabulate"
    )
    p.add_argument(
        "--precision",
        choices=tuple(ALL_PRECISIONS),
        default="fp32",
        help="storage: fp32; bf16-state (float32 weights, bfloat16 Adam state); bf16-master (bfloat16 weights and "
        "gradients, float32 master copy, bfloat16 state); bf16 (bfloat16 everywhere, no master copy); stochastic "
        "rounding unless a -nearest variant",
    )
    p.add_argument(
        "--compare-precision",
        action="store_true",
        help="train every precision (and the round-to-nearest contrasts) from the same initialisation, for --seeds "
        "seeds, and tabulate the final training loss",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of --compare-precision (--seed, --seed + 1, ...)")
    p.add_argument("--plot", metavar="PNG", help="save loss and test-accuracy curves (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines; just the summary")
    p.add_argument(
        "--save",
        metavar="PATH",
        help="write a checkpoint (model, optimizer, position) to PATH after every epoch, replacing it atomically",
    )
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the run saved in PATH (same settings; --epochs is the total), bit for bit as if uninterrupted",
    )
    return p


def _run_config(args: argparse.Namespace, name: str, lr0: float, data: Dataset) -> Dict[str, Any]:
    """The settings a resumed run must share with the saved one."""
    return {
        "optimizer": name,
        "precision": args.precision,
        "lr": lr0,
        "schedule": args.schedule,
        "epochs": args.epochs,
        "weight_decay": args.weight_decay,
        "clip_norm": args.clip_norm,
        "batch_size": args.batch_size,
        "dropout": args.dropout,
        "seed": args.seed,
        "data": data.describe(),
    }


def _config_mismatch(saved: Dict[str, Any], now: Dict[str, Any]) -> Optional[str]:
    """Why a run cannot continue a saved one, or None. Only --epochs may differ, and
    only with a constant rate (a schedule is laid out over the saved run's epochs)."""
    for key, value in now.items():
        if key == "epochs" and now["schedule"] == "constant":
            continue
        if saved.get(key) != value:
            return f"was written by a run with {key} {saved.get(key)!r}, this run has {value!r}"
    return None


def _on_epoch(
    args: argparse.Namespace, model: MLP, opt: adamcpp.Optimizer, rng: np.random.Generator, config: Dict[str, Any]
) -> Callable[[int, History], None]:
    """What the command line does after each epoch: save the checkpoint (--save), then print the epoch's line."""

    def on_epoch(epoch: int, history: History) -> None:
        if args.save:
            save_checkpoint(args.save, model, opt, rng, history, epoch, config)
        if not (args.compare or args.quiet):
            print(_epoch_line(epoch, args.epochs, history), flush=True)

    return on_epoch


def bytes_per_parameter(precision: str) -> int:
    """What a parameter costs in memory with Adam: weight, gradient, m, v (and a master copy)."""
    dtype, options = ALL_PRECISIONS[precision]
    weight = 4 if dtype == "float32" else 2
    state = 2 if options.get("state_dtype") == "bfloat16" else 4
    master = 4 if dtype != "float32" and options.get("master_weights", True) else 0
    return 2 * weight + 2 * state + master


def compare_precisions(args: argparse.Namespace, data: Dataset, progress: bool) -> int:
    """--compare-precision: Adam (or AdamW) in every precision and round-to-nearest
    contrast, from the same initialisation (rounded to the precision's dtype),
    batches and dropout masks, for each seed; prints the final training loss
    (mean over the last epoch's batches) per seed and its mean against fp32."""
    name = args.optimizer
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    lr0 = args.lr if args.lr is not None else DEFAULT_LR[name]
    precisions = list(ALL_PRECISIONS)
    seeds = [args.seed + k for k in range(args.seeds)]
    results: Dict[str, List[History]] = {p: [] for p in precisions}
    for seed in seeds:
        init = MLP((data.n_features, 64, 128, data.n_classes), args.dropout, seed=seed)
        for precision in precisions:
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
            try:
                h = train(
                    model, opt, data, epochs=args.epochs, batch_size=args.batch_size, seed=seed,
                    name=f"{precision} seed {seed}", progress=progress,
                )
            except FloatingPointError as exc:
                print(f"{precision}, seed {seed}: diverged ({exc})", file=sys.stderr)
                h = History(optimizer=name, lr=lr, train_loss=[math.nan], test_acc=[math.nan])
            results[precision].append(h)
            if not args.quiet:
                print(f"  {precision:<19} seed {seed}: final training loss {h.train_loss[-1]:.5f}, "
                      f"test acc {h.final_test_acc:.4f}", flush=True)
    print()
    print(
        f"Precision comparison ({name}, lr {lr0:g}, {args.epochs} epochs, schedule {args.schedule}; the same "
        "initialisation, batches and dropout masks per seed; final training loss = mean over the last epoch)"
    )
    header = (
        f"{'precision':<19} {'B/param':>7} "
        + " ".join(f"{'seed ' + str(sd):>11}" for sd in seeds)
        + f" {'mean':>9} {'x fp32':>7} {'test acc':>9}"
    )
    print(header)
    print("-" * len(header))
    base = float(np.mean([h.train_loss[-1] for h in results["fp32"]]))
    for precision in precisions:
        losses = [h.train_loss[-1] for h in results[precision]]
        mean = float(np.mean(losses))
        acc = float(np.mean([h.final_test_acc for h in results[precision]]))
        print(
            f"{precision:<19} {bytes_per_parameter(precision):>7} "
            + " ".join(f"{loss:>11.5f}" for loss in losses)
            + f" {mean:>9.5f} {mean / base:>6.2f}x {acc:>9.4f}"
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs: expected an int >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size: expected an int >= 1")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout: expected a rate in [0, 1), got {args.dropout}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr >= 0):
        parser.error(f"--lr: expected a finite number >= 0, got {args.lr}")
    if args.clip_norm is not None and not (math.isfinite(args.clip_norm) and args.clip_norm >= 0):
        parser.error(f"--clip-norm: expected a finite number >= 0, got {args.clip_norm}")
    if args.compare and args.compare_precision:
        parser.error("--compare and --compare-precision: choose one")
    if args.compare_precision:
        if args.save or args.resume:
            parser.error("--save and --resume apply to one run, not to --compare-precision")
        if args.seeds < 1:
            parser.error("--seeds: expected an int >= 1")
        if args.optimizer not in ("adam", "adamw"):
            parser.error("--compare-precision compares Adam/AdamW's storage options: use --optimizer adam or adamw")
    if args.precision != "fp32":
        if args.optimizer not in ("adam", "adamw") or args.compare:
            parser.error(f"--precision {args.precision} is an Adam/AdamW option (not with --compare or SGD)")
        try:
            precision_dtype(args.precision)
        except RuntimeError as exc:
            parser.error(str(exc))
    if args.compare:
        names = [n for n in OPTIMIZERS if optimizer_available(n)]
        skipped = [n for n in OPTIMIZERS if n not in names]
        if args.lr is not None:
            parser.error("--lr applies to one optimizer; --compare uses each optimizer's default rate")
        if args.save or args.resume:
            parser.error("--save and --resume apply to one optimizer's run, not to --compare")
    else:
        names, skipped = [args.optimizer], []
        if not optimizer_available(args.optimizer):
            parser.error(
                f"--optimizer {args.optimizer} needs adamcpp.SGD, which this adamcpp ({adamcpp.__version__}) "
                "does not provide; use adam or adamw"
            )
    if args.clip_norm is not None:
        lacking = [n for n in names if not supports_clipping(n)]
        if lacking:
            parser.error(
                f"--clip-norm needs the max_grad_norm= option, which this adamcpp ({adamcpp.__version__}) "
                f"does not provide for: {', '.join(lacking)}"
            )
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
    if args.resume and not os.path.isfile(args.resume):
        parser.error(f"--resume: no checkpoint file {args.resume!r}")

    try:
        data = load_data(args.data, seed=args.seed)
    except (RuntimeError, ValueError, OSError) as exc:
        parser.error(str(exc))
    init = MLP((data.n_features, 64, 128, data.n_classes), args.dropout, seed=args.seed)
    steps_per_epoch = math.ceil(len(data.y_train) / args.batch_size)
    progress = not args.quiet and sys.stderr.isatty()
    print(f"data       {data.describe()}")
    print(f"model      {init!r}")
    print(
        f"training   {args.epochs} epochs x {steps_per_epoch} batches of {args.batch_size}, schedule {args.schedule}, "
        f"seed {args.seed}" + (f", clip-norm {args.clip_norm:g}" if args.clip_norm is not None else "")
    )
    info = adamcpp.build_info()
    print(f"adamcpp    {info['version']}, SIMD {info['simd']}, {adamcpp.get_num_threads()} thread(s)")
    if args.compare_precision:
        return compare_precisions(args, data, progress)

    histories: List[History] = []
    for name in names:
        lr0 = args.lr if args.lr is not None else DEFAULT_LR[name]
        lr = make_schedule(args.schedule, lr0, epochs=args.epochs, steps_per_epoch=steps_per_epoch)
        model = init.astype(precision_dtype(args.precision))  # the same initialisation for every optimizer
        try:
            opt = make_optimizer(
                name,
                model.params,
                lr,
                weight_decay=args.weight_decay,
                max_grad_norm=args.clip_norm,
                precision=args.precision,
                seed=args.seed,
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            parser.error(f"{name}: {exc}")
        if not args.compare and not args.quiet:
            print(f"optimizer  {type(opt).__name__}, lr {_describe_lr(lr)}")
        config = _run_config(args, name, lr0, data)
        rng, history, start_epoch = training_rng(args.seed), None, 0
        if args.resume:
            try:
                start_epoch, rng, history, saved_config = load_checkpoint(args.resume, model, opt)
            except (TypeError, ValueError) as exc:
                parser.error(f"--resume: {exc}")
            mismatch = _config_mismatch(saved_config, config)
            if mismatch:
                parser.error(f"--resume: {args.resume} {mismatch}; resume with the settings of the saved run")
            print(f"resumed    {args.resume} after epoch {start_epoch}/{saved_config['epochs']}")

        per_epoch = _on_epoch(args, model, opt, rng, config)
        try:
            h = train(
                model,
                opt,
                data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                name=name,
                progress=progress,
                on_epoch=per_epoch,
                rng=rng,
                history=history,
                start_epoch=start_epoch,
            )
        except FloatingPointError as exc:
            print(f"{name}: diverged ({exc}); try a smaller --lr", file=sys.stderr)
            return 1
        h.lr = lr
        histories.append(h)
        if args.compare and not args.quiet:
            print(f"  {name:<9} done: test acc {h.final_test_acc:.4f} in {h.wall_time:.2f} s", flush=True)

    print()
    if args.compare:
        print(
            f"Comparison (same initialisation, batches and dropout masks; {args.epochs} epochs, "
            f"schedule {args.schedule})"
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
                f"{_fmt_epochs(h.epochs_to(TARGET_ACCURACY)):>14} {h.wall_time:>8.2f} {h.step_time:>11.3f}"
            )
        if skipped:
            print(f"(skipped, adamcpp.SGD not available: {', '.join(skipped)})")
    else:
        h = histories[0]
        best = int(np.argmax(h.test_acc))
        reached = h.epochs_to(TARGET_ACCURACY)
        print("Summary")
        print(
            f"  final     train loss {h.train_loss[-1]:.4f}, test loss {h.test_loss[-1]:.4f}, "
            f"test accuracy {h.final_test_acc:.4f} (best {h.test_acc[best]:.4f} at epoch {best + 1})"
        )
        print(f"  95% test accuracy {'first at epoch ' + str(reached) if reached else 'not reached'}")
        print(
            f"  time      {h.wall_time:.2f} s total, {h.step_time:.3f} s inside opt.step "
            f"({100 * h.step_time / max(h.wall_time, 1e-12):.1f}%) for {h.updates:,} updates "
            f"({1e6 * h.step_time / max(h.updates, 1):.1f} us each)"
        )
    if args.plot:
        plot_histories(histories, args.plot)
        print(f"curves written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
