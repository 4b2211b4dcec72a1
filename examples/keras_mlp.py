#!/usr/bin/env python3
"""The Adam article's MLP in Keras 3, trained with adamcpp.keras.Adam and, from the same seed, keras.optimizers.Adam.

    python3 examples/keras_mlp.py              # scikit-learn's digits (8x8), 30 epochs
    python3 examples/keras_mlp.py mnist.npz    # an MNIST .npz as keras.datasets.mnist saves it

Sequential: Flatten, Dense 64 relu, Dropout 0.2, Dense 128 relu, Dropout 0.2, Dense 10 softmax; batches of 32, sparse
categorical cross-entropy. Both runs start from keras.utils.set_random_seed(seed): the same initial weights, shuffles
and dropout masks, so the two test accuracies differ only by what the optimizers do. Needs keras>=3 and torch
(`pip install 'adamcpp[keras]'`); KERAS_BACKEND defaults to torch here, the backend adamcpp updates in place.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported
# The matrices are tiny (batches of 32 x 64..128 units): more threads spend longer waking than multiplying.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras
import numpy as np

import adamcpp.keras


def load(path):
    """(x_train, y_train, x_test, y_test): an MNIST .npz (uint8 pixels scaled by 1/255), else the digits split 80/20."""
    if path:
        with np.load(path) as f:
            return tuple(
                f[k].astype(np.float32) / (255.0 if k.startswith("x") else 1.0)
                for k in ("x_train", "y_train", "x_test", "y_test")
            )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = (digits.images / 16.0).astype(np.float32), digits.target
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


def train(optimizer, data, epochs, seed):
    """Test accuracy of the article's MLP trained with `optimizer`, and the training time in seconds."""
    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(x_train.shape[1:]),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=256, verbose=0)
    return float(accuracy), seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("npz", nargs="?", help="an MNIST .npz (x_train, y_train, x_test, y_test); default: digits")
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 on digits, 5 on an .npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if keras.backend.backend() != "torch":
        parser.error(f"KERAS_BACKEND is {keras.backend.backend()!r}: adamcpp.keras needs the torch backend")
    data = load(args.npz)
    epochs = args.epochs or (5 if args.npz else 30)
    print(f"{args.npz or 'digits'}: {len(data[0])} training and {len(data[2])} test images, {epochs} epochs")
    for name, make in (("adamcpp.keras.Adam", adamcpp.keras.Adam), ("keras.optimizers.Adam", keras.optimizers.Adam)):
        accuracy, seconds = train(make(learning_rate=1e-3), data, epochs, args.seed)
        print(f"{name:<22} test accuracy {accuracy:.4f}  ({seconds:.1f} s of fit)")


if __name__ == "__main__":
    main()
