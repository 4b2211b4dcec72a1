"""HIPS autograd end to end: autograd keeps an MLP's parameters as a list of (W, b) tuples and returns gradients in
the same structure; adamcpp steps that tree as it is (docs/api.md 2.2) and must follow autograd's own Adam
(`autograd.misc.optimizers.adam`) in float64. Skips without autograd (`pip install autograd`)."""

from __future__ import annotations

import numpy as np
import pytest

import adamcpp

autograd = pytest.importorskip("autograd", reason="autograd is not installed (pip install autograd)")
anp = pytest.importorskip("autograd.numpy")
optimizers = pytest.importorskip("autograd.misc.optimizers")

LAYERS = [16, 12, 5]
STEPS = 50
LR = 1e-2


def _data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, LAYERS[0]))
    y = rng.integers(0, LAYERS[-1], 64)
    return x, np.eye(LAYERS[-1])[y]


def _init():
    rng = np.random.default_rng(1)
    return [
        (rng.standard_normal((m, n)) * np.sqrt(2.0 / m), rng.standard_normal(n) * 0.1)
        for m, n in zip(LAYERS[:-1], LAYERS[1:])
    ]


def _loss_fn():
    x, t = _data()

    def loss(params, i=0):
        h = x
        for k, (w, b) in enumerate(params):
            h = anp.dot(h, w) + b
            if k + 1 < len(params):
                h = anp.tanh(h)
        h = h - anp.max(h, axis=1, keepdims=True)
        logp = h - anp.log(anp.sum(anp.exp(h), axis=1, keepdims=True))
        return -anp.mean(anp.sum(logp * t, axis=1))

    return loss


def test_an_autograd_mlp_stepped_as_its_tuples_follows_autograds_adam_in_float64():
    loss = _loss_fn()
    grad = autograd.grad(loss)
    reference = optimizers.adam(grad, _init(), num_iters=STEPS, step_size=LR, b1=0.9, b2=0.999, eps=1e-8)

    params = _init()  # a list of (W, b) tuples: the tree adamcpp steps in place
    # autograd's Adam adds eps to sqrt(v / (1 - b2^t)): adamcpp's "torch" form
    opt = adamcpp.Adam(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, eps_style="torch")
    first = loss(params)
    for _ in range(STEPS):
        g = grad(params)
        assert isinstance(g, list) and isinstance(g[0], tuple)  # autograd's own structure
        assert opt.step(g)
    assert loss(params) < 0.8 * first  # it trained
    # Both compute the same formula in float64 with a different order of operations (autograd divides v by the
    # bias correction before the square root, adamcpp divides the square root; m / bc1 against lr / bc1): each
    # step's update differs by at most a few ulps of itself, and the update is at most about lr in size, so each
    # step adds at most ~4 eps * max|x| to the difference; the gradient feeds a difference back with a factor of
    # at most (1 + lr * L) per step, L (the gradient's Lipschitz constant here) below 2, which over 50 steps is
    # below e. Bound: 4 * STEPS * eps * e * max|x| per leaf (1.2e-13 relative).
    eps = np.finfo(np.float64).eps
    for (w, b), (rw, rb) in zip(params, reference):
        for a, r in ((w, rw), (b, rb)):
            scale = np.max(np.abs(r))
            assert np.max(np.abs(a - r)) <= 4 * STEPS * eps * np.e * scale
    # The state is per leaf, in the tree's order, and counts every step.
    assert [s["step"] for s in opt.state] == [STEPS] * 4


def test_a_gradient_tree_of_another_structure_is_refused_by_path_and_nothing_changes():
    params = _init()
    opt = adamcpp.Adam(params, lr=LR)
    g = autograd.grad(_loss_fn())(params)
    before = [(w.copy(), b.copy()) for w, b in params]
    bad = [list(g[0]), g[1]]  # a list where autograd's tuple was
    with pytest.raises(TypeError, match=r"^grads\[0\]: expected a tuple \(as params\[0\]\), got list"):
        opt.step(bad)
    for (w, b), (w0, b0) in zip(params, before):
        assert np.array_equal(w, w0) and np.array_equal(b, b0)
    assert [s["step"] for s in opt.state] == [0] * 4
