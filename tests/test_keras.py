"""adamcpp.keras: Keras 3 optimizers (Adam, AdamW, SGD) whose update is adamcpp's native in-place step.

Lockstep against Keras's own optimizers (the same gradients given to both, float32 and float64, within a bound derived
from the rounding of each operation), fit, schedules, save/load resuming bit for bit, config round trips, the refused
backends and devices, storage swapped under a variable, and examples/keras_mlp.py's accuracy on digits.
Skips without keras, or when keras's backend is not torch (KERAS_BACKEND defaults to torch here)."""

from __future__ import annotations

import copy
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

from conftest import source_tree

os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is imported
try:
    import keras
except ImportError as err:  # keras missing, or its backend's package missing
    pytest.skip(f"needs keras>=3 with the torch backend (import keras failed: {err})", allow_module_level=True)
if keras.backend.backend() != "torch":
    pytest.skip(
        f"adamcpp.keras runs on keras's torch backend; this one is {keras.backend.backend()!r} (KERAS_BACKEND)",
        allow_module_level=True,
    )
torch = pytest.importorskip("torch", reason="keras's torch backend needs torch")

import adamcpp.keras as ak  # noqa: E402

# Keras 3.15's Variable.__array__ takes no `copy` keyword, which NumPy >= 2 reports whenever Keras converts a
# variable (get_weights, model.save, get_config): Keras's warning, not adamcpp's.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")

ROOT = Path(__file__).resolve().parent.parent


def mlp(seed: int = 0, dtype: str = "float32", dropout: float = 0.0) -> Any:
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((8,), dtype=dtype), keras.layers.Dense(16, activation="relu", dtype=dtype)]
    if dropout:
        layers.append(keras.layers.Dropout(dropout, dtype=dtype))
    layers.append(keras.layers.Dense(4, activation="softmax", dtype=dtype))
    return keras.Sequential(layers)


def data(n: int = 64, dtype: Any = np.float32):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 8)).astype(dtype)
    return x, (np.abs(x[:, :4]).argmax(axis=1)).astype(np.int64)


def values(variables) -> List[np.ndarray]:
    """Copies of the variables' values (the tensors read directly: no Keras conversion)."""
    return [v.value.detach().numpy().copy() for v in variables]


def slots(optimizer, suffix: str) -> List[np.ndarray]:
    """Copies of an optimizer's variables whose name ends with `suffix` ("momentum", "velocity", ...), in order."""
    return [v.value.detach().numpy().copy() for v in optimizer.variables if v.name.endswith("_" + suffix)]


def gradients(model, x, y) -> List[Any]:
    loss = keras.losses.SparseCategoricalCrossentropy()(torch.from_numpy(y), model(torch.from_numpy(x)))
    return list(torch.autograd.grad(loss, [v.value for v in model.trainable_variables]))


# ------------------------------------------------------------------------------------------------ the API


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_signatures_and_defaults_are_keras(name):
    ours = inspect.signature(getattr(ak, name)).parameters
    theirs = inspect.signature(getattr(keras.optimizers, name)).parameters
    assert list(ours) == list(theirs)
    assert {k: p.default for k, p in ours.items()} == {k: p.default for k, p in theirs.items()}
    assert issubclass(getattr(ak, name), keras.optimizers.Optimizer)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("Adam", {}),
        ("Adam", {"amsgrad": True}),
        ("AdamW", {"weight_decay": 0.1}),
        ("SGD", {"momentum": 0.9}),
        ("SGD", {}),
    ],
)
def test_variables_are_kerass(name, kwargs):
    """The same optimizer variables (names, shapes, dtypes, order) as Keras's optimizer: checkpoints hold the same
    layout, and `iterations` counts as Keras's does."""
    model = mlp()
    ours, theirs = getattr(ak, name)(**kwargs), getattr(keras.optimizers, name)(**kwargs)
    ours.build(model.trainable_variables)
    theirs.build(model.trainable_variables)
    describe = lambda opt: [(v.name, tuple(v.shape), v.dtype) for v in opt.variables]  # noqa: E731
    assert describe(ours) == describe(theirs)
    assert ours.get_config().keys() == theirs.get_config().keys()


def test_compile_and_fit_learn_in_place_like_keras():
    x, y = data(256)
    histories = {}
    for make in (ak.Adam, keras.optimizers.Adam):
        model = mlp(dropout=0.1)  # seeded: the same weights, shuffles and dropout masks for both optimizers
        model.compile(optimizer=make(learning_rate=1e-2), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        pointers = [v.value.data_ptr() for v in model.trainable_variables]
        histories[make] = model.fit(x, y, batch_size=32, epochs=8, verbose=0).history
        assert int(model.optimizer.iterations.value) == 8 * 8
        # Updated where they live: the variables' tensors kept their memory.
        assert [v.value.data_ptr() for v in model.trainable_variables] == pointers
    ours, theirs = histories[ak.Adam], histories[keras.optimizers.Adam]
    assert ours["loss"][-1] < 0.75 * ours["loss"][0], ours["loss"]
    # 64 updates of a few-ulp difference per step: the losses agree far below any learning effect.
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-4)
    np.testing.assert_allclose(ours["accuracy"], theirs["accuracy"], rtol=0, atol=1 / 256)


# ------------------------------------------------------------------------------------ lockstep numerics
#
# Both optimizers get the same gradients (computed on the Keras-trained model) for `steps` updates; everything Keras
# does around the update (learning rate, weight decay) is the same code on both sides. Only the update differs:
# Keras's torch optimizers run torch's foreach ops, adamcpp its kernel, in the operation order of eps_style="keras":
#     m <- b1*m + (1-b1)*g;  v <- b2*v + ((1-b2)*g)*g;  [vh <- max(vh, v)];  p <- p - (alpha*m) / (sqrt(v) + eps)
# with alpha = lr * sqrt(1 - b2**t) / (1 - b1**t). Each side rounds each operation to within u = 2**-24 (float32) or
# 2**-53 (float64) relative; torch may fuse a multiply-add (one rounding fewer). The gap D between the two sides
# therefore obeys, per element and to first order (values are Keras's, u counted for both sides):
#     Dm <- b1*Dm + 2*3u*(b1|m| + (1-b1)|g|)                 three roundings per side
#     Dv <- b2*Dv + 2*4u*(b2*v + (1-b2)*g*g)                  four
#     Dvh <- max(Dvh, Dv)                                     max is 1-Lipschitz
#     Dden <= min(Dv / (2 sqrt v), sqrt Dv) + 2*2u*den       sqrt's slope; sqrt and + round
#     Dalpha/alpha <= u*((t+1) b1^t/(1-b1^t) + (t+1) b2^t/(2(1-b2^t)) + 8)
#         Keras computes alpha in the variable's dtype: b**t from b rounded to it (|b32 - b| <= u*b moves b**t by
#         <= t*u*b**t) and pow's own rounding (<= u*b**t), both divided by the cancellation 1 - b**t, halved by the
#         square root for b2; then sqrt, *, / and adamcpp's single rounding of its float64 alpha: <= 8u.
#     Ddelta <= alpha*Dm/den + |delta|*(Dden/den + Dalpha/alpha + 2*2u)        delta = alpha*m/den: * and /
#     Dp <- Dp + Ddelta + 2u*|p|                              each side rounds p - delta
# (decoupled weight decay, p <- p*(1 - lr*wd), is Keras's own code on both sides: Dp <- (1-lr*wd)*Dp + 2u|p|.)
# SGD (Keras: m <- mu*m - lr*g; p <- p + m, or p + mu*m - lr*g with Nesterov; adamcpp keeps b = -m):
#     Dm <- mu*Dm + 2*3u*(mu|m| + lr|g|);  Dp <- Dp + Dm + 2u|p|   (Nesterov: Dp + mu*Dm + 2*3u*(|p| + lr|g| + mu|m|);
#     without momentum: Dp + 2*2u*(|p| + lr|g|))
# The test allows twice the bound for the second-order terms left out; a perturbation of the learning rate by one part
# in 10^4 exceeds it (test_the_lockstep_bound_catches_a_perturbed_update), so the bound is not vacuous.


class Bound:
    """The running per-element bound above, fed with Keras's values before and after each step."""

    def __init__(self, kind: str, hyper: Dict[str, Any], shapes, eps_unit: float):
        self.kind, self.h, self.u = kind, hyper, eps_unit
        zero = lambda: [np.zeros(s) for s in shapes]  # noqa: E731
        self.dp, self.dm, self.dv, self.dvh = zero(), zero(), zero(), zero()

    def step(self, t: int, lr: float, grads, before: Dict[str, list], after: Dict[str, list]) -> None:
        u, h = self.u, self.h
        for i, g in enumerate(grads):
            g = np.abs(g.astype(np.float64))
            p_new = np.abs(after["p"][i].astype(np.float64))
            if h.get("weight_decay"):
                self.dp[i] = (1 - lr * h["weight_decay"]) * self.dp[i] + 2 * u * np.abs(before["p"][i])
            if self.kind == "sgd":
                self._sgd(i, lr, g, before, p_new)
            else:
                self._adam(i, t, lr, g, before, after, p_new)

    def _sgd(self, i, lr, g, before, p_new):
        u, mu = self.u, self.h.get("momentum", 0.0)
        p = np.abs(before["p"][i].astype(np.float64))
        if mu == 0.0:
            self.dp[i] = self.dp[i] + 2 * 2 * u * (p + lr * g)
            return
        m = np.abs(before["momentum"][i].astype(np.float64))
        self.dm[i] = mu * self.dm[i] + 2 * 3 * u * (mu * m + lr * g)
        if self.h.get("nesterov"):
            self.dp[i] = self.dp[i] + mu * self.dm[i] + 2 * 3 * u * (p + lr * g + mu * m)
        else:
            self.dp[i] = self.dp[i] + self.dm[i] + 2 * u * p_new

    def _adam(self, i, t, lr, g, before, after, p_new):
        u, h = self.u, self.h
        b1, b2, eps = h.get("beta_1", 0.9), h.get("beta_2", 0.999), h.get("epsilon", 1e-7)
        m_old = np.abs(before["momentum"][i].astype(np.float64))
        v_old = before["velocity"][i].astype(np.float64)
        self.dm[i] = b1 * self.dm[i] + 2 * 3 * u * (b1 * m_old + (1 - b1) * g)
        self.dv[i] = b2 * self.dv[i] + 2 * 4 * u * (b2 * v_old + (1 - b2) * g * g)
        v, dv = after["velocity"][i].astype(np.float64), self.dv[i]
        if h.get("amsgrad"):
            self.dvh[i] = np.maximum(self.dvh[i], self.dv[i])
            v, dv = after["velocity_hat"][i].astype(np.float64), self.dvh[i]
        m = np.abs(after["momentum"][i].astype(np.float64))
        root = np.sqrt(v)
        den = root + eps
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(root > 0, dv / (2 * root), np.inf)
        dden = np.minimum(slope, np.sqrt(dv)) + 2 * 2 * u * den
        alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        rel_alpha = u * ((t + 1) * b1**t / (1 - b1**t) + (t + 1) * b2**t / (2 * (1 - b2**t)) + 8)
        delta = alpha * m / den
        ddelta = alpha * self.dm[i] / den + delta * (dden / den + rel_alpha + 2 * 2 * u)
        self.dp[i] = self.dp[i] + ddelta + 2 * u * p_new


SLOTS = {"adam": ("momentum", "velocity"), "sgd": ("momentum",)}


def lockstep(
    name: str,
    hyper: Dict[str, Any],
    *,
    dtype: str = "float32",
    steps: int = 25,
    ours_hyper: Optional[Dict[str, Any]] = None,
) -> Dict[str, float]:
    """Runs Keras's `name` and adamcpp.keras's `name` side by side on the same gradients; returns the largest gap of
    the parameters and of each state slot, each as a multiple of its bound (<= 1 passes)."""
    kind = "sgd" if name == "SGD" else "adam"
    keras_model, our_model = mlp(0, dtype), mlp(0, dtype)
    theirs = getattr(keras.optimizers, name)(**hyper)
    ours = getattr(ak, name)(**(ours_hyper or hyper))
    x, y = data(32, np.float64 if dtype == "float64" else np.float32)
    shapes = [tuple(v.shape) for v in keras_model.trainable_variables]
    bound = Bound(kind, hyper, shapes, 2.0**-24 if dtype == "float32" else 2.0**-53)
    names = SLOTS[kind] + (("velocity_hat",) if hyper.get("amsgrad") else ())
    if kind == "sgd" and not hyper.get("momentum"):
        names = ()
    worst = {"p": 0.0, **{n: 0.0 for n in names}}
    sign = {"momentum": -1.0 if kind == "sgd" else 1.0}  # adamcpp.keras.SGD keeps b = -m
    for t in range(1, steps + 1):
        grads = gradients(keras_model, x, y)
        theirs.build(keras_model.trainable_variables)
        before = {"p": values(keras_model.trainable_variables), **{n: slots(theirs, n) for n in names}}
        lr = float(theirs.learning_rate.value if hasattr(theirs.learning_rate, "value") else theirs.learning_rate)
        theirs.apply([g.clone() for g in grads], keras_model.trainable_variables)
        ours.apply([g.clone() for g in grads], our_model.trainable_variables)
        after = {"p": values(keras_model.trainable_variables), **{n: slots(theirs, n) for n in names}}
        bound.step(t, lr, [g.numpy() for g in grads], before, after)
        ours_now = {"p": values(our_model.trainable_variables), **{n: slots(ours, n) for n in names}}
        limits = {"p": bound.dp, "momentum": bound.dm, "velocity": bound.dv, "velocity_hat": bound.dvh}
        for n in worst:
            for a, b, lim in zip(ours_now[n], after[n], limits[n]):
                gap = np.abs(sign.get(n, 1.0) * a.astype(np.float64) - b.astype(np.float64))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(gap == 0, 0.0, gap / (2 * lim))
                worst[n] = max(worst[n], float(ratio.max()))
    return worst


LOCKSTEP = {
    "adam": ("Adam", {"learning_rate": 1e-2}),
    "adam-defaults": ("Adam", {}),
    "adam-amsgrad": ("Adam", {"learning_rate": 1e-2, "amsgrad": True, "beta_2": 0.99}),
    "adam-betas-eps": ("Adam", {"learning_rate": 3e-3, "beta_1": 0.8, "beta_2": 0.95, "epsilon": 1e-3}),
    "adamw": ("AdamW", {"learning_rate": 1e-2, "weight_decay": 0.1}),
    "adam-decay": ("Adam", {"learning_rate": 1e-2, "weight_decay": 0.05}),
    "sgd": ("SGD", {"learning_rate": 0.1}),
    "sgd-momentum": ("SGD", {"learning_rate": 0.05, "momentum": 0.9}),
    "sgd-nesterov": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    "sgd-momentum-decay": ("SGD", {"learning_rate": 0.05, "momentum": 0.5, "weight_decay": 0.01}),
}


@pytest.mark.parametrize("case", list(LOCKSTEP))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_lockstep_with_keras(case, dtype):
    name, hyper = LOCKSTEP[case]
    worst = lockstep(name, hyper, dtype=dtype)
    assert all(r <= 1.0 for r in worst.values()), worst


def test_the_lockstep_bound_catches_a_perturbed_update():
    """A learning rate one part in 10^4 away (Adam), or momentum 1e-4 away (SGD), breaks the bound: the test above
    would see an update that is not Keras's."""
    worst = lockstep("Adam", {"learning_rate": 1e-2}, ours_hyper={"learning_rate": 1e-2 * (1 + 1e-4)})
    assert worst["p"] > 1.0, worst
    worst = lockstep(
        "SGD", {"learning_rate": 0.05, "momentum": 0.9}, ours_hyper={"learning_rate": 0.05, "momentum": 0.9 + 1e-4}
    )
    assert worst["p"] > 1.0 and worst["momentum"] > 1.0, worst


def test_lockstep_float64_matches_to_a_few_ulps():
    """In float64 (keras.config.set_floatx("float64"), so the learning rate is float64 too) the gap is of the order of
    the float64 rounding: the bound above, measured in float64 units."""
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        worst = lockstep("Adam", {"learning_rate": 1e-2, "amsgrad": True}, dtype="float64")
        worst_sgd = lockstep("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}, dtype="float64")
    finally:
        keras.config.set_floatx(previous)
    assert all(r <= 1.0 for r in [*worst.values(), *worst_sgd.values()]), (worst, worst_sgd)


@pytest.mark.parametrize("name, extra", [("Adam", {}), ("SGD", {"momentum": 0.9})])
def test_schedule_learning_rate_is_evaluated_per_step(name, extra):
    """A LearningRateSchedule is called with `iterations` before each update, as Keras does: lockstep holds while the
    rate changes every step (for SGD with momentum, Keras's m <- mu*m - lr*g differs from torch's form as soon as the
    rate changes, so this pins Keras's form)."""
    schedule = keras.optimizers.schedules.ExponentialDecay(5e-2, decay_steps=2, decay_rate=0.5)
    worst = lockstep(name, {"learning_rate": schedule, **extra}, steps=12)
    assert all(r <= 1.0 for r in worst.values()), worst
    worst = lockstep(
        name, {"learning_rate": schedule, **extra}, steps=12, ours_hyper={"learning_rate": 5e-2, **extra}
    )  # a constant rate is told apart
    assert worst["p"] > 1.0, worst


def test_read_only_numpy_gradients_are_read_in_place():
    keras_model, our_model = mlp(), mlp()
    x, y = data(32)
    grads = [g.numpy() for g in gradients(keras_model, x, y)]
    for g in grads:
        g.flags.writeable = False
    theirs, ours = keras.optimizers.Adam(1e-2), ak.Adam(1e-2)
    theirs.apply([torch.from_numpy(g.copy()) for g in grads], keras_model.trainable_variables)
    ours.apply(grads, our_model.trainable_variables)
    for a, b in zip(values(our_model.trainable_variables), values(keras_model.trainable_variables)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- storage swapped under a view


def test_storage_replaced_under_a_variable_is_followed():
    """torch may give a variable's tensor new memory (`param.data = ...`, share_memory_()): the next step writes the
    new memory, never the old one, and the results are those of a run without the swap."""
    x, y = data(32)
    plain, swapped = mlp(), mlp()
    opt_plain, opt_swapped = ak.Adam(1e-2), ak.Adam(1e-2)
    grads = gradients(plain, x, y)
    for model, opt in ((plain, opt_plain), (swapped, opt_swapped)):
        opt.apply([g.clone() for g in grads], model.trainable_variables)
    kernel = swapped.trainable_variables[0]
    old = kernel.value.data
    old_values = old.clone()
    kernel.value.data = old.clone()  # new storage, same numbers
    momentum = next(v for v in opt_swapped.variables if v.name.endswith("_momentum"))
    momentum.value.data = momentum.value.data.clone()
    assert kernel.value.data_ptr() != old.data_ptr()
    for _ in range(3):
        grads = gradients(plain, x, y)
        opt_plain.apply([g.clone() for g in grads], plain.trainable_variables)
        opt_swapped.apply([g.clone() for g in grads], swapped.trainable_variables)
    assert torch.equal(old, old_values), "the old storage was written through a stale view"
    for a, b in zip(values(swapped.trainable_variables), values(plain.trainable_variables)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots(opt_swapped, "momentum"), slots(opt_plain, "momentum")):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------- save, load, config


@pytest.mark.parametrize(
    "make",
    [
        lambda: ak.Adam(1e-2, amsgrad=True),
        lambda: ak.AdamW(2e-3, weight_decay=0.1),
        lambda: ak.SGD(0.05, momentum=0.9, nesterov=True),
        lambda: ak.Adam(keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=40)),
    ],
    ids=["adam-amsgrad", "adamw", "sgd-nesterov", "adam-schedule"],
)
def test_save_and_load_resume_identically(make, tmp_path):
    x, y = data(128)
    model = mlp()  # no dropout: a reloaded Dropout layer draws other masks than the original's from the same seed
    model.compile(optimizer=make(), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the classes are registered
    assert type(loaded.optimizer) is type(model.optimizer)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert int(loaded.optimizer.iterations.value) == 8
    for a, b in zip(values(loaded.optimizer.variables), values(model.optimizer.variables)):
        np.testing.assert_array_equal(a, b)
    for m in (model, loaded):
        m.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(values(loaded.weights), values(model.weights)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(values(loaded.optimizer.variables), values(model.optimizer.variables)):
        np.testing.assert_array_equal(a, b)


def test_a_fresh_process_loads_the_model(tmp_path):
    """load_model in a new interpreter: importing adamcpp.keras registers the classes, nothing else is needed."""
    x, y = data(64)
    model = mlp()
    model.compile(optimizer=ak.AdamW(learning_rate=1e-2), loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    code = (
        "import os, sys; os.environ['KERAS_BACKEND'] = 'torch'\n"
        "import keras, adamcpp.keras\n"
        "m = keras.models.load_model(sys.argv[1])\n"
        "print(type(m.optimizer).__module__, type(m.optimizer).__name__, int(m.optimizer.iterations.value), "
        "m.optimizer.weight_decay)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "m.keras")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, KERAS_BACKEND="torch"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["adamcpp.keras", "AdamW", "2", "0.004"], done.stdout


@pytest.mark.parametrize(
    "make",
    [
        lambda: ak.Adam(3e-3, beta_1=0.8, beta_2=0.95, epsilon=1e-6, amsgrad=True, clipnorm=1.0, name="opt"),
        lambda: ak.AdamW(weight_decay=0.2, global_clipnorm=2.0, use_ema=True, ema_momentum=0.9),
        lambda: ak.SGD(0.1, momentum=0.5, nesterov=True, clipvalue=0.5, gradient_accumulation_steps=2),
        lambda: ak.Adam(keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.9)),
    ],
    ids=["adam", "adamw", "sgd", "schedule"],
)
def test_config_round_trips(make):
    opt = make()
    config = opt.get_config()
    again = type(opt).from_config(copy.deepcopy(config))  # Keras's from_config edits the dict it is given
    assert again.get_config() == config
    serialized = keras.optimizers.serialize(opt)
    assert serialized["registered_name"] == f"adamcpp>{type(opt).__name__}"
    revived = keras.optimizers.deserialize(serialized)
    assert type(revived) is type(opt) and revived.get_config() == config


def test_keras_features_around_the_update_still_apply():
    """Clipping, gradient accumulation and EMA are Keras's base class's, around adamcpp's update: lockstep holds."""
    for hyper in ({"learning_rate": 1e-2, "global_clipnorm": 0.05}, {"learning_rate": 1e-2, "clipvalue": 1e-3}):
        worst = lockstep("Adam", hyper, steps=6)
        assert all(r <= 1.0 for r in worst.values()), (hyper, worst)
    for extra in ({"gradient_accumulation_steps": 2}, {"use_ema": True, "ema_overwrite_frequency": 3}):
        keras_model, our_model = mlp(), mlp()
        theirs, ours = keras.optimizers.Adam(1e-2, **extra), ak.Adam(1e-2, **extra)
        x, y = data(32)
        for _ in range(6):
            grads = gradients(keras_model, x, y)
            theirs.apply([g.clone() for g in grads], keras_model.trainable_variables)
            ours.apply([g.clone() for g in grads], our_model.trainable_variables)
        assert int(ours.iterations) == int(theirs.iterations)
        for a, b in zip(values(our_model.trainable_variables), values(keras_model.trainable_variables)):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6, err_msg=str(extra))


# ------------------------------------------------------------------------------------------ refusals and errors


@pytest.mark.parametrize(
    "backend, why",
    [("jax", "immutable"), ("tensorflow", "immutable"), ("numpy", "cannot"), ("openvino", "cannot"), ("mlx", "cannot")],
)
def test_other_backends_are_refused_with_the_reason(backend, why):
    with pytest.raises(RuntimeError) as info:
        ak.check_backend(backend, "AdamW")
    message = str(info.value)
    for needed in (repr(backend), why, "KERAS_BACKEND=torch", "keras.optimizers.AdamW", "in place"):
        assert needed in message, message
    ak.check_backend("torch")  # accepted


def test_construction_refuses_when_the_backend_is_not_torch(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    for cls in (ak.Adam, ak.AdamW, ak.SGD):
        with pytest.raises(RuntimeError, match=r"'jax'.*immutable.*keras\.optimizers\." + cls.__name__):
            cls()


class _FakeVariable:
    def __init__(self, tensor):
        self.value = tensor
        self.path = "dense/kernel"


@pytest.mark.parametrize(
    "tensor, error, words",
    [
        (
            lambda: torch.empty(3, device="meta"),
            ValueError,
            ["dense/kernel", "'meta' device", "CPU", "keras.optimizers.Adam"],
        ),
        (lambda: torch.zeros(3, dtype=torch.float16), TypeError, ["dense/kernel", "float32 or float64", "float16"]),
        (lambda: torch.zeros(4, 3).t(), ValueError, ["dense/kernel", "not contiguous"]),
    ],
    ids=["device", "dtype", "layout"],
)
def test_variables_adamcpp_cannot_update_in_place_are_refused_at_build(tensor, error, words):
    opt = ak.Adam()
    with pytest.raises(error) as info:
        opt.build([_FakeVariable(tensor())])
    assert all(w in str(info.value) for w in words), str(info.value)
    assert not opt.built


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: ak.Adam(beta_1=1.0), ValueError, ["beta_1", "[0, 1)"]),
        (lambda: ak.Adam(beta_2=-0.1), ValueError, ["beta_2"]),
        (lambda: ak.Adam(epsilon=-1e-7), ValueError, ["epsilon", ">= 0"]),
        (lambda: ak.Adam(amsgrad="yes"), TypeError, ["amsgrad", "bool"]),
        (lambda: ak.AdamW(weight_decay=None), ValueError, ["weight_decay", "adamcpp.keras.Adam"]),
        (lambda: ak.SGD(momentum=1.5), ValueError, ["momentum", "[0, 1]"]),
        (lambda: ak.SGD(nesterov=1), TypeError, ["nesterov", "bool"]),
    ],
)
def test_bad_hyperparameters_are_named(make, error, words):
    with pytest.raises(error) as info:
        make()
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_variable_it_was_not_built_with_is_named():
    model, other = mlp(), mlp(1)
    opt = ak.Adam()
    opt.build(model.trainable_variables)
    with pytest.raises(ValueError, match="not a variable this optimizer was built with"):
        opt.update_step(torch.zeros(8, 16), other.trainable_variables[0], 1e-3)


def test_import_adamcpp_imports_neither_keras_nor_torch():
    code = "import sys, adamcpp; print(sorted(m for m in ('keras', 'torch', 'adamcpp.keras') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


# -------------------------------------------------------------------------------------------------- the example


@pytest.mark.skipif(
    source_tree("examples") is None, reason="needs the source tree's examples/ (tests run against an installed package)"
)
def test_example_reaches_95_percent_on_digits_like_keras():
    pytest.importorskip("sklearn")
    env = dict(os.environ, KERAS_BACKEND="torch", OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "keras_mlp.py")], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr
    accuracy: Dict[str, float] = {
        name: float(a) for name, a in re.findall(r"^(\S+)\s+test accuracy (\S+)", done.stdout, flags=re.M)
    }
    assert set(accuracy) == {"adamcpp.keras.Adam", "keras.optimizers.Adam"}, done.stdout
    assert accuracy["adamcpp.keras.Adam"] >= 0.95, done.stdout
    # Same seed, same data, the same update up to rounding: the accuracies agree to a few test images (of 360).
    assert abs(accuracy["adamcpp.keras.Adam"] - accuracy["keras.optimizers.Adam"]) <= 0.02, done.stdout


def test_float64_adam_trains_an_epoch_of_digits_as_keras_does():
    """The seed's model (Flatten, Dense 64 relu, Dense 128 relu, Dense 10 softmax; no dropout, so both runs see the
    same function) in float64, trained for one epoch of digits (1,437 training images: 44 full batches of 32) by
    keras.optimizers.Adam and by adamcpp.keras.Adam from the same initial weights, each on its own model and its own
    gradients: after the epoch every weight tensor agrees within 1e-15 relative to its largest element. Both
    compute Keras's formula in float64; per step the updates differ by a few ulps of an update of size ~lr = 1e-3,
    i.e. ~1e-19 absolute against weights of size ~0.1-1, and 44 steps with the gradients feeding differences back
    stay far below 1e-15 (measured 2.6e-16; a learning rate one part in 1e6 off gives 1.1e-6)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is not installed")
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float64)
    y = digits.target.astype(np.int64)
    x_train, y_train = x[:1437], y[:1437]
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:

        def seed_model():
            keras.utils.set_random_seed(0)
            return keras.Sequential(
                [
                    keras.Input((8, 8), dtype="float64"),
                    keras.layers.Flatten(dtype="float64"),
                    keras.layers.Dense(64, activation="relu", dtype="float64"),
                    keras.layers.Dense(128, activation="relu", dtype="float64"),
                    keras.layers.Dense(10, activation="softmax", dtype="float64"),
                ]
            )

        theirs_model, ours_model = seed_model(), seed_model()
        theirs, ours = keras.optimizers.Adam(learning_rate=1e-3), ak.Adam(learning_rate=1e-3)
        for start in range(0, len(x_train) - 31, 32):
            xb, yb = x_train[start : start + 32], y_train[start : start + 32]
            theirs.apply(gradients(theirs_model, xb, yb), theirs_model.trainable_variables)
            ours.apply(gradients(ours_model, xb, yb), ours_model.trainable_variables)
        assert int(ours.iterations.value) == int(theirs.iterations.value) == 44
        worst = 0.0
        for a, b in zip(values(ours_model.trainable_variables), values(theirs_model.trainable_variables)):
            worst = max(worst, float(np.max(np.abs(a - b)) / np.max(np.abs(b))))
        assert worst <= 1e-15, worst
    finally:
        keras.config.set_floatx(previous)
