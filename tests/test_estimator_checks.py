from sklearn.utils.estimator_checks import parametrize_with_checks

from sktda import EnsembleAttributor

from .conftest import InputShapeSetter, make_classifier_net

EXPECTED_FAILURES = {
    "check_methods_subset_invariance": (
        "float32 matrix products round differently for different batch shapes, so "
        "attributions of a subset agree with those of the full batch to ~1e-6 "
        "relative, not to the check's 1e-7"
    ),
}


def _attributor():
    net = make_classifier_net(max_epochs=2, callbacks=[InputShapeSetter()])
    return EnsembleAttributor(net, proj_dim=16, score_n_subsets=3, random_state=0)


@parametrize_with_checks([_attributor()], expected_failed_checks=lambda est: EXPECTED_FAILURES)
def test_sklearn_compatible(estimator, check):
    check(estimator)
