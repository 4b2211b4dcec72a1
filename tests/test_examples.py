"""The runnable examples: quickstart.py as a subprocess; train_mlp.py's model
(gradient check against finite differences), training (accuracy, bitwise
reproducibility) and command line."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import adamcpp
from conftest import source_tree

if source_tree("examples") is None:
    pytest.skip("needs the source tree's examples/ (tests run against an installed package)", allow_module_level=True)
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_mlp as T  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def single_threaded_blas():
    """The example's matrices are tiny; a multi-threaded BLAS only slows them down
    (train_mlp.py does the same when run as a script). Results do not depend on it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return T.load_data(seed=0)


# ------------------------------------------------------------------ quickstart


def test_quickstart_runs_and_loss_falls():
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    losses = [float(m) for m in re.findall(r"^step\s+\d+\s+loss (\S+)$", proc.stdout, flags=re.M)]
    assert len(losses) >= 4, proc.stdout
    # Zero-initialised softmax regression over 3 classes starts at exactly ln 3.
    assert losses[0] == pytest.approx(math.log(3), abs=5e-5)  # printed with 4 decimals
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # Observed: 1.0986 -> 0.1257 (overlapping blobs keep it above 0); require a 5x drop.
    assert losses[-1] < losses[0] / 5
    assert "training accuracy" in proc.stdout


# ---------------------------------------------------------- model: the numerics


def test_softmax_cross_entropy_matches_definition_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, size=6)
    loss, dlogits = T.softmax_cross_entropy(logits.copy(), labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Same float64 quantity by the textbook formula; a few roundings on O(1) values.
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])), rel=1e-14)
    onehot = np.eye(10)[labels]
    np.testing.assert_allclose(dlogits, (p - onehot) / 6, rtol=0, atol=1e-15)
    # Huge logits: no overflow (filterwarnings=error would turn a RuntimeWarning into a failure).
    big = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], dtype=np.float32)
    loss, dlogits = T.softmax_cross_entropy(big, np.array([1, 0]))
    assert math.isfinite(loss) and np.isfinite(dlogits).all()
    assert loss == pytest.approx((1e4 + math.log(2)) / 2, rel=1e-6)  # float32 logits, float32 arithmetic


def _loss_fn(model, x, y, dropout_seed):
    """The training loss as a function of the parameters, with a fixed dropout mask:
    re-seeding the rng for every evaluation draws the same mask (same shapes)."""

    def f():
        rng = None if dropout_seed is None else np.random.default_rng(dropout_seed)
        logits = model.forward(x, train=True, rng=rng)
        model._cache = []
        return T.softmax_cross_entropy(logits, y)[0]

    return f


@pytest.mark.parametrize("dropout_seed", [None, 7], ids=["dropout-off", "fixed-dropout-mask"])
@pytest.mark.parametrize("sizes,per_tensor", [((12, 9, 11, 5), None), ((64, 64, 128, 10), 60)], ids=["small-all", "article-sampled"])
def test_backward_matches_finite_differences(sizes, per_tensor, dropout_seed):
    """Central differences in float64 against MLP.backward, at every entry (small
    model) or at `per_tensor` random entries of each tensor (the article's sizes)."""
    rng = np.random.default_rng(1)
    model = T.MLP(sizes, dropout=0.2, seed=3, dtype=np.float64)
    for k in model.params:
        if k.startswith("b"):  # nonzero biases so their gradient paths are exercised
            model.params[k][...] = 0.1 * rng.standard_normal(model.params[k].shape)
    x = rng.random((5, sizes[0]))
    y = rng.integers(0, sizes[-1], size=5)
    drop_rng = None if dropout_seed is None else np.random.default_rng(dropout_seed)
    model.loss_and_grad(x, y, rng=drop_rng)
    analytic = {k: g.copy() for k, g in model.grads.items()}

    # The check is only valid away from ReLU kinks: every hidden pre-activation must
    # stay on its side of 0 under a perturbation of h (|dz/dtheta| <= max(|x|, |a|) ~ 1..10).
    model.forward(x, train=True, rng=None if dropout_seed is None else np.random.default_rng(dropout_seed))
    kink_distance = min(np.abs(z).min() for _, z, _ in model._cache[:-1])
    model._cache = []
    h = 1e-6
    assert kink_distance > 1e3 * h

    f = _loss_fn(model, x, y, dropout_seed)
    for name, p in model.params.items():
        flat = p.reshape(-1)
        idx = np.arange(flat.size) if per_tensor is None else rng.choice(flat.size, min(per_tensor, flat.size), replace=False)
        numeric = np.empty(len(idx))
        for j, i in enumerate(idx):
            old = flat[i]
            flat[i] = old + h
            up = f()
            flat[i] = old - h
            down = f()
            flat[i] = old
            numeric[j] = (up - down) / (2 * h)
        an = analytic[name].reshape(-1)[idx]
        # Error of the central difference: roundoff ~ eps64 * |L| / h ~ 2.2e-16 * 2.5 / 1e-6
        # ~ 6e-10 (a few times that from the forward pass' own rounding) plus truncation
        # h^2/6 * |L'''| ~ 1e-12; 1e-7 absolute leaves > 30x margin, while a wrong
        # backward pass is off by O(|gradient|) ~ 1e-3..1e-1.
        np.testing.assert_allclose(numeric, an, rtol=1e-6, atol=1e-7, err_msg=name)
        assert np.abs(analytic[name]).max() > 1e-4, name  # not a vacuous comparison


def test_dropout_is_inverted_and_train_only():
    model = T.MLP((20, 400, 300, 4), dropout=0.2, seed=0)
    x = np.random.default_rng(0).random((50, 20), dtype=np.float32)
    a = model.forward(x)
    np.testing.assert_array_equal(a, model.forward(x))  # inference: deterministic, no dropout
    model.forward(x, train=True, rng=np.random.default_rng(0))
    mask = model._cache[1][2]
    kept = mask != 0
    # Kept units are scaled by 1/(1-p) = 1.25 exactly in float32; dropped ones are 0.
    assert set(np.unique(mask).tolist()) == {0.0, np.float32(1.25)}
    # 50 x 400 Bernoulli(0.8) draws: the kept fraction is 0.8 +- 5 sigma (sigma = sqrt(.16/20000) = 0.0028).
    assert abs(kept.mean() - 0.8) < 5 * math.sqrt(0.16 / kept.size)


def test_model_layout_and_init():
    model = T.MLP((784, 64, 128, 10))
    assert list(model.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert [p.shape for p in model.params.values()] == [(784, 64), (64,), (64, 128), (128,), (128, 10), (10,)]
    for k, p in model.params.items():
        assert p.dtype == np.float32 and p.flags.c_contiguous and p.flags.writeable
        assert model.grads[k].shape == p.shape and model.grads[k].dtype == np.float32
    assert model.n_params == 784 * 64 + 64 + 64 * 128 + 128 + 128 * 10 + 10
    # He-normal: std sqrt(2/784) = 0.0505; over 50,176 draws the sample std is within 2%.
    assert np.std(model.params["W1"]) == pytest.approx(math.sqrt(2 / 784), rel=0.02)
    assert not np.any(model.params["b1"])
    twin = model.copy()
    for k in model.params:
        np.testing.assert_array_equal(twin.params[k], model.params[k])
        assert not np.shares_memory(twin.params[k], model.params[k])


# ---------------------------------------------------------------- training runs


def _run(data, *, epochs, seed=0, name="adam", lr=None, schedule="constant", **opt_kwargs):
    model = T.MLP((data.n_features, 64, 128, data.n_classes), 0.2, seed=seed)
    spe = math.ceil(len(data.y_train) / 32)
    rate = T.make_schedule(schedule, lr if lr is not None else T.DEFAULT_LR[name], epochs=epochs, steps_per_epoch=spe)
    opt = T.make_optimizer(name, model.params, rate, **opt_kwargs)
    history = T.train(model, opt, data, epochs=epochs, seed=seed)
    return model, opt, history


def test_digits_data(digits):
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.x_train.dtype == np.float32 and digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    # Stratified: every class keeps its share (~36 of each in the test set).
    assert np.bincount(digits.y_test, minlength=10).min() >= 35


def test_adam_reaches_stated_accuracy_on_digits(digits):
    """Adam, lr 1e-3, batch 32, seed 0, 15 epochs: observed test accuracy 0.961
    (346/360; init seeds 1-3 give 0.964-0.969). Required: >= 0.94, a margin of 7
    test images for BLAS/platform differences in the last bits."""
    _, opt, h = _run(digits, epochs=15)
    assert len(h.test_acc) == 15 and h.updates == 15 * 45
    assert all(s["step"] == 15 * 45 for s in opt.state)
    assert h.test_acc[-1] >= 0.94, h.test_acc
    assert h.train_loss[-1] < h.train_loss[0] / 5  # observed 1.68 -> 0.13
    assert h.epochs_to(0.90) is not None and h.epochs_to(0.90) <= 6  # observed: epoch 3
    assert 0 < h.step_time < h.wall_time


def test_training_is_bitwise_reproducible(digits):
    m1, _, h1 = _run(digits, epochs=3, seed=5)
    m2, _, h2 = _run(digits, epochs=3, seed=5)
    for k in m1.params:
        assert m1.params[k].tobytes() == m2.params[k].tobytes(), k
    assert h1.train_loss == h2.train_loss and h1.test_acc == h2.test_acc
    m3, _, _ = _run(digits, epochs=3, seed=6)
    assert any(m1.params[k].tobytes() != m3.params[k].tobytes() for k in m1.params)


@pytest.mark.parametrize("name", ["adamw", "sgd", "momentum"])
def test_other_optimizers_learn(digits, name):
    if not T.optimizer_available(name):
        pytest.skip("adamcpp.SGD is not available")
    _, opt, h = _run(digits, epochs=4, name=name)
    # After 4 epochs at the default rates every optimizer is above 0.85 (observed 0.92-0.94).
    assert h.test_acc[-1] >= 0.85, h.test_acc
    if name == "momentum":
        assert opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("schedule", T.SCHEDULES)
def test_schedules_drive_the_rate(digits, schedule):
    _, opt, h = _run(digits, epochs=3, schedule=schedule)
    lr = opt.param_groups[0]["lr"]
    total = 3 * 45
    if schedule == "constant":
        assert lr == 1e-3
    else:
        assert isinstance(lr, adamcpp.schedules.Schedule)
        assert h.lr_at_end[-1] == lr(total)
    if schedule in ("cosine", "warmup-cosine"):
        assert h.lr_at_end[-1] == 0.0  # decayed to exactly 0 at the end of the run
    if schedule == "warmup-cosine":
        # Warmup: one epoch (45 updates) capped at 10% of the run (135 // 10 = 13 updates).
        assert lr == adamcpp.schedules.WarmupCosineDecay(1e-3, 13, 135)
        assert lr(0) == 0.0 and lr(13) == 1e-3
    if schedule == "step":
        assert lr == adamcpp.schedules.StepDecay(1e-3, 45, 0.2)  # x0.2 every third of 3 epochs
    assert h.test_acc[-1] > 0.5


def test_clip_norm_is_wired(digits):
    if not T.supports_clipping("adam"):
        pytest.skip("max_grad_norm is not available")
    model = T.MLP((64, 64, 128, 10), seed=0)
    opt = T.make_optimizer("adam", model.params, 1e-3, max_grad_norm=0.5)
    model.loss_and_grad(digits.x_train[:32], digits.y_train[:32])
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in model.grads.values()))
    opt.step(model.grads)
    # Both sides sum the same 13,770 float32 squares in double, in different orders:
    # relative difference <= n * eps64 ~ 3e-12.
    assert opt.last_grad_norm == pytest.approx(norm, rel=1e-9)


def test_npz_data_and_input_size_follow_the_file(tmp_path, digits):
    # An MNIST-style file: uint8 images (N, 8, 8) in 0..255.
    path = tmp_path / "tiny.npz"
    to_u8 = lambda x: np.round(x * 255).astype(np.uint8).reshape(-1, 8, 8)  # noqa: E731
    np.savez(path, x_train=to_u8(digits.x_train), y_train=digits.y_train, x_test=to_u8(digits.x_test), y_test=digits.y_test)
    data = T.load_data(str(path))
    assert data.n_features == 64 and data.n_classes == 10 and data.name == "tiny.npz"
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    # 8-bit rounding of [0, 1] pixels: within half a step of 1/255.
    np.testing.assert_allclose(data.x_train, digits.x_train, rtol=0, atol=0.5 / 255 + 1e-7)
    _, _, h = _run(data, epochs=2)
    assert h.test_acc[-1] > 0.8
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="missing"):
        T.load_data(str(bad))


def test_progress_bar(digits, capsys):
    model = T.MLP((64, 64, 128, 10), seed=0)
    opt = T.make_optimizer("adam", model.params, 1e-3)
    T.train(model, opt, digits, epochs=1, name="demo", progress=True)
    out, err = capsys.readouterr()
    # tqdm on stderr, redrawn in place and erased at the end of the epoch; nothing on stdout
    assert "demo   1/1" in err and "/45" in err and "\n" not in err and err.endswith("\r")
    assert out == ""
    T.train(model, opt, digits, epochs=1, name="demo", progress=False)
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------ command line


def test_cli_single_run_summary(digits, capsys, restore_threads):
    assert T.main(["--epochs", "2", "--quiet", "--threads", "1", "--schedule", "cosine"]) == 0
    out = capsys.readouterr()
    assert "Summary" in out.out and "test accuracy" in out.out and "inside opt.step" in out.out
    assert "epoch   1/2" not in out.out  # --quiet: no per-epoch lines
    assert out.err == ""  # not a TTY: no progress bar
    assert adamcpp.get_num_threads() == 1


def test_cli_compare_table(digits, capsys):
    assert T.main(["--compare", "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(adam|adamw|sgd|momentum)\s+(\S+)\s+([01]\.\d{4})\s+([01]\.\d{4})\s+(\S+)\s+(\S+)\s+(\S+)$", out, re.M)
    expected = [n for n in T.OPTIMIZERS if T.optimizer_available(n)]
    assert [r[0] for r in rows] == expected, out
    for name, lr, final, best, _, wall, step in rows:
        assert float(lr) == T.DEFAULT_LR[name]
        assert 0.5 < float(final) <= float(best) and 0 < float(step) < float(wall)


@pytest.mark.parametrize("precision", list(T.ALL_PRECISIONS))
def test_precisions_train_and_store_what_they_say(digits, precision):
    """--precision: the parameters, gradients and Adam state have the
    precision's dtypes, and a short run learns."""
    pytest.importorskip("ml_dtypes")
    dtype = T.precision_dtype(precision)
    model = T.MLP((digits.n_features, 16, 10), 0.0, seed=1).astype(dtype)
    opt = T.make_optimizer("adam", model.params, 3e-3, precision=precision, seed=1)
    h = T.train(model, opt, digits, epochs=3, seed=1)
    assert h.train_loss[-1] < 0.6 * h.train_loss[0]
    options = T.ALL_PRECISIONS[precision][1]
    state = opt.state[0]
    assert model.params["W1"].dtype == dtype and model.grads["W1"].dtype == dtype
    assert state["exp_avg"].dtype.name == ("bfloat16" if options.get("state_dtype") == "bfloat16" else "float32")
    assert ("master_param" in state) == (dtype.itemsize == 2 and options.get("master_weights", True))
    assert T.bytes_per_parameter(precision) == {"fp32": 16, "bf16-state": 12, "bf16-master": 12, "bf16": 8,
                                                "bf16-state-nearest": 12, "bf16-nearest": 8}[precision]


def test_cli_compare_precision_table(digits, capsys):
    pytest.importorskip("ml_dtypes")
    assert T.main(["--compare-precision", "--seeds", "2", "--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^(\S+)\s+(\d+)\s+(\d\.\d{5})\s+(\d\.\d{5})\s+(\d\.\d{5})\s+(\d+\.\d\d)x\s+([01]\.\d{4})$", out, re.M)
    assert [r[0] for r in rows] == list(T.ALL_PRECISIONS), out
    assert rows[0][5] == "1.00"  # fp32 is the reference
    for name, nbytes, l0, l1, mean, ratio, acc in rows:
        assert int(nbytes) == T.bytes_per_parameter(name)
        assert float(mean) == pytest.approx((float(l0) + float(l1)) / 2, abs=1e-5)


def test_cli_precision_errors(capsys):
    for argv, message in [
        (["--precision", "bf16", "--optimizer", "sgd"], "Adam/AdamW option"),
        (["--compare-precision", "--optimizer", "momentum"], "use --optimizer adam or adamw"),
        (["--compare-precision", "--seeds", "0"], "--seeds"),
        (["--compare-precision", "--compare"], "choose one"),
    ]:
        with pytest.raises(SystemExit):
            T.main(argv)
        assert message in capsys.readouterr().err


def test_cli_plot(digits, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "curves.png"
    assert T.main(["--epochs", "2", "--quiet", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_sgd_fails_clearly(monkeypatch, capsys):
    monkeypatch.delattr(adamcpp, "SGD", raising=False)
    with pytest.raises(SystemExit) as exc:
        T.main(["--optimizer", "sgd", "--epochs", "1"])
    assert exc.value.code == 2
    assert "needs adamcpp.SGD" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="needs adamcpp.SGD"):
        T.make_optimizer("momentum", T.MLP().params, 0.01)


def test_cli_compare_without_sgd_skips_it(monkeypatch, capsys, digits):
    monkeypatch.delattr(adamcpp, "SGD", raising=False)
    assert T.main(["--compare", "--epochs", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "skipped, adamcpp.SGD not available: sgd, momentum" in out


def test_cli_clip_norm_without_support_fails_clearly(monkeypatch, capsys):
    class AdamWithoutClipping(adamcpp.Adam):
        def __init__(self, params, lr=1e-3):
            super().__init__(params, lr)

    monkeypatch.setattr(adamcpp, "Adam", AdamWithoutClipping)
    with pytest.raises(SystemExit) as exc:
        T.main(["--clip-norm", "1.0", "--epochs", "1"])
    assert exc.value.code == 2
    assert "max_grad_norm" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--clip-norm", "nan"], "--clip-norm"),
        (["--compare", "--lr", "0.1"], "--lr"),
        (["--threads", "0"], "--threads"),
        (["--dropout", "1.0"], "--dropout"),
    ],
)
def test_cli_rejects_bad_arguments(argv, message, capsys, restore_threads):
    with pytest.raises(SystemExit) as exc:
        T.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err



def test_cli_reports_optimizer_errors(digits, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--weight-decay", "-1", "--epochs", "1"])
    assert exc.value.code == 2
    assert "weight_decay" in capsys.readouterr().err


# ------------------------------------------------------------- save and resume


def _same_checkpoint(a, b, where="checkpoint"):
    """Two checkpoints hold the same values, arrays bit for bit (wall times aside)."""
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k not in ("wall_time", "step_time"):
                _same_checkpoint(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_checkpoint(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(digits, tmp_path, monkeypatch, capsys):
    """4 epochs with a cosine schedule (the rate depends on the position) and dropout
    (the generator's state matters), straight through; against the same command
    killed right after its checkpoint of epoch 2, then run again with --resume."""
    argv = ["--epochs", "4", "--schedule", "cosine", "--quiet"]
    straight, broken = tmp_path / "straight.safetensors", tmp_path / "broken.safetensors"
    assert T.main([*argv, "--save", str(straight)]) == 0

    class Killed(BaseException):
        pass

    real_save = adamcpp.save

    def save_then_die(checkpoint, path):
        real_save(checkpoint, path)
        if checkpoint["trainer"]["epoch"] == 2:
            raise Killed

    monkeypatch.setattr(adamcpp, "save", save_then_die)
    with pytest.raises(Killed):
        T.main([*argv, "--save", str(broken)])
    monkeypatch.setattr(adamcpp, "save", real_save)
    halfway = adamcpp.load(broken)
    assert halfway["trainer"]["epoch"] == 2 and halfway["state"][0]["step"] == 2 * 45
    capsys.readouterr()

    assert T.main([*argv, "--save", str(broken), "--resume", str(broken)]) == 0
    assert f"resumed    {broken} after epoch 2/4" in capsys.readouterr().out
    done, resumed = adamcpp.load(straight), adamcpp.load(broken)
    assert resumed["trainer"]["epoch"] == 4 and len(resumed["trainer"]["history"]["test_acc"]) == 4
    _same_checkpoint(done, resumed)  # parameters, optimizer state, schedule, generator, curves


def test_resume_sensitivity_to_the_generator(digits, tmp_path):
    """What --resume restores matters: from the same epoch-2 checkpoint, continuing with
    the saved generator reproduces the uninterrupted run; a fresh generator does not."""
    spe = 45
    model = T.MLP((64, 64, 128, 10), 0.2, seed=0)
    opt = T.make_optimizer("adam", model.params, T.make_schedule("cosine", 1e-3, epochs=4, steps_per_epoch=spe))
    rng = T.training_rng(0)
    path = tmp_path / "ck.safetensors"
    saves = {}

    def on_epoch(e, h):
        if e == 2:
            T.save_checkpoint(str(path), model, opt, rng, h, e, {"note": "test"})
            saves["at"] = e

    T.train(model, opt, digits, epochs=4, rng=rng, on_epoch=on_epoch)
    assert saves == {"at": 2}
    final = {k: v.copy() for k, v in model.params.items()}

    def resume(fresh_generator):
        m = T.MLP((64, 64, 128, 10), 0.2, seed=99)  # other initial values: all come from the file
        o = T.make_optimizer("adam", m.params, 0.5)
        epoch, g, h, config = T.load_checkpoint(str(path), m, o)
        assert (epoch, config) == (2, {"note": "test"}) and len(h.test_acc) == 2
        T.train(m, o, digits, epochs=4, rng=T.training_rng(0) if fresh_generator else g, history=h, start_epoch=epoch)
        assert len(h.test_acc) == 4
        return m.params

    restored = resume(False)
    assert all(restored[k].tobytes() == final[k].tobytes() for k in final)
    fresh = resume(True)
    assert any(fresh[k].tobytes() != final[k].tobytes() for k in final)


def test_constant_rate_runs_may_be_extended(digits, tmp_path, capsys):
    """With a constant rate --epochs may grow on resume: 2 epochs, then resumed to 3,
    equal 3 epochs straight."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert T.main(["--epochs", "3", "--quiet", "--save", str(a)]) == 0
    assert T.main(["--epochs", "2", "--quiet", "--save", str(b)]) == 0
    assert T.main(["--epochs", "3", "--quiet", "--save", str(b), "--resume", str(b)]) == 0
    _same_checkpoint(adamcpp.load(a), adamcpp.load(b))


def test_resume_refuses_what_it_cannot_continue(digits, tmp_path, capsys):
    path = tmp_path / "ck.safetensors"
    assert T.main(["--epochs", "1", "--quiet", "--schedule", "cosine", "--save", str(path)]) == 0
    capsys.readouterr()
    cases = [
        (["--compare", "--save", str(path)], "not to --compare"),
        (["--resume", str(tmp_path / "missing.safetensors")], "no checkpoint file"),
        (["--resume", str(path), "--schedule", "cosine", "--optimizer", "adamw"], "optimizer 'adam', this run has 'adamw'"),
        (["--resume", str(path), "--schedule", "cosine", "--epochs", "2"], "epochs 1, this run has 2"),
        (["--resume", str(path)], "schedule 'cosine', this run has 'constant'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            T.main(["--quiet", "--epochs", "1", *argv] if "--epochs" not in argv else ["--quiet", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(SystemExit):
        T.main(["--epochs", "1", "--schedule", "cosine", "--resume", str(path)])
    assert "checksum mismatch" in capsys.readouterr().err
    plain = tmp_path / "plain.safetensors"
    adamcpp.save(adamcpp.Adam([np.zeros(2, np.float32)]).state_dict(), plain)
    with pytest.raises(SystemExit):
        T.main(["--epochs", "1", "--resume", str(plain)])
    assert "not a train_mlp.py checkpoint" in capsys.readouterr().err
