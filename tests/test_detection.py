import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sktda import FilteredEstimator, OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split

from .conftest import make_classifier_net, make_regressor_net


@pytest.fixture(scope="module")
def noisy_digits():
    X, X_test, y, y_test = load_digits_split(n_train=300, n_test=100, random_state=1)
    y_noisy, flipped = flip_labels(y, 0.2, random_state=0)
    return X, X_test, y_noisy, y_test, flipped


def _net(**kwargs):
    return make_classifier_net(**{"max_epochs": 15, "module__hidden": (32,), "lr": 0.1, **kwargs})


@pytest.fixture(scope="module")
def fitted(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    return OutlierGradientDetector(_net(), contamination=0.2, random_state=0).fit(X, y_noisy)


def test_outlier_contract(fitted, noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    assert fitted.train_scores_.shape == (len(X),)
    assert abs(np.mean(fitted.labels_ == -1) - 0.2) <= 1 / len(X)
    np.testing.assert_allclose(fitted.score_samples(X, y_noisy), fitted.train_scores_, rtol=1e-5)
    np.testing.assert_allclose(
        fitted.decision_function(X, y_noisy), fitted.train_scores_ - fitted.offset_, rtol=1e-5
    )
    np.testing.assert_array_equal(fitted.predict(X, y_noisy), fitted.labels_)
    assert set(np.unique(fitted.labels_)) == {-1, 1}
    assert set(fitted.costs_) == {"train_seconds", "featurize_seconds", "detect_seconds"}
    assert len(fitted.detectors_) == 4  # one per checkpoint (the default 4)


def test_finds_flipped_labels(fitted, noisy_digits):
    *_, flipped = noisy_digits
    assert roc_auc_score(flipped, -fitted.train_scores_) > 0.9


def test_l2_score_is_the_loss_gradient_norm(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    det = OutlierGradientDetector(
        _net(max_epochs=3), detector="l2", layers="last", n_checkpoints=None, random_state=0
    ).fit(X, y_noisy)
    module = det.estimators_[0].module_.eval()
    norms = []
    for x, label in zip(torch.from_numpy(X[:10]), torch.from_numpy(y_noisy[:10])):
        loss = torch.nn.functional.cross_entropy(module(x[None]), label[None])
        grads = torch.autograd.grad(loss, list(module.layers[-1].parameters()))
        norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))
    np.testing.assert_allclose(-det.train_scores_[:10], norms, rtol=1e-4)


def test_predicted_labels_when_y_is_none(fitted, noisy_digits):
    _, X_test, _, _, _ = noisy_digits
    with torch.no_grad():
        probs = fitted.estimators_[0].module_.eval()(torch.from_numpy(X_test)).softmax(-1)
    predicted = fitted.classes_[probs.argmax(-1).numpy()]
    np.testing.assert_allclose(
        fitted.score_samples(X_test), fitted.score_samples(X_test, predicted), rtol=1e-6
    )
    assert fitted.predict(X_test).shape == (len(X_test),)


def test_reproducible(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    kwargs = dict(detector="iforest", n_checkpoints=2, random_state=3)
    a = OutlierGradientDetector(_net(max_epochs=4), **kwargs).fit(X, y_noisy).train_scores_
    b = OutlierGradientDetector(_net(max_epochs=4), **kwargs).fit(X, y_noisy).train_scores_
    np.testing.assert_array_equal(a, b)


def test_detectors_and_auto_contamination(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    common = dict(n_checkpoints=None, random_state=0)
    l2 = OutlierGradientDetector(_net(), detector="l2", contamination="auto", **common).fit(X, y_noisy)
    assert l2.offset_ == pytest.approx(_otsu_reference(l2.train_scores_))
    l1 = OutlierGradientDetector(_net(max_epochs=4), detector="l1", **common).fit(X, y_noisy)
    assert np.all(-l1.train_scores_ >= -l2.train_scores_ - 1e-6)  # |g|_1 >= |g|_2
    lof = OutlierGradientDetector(_net(max_epochs=4), detector=LocalOutlierFactor(novelty=True), **common)
    assert lof.fit(X, y_noisy).train_scores_.shape == (len(X),)
    per_class = OutlierGradientDetector(_net(max_epochs=4), detector="iforest", per_class=True, **common)
    per_class.fit(X, y_noisy)
    assert set(per_class.detectors_[0]) == set(range(10))


def _otsu_reference(scores):
    """The cut between consecutive distinct scores with the largest between-group
    variance, by brute force."""
    s = np.unique(scores)
    cuts = (s[:-1] + s[1:]) / 2
    variance = [
        np.mean(scores < c)
        * np.mean(scores >= c)
        * (scores[scores < c].mean() - scores[scores >= c].mean()) ** 2
        for c in cuts
    ]
    return cuts[int(np.argmax(variance))]


def test_auto_contamination_is_otsus_threshold(noisy_digits):
    """contamination="auto" cuts the scores where the two groups are most separated:
    exactly a planted group of outliers, and on mislabeled digits about the noise."""
    from sktda._scoring import otsu_offset as _otsu_offset

    rng = np.random.default_rng(0)
    planted = np.concatenate([rng.normal(0, 1, 900), rng.normal(-12, 1, 100)])
    assert _otsu_offset(planted) == pytest.approx(_otsu_reference(planted))
    assert np.array_equal(planted < _otsu_offset(planted), np.arange(1000) >= 900)
    ties = np.repeat([-3.0, 0.0, 1.0], [2, 5, 5])
    assert _otsu_offset(ties) == pytest.approx(_otsu_reference(ties)) == -1.5
    assert _otsu_offset(np.zeros(5)) == 0.0  # nothing to split, nothing below
    X, _, y_noisy, _, flipped = noisy_digits
    auto = OutlierGradientDetector(_net(), contamination="auto", random_state=0)
    majority = np.concatenate([rng.normal(0, 1, 700), rng.normal(12, 1, 300)])
    assert np.mean(majority < auto._offset(majority)) == 0.5  # outliers are never the majority
    auto.fit(X, y_noisy)
    flagged = auto.labels_ == -1
    assert 0.1 < flagged.mean() < 0.35 and flipped[flagged].mean() > 0.5  # 20% of the labels flipped


def test_fit_resample_that_empties_a_class_warns_and_names_it(noisy_digits):
    """Three digits labelled 'rare', the class's only samples, are all flagged. By
    default the smallest class is not cleaned (as imbalanced-learn's cleaning
    samplers' "auto"); with sampling_strategy="all" the samples go, with a warning
    naming the class."""
    X, _, y_noisy, _, _ = noisy_digits
    y = y_noisy.astype(str)
    y[:3] = "rare"
    det = OutlierGradientDetector(_net(module__n_outputs=11), contamination=0.3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X_kept, y_kept = det.fit_resample(X, y)
    assert (det.labels_[:3] == -1).all() and list(y_kept).count("rare") == 3
    assert "rare" not in det.sampling_strategy_
    det.set_params(sampling_strategy="all")
    with pytest.warns(UserWarning, match=r"removes every training sample of class\(es\) \['rare'\]"):
        X_kept, y_kept = det.fit_resample(X, y)
    assert "rare" not in set(y_kept) and len(y_kept) == len(det.sample_indices_)
    np.testing.assert_array_equal(det.sample_indices_, np.flatnonzero(det.labels_ == 1))
    np.testing.assert_array_equal(X_kept, X[det.sample_indices_])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class keeps samples: no warning
        det.set_params(contamination=0.001).fit_resample(X, y)  # one sample flagged


@pytest.mark.parametrize(
    "strategy",
    ["auto", "all", "majority", "not minority", "not majority", [3, 5], "callable"],
)
def test_sampling_strategy_chooses_the_classes_cleaned(noisy_digits, strategy):
    X, _, y_noisy, _, _ = noisy_digits
    counts = dict(zip(*np.unique(y_noisy, return_counts=True)))
    smallest, largest = min(counts, key=counts.get), max(counts, key=counts.get)
    expected = {
        "auto": set(counts) - {smallest},
        "not minority": set(counts) - {smallest},
        "all": set(counts),
        "majority": {largest},
        "not majority": set(counts) - {largest},
        "callable": {0, 1},
    }.get(strategy if isinstance(strategy, str) else "", {3, 5})
    given = (lambda y: [0, 1]) if strategy == "callable" else strategy
    det = OutlierGradientDetector(
        _net(max_epochs=3), n_checkpoints=None, sampling_strategy=given, random_state=0
    )
    X_kept, y_kept = det.fit_resample(X, y_noisy)
    assert set(det.sampling_strategy_) == expected
    assert set(det.sampling_strategy_.values()) == {counts[smallest]}
    keep = (det.labels_ == 1) | ~np.isin(y_noisy, sorted(expected))
    np.testing.assert_array_equal(det.sample_indices_, np.flatnonzero(keep))
    np.testing.assert_array_equal(y_kept, y_noisy[keep])
    with pytest.raises(ValueError, match=r"names the classes \[42\]"):
        det.set_params(sampling_strategy=[42]).fit(X, y_noisy)


def test_sampler_outputs_feature_names_and_refuses_sparse_inputs(noisy_digits):
    import scipy.sparse

    X, _, y_noisy, _, _ = noisy_digits
    det = OutlierGradientDetector(_net(max_epochs=2), n_checkpoints=None, random_state=0)
    X_kept, y_kept = det.set_output(transform="pandas").fit_resample(X, y_noisy)
    assert isinstance(X_kept, pd.DataFrame) and list(X_kept.columns) == [f"x{i}" for i in range(X.shape[1])]
    np.testing.assert_array_equal(X_kept.to_numpy(), X[det.sample_indices_])
    np.testing.assert_array_equal(det.get_feature_names_out(), X_kept.columns)
    frame = pd.DataFrame(X, columns=[f"pixel{i}" for i in range(X.shape[1])])
    X_kept, _ = det.set_output(transform="default").fit_resample(frame, y_noisy)
    np.testing.assert_array_equal(det.get_feature_names_out(), frame.columns)
    with pytest.raises(TypeError, match=r"toarray\(\)"):
        det.fit_resample(scipy.sparse.csr_matrix(X), y_noisy)


def test_sampler_outputs_polars(noisy_digits):
    pl = pytest.importorskip("polars")
    X, _, y_noisy, _, _ = noisy_digits
    det = OutlierGradientDetector(_net(max_epochs=2), n_checkpoints=None, random_state=0)
    X_kept, _ = det.set_output(transform="polars").fit_resample(X, y_noisy)
    assert isinstance(X_kept, pl.DataFrame) and X_kept.columns == [f"x{i}" for i in range(X.shape[1])]
    np.testing.assert_array_equal(X_kept.to_numpy(), X[det.sample_indices_])


def test_bad_input(noisy_digits, regression_data):
    X, X_test, y_noisy, _, _ = noisy_digits
    with pytest.raises(ValueError, match="contamination"):
        OutlierGradientDetector(_net(), contamination=0.7).fit(X, y_noisy)
    with pytest.raises(TypeError, match="detector.*'fit' and 'score_samples'"):
        OutlierGradientDetector(_net(max_epochs=1), detector=KMeans(2), n_checkpoints=None).fit(X, y_noisy)
    with pytest.raises(ValueError, match="detector"):
        OutlierGradientDetector(_net(), detector="svm").fit(X, y_noisy)
    with pytest.raises(TypeError, match="skorch"):
        OutlierGradientDetector(LogisticRegression()).fit(X, y_noisy)
    X_r, _, y_r, _ = regression_data
    with pytest.raises(ValueError, match="per_class"):
        OutlierGradientDetector(make_regressor_net(), per_class=True).fit(X_r, y_r)
    det = OutlierGradientDetector(_net(max_epochs=1), n_checkpoints=None).fit(
        X[y_noisy < 9], y_noisy[y_noisy < 9]
    )
    with pytest.raises(ValueError, match="not in the training data"):
        det.predict(X, y_noisy)
    with pytest.raises(ValueError, match="NaN"):
        det.predict(np.full_like(X_test, np.nan))


def test_regressor(regression_data):
    X, _, y, _ = regression_data
    y = y.copy()
    y[:5] += 10  # gross target errors
    det = OutlierGradientDetector(
        make_regressor_net(max_epochs=10), detector="l2", contamination=0.1, random_state=0
    ).fit(X, y)
    assert set(np.flatnonzero(det.labels_ == -1)) >= {0, 1, 2, 3, 4}


def test_fit_resample_and_imblearn_pipeline(noisy_digits):
    from imblearn.pipeline import Pipeline

    X, X_test, y_noisy, y_test, flipped = noisy_digits
    det = OutlierGradientDetector(_net(), contamination=0.2, random_state=0)
    frame = pd.DataFrame(X)
    X_kept, y_kept = det.fit_resample(frame, pd.Series(y_noisy))
    assert isinstance(X_kept, pd.DataFrame) and isinstance(y_kept, pd.Series)
    np.testing.assert_array_equal(X_kept.index, det.sample_indices_)
    assert flipped[det.sample_indices_].mean() < flipped.mean() / 2  # most flips are gone
    pipe = Pipeline([("filter", det), ("clf", LogisticRegression(max_iter=1000))]).fit(X, y_noisy)
    assert pipe.predict(X_test).shape == (len(X_test),)
    assert pipe.named_steps["filter"].labels_.shape == (len(X),)


def test_filtered_estimator_in_sklearn_tools(noisy_digits):
    X, X_test, y_noisy, y_test, _ = noisy_digits
    det = OutlierGradientDetector(_net(), contamination=0.2, sampling_strategy="all", random_state=0)
    model = make_pipeline(StandardScaler(), FilteredEstimator(LogisticRegression(max_iter=1000), det))
    model.fit(X, y_noisy)
    filtered = model[-1]
    assert filtered.n_removed_ == 60
    np.testing.assert_array_equal(filtered.classes_, np.arange(10))
    assert filtered.predict_proba(X_test).shape == (len(X_test), 10)
    assert model.score(X_test, y_test) == filtered.estimator_.score(
        StandardScaler().fit(X).transform(X_test), y_test
    )
    scores = cross_validate(FilteredEstimator(LogisticRegression(max_iter=1000), det), X, y_noisy, cv=2)
    assert scores["test_score"].shape == (2,)
    grid = GridSearchCV(
        FilteredEstimator(LogisticRegression(max_iter=1000), det),
        {"detector__contamination": [0.1, 0.2]},
        cv=2,
    ).fit(X, y_noisy)
    best = np.argmax(grid.cv_results_["mean_test_score"])
    assert grid.best_params_ == grid.cv_results_["params"][best]
    assert grid.best_estimator_.n_removed_ == round(grid.best_params_["detector__contamination"] * len(X))
    with pytest.raises(TypeError, match="fit_resample"):
        FilteredEstimator(LogisticRegression(), detector=StandardScaler()).fit(X, y_noisy)
    # without a detector the skorch net filters its own training set
    own = FilteredEstimator(_net(max_epochs=5)).fit(X, y_noisy)
    assert own.n_removed_ == len(X) - len(own.detector_.sample_indices_)


def test_per_class_detectors_are_fitted_on_their_class_only(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    det = OutlierGradientDetector(
        _net(max_epochs=3),
        detector=LocalOutlierFactor(n_neighbors=5, novelty=True),
        layers="last",
        per_class=True,
        n_checkpoints=None,
        random_state=0,
    ).fit(X, y_noisy)
    module = det.estimators_[0].module_.eval()
    G = []
    for x, label in zip(torch.from_numpy(X), torch.from_numpy(y_noisy)):
        loss = torch.nn.functional.cross_entropy(module(x[None]), label[None])
        grads = torch.autograd.grad(loss, list(module.layers[-1].parameters()))
        G.append(torch.cat([g.reshape(-1) for g in grads]))
    G = torch.stack(G).numpy()
    for c in (0, 7):
        rows = np.flatnonzero(y_noisy == c)
        expected = LocalOutlierFactor(n_neighbors=5, novelty=True).fit(G[rows]).score_samples(G[rows])
        np.testing.assert_allclose(det.train_scores_[rows], expected, rtol=1e-3)
        assert det.detectors_[0][c].n_samples_fit_ == len(rows)


def test_non_finite_detector_scores_are_refused(noisy_digits):
    from sklearn.base import BaseEstimator

    class Broken(BaseEstimator):
        def fit(self, G):
            return self

        def score_samples(self, G):
            return np.full(len(G), np.nan)

    X, _, y_noisy, _, _ = noisy_digits
    with pytest.raises(ValueError, match="outlier scores are not finite"):
        OutlierGradientDetector(_net(max_epochs=1), detector=Broken(), n_checkpoints=None).fit(X, y_noisy)


def test_filtered_estimator_routes_sample_weight_to_the_kept_samples(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    weights = np.linspace(0.5, 2.0, len(X))
    det = OutlierGradientDetector(_net(max_epochs=3), contamination=0.2, n_checkpoints=None, random_state=0)
    model = FilteredEstimator(LogisticRegression(max_iter=300), det).fit(X, y_noisy, sample_weight=weights)
    kept = model.detector_.sample_indices_
    expected = LogisticRegression(max_iter=300).fit(X[kept], y_noisy[kept], sample_weight=weights[kept])
    np.testing.assert_allclose(model.estimator_.coef_, expected.coef_, rtol=1e-6)
    unweighted = FilteredEstimator(LogisticRegression(max_iter=300), det).fit(X, y_noisy)
    assert not np.allclose(unweighted.estimator_.coef_, expected.coef_)


def test_filtered_estimator_validates_its_parameters(noisy_digits):
    X, _, y_noisy, _, _ = noisy_digits
    with pytest.raises(TypeError, match="estimator.*'fit'"):
        FilteredEstimator("logreg").fit(X, y_noisy)


def test_filtered_estimator_refuses_a_sample_weight_of_the_wrong_length_before_training(
    noisy_digits, monkeypatch
):
    import sktda._ensembles as ensembles

    X, _, y_noisy, _, _ = noisy_digits
    monkeypatch.setattr(ensembles, "fit_net", lambda *a, **k: pytest.fail("trained before the check"))
    model = FilteredEstimator(LogisticRegression(), OutlierGradientDetector(_net(max_epochs=1)))
    with pytest.raises(ValueError, match=f"sample_weight has {len(X) - 1} entries but y has {len(X)}"):
        model.fit(X, y_noisy, sample_weight=np.ones(len(X) - 1))
