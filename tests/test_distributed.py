"""The same fit, bit for bit, on a local Dask cluster (joblib's dask backend) as
in-process, even when a worker dies mid-fit."""

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
    np.testing.assert_array_equal(remote, local)

    det = OutlierGradientDetector(make_classifier_net(), n_checkpoints=2, n_jobs=2, random_state=0)
    local_scores = det.fit(X_train, y_train).train_scores_
    with parallel_config(backend="dask"):
        remote_scores = det.fit(X_train, y_train).train_scores_
    np.testing.assert_array_equal(remote_scores, local_scores)


def test_a_worker_killed_during_fit_changes_nothing(client, digits):
    """Dask reschedules the tasks of a dead worker; every task is a pure function of
    its seed, so the result is the undisturbed one, bit for bit."""
    import os
    import signal
    import threading
    import time

    from joblib import parallel_config

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(max_epochs=60), n_models=4, proj_dim=64, n_jobs=2, random_state=0
    )
    with parallel_config(backend="dask"):
        undisturbed = attr.fit(X_train, y_train).attribute(X_test, y_test)

    result = {}

    def fit():
        with parallel_config(backend="dask"):
            result["A"] = attr.fit(X_train, y_train).attribute(X_test, y_test)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline = time.monotonic() + 60
    busy = []
    while not busy and time.monotonic() < deadline:
        busy = [worker for worker, tasks in client.processing().items() if tasks]
        time.sleep(0.02)
    assert busy, "no worker ever held a task"
    pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    np.testing.assert_array_equal(result["A"], undisturbed)
