"""The model the examples train: the Adam article's MLP in plain NumPy, its loss and its data.

Not a script: train_mlp.py, train_mlp_resume.py and train_mlp_mpi.py import it from this folder, and the
studies of bench/mlp_study.py train the same model. The network is the article's Keras one, written out:

    Flatten -> Dense 64 relu -> Dropout 0.2 -> Dense 128 relu -> Dropout 0.2 -> Dense 10 softmax

Data: scikit-learn's bundled 8x8 digits (1,797 images, 20% held out by a seeded stratified split; offline),
or an MNIST-style ``.npz`` with the arrays ``x_train, y_train, x_test, y_test``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np


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

    Digits: ``sklearn.datasets.load_digits`` (pixels 0..16 scaled to [0, 1]), split by
    ``train_test_split(test_size, stratify=y, random_state=seed)``. ``.npz``: images of any shape are
    flattened (the Flatten layer) and uint8 pixels scaled by 1/255. Raises RuntimeError without
    scikit-learn, ValueError for a file that lacks an array or whose arrays do not agree.
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
        x_train, y_train, x_test, y_test = (np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test))
        return Dataset("digits 8x8", x_train, y_train, x_test, y_test, 10)
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
    return Dataset(os.path.basename(path), x_train, y_train, x_test, y_test, n_classes)


def training_rng(seed: int) -> np.random.Generator:
    """The stream of shuffles and dropout masks, independent of the initialisation's (``seed``)."""
    return np.random.default_rng([seed, 1])


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """One epoch: the indices of each mini-batch of a fresh shuffle of ``range(n)`` (the last may be short)."""
    order = rng.permutation(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> Tuple[float, np.ndarray]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient with respect to the logits.

    Stable form: with z = logits - max(logits) per row, log softmax = z - log(sum exp z), so no exp
    overflows and the log never sees 0. Gradient: (softmax - onehot) / batch.
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

    ``sizes = (inputs, hidden..., classes)``; the article's network on MNIST is ``MLP((784, 64, 128, 10))``.
    Weights are He-normal (std sqrt(2 / fan_in)), biases zero. ``params`` and ``grads`` are dicts
    ``W1, b1, W2, b2, ...`` of C-contiguous arrays of ``dtype``; ``backward`` writes into the preallocated
    ``grads``, and an optimizer updates ``params`` in place. With a 16-bit ``dtype`` (``astype``) the passes
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
        self._set_dtype(dtype)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        self.params: Dict[str, np.ndarray] = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            std = math.sqrt(2.0 / fan_in)
            w = np.ascontiguousarray(rng.standard_normal((fan_in, fan_out)) * std, dtype=self.compute_dtype)
            self.params[f"W{i}"] = w.astype(self.dtype)
            self.params[f"b{i}"] = np.zeros(fan_out, dtype=self.dtype)
        self.grads: Dict[str, np.ndarray] = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.cache: List[Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = []  # (input, z, dropout mask)

    def _set_dtype(self, dtype: Any) -> None:
        self.dtype = np.dtype(dtype)
        self.compute_dtype = np.dtype(np.float32) if self.dtype.itemsize == 2 else self.dtype

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
        """The same architecture with these parameters in ``dtype`` (float32 -> bfloat16 rounds to nearest)."""
        other = MLP.__new__(MLP)
        other.sizes, other.dropout = self.sizes, self.dropout
        other._set_dtype(dtype)
        other.params = {k: v.astype(other.dtype) for k, v in self.params.items()}
        other.grads = {k: np.zeros_like(v) for k, v in other.params.items()}
        other.cache = []
        return other

    def _weight(self, key: str) -> np.ndarray:
        """A parameter in the compute dtype (itself when it already is)."""
        p = self.params[key]
        return p if p.dtype == self.compute_dtype else p.astype(self.compute_dtype)

    def forward(self, x: np.ndarray, *, train: bool = False, rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Logits for a batch. ``train=True`` caches the activations for ``backward`` and, when ``rng`` is
        given, applies inverted dropout after each hidden layer (keep a unit with probability 1-p and scale it
        by 1/(1-p), so inference needs no rescaling). ``train=False`` is inference: no cache, no dropout."""
        self.cache = []
        a = x
        for i in range(1, self.n_layers + 1):
            z = a @ self._weight(f"W{i}")
            z += self._weight(f"b{i}")
            if i == self.n_layers:
                if train:
                    self.cache.append((a, z, None))
                return z
            h = np.maximum(z, 0)
            mask = None
            if train and rng is not None and self.dropout > 0.0:
                cd = self.compute_dtype
                keep = rng.random(h.shape, dtype=cd) >= cd.type(self.dropout)
                mask = keep.astype(cd) * cd.type(1.0 / (1.0 - self.dropout))
                h *= mask
            if train:
                self.cache.append((a, z, mask))
            a = h
        raise AssertionError("unreachable")

    def backward(self, dlogits: np.ndarray) -> None:
        """Back-propagates d loss / d logits through the cached training forward pass into ``grads``."""
        if len(self.cache) != self.n_layers:
            raise RuntimeError("backward needs a training forward pass first (forward(x, train=True))")
        delta = dlogits
        for i in range(self.n_layers, 0, -1):
            a_in = self.cache[i - 1][0]
            if self.dtype == self.compute_dtype:
                np.matmul(a_in.T, delta, out=self.grads[f"W{i}"])
                np.sum(delta, axis=0, out=self.grads[f"b{i}"])
            else:  # computed in float32, stored rounded to the parameters' dtype
                self.grads[f"W{i}"][...] = a_in.T @ delta
                self.grads[f"b{i}"][...] = np.sum(delta, axis=0)
            if i == 1:
                break
            delta = delta @ self._weight(f"W{i}").T  # d loss / d (output of layer i-1, after dropout)
            _, z_prev, mask_prev = self.cache[i - 2]
            if mask_prev is not None:
                delta *= mask_prev
            delta *= z_prev > 0  # ReLU'(z) (0 at z = 0)
        self.cache = []

    def loss_and_grad(
        self, x: np.ndarray, y: np.ndarray, *, rng: Optional[np.random.Generator] = None
    ) -> Tuple[float, np.ndarray]:
        """Training forward + backward on one batch: fills ``grads`` and returns (mean loss, logits).
        ``rng`` drives dropout; ``None`` turns dropout off."""
        logits = self.forward(x, train=True, rng=rng)
        loss, dlogits = softmax_cross_entropy(logits, y)
        self.backward(dlogits)
        return loss, logits

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
