"""joblib's Ray backend (``ray.util.joblib``): the same fit, bit for bit, as in
this process, for both estimators."""

import numpy as np
import pytest
from sklearn.base import clone

from sktda import EnsembleAttributor, OutlierGradientDetector

from .conftest import make_classifier_net

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install sktda[ray])")


@pytest.fixture(scope="module")
def ray_backend():
    from ray.util.joblib import register_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    register_ray()
    yield
    ray.shutdown()


def test_ray_backend_equals_local_run(ray_backend, digits):
    from joblib import parallel_config

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=64, n_jobs=2, random_state=0)
    local = clone(attr).fit(X_train, y_train)
    with parallel_config(backend="ray"):
        remote = clone(attr).fit(X_train, y_train)
        np.testing.assert_array_equal(remote.attribute(X_test, y_test), local.attribute(X_test, y_test))
    np.testing.assert_array_equal(remote.train_features_, local.train_features_)

    det = OutlierGradientDetector(make_classifier_net(), n_checkpoints=2, n_jobs=2, random_state=0)
    expected = clone(det).fit(X_train, y_train).train_scores_
    with parallel_config(backend="ray"):
        np.testing.assert_array_equal(clone(det).fit(X_train, y_train).train_scores_, expected)
