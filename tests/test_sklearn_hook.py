"""scikit-learn's MLPClassifier / MLPRegressor trained by adamcpp through scikit-learn's PRIVATE optimizer hook
(docs/guide.md, "Training a scikit-learn MLP (private API)"). The recipe is the guide's own code block, executed
here, so the tests and the documentation cannot drift apart.

The hook: scikit-learn's private `_fit_stochastic` assigns `self._optimizer = AdamOptimizer(...)` and calls its
`update_params(params, grads)` once per batch; the recipe's mixin catches that assignment with a property and
stores an adamcpp-backed optimizer (`adamcpp.Adam`, eps_style="keras"), which steps scikit-learn's own
`coefs_ + intercepts_` in place. Checked here: the same fit as scikit-learn's Adam to float64 rounding (with a
derived bound, and proof that the comparison catches a wrong beta or the wrong eps form), accuracy on digits,
partial_fit keeping the optimizer, its state and count, arrays replaced under the optimizer (early stopping's
copies, pickling), and the refusals. Skipped without scikit-learn or without docs/guide.md."""

# ruff: noqa: SLF001 -- the subject is scikit-learn's private `_optimizer`: reading it is the point of these tests

from __future__ import annotations

import pickle
import re
import sys
import types
from typing import Iterator

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install scikit-learn)")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import load_diabetes, load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier, MLPRegressor  # noqa: E402

import adamcpp  # noqa: E402
from conftest import source_tree  # noqa: E402

# The comparisons stop at max_iter on purpose; scikit-learn then warns, and warnings are errors here.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

ROOT = source_tree("docs/guide.md")
needs_guide = pytest.mark.skipif(ROOT is None, reason="needs the source tree's docs/guide.md (the recipe lives there)")

UNIT_ROUNDOFF = np.finfo(np.float64).eps / 2  # u = 2**-53


@pytest.fixture(scope="module")
def recipe() -> Iterator[types.ModuleType]:
    """The guide's recipe block, executed in a module of its own."""
    if ROOT is None:
        pytest.skip("needs the source tree's docs/guide.md (the recipe lives there)")
    text = (ROOT / "docs" / "guide.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)
              if "class AdamcppAdamOptimizer" in b]
    assert len(blocks) == 1, "docs/guide.md: expected one python block defining AdamcppAdamOptimizer"
    module = types.ModuleType("sklearn_hook_recipe")
    exec(compile(blocks[0], "docs/guide.md (the scikit-learn recipe)", "exec"), module.__dict__)
    sys.modules[module.__name__] = module  # importable, so that pickle finds the classes
    yield module
    del sys.modules[module.__name__]


def digits():
    x, y = load_digits(return_X_y=True)
    return x / 16.0, y


def weights(est):
    return est.coefs_ + est.intercepts_


def max_difference(a, b) -> float:
    return max(float(np.max(np.abs(p - q))) for p, q in zip(weights(a), weights(b)))


def rounding_bound(steps: int, lr: float, *estimators) -> float:
    """How far two float64 Adam fits may drift apart when they evaluate the same formula in different orders.

    Per update, scikit-learn and adamcpp do the same float64 operations on the same inputs (m; the step size
    lr*sqrt(1-b2^t)/(1-b1^t), computed by both in double with pow and sqrt; m/(sqrt(v)+eps)) except one: v's new
    term is rounded as (1-b2)*(g*g) by scikit-learn and ((1-b2)*g)*g by adamcpp, two roundings apart, so v
    differs by <= 2u relative (u = 2**-53), sqrt(v)+eps by <= 1u and the update by <= 3u of its size. Adam's
    update is at most lr*(1-b1)/sqrt(1-b2) ~ 3.2*lr per element (Kingma & Ba, section 2.1), so <= 10u*lr apart.
    Adding it to p rounds once on each side: <= one spacing of the largest |p| more. Over S updates these add
    up; the next gradients are taken at weights that differ by that much, and over a short run this feedback
    stays small: the factor 2 is its margin. (Over thousands of updates training is chaotic and the feedback
    is not bounded this way, which is why the comparisons run 10-20 epochs.) Largest |p| from the final
    weights of both fits (the weights grow during these fits, so the final ones are the largest).
    """
    largest = max(float(np.max(np.abs(p))) for est in estimators for p in weights(est))
    per_update = float(np.spacing(largest)) + 10 * UNIT_ROUNDOFF * lr
    return 2 * steps * per_update


CLASSIFIER = dict(hidden_layer_sizes=(32,), max_iter=10, random_state=0, tol=0.0)


# -- numerics: the same fit as scikit-learn's own Adam ---------------------------------------------------------


@pytest.mark.parametrize("case", ["classifier", "classifier_early_stopping", "regressor"])
def test_same_fit_as_sklearns_adam(recipe, case):
    if case == "regressor":
        x, y = load_diabetes(return_X_y=True)
        settings = dict(hidden_layer_sizes=(16,), max_iter=20, random_state=0, learning_rate_init=1e-2, tol=0.0)
        ours, theirs = recipe.AdamcppMLPRegressor(**settings), MLPRegressor(**settings)
    else:
        x, y = digits()
        settings = dict(CLASSIFIER)
        if case == "classifier_early_stopping":  # coefs_ are copies of the best weights at the end
            settings.update(early_stopping=True, n_iter_no_change=2, tol=1e-2, learning_rate_init=1e-2, max_iter=15)
        ours, theirs = recipe.AdamcppMLPClassifier(**settings), MLPClassifier(**settings)
    ours.fit(x, y)
    theirs.fit(x, y)

    assert type(theirs._optimizer).__name__ == "AdamOptimizer"  # scikit-learn's own ran on the other side
    assert isinstance(ours._optimizer, recipe.AdamcppAdamOptimizer)
    steps = theirs._optimizer.t
    assert ours._optimizer.t == steps > 0 and ours.n_iter_ == theirs.n_iter_ and ours.t_ == theirs.t_
    assert [s["step"] for s in ours._optimizer.adam.state] == [steps] * len(weights(ours))
    assert all(p.dtype == np.float64 for p in weights(ours))
    if case == "classifier_early_stopping":
        assert ours.validation_scores_ == theirs.validation_scores_
        assert ours.n_iter_ < settings["max_iter"]  # it did stop early

    difference = max_difference(ours, theirs)
    bound = rounding_bound(steps, settings.get("learning_rate_init", 1e-3), ours, theirs)
    print(f"\n{case}: scikit-learn {sklearn.__version__}, {steps} updates: largest difference {difference:.3g}, "
          f"bound {bound:.3g}")
    assert difference <= bound


def test_the_comparison_catches_a_wrong_beta_or_eps_form(recipe, monkeypatch):
    """The bound is tight enough to fail: a beta_1 off by 1e-6, or adamcpp's "torch" eps form (eps added to the
    bias-corrected root) instead of scikit-learn's, moves the weights far beyond it."""
    x, y = digits()
    theirs = MLPClassifier(**CLASSIFIER).fit(x, y)
    right = recipe.AdamcppMLPClassifier(**CLASSIFIER).fit(x, y)
    bound = rounding_bound(theirs._optimizer.t, 1e-3, right, theirs)
    assert max_difference(right, theirs) <= bound

    wrong_beta = recipe.AdamcppMLPClassifier(**CLASSIFIER, beta_1=0.9 + 1e-6).fit(x, y)
    assert max_difference(wrong_beta, theirs) > 1000 * bound

    def torch_form(params, **kwargs):
        return adamcpp.Adam(params, **{**kwargs, "eps_style": "torch"})

    monkeypatch.setitem(recipe.__dict__, "adamcpp", types.SimpleNamespace(Adam=torch_form))
    wrong_eps = recipe.AdamcppMLPClassifier(**CLASSIFIER).fit(x, y)
    assert wrong_eps._optimizer.adam.param_groups[0]["eps_style"] == "torch"
    assert max_difference(wrong_eps, theirs) > 1000 * bound
    print(f"\nbound {bound:.3g}; beta_1 + 1e-6: {max_difference(wrong_beta, theirs):.3g}; "
          f"eps_style='torch': {max_difference(wrong_eps, theirs):.3g}")


# -- accuracy -------------------------------------------------------------------------------------------------


def test_digits_accuracy_matches_sklearns_adam(recipe):
    x, y = digits()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    settings = dict(hidden_layer_sizes=(64,), learning_rate_init=1e-2, max_iter=30, random_state=0)
    ours = recipe.AdamcppMLPClassifier(**settings).fit(x_train, y_train)
    theirs = MLPClassifier(**settings).fit(x_train, y_train)
    acc_ours, acc_theirs = ours.score(x_test, y_test), theirs.score(x_test, y_test)
    print(f"\ndigits test accuracy after {ours.n_iter_} epochs: adamcpp hook {acc_ours:.4f}, "
          f"scikit-learn's adam {acc_theirs:.4f} (scikit-learn {sklearn.__version__})")
    assert acc_ours >= 0.95 and acc_theirs >= 0.95
    assert abs(acc_ours - acc_theirs) <= 1 / len(y_test) + 1e-12  # the fits agree to rounding: one image at most


# -- partial_fit, arrays replaced under the optimizer, pickling -----------------------------------------------


def test_partial_fit_keeps_the_optimizer_its_state_and_count(recipe):
    x, y = digits()
    settings = dict(hidden_layer_sizes=(32,), random_state=0)
    ours, theirs = recipe.AdamcppMLPClassifier(**settings), MLPClassifier(**settings)
    hook = None
    for call in range(3):
        kwargs = {"classes": np.unique(y)} if call == 0 else {}
        ours.partial_fit(x, y, **kwargs)
        theirs.partial_fit(x, y, **kwargs)
        hook = hook or ours._optimizer
        assert ours._optimizer is hook  # made at the first call, kept after it
        assert hook.t == theirs._optimizer.t == 9 * (call + 1)  # 9 batches of 200 per call
        assert [s["step"] for s in hook.adam.state] == [hook.t] * 4
        assert all(p is q for p, q in zip(hook.adam.param_groups[0]["params"], weights(ours)))
        assert max_difference(ours, theirs) <= rounding_bound(hook.t, 1e-3, ours, theirs)
        for mine, sk in zip(hook.ms + hook.vs, theirs._optimizer.ms + theirs._optimizer.vs):  # the moments too
            assert np.allclose(mine, sk, rtol=1e-9, atol=1e-15)

    # Early stopping leaves copies of the best weights in coefs_/intercepts_ at the end of fit: new arrays in
    # the old places. The optimizer follows them, and each place keeps its state, like scikit-learn's m and v.
    for est in (ours, theirs):
        est.coefs_ = [c.copy() for c in est.coefs_]
        est.intercepts_ = [b.copy() for b in est.intercepts_]
        est.partial_fit(x, y)
    assert hook.t == theirs._optimizer.t == 36
    assert all(p is q for p, q in zip(hook.adam.param_groups[0]["params"], weights(ours)))
    assert max_difference(ours, theirs) <= rounding_bound(36, 1e-3, ours, theirs)

    # A pickled model resumes exactly where the original does.
    restored = pickle.loads(pickle.dumps(ours))
    assert restored._optimizer.t == 36
    restored.partial_fit(x, y)
    ours.partial_fit(x, y)
    assert restored._optimizer.t == ours._optimizer.t == 45
    assert max_difference(restored, ours) == 0.0

    fresh = clone(ours)  # scikit-learn's estimator protocol is intact: parameters only, no fitted state
    assert type(fresh) is type(ours) and fresh.get_params() == ours.get_params()
    assert not hasattr(fresh, "_optimizer") and not hasattr(fresh, "coefs_")


def test_warm_start_fit_starts_a_new_optimizer_like_sklearn(recipe):
    x, y = digits()
    settings = dict(hidden_layer_sizes=(32,), max_iter=3, random_state=0, warm_start=True)
    ours, theirs = recipe.AdamcppMLPClassifier(**settings), MLPClassifier(**settings)
    for _ in range(2):
        ours.fit(x, y)
        theirs.fit(x, y)
        assert ours._optimizer.t == theirs._optimizer.t == 27  # a fresh count at every fit, as scikit-learn's
    assert max_difference(ours, theirs) <= rounding_bound(54, 1e-3, ours, theirs)


# -- what the recipe refuses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
def test_other_solvers_are_refused_before_training(recipe, solver):
    x, y = digits()
    for est, call in [(recipe.AdamcppMLPClassifier(solver=solver), "fit"),
                      (recipe.AdamcppMLPRegressor(solver=solver), "fit"),
                      (recipe.AdamcppMLPClassifier(solver=solver), "partial_fit")]:
        with pytest.raises(ValueError, match=f"solver must be 'adam', got '{solver}'"):
            getattr(est, call)(x, y)
        assert not hasattr(est, "coefs_")  # nothing trained


def test_a_changed_private_hook_is_an_error_not_a_silent_fallback(recipe):
    """Were scikit-learn to stop assigning and calling `_optimizer` (a private name), its own Adam would train
    the model; the recipe raises instead of returning a model adamcpp never touched."""

    class Elsewhere(recipe.AdamcppMLPClassifier):
        # Stands in for a scikit-learn whose optimizer no longer goes through the recipe's property.
        @property
        def _optimizer(self):
            try:
                return self.__dict__["_sklearn_optimizer"]
            except KeyError:
                raise AttributeError("_optimizer") from None

        @_optimizer.setter
        def _optimizer(self, optimizer):
            self.__dict__["_sklearn_optimizer"] = optimizer

        @_optimizer.deleter
        def _optimizer(self):
            self.__dict__.pop("_sklearn_optimizer", None)

    x, y = digits()
    with pytest.raises(RuntimeError, match="adamcpp did not train this model"):
        Elsewhere(hidden_layer_sizes=(8,), max_iter=1, random_state=0).fit(x, y)
    with pytest.raises(RuntimeError, match="adamcpp did not train this model"):
        Elsewhere(hidden_layer_sizes=(8,), random_state=0).partial_fit(x, y, classes=np.unique(y))
