#!/usr/bin/env python3
"""adamcpp quickstart: softmax regression on synthetic data, trained with adamcpp.Adam.

The recipe of every training loop: compute the gradients into arrays shaped like
the parameters, call ``opt.step(grads)``, and the parameters change in place.
"""

import numpy as np

import adamcpp

# Three Gaussian blobs in 2-D (fixed seed: the same run every time).
rng = np.random.default_rng(0)
centers = np.array([[0.0, 2.0], [-2.0, -1.0], [2.0, -1.0]])
y = rng.integers(0, 3, size=600)
x = (centers[y] + rng.standard_normal((600, 2))).astype(np.float32)

# Parameters: float32, C-contiguous; the optimizer updates them in place.
params = {"W": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
grads = {name: np.zeros_like(p) for name, p in params.items()}
opt = adamcpp.Adam(params, lr=0.05)

for step in range(201):
    # Forward: logits -> numerically stable softmax cross-entropy.
    logits = x @ params["W"] + params["b"]
    z = logits - logits.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = -log_probs[np.arange(len(y)), y].mean()
    # Backward: d loss / d logits = (softmax - onehot) / n.
    dlogits = np.exp(log_probs)
    dlogits[np.arange(len(y)), y] -= 1.0
    dlogits /= len(y)
    grads["W"][...] = x.T @ dlogits
    grads["b"][...] = dlogits.sum(axis=0)
    if step % 40 == 0:
        print(f"step {step:3d}  loss {loss:.4f}")
    opt.step(grads)  # one fused native call updates W and b

accuracy = np.mean((x @ params["W"] + params["b"]).argmax(axis=1) == y)
print(f"final loss {loss:.4f}, training accuracy {accuracy:.3f} (adamcpp {adamcpp.__version__})")
