import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from sktda import EnsembleAttributor, FilteredEstimator, OutlierGradientDetector

from .conftest import InputShapeSetter, make_classifier_net

EXPECTED_FAILURES = {
    "EnsembleAttributor": {},
    "OutlierGradientDetector": {
        check: "the detector trains a supervised net on (X, y) and scores loss gradients at the "
        "given labels, so fit(X) without y has nothing to learn from"
        for check in ("check_outliers_train", "check_outliers_fit_predict")
    },
    "FilteredEstimator": {},
}


def _net():
    return make_classifier_net(max_epochs=2, callbacks=[InputShapeSetter()])


ESTIMATORS = [
    EnsembleAttributor(_net(), proj_dim=16, score_n_subsets=3, random_state=0),
    OutlierGradientDetector(_net(), n_checkpoints=2, random_state=0),
    FilteredEstimator(
        LogisticRegression(), OutlierGradientDetector(_net(), n_checkpoints=None, random_state=0)
    ),
]


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=lambda est: EXPECTED_FAILURES[type(est).__name__])
def test_sklearn_compatible(estimator, check):
    check(estimator)


imblearn_checks = pytest.importorskip("imblearn.utils.estimator_checks").parametrize_with_checks

# imbalanced-learn's own checks of a sampler (and of a classifier, for anything with
# predict), with the reason of every check expected to fail
IMBLEARN_EXPECTED_FAILURES = {
    "check_samplers_pandas_sparse": "sparse inputs are refused with a TypeError that names .toarray(): "
    "per-sample gradients need dense tensors (input_tags.sparse is False, so the plain sparse check is "
    "not run; this one runs on every DataFrame-taking sampler)",
    **{
        check: "imbalanced-learn runs its classifier checks on anything with predict, and the "
        "detector's predict flags outliers (+1 / -1), as scikit-learn's outlier detectors do: it is "
        "not a classifier of y"
        for check in (
            "check_classifier_on_multilabel_or_multioutput_targets",
            "check_classifiers_with_encoded_labels",
        )
    },
}


@imblearn_checks(
    [OutlierGradientDetector(_net(), n_checkpoints=2, random_state=0)],
    expected_failed_checks=lambda est: IMBLEARN_EXPECTED_FAILURES,
)
def test_imblearn_sampler_compatible(estimator, check):
    check(estimator)
