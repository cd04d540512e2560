from sklearn.linear_model import LogisticRegression
from sklearn.utils.estimator_checks import parametrize_with_checks

from sktda import EnsembleAttributor, FilteredEstimator, OutlierGradientDetector

from .conftest import InputShapeSetter, make_classifier_net

FLOAT32_ROUNDING = (
    "float32 matrix products round differently for different batch shapes, so results "
    "for a subset agree with those of the full batch to ~1e-6 relative, not to the "
    "check's 1e-7"
)
EXPECTED_FAILURES = {
    "EnsembleAttributor": {"check_methods_subset_invariance": FLOAT32_ROUNDING},
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
