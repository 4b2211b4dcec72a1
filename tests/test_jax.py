"""adamcpp driving a JAX model on the CPU (docs/guide.md, "Training a JAX model"): the parameters are a
writable NumPy master copy that adamcpp updates in place, JAX computes the loss and gradients
(`jax.value_and_grad`), the gradients are passed as `np.asarray(g)` (zero-copy, read-only) and the
parameters go back to JAX as `jnp.asarray(p)` each step. Lockstep against optax.adam in float64, and the
refusals: a JAX array is never a parameter or state array. Skipped without jax and optax."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="jax is not installed (pip install jax)")
optax = pytest.importorskip("optax", reason="optax is not installed (pip install optax)")
jnp = pytest.importorskip("jax.numpy")

import adamcpp  # noqa: E402

jax.config.update("jax_enable_x64", True)

LR, B1, B2, EPS, STEPS = 1e-2, 0.9, 0.999, 1e-8, 50


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5))
    y = (x @ rng.normal(size=5) + 0.3 * rng.normal(size=64) > 0).astype(np.float64)
    params = {"w1": rng.normal(size=(5, 8)) * 0.5, "b1": np.zeros(8), "w2": rng.normal(size=8) * 0.5, "b2": np.zeros(())}
    return jnp.asarray(x), jnp.asarray(y), params


def loss(params, x, y):
    """A one-hidden-layer MLP's logistic loss."""
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    logits = h @ params["w2"] + params["b2"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)


def test_lockstep_with_optax_adam_in_float64():
    x, y, init = data()
    value_and_grad = jax.value_and_grad(loss)
    # adamcpp: the NumPy master copy, updated in place; eps_style="torch" is optax's form (scale_by_adam
    # divides by sqrt(nu_hat) + eps with nu_hat = nu / (1 - b2^t): eps outside the bias-corrected root).
    params = {k: np.array(v, dtype=np.float64) for k, v in init.items()}
    opt = adamcpp.Adam(params, lr=LR, betas=(B1, B2), eps=EPS, eps_style="torch")
    # optax: the same model, its own arrays.
    tx = optax.adam(LR, b1=B1, b2=B2, eps=EPS)
    ref = {k: jnp.asarray(v) for k, v in init.items()}
    state = tx.init(ref)
    worst = 0.0
    for _ in range(STEPS):
        value, grads = value_and_grad({k: jnp.asarray(p) for k, p in params.items()}, x, y)
        opt.step({k: np.asarray(g) for k, g in grads.items()})
        ref_value, ref_grads = value_and_grad(ref, x, y)
        updates, state = tx.update(ref_grads, state, ref)
        ref = optax.apply_updates(ref, updates)
        for k in params:
            r = np.asarray(ref[k])
            worst = max(worst, float(np.max(np.abs(params[k] - r)) / max(float(np.max(np.abs(r))), 0.1)))
    # The bound (per tensor, relative to its largest element, floored at 0.1 for the scalar bias that crosses
    # zero): both sides evaluate the same formula in float64 in a different order (adamcpp folds the bias corrections into the step size and sqrt(1 - b2^t), optax
    # divides the moments), a few ulps (~2e-16 relative) of an update of size <= lr = 1e-2 per step against
    # parameters of size ~0.1-1: ~1e-17 to 1e-16 per step. Differences feed back through the gradients with a
    # gain of about one over 50 steps of a smooth loss, and a gradient component near zero (where m / sqrt(v)
    # flips with its sign) can put a whole update's rounding into one element: 50 * 2e-16 = 1e-14. Measured:
    # ~5e-15 at most (the bias vectors, which start at zero, carry it).
    assert worst <= 1e-14, worst
    assert float(loss({k: jnp.asarray(p) for k, p in params.items()}, x, y)) < float(loss(init, x, y))


def test_jax_arrays_are_refused_as_parameters_and_state_and_read_as_gradients():
    w = jnp.zeros(3)
    with pytest.raises(TypeError, match=r"^params\[0\]: expected a numpy.ndarray, got jax.*JAX arrays are immutable"):
        adamcpp.Adam([w])
    params = [np.zeros(3)]
    opt = adamcpp.Adam(params)
    with pytest.raises(TypeError, match=r"^grads\[0\]: expected a numpy.ndarray, got .*pass `np.asarray\(g\)`"):
        opt.step([jnp.ones(3)])
    opt.state[0]["exp_avg"] = jnp.zeros(3)
    with pytest.raises(TypeError, match=r"^exp_avg of params\[0\]: .*JAX arrays are immutable"):
        opt.step([np.ones(3)])
    assert opt.state[0]["step"] == 0 and not params[0].any()
    del opt.state[0]["exp_avg"]
    opt = adamcpp.Adam(params)
    g = np.asarray(jnp.ones(3))  # a read-only, zero-copy view
    assert not g.flags.writeable
    assert opt.step([g]) and params[0].all()
