"""The same fit on a local Dask cluster (joblib's dask backend) as in-process."""

import numpy as np
import pytest

from sktda import EnsembleAttributor, OutlierGradientDetector

from .conftest import make_classifier_net

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed (pip install sktda[distributed])"
)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, processes=True
    )
    with Client(cluster) as client:
        yield client
    cluster.close()


def test_dask_cluster_run_equals_local_run(client, digits):
    from joblib import parallel_config

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=64, n_jobs=2, random_state=0)
    local = attr.fit(X_train, y_train).attribute(X_test, y_test)
    with parallel_config(backend="dask"):
        remote = attr.fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-6 * np.abs(local).max())

    det = OutlierGradientDetector(make_classifier_net(), n_checkpoints=2, n_jobs=2, random_state=0)
    local_scores = det.fit(X_train, y_train).train_scores_
    with parallel_config(backend="dask"):
        remote_scores = det.fit(X_train, y_train).train_scores_
    np.testing.assert_allclose(remote_scores, local_scores, rtol=1e-5)
