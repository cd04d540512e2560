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
