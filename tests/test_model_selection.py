import numpy as np
import pytest
import torch

import sktda.model_selection as ms
from sktda._nets import fit_net
from sktda.model_selection import subset_retraining

from .conftest import make_classifier_net, make_regressor_net


def test_subsets_and_outputs_are_nets_retrained_on_each_subset(digits, monkeypatch):
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=2)
    seeds = []
    real = ms._subset_outputs
    monkeypatch.setattr(
        ms, "_subset_outputs", lambda *a: seeds.append(a[7]) or real(*a)
    )  # a = (estimator, task, X, y, mask, X_test, y_test, seed, device)
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=4, subset_fraction=0.4, random_state=1
    )
    assert truth.subsets.shape == (4, len(X_train)) and truth.subsets.dtype == bool
    np.testing.assert_array_equal(truth.subsets.sum(1), round(0.4 * len(X_train)))
    assert len({tuple(s) for s in truth.subsets}) == 4
    # every row of outputs is the correct-class margin of a net trained on that subset alone
    task = ms.check_net(net)
    for s in (0, 3):
        mask = truth.subsets[s]
        net_s = fit_net(
            net, X_train[mask], y_train[mask], seed=int(seeds[s]), device=torch.device("cpu"), task=task
        )
        with torch.no_grad():
            logits = net_s.module_(torch.from_numpy(X_test))
        margin, _ = task.target_and_residual(logits, torch.from_numpy(y_test))
        np.testing.assert_allclose(truth.outputs[s], margin.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(truth.outputs[0], truth.outputs[3])


def test_regressor_outputs_are_predictions(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    net = make_regressor_net()
    truth = subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets=3, random_state=0)
    # the target does not depend on y_test: the same outputs for any y_test
    ms._CACHE.clear()
    other = subset_retraining(
        net, X_train, y_train, X_test, np.zeros_like(y_test), n_subsets=3, random_state=0
    )
    np.testing.assert_array_equal(truth.outputs, other.outputs)


def test_diverging_subset_models_are_refused(digits):
    X_train, X_test, y_train, y_test = digits
    with pytest.raises(ValueError, match="training diverged"):
        subset_retraining(make_classifier_net(lr=1e12), X_train, y_train, X_test, y_test, n_subsets=3)


def test_non_finite_subset_outputs_are_refused(digits, monkeypatch):
    X_train, X_test, y_train, y_test = digits
    monkeypatch.setattr(ms, "_subset_outputs", lambda *a: np.full(len(X_test), np.inf))
    with pytest.raises(ValueError, match="subset 0 gives non-finite outputs"):
        subset_retraining(make_classifier_net(max_epochs=1), X_train, y_train, X_test, y_test, n_subsets=3)


def test_cached_and_reproducible(digits, monkeypatch, tmp_path):
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=2)
    kwargs = dict(n_subsets=3, random_state=0)
    first = subset_retraining(net, X_train, y_train, X_test, y_test, **kwargs)
    calls = []
    monkeypatch.setattr(ms, "_subset_outputs", lambda *a, **k: calls.append(1) or np.zeros(len(X_test)))
    again = subset_retraining(net, X_train, y_train, X_test, y_test, **kwargs)
    assert calls == [] and again.outputs is first.outputs
    # a different net configuration is a different ground truth
    subset_retraining(make_classifier_net(max_epochs=3), X_train, y_train, X_test, y_test, **kwargs)
    assert len(calls) == 3
    monkeypatch.undo()
    ms._CACHE.clear()
    cached = subset_retraining(net, X_train, y_train, X_test, y_test, memory=str(tmp_path), **kwargs)
    np.testing.assert_allclose(cached.outputs, first.outputs, rtol=1e-6)
    ms._CACHE.clear()
    monkeypatch.setattr(ms, "_subset_outputs", lambda *a, **k: calls.append(1) or np.zeros(len(X_test)))
    from_disk = subset_retraining(net, X_train, y_train, X_test, y_test, memory=str(tmp_path), **kwargs)
    np.testing.assert_allclose(from_disk.outputs, first.outputs, rtol=1e-6)
    assert len(calls) == 3


def test_parallel_equals_sequential(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    net = make_regressor_net()
    seq = subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets=4, random_state=5)
    ms._CACHE.clear()
    par = subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets=4, random_state=5, n_jobs=2)
    np.testing.assert_allclose(seq.outputs, par.outputs, rtol=1e-5, atol=1e-6)


def test_bad_input(digits):
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=1)
    with pytest.raises(ValueError, match="n_subsets"):
        subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets=2)
    with pytest.raises(ValueError, match="subset_fraction"):
        subset_retraining(net, X_train, y_train, X_test, y_test, subset_fraction=1.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        subset_retraining(net, X_train[:3], y_train[:3], X_train[:3], y_train[:3], subset_fraction=0.2)
    with pytest.raises(ValueError, match="same per-sample shape"):
        subset_retraining(net, X_train, y_train, X_test[:, :5], y_test)
    with pytest.raises(ValueError, match="one target per sample"):
        subset_retraining(net, X_train, y_train[:-1], X_test, y_test)
    with pytest.raises(ValueError, match="not in the training data"):
        subset_retraining(net, X_train[y_train < 5], y_train[y_train < 5], X_test, y_test)
    with pytest.raises(TypeError, match="skorch"):
        subset_retraining(object(), X_train, y_train, X_test, y_test)
    with pytest.raises(ValueError, match="one label per sample"):
        subset_retraining(net, X_train, np.stack([y_train, y_train], 1), X_test, y_test)
    with pytest.raises(ValueError, match="n_subsets"):
        subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets="3")


def test_grid_search_over_strategies_retrains_each_fold_once(digits, monkeypatch):
    from sklearn.model_selection import GridSearchCV

    from sktda import EnsembleAttributor
    from sktda.model_selection import best_under_budget, cost_scorer, lds_scorer

    X_train, _, y_train, _ = digits
    ms._CACHE.clear()
    calls = []
    real = ms._subset_outputs
    monkeypatch.setattr(ms, "_subset_outputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    attr = EnsembleAttributor(
        make_classifier_net(max_epochs=2), proj_dim=32, score_n_subsets=4, random_state=0
    )
    grid = {"ensemble": ["independent", "dropout"], "n_masks": [2]}
    search = GridSearchCV(attr, grid, cv=2).fit(X_train, y_train)
    assert len(calls) == 2 * 4  # two folds, four subsets each; shared by both candidates
    assert set(search.cv_results_["param_ensemble"]) == {"independent", "dropout"}
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    best = np.argmax(search.cv_results_["mean_test_score"])
    assert search.best_params_ == search.cv_results_["params"][best]
    assert {"mean_fit_time", "mean_score_time"} <= set(search.cv_results_)

    scoring = {"lds": lds_scorer, "train_seconds": cost_scorer("train_seconds")}
    budget = GridSearchCV(attr, grid, cv=2, scoring=scoring, refit=best_under_budget(1e9)).fit(
        X_train, y_train
    )
    assert len(calls) == 2 * 4  # still cached
    best = np.argmax(budget.cv_results_["mean_test_lds"])
    assert budget.best_index_ == best
    cheapest = GridSearchCV(attr, grid, cv=2, scoring=scoring, refit=best_under_budget(0.0)).fit(
        X_train, y_train
    )
    assert cheapest.best_index_ == np.argmin(cheapest.cv_results_["mean_test_train_seconds"])


def test_cost_scorer_rejects_unknown_costs():
    from sktda.model_selection import cost_scorer

    with pytest.raises(ValueError, match="cost must be one of"):
        cost_scorer("gpu_hours")


def test_outputs_measure_the_target_in_test_mode_and_a_lambda_target_works(digits, tmp_path):
    """A callable target is what the outputs measure (in training mode the loss would
    be); a lambda, which pickle cannot find, is computed without the cache."""
    X_train, X_test, y_train, y_test = digits
    kwargs = dict(n_subsets=3, random_state=0, memory=str(tmp_path))
    net = make_classifier_net(max_epochs=1)
    constant = subset_retraining(
        net, X_train, y_train, X_test, y_test, target=lambda out, y: out[:, 0] * 0 + 7, **kwargs
    )
    np.testing.assert_array_equal(constant.outputs, 7.0)
    third = subset_retraining(
        net, X_train, y_train, X_test, y_test, target=lambda out, y: out[:, 3], **kwargs
    )
    assert third.outputs.shape == (3, len(X_test)) and np.ptp(third.outputs) > 0
    assert list(tmp_path.iterdir()) == []  # nothing cached on disk for an unpicklable target

    from sktda import EnsembleAttributor

    attr = EnsembleAttributor(
        net, target=lambda out, y: out[:, 3], proj_dim=16, score_n_subsets=3, random_state=0
    )
    assert -1 <= attr.fit(X_train, y_train).score(X_test, y_test) <= 1
