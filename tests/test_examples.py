"""The runnable examples: the model module they share (examples/mlp.py: gradient check against finite differences,
dropout, a stable softmax, the data), and every script run as a user runs it, in a subprocess: quickstart.py,
train_mlp.py (accuracy, bitwise reproducibility, command line) and train_mlp_resume.py (a run killed after a
checkpoint and resumed ends with the bits of an uninterrupted one; what it refuses). No example script is imported.
train_mlp_mpi.py runs under mpiexec in tests/test_distributed.py; bench/mlp_study.py in tests/test_mlp_study.py."""

from __future__ import annotations

import itertools
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
import mlp  # noqa: E402  (the model module, written to be imported; the scripts beside it are not)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return mlp.load_data(seed=0)


def run_example(script: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
    )


# ------------------------------------------------------------------ quickstart


def test_quickstart_runs_and_loss_falls():
    proc = run_example("quickstart.py")
    assert proc.returncode == 0, proc.stderr
    losses = [float(m) for m in re.findall(r"^step\s+\d+\s+loss (\S+)$", proc.stdout, flags=re.M)]
    assert len(losses) >= 4, proc.stdout
    # Zero-initialised softmax regression over 3 classes starts at exactly ln 3.
    assert losses[0] == pytest.approx(math.log(3), abs=5e-5)  # printed with 4 decimals
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    # Observed: 1.0986 -> 0.1257 (overlapping blobs keep it above 0); require a 5x drop.
    assert losses[-1] < losses[0] / 5
    assert "training accuracy" in proc.stdout


# ---------------------------------------------------------- mlp.py: the numerics


def test_softmax_cross_entropy_matches_definition_and_is_stable():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 10))
    labels = rng.integers(0, 10, size=6)
    loss, dlogits = mlp.softmax_cross_entropy(logits.copy(), labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # Same float64 quantity by the textbook formula; a few roundings on O(1) values.
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(6), labels])), rel=1e-14)
    onehot = np.eye(10)[labels]
    np.testing.assert_allclose(dlogits, (p - onehot) / 6, rtol=0, atol=1e-15)
    # Huge logits: no overflow (filterwarnings=error would turn a RuntimeWarning into a failure).
    big = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], dtype=np.float32)
    loss, dlogits = mlp.softmax_cross_entropy(big, np.array([1, 0]))
    assert math.isfinite(loss) and np.isfinite(dlogits).all()
    assert loss == pytest.approx((1e4 + math.log(2)) / 2, rel=1e-6)  # float32 logits, float32 arithmetic


def _loss_fn(model, x, y, dropout_seed):
    """The training loss as a function of the parameters, with a fixed dropout mask:
    re-seeding the rng for every evaluation draws the same mask (same shapes)."""

    def f():
        rng = None if dropout_seed is None else np.random.default_rng(dropout_seed)
        logits = model.forward(x, train=True, rng=rng)
        model.cache = []
        return mlp.softmax_cross_entropy(logits, y)[0]

    return f


@pytest.mark.parametrize("dropout_seed", [None, 7], ids=["dropout-off", "fixed-dropout-mask"])
@pytest.mark.parametrize(
    "sizes,per_tensor", [((12, 9, 11, 5), None), ((64, 64, 128, 10), 60)], ids=["small-all", "article-sampled"]
)
def test_backward_matches_finite_differences(sizes, per_tensor, dropout_seed):
    """Central differences in float64 against MLP.backward, at every entry (small
    model) or at `per_tensor` random entries of each tensor (the article's sizes)."""
    rng = np.random.default_rng(1)
    model = mlp.MLP(sizes, dropout=0.2, seed=3, dtype=np.float64)
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
    kink_distance = min(np.abs(z).min() for _, z, _ in model.cache[:-1])
    model.cache = []
    h = 1e-6
    assert kink_distance > 1e3 * h

    f = _loss_fn(model, x, y, dropout_seed)
    for name, p in model.params.items():
        flat = p.reshape(-1)
        if per_tensor is None:
            idx = np.arange(flat.size)
        else:
            idx = rng.choice(flat.size, min(per_tensor, flat.size), replace=False)
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
    model = mlp.MLP((20, 400, 300, 4), dropout=0.2, seed=0)
    x = np.random.default_rng(0).random((50, 20), dtype=np.float32)
    a = model.forward(x)
    np.testing.assert_array_equal(a, model.forward(x))  # inference: deterministic, no dropout
    model.forward(x, train=True, rng=np.random.default_rng(0))
    mask = model.cache[1][2]
    kept = mask != 0
    # Kept units are scaled by 1/(1-p) = 1.25 exactly in float32; dropped ones are 0.
    assert set(np.unique(mask).tolist()) == {0.0, np.float32(1.25)}
    # 50 x 400 Bernoulli(0.8) draws: the kept fraction is 0.8 +- 5 sigma (sigma = sqrt(.16/20000) = 0.0028).
    assert abs(kept.mean() - 0.8) < 5 * math.sqrt(0.16 / kept.size)
    model.forward(x)  # inference caches nothing
    with pytest.raises(RuntimeError, match="training forward pass first"):
        model.backward(np.zeros((50, 4), np.float32))


def test_model_layout_and_init():
    model = mlp.MLP((784, 64, 128, 10))
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
    for bad, message in [(dict(sizes=(3,)), "at least"), (dict(dropout=1.0), "dropout")]:
        with pytest.raises(ValueError, match=message):
            mlp.MLP(**bad)


def test_batches_cover_every_sample_once():
    parts = list(mlp.batches(100, 32, np.random.default_rng(0)))
    assert [len(b) for b in parts] == [32, 32, 32, 4]
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    again = list(mlp.batches(100, 32, np.random.default_rng(0)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_digits_data(digits):
    assert digits.x_train.shape == (1437, 64) and digits.x_test.shape == (360, 64)
    assert digits.x_train.dtype == np.float32 and digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    # Stratified: every class keeps its share (~36 of each in the test set).
    assert np.bincount(digits.y_test, minlength=10).min() >= 35


def _to_npz(path, data):
    """An MNIST-style file: uint8 images (N, 8, 8) in 0..255."""
    to_u8 = lambda x: np.round(x * 255).astype(np.uint8).reshape(-1, 8, 8)  # noqa: E731
    np.savez(path, x_train=to_u8(data.x_train), y_train=data.y_train, x_test=to_u8(data.x_test), y_test=data.y_test)


def test_npz_data(tmp_path, digits):
    path = tmp_path / "tiny.npz"
    _to_npz(path, digits)
    data = mlp.load_data(str(path))
    assert data.n_features == 64 and data.n_classes == 10 and data.name == "tiny.npz"
    assert data.x_train.dtype == np.float32 and data.x_train.flags.c_contiguous
    # 8-bit rounding of [0, 1] pixels: within half a step of 1/255.
    np.testing.assert_allclose(data.x_train, digits.x_train, rtol=0, atol=0.5 / 255 + 1e-7)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="missing"):
        mlp.load_data(str(bad))


# ------------------------------------------------------------------ train_mlp.py

_EPOCH = re.compile(r"^epoch\s+(\d+)/(\d+)  loss (\S+)  test loss (\S+)  test acc (\S+)$", re.M)


def _digest(out: str) -> str:
    (digest,) = re.findall(r"^  weights   sha256 ([0-9a-f]{16}) ", out, re.M)
    return digest


def test_train_mlp_reaches_the_readme_accuracy(digits):
    """README's first command: Adam, lr 1e-3, batch 32, seed 0, 50 epochs. Observed test accuracy 0.9722
    (first above 95% at epoch 11, 0.961 at epoch 15; seeds 0-7 all end >= 0.97). Required: >= 0.96 at the
    end and >= 0.94 at epoch 15, margins of 4 and 7 test images for BLAS/platform differences in the last bits."""
    proc = run_example("train_mlp.py")
    assert proc.returncode == 0, proc.stderr
    epochs = [(int(e), float(loss), float(acc)) for e, total, loss, _, acc in _EPOCH.findall(proc.stdout)]
    assert [e for e, _, _ in epochs] == list(range(1, 51)), proc.stdout
    losses, accs = [loss for _, loss, _ in epochs], [acc for _, _, acc in epochs]
    assert accs[-1] >= 0.96 and accs[14] >= 0.94, accs
    assert losses[-1] < losses[0] / 5  # observed 1.68 -> 0.03
    assert min(e for e, _, a in epochs if a >= 0.90) <= 6  # observed: epoch 3
    assert f"test accuracy {accs[-1]:.4f}" in proc.stdout and "95% test accuracy first at epoch" in proc.stdout
    assert "inside opt.step" in proc.stdout and "for 2,250 updates" in proc.stdout  # 50 x ceil(1437 / 32)
    assert proc.stderr == ""


def test_train_mlp_is_bitwise_reproducible(digits):
    """The same seed gives the same bits, whatever adamcpp's thread count; another seed other bits."""
    one = run_example("train_mlp.py", "--epochs", "3", "--seed", "5", "--quiet", "--threads", "1")
    two = run_example("train_mlp.py", "--epochs", "3", "--seed", "5", "--quiet", "--threads", "2")
    other = run_example("train_mlp.py", "--epochs", "3", "--seed", "6", "--quiet")
    for proc in (one, two, other):
        assert proc.returncode == 0, proc.stderr
    assert "1 thread(s)" in one.stdout and "2 thread(s)" in two.stdout
    assert _digest(one.stdout) == _digest(two.stdout) != _digest(other.stdout)
    final = lambda out: re.findall(r"^  final .*$", out, re.M)  # noqa: E731
    assert final(one.stdout) == final(two.stdout) != final(other.stdout)
    assert not _EPOCH.search(one.stdout) and one.stderr == ""  # --quiet: the summary only


def test_train_mlp_on_an_npz_file(tmp_path, digits):
    _to_npz(tmp_path / "tiny.npz", digits)
    proc = run_example("train_mlp.py", "--data", tmp_path / "tiny.npz", "--epochs", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "data       tiny.npz (1,437 train / 360 test, 64 features, 10 classes)" in proc.stdout
    assert float(re.search(r"test accuracy (\S+)", proc.stdout).group(1)) > 0.8
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((2, 4)))
    proc = run_example("train_mlp.py", "--data", tmp_path / "bad.npz")
    assert proc.returncode == 2 and "missing array(s)" in proc.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--threads", "0"], "--threads"),
        (["--dropout", "1.0"], "--dropout"),
    ],
)
def test_train_mlp_rejects_bad_arguments(argv, message):
    proc = run_example("train_mlp.py", *argv)
    assert proc.returncode == 2, proc.stdout
    assert message in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------- train_mlp_resume.py

# Runs train_mlp_resume.py as a user would, but dies (os._exit: no cleanup, like a kill) right after the
# checkpoint of epoch argv[2] is written. argv: examples/, the epoch, then the script's arguments.
_KILLED_AFTER = """
import os, runpy, sys
import adamcpp
examples, epoch, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_save = adamcpp.save
def save(checkpoint, path):
    real_save(checkpoint, path)
    if checkpoint["trainer"]["epoch"] == epoch:
        os._exit(9)
adamcpp.save = save
sys.path.insert(0, examples)
sys.argv = [os.path.join(examples, "train_mlp_resume.py"), *args]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _same_checkpoint(a, b, where="checkpoint"):
    """Two checkpoints hold the same values, arrays bit for bit."""
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same_checkpoint(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_checkpoint(x, y, f"{where}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def test_resumed_run_matches_an_uninterrupted_one_bit_for_bit(digits, tmp_path):
    """4 epochs with a cosine schedule (the rate depends on the position) and dropout (the generator's
    state matters), straight through; against the same command killed right after its checkpoint of
    epoch 2, then run again with --resume. Then the generator's part: the same checkpoint resumed with
    a fresh generator in place of the saved one ends elsewhere."""
    argv = ["--epochs", "4", "--schedule", "cosine", "--quiet"]
    straight, broken = tmp_path / "straight.safetensors", tmp_path / "broken.safetensors"
    assert run_example("train_mlp_resume.py", *argv, "--checkpoint", straight).returncode == 0
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER, str(EXAMPLES), "2", *argv, "--checkpoint", str(broken)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
    )
    assert killed.returncode == 9, killed.stderr
    halfway = adamcpp.load(broken)
    assert halfway["trainer"]["epoch"] == 2 and halfway["state"][0]["step"] == 2 * 45
    fresh = tmp_path / "fresh.safetensors"
    halfway["trainer"]["rng"] = mlp.training_rng(0).bit_generator.state
    adamcpp.save(halfway, fresh)

    proc = run_example("train_mlp_resume.py", *argv, "--checkpoint", broken, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resumed    {broken} after epoch 2/4" in proc.stdout
    done, resumed = adamcpp.load(straight), adamcpp.load(broken)
    assert resumed["trainer"]["epoch"] == 4 and len(resumed["trainer"]["curves"]["test_acc"]) == 4
    _same_checkpoint(done, resumed)  # parameters, optimizer state, schedule, generator, curves
    assert straight.read_bytes() == broken.read_bytes()

    assert run_example("train_mlp_resume.py", *argv, "--checkpoint", fresh, "--resume").returncode == 0
    elsewhere = adamcpp.load(fresh)["model"]
    assert any(elsewhere[k].tobytes() != done["model"][k].tobytes() for k in done["model"])


def test_constant_rate_runs_may_be_extended(digits, tmp_path):
    """With a constant rate --epochs may grow on resume: 2 epochs, then resumed to 3, equal 3 epochs straight."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert run_example("train_mlp_resume.py", "--epochs", "3", "--quiet", "--checkpoint", a).returncode == 0
    assert run_example("train_mlp_resume.py", "--epochs", "2", "--quiet", "--checkpoint", b).returncode == 0
    proc = run_example("train_mlp_resume.py", "--epochs", "3", "--checkpoint", b, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert "epoch   3/3" in proc.stdout and "epoch   2/3" not in proc.stdout
    _same_checkpoint(adamcpp.load(a), adamcpp.load(b))


def test_resume_refuses_what_it_cannot_continue(digits, tmp_path):
    path = tmp_path / "ck.safetensors"
    first = run_example("train_mlp_resume.py", "--epochs", "1", "--schedule", "cosine", "--checkpoint", path)
    assert first.returncode == 0, first.stderr
    before = path.read_bytes()
    cases = [
        (["--checkpoint", tmp_path / "missing.safetensors"], "no checkpoint file"),
        (["--checkpoint", path, "--schedule", "cosine", "--epochs", "2"], "epochs 1, this run has 2"),
        (["--checkpoint", path, "--epochs", "1"], "schedule 'cosine', this run has 'constant'"),
        (["--checkpoint", path, "--schedule", "cosine", "--epochs", "1", "--seed", "1"], "seed 0, this run has 1"),
        (["--checkpoint", path, "--epochs", "0"], "--epochs"),
    ]
    for argv, message in cases:
        proc = run_example("train_mlp_resume.py", "--resume", *argv)
        assert proc.returncode == 2, argv
        assert message in proc.stderr, (argv, proc.stderr)
    assert path.read_bytes() == before  # a refused resume writes nothing
    damaged = bytearray(before)
    damaged[-1] ^= 1
    path.write_bytes(bytes(damaged))
    proc = run_example("train_mlp_resume.py", "--epochs", "1", "--schedule", "cosine", "--checkpoint", path, "--resume")
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr
    plain = tmp_path / "plain.safetensors"
    adamcpp.save(adamcpp.Adam([np.zeros(2, np.float32)]).state_dict(), plain)
    proc = run_example("train_mlp_resume.py", "--epochs", "1", "--checkpoint", plain, "--resume")
    assert proc.returncode == 2 and "not a train_mlp_resume.py checkpoint" in proc.stderr
