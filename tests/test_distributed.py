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

    # two threads per worker, as real clusters run: sktda's tasks must not disturb each
    # other (torch's global generator and thread count, the modules' hooks)
    cluster = LocalCluster(
        n_workers=2, threads_per_worker=2, host="127.0.0.1", dashboard_address=None, processes=True
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


# ---------------------------------------------------- features kept on the workers
@pytest.fixture
def many_shards(monkeypatch):
    """Shards of a few rows each, so that every reduction crosses shards and workers."""
    import sktda._features

    monkeypatch.setattr(sktda._features, "SHARD_BYTES", 2**12)


@pytest.mark.parametrize("method", ["trak", "ekfac", "tracin"])
def test_features_kept_on_the_workers_give_the_local_results_bit_for_bit(client, digits, many_shards, method):
    import pickle

    from joblib import parallel_config
    from sklearn.base import clone

    from sktda._cluster import ClusterShards

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(),
        method=method,
        n_models=2,
        n_checkpoints=2,
        proj_dim=32,
        batch_size=16,
        random_state=0,
    )
    local = clone(attr).fit(X_train, y_train)
    with parallel_config(backend="dask"):
        remote = clone(attr).fit(X_train, y_train)
    shards = remote._store.shards
    assert isinstance(shards, ClusterShards) and len(shards.ranges) > 4
    assert not isinstance(remote.train_features_, np.ndarray)  # a lazy dask array
    np.testing.assert_array_equal(remote.train_features_.compute(), local.train_features_)
    np.testing.assert_array_equal(remote.train_residuals_, local.train_residuals_)
    np.testing.assert_array_equal(remote.attribute(X_test, y_test), local.attribute(X_test, y_test))
    np.testing.assert_array_equal(remote.self_attribute(), local.self_attribute())
    for got, expected in zip(
        remote.most_influential(X_test, y_test, k=7, return_std=True),
        local.most_influential(X_test, y_test, k=7, return_std=True),
    ):
        np.testing.assert_array_equal(got, expected)
    groups = np.arange(len(X_train)) % 4  # group sums are added across shards in the same tree
    for got, expected in zip(
        remote.attribute(X_test, y_test, groups=groups, return_std=True),
        local.attribute(X_test, y_test, groups=groups, return_std=True),
    ):
        np.testing.assert_array_equal(got, expected)
    copy = pickle.loads(pickle.dumps(remote))  # a copy outlives the cluster: it holds the features
    assert isinstance(copy.train_features_, np.ndarray)
    np.testing.assert_array_equal(copy.attribute(X_test, y_test), local.attribute(X_test, y_test))


def test_a_dask_array_is_read_by_the_workers_and_never_copied(client, digits, many_shards):
    import os

    import dask.array as da
    from joblib import parallel_config
    from sklearn.base import clone

    X_train, X_test, y_train, y_test = digits
    driver = os.getpid()

    def rows(block, block_info=None):
        # the driver reads the first rows alone (to check the module on them)
        if os.getpid() == driver and block_info[None]["chunk-location"][0] > 0:
            raise AssertionError("the driver read training rows beyond the first chunk")
        return block

    X_dask = da.from_array(X_train, chunks=32).map_blocks(rows, dtype=X_train.dtype)
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    local = clone(attr).fit(X_train, y_train)
    with parallel_config(backend="dask"):
        remote = clone(attr).fit(X_dask, y_train)
    assert remote.retraining_.X.name == X_dask.astype(np.float32).name  # a reference, not a copy
    assert remote.n_features_in_ == X_train.shape[1]
    np.testing.assert_array_equal(remote.attribute(X_test, y_test), local.attribute(X_test, y_test))
    np.testing.assert_array_equal(
        clone(attr).fit(X_dask, y_train).attribute(X_test, y_test), local.attribute(X_test, y_test)
    )


def test_attribute_stays_on_the_cluster_when_it_would_not_fit_here(client, digits, many_shards, monkeypatch):
    from joblib import parallel_config

    import sktda.attribution

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    with parallel_config(backend="dask"):
        attr.fit(X_train, y_train)
    dense = attr.attribute(X_test, y_test)
    monkeypatch.setattr(sktda.attribution, "dense_fits", lambda n_test, n_train: False)
    lazy = attr.attribute(X_test, y_test)
    assert not isinstance(lazy, np.ndarray) and lazy.shape == dense.shape
    np.testing.assert_array_equal(lazy.compute(), dense)


def test_cluster_features_is_refused_without_a_dask_backend_or_with_a_features_dir(digits, tmp_path):
    from joblib import parallel_config

    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16, cluster_features=True)
    with pytest.raises(ValueError, match="no Dask backend is active"):
        attr.fit(X_train, y_train)
    with pytest.raises(ValueError, match="features_dir"), parallel_config(backend="dask"):
        attr.set_params(features_dir=str(tmp_path)).fit(X_train, y_train)
    assert not hasattr(attr, "ensemble_")


def _both_workers(client) -> None:
    """Wait for the cluster's two workers (a killed one is restarted by its nanny),
    within a limit: a worker that never comes back fails the test, not the run."""
    client.wait_for_workers(2, timeout=180)


def _kill(client, worker) -> None:
    import os
    import signal

    os.kill(client.run(os.getpid, workers=[worker])[worker], signal.SIGKILL)


def test_a_worker_killed_while_featurizing_changes_nothing(client, digits, many_shards):
    """The tasks of a lost worker are rerun, and its shards recomputed from their
    lineage (the members and the rows they were featurized from), bit for bit."""
    import threading
    import time

    import torch
    from joblib import parallel_config
    from sklearn.base import clone
    from torch.utils.data import Dataset

    X_train, X_test, y_train, y_test = digits

    class SlowRows(Dataset):
        """A few milliseconds per item, so that a featurizing task is still running
        when the test looks for it (defined here: the workers unpickle it by value)."""

        targets = y_train

        def __len__(self):
            return len(X_train)

        def __getitem__(self, i):
            time.sleep(0.005)
            return torch.from_numpy(X_train[i]), int(y_train[i])

    rows = SlowRows()
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    with parallel_config(backend="dask"):
        expected = clone(attr).fit(X_train, y_train).attribute(X_test, y_test)
    _both_workers(client)
    result = {}

    def fit():
        with parallel_config(backend="dask"):
            result["A"] = clone(attr).fit(rows).attribute(X_test, y_test)

    thread = threading.Thread(target=fit)
    thread.start()
    deadline, busy = time.monotonic() + 120, []
    while not busy and time.monotonic() < deadline:
        busy = [
            w for w, keys in client.processing().items() if any("_featurize_block" in str(k) for k in keys)
        ]
        time.sleep(0.005)
    assert busy, "no worker ever featurized"
    _kill(client, busy[0])
    thread.join(timeout=300)
    assert not thread.is_alive()
    np.testing.assert_array_equal(result["A"], expected)


def test_a_worker_lost_before_scoring_has_its_shards_recomputed(client, digits, many_shards):
    from joblib import parallel_config
    from sklearn.base import clone

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    _both_workers(client)
    with parallel_config(backend="dask"):
        expected = clone(attr).fit(X_train, y_train)
        top_expected, A_expected = (
            expected.most_influential(X_test, y_test, k=5),
            expected.attribute(X_test, y_test),
        )
        fitted = clone(attr).fit(X_train, y_train)
    _both_workers(client)
    holders = client.who_has(fitted._store.shards.blocks)
    _kill(client, next(iter(holders.values()))[0])  # a worker holding shards
    with parallel_config(backend="dask"):
        top, A = fitted.most_influential(X_test, y_test, k=5), fitted.attribute(X_test, y_test)
    np.testing.assert_array_equal(A, A_expected)
    for got, want in zip(top, top_expected):
        np.testing.assert_array_equal(got, want)


def test_the_memory_plan_puts_the_features_on_the_workers(client, digits):
    import dask.array as da
    from joblib import parallel_config

    X_train, _, y_train, _ = digits
    n = len(X_train)
    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=64, random_state=0)
    here = attr.plan_memory(X_train, y_train)
    with parallel_config(backend="dask"):
        there = attr.plan_memory(da.from_array(X_train, chunks=50), y_train)
    assert (here.features_on_workers, here.features) == (0, 2 * n * (64 * 4 + 4))
    # the residuals stay here; sktda keeps a reference to a dask array, not a copy
    assert (there.features_on_workers, there.features, there.inputs) == (2 * n * 64 * 4, 2 * n * 4, 0)
    # training, featurizing and the streamed blocks run on the workers
    assert (there.training, there.featurizing, there.working, here.worker) == (0, 0, 0, 0)
    assert there.worker > there.features_on_workers // 2 + here.training // 2  # two workers
    assert there.fit_peak < here.fit_peak


def test_a_dataset_is_read_by_the_workers(client, digits, many_shards):
    """Under the Dask backend the driver reads a Dataset's first items alone (to check
    the module on them); its targets come from its ``targets`` attribute."""
    import os

    import torch
    from joblib import parallel_config
    from sklearn.base import clone
    from torch.utils.data import Dataset

    X_train, X_test, y_train, y_test = digits
    driver = os.getpid()

    class Rows(Dataset):
        targets = y_train

        def __len__(self):
            return len(X_train)

        def __getitem__(self, i):
            if os.getpid() == driver and i >= 8:
                raise AssertionError(f"the driver read training item {i}")
            return torch.from_numpy(X_train[i]), int(y_train[i])

    attr = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=32, batch_size=16, random_state=0)
    expected = clone(attr).fit(X_train, y_train).attribute(X_test, y_test)
    with parallel_config(backend="dask"):
        remote = clone(attr).fit(Rows())
    np.testing.assert_array_equal(remote.attribute(X_test, y_test), expected)


@pytest.mark.parametrize("detector", ["l1", "iforest"])
def test_the_detector_scores_the_workers_shards_as_a_local_fit_does(client, digits, many_shards, detector):
    from joblib import parallel_config
    from sklearn.base import clone

    X_train, X_test, y_train, y_test = digits
    det = OutlierGradientDetector(
        make_classifier_net(), detector=detector, n_models=2, proj_dim=32, random_state=0
    )
    local = clone(det).fit(X_train, y_train)
    with parallel_config(backend="dask"):
        remote = clone(det).fit(X_train, y_train)
    np.testing.assert_array_equal(remote.train_scores_, local.train_scores_)
    np.testing.assert_array_equal(remote.score_samples(X_test, y_test), local.score_samples(X_test, y_test))


def test_tasks_sharing_a_worker_s_threads_give_the_local_results(digits):
    """Two models trained, and shards featurized, in threads of one worker: sktda's
    tasks take turns (torch's generator, its thread count and the modules' hooks are
    the process's), so the results are the local ones bit for bit."""
    from distributed import Client, LocalCluster
    from joblib import parallel_config
    from sklearn.base import clone

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), method="ekfac", n_models=2, proj_dim=32, random_state=0)
    expected = clone(attr).fit(X_train, y_train).attribute(X_test, y_test)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as own,
        parallel_config(backend="dask", client=own),
    ):
        got = clone(attr).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_array_equal(got, expected)


def test_a_dask_array_on_a_one_thread_worker_does_not_deadlock(digits):
    """Training reads its dask array on the worker, waiting on the tasks that compute
    it; a second training task must not hold the worker's only thread meanwhile."""
    import threading

    import dask.array as da
    from distributed import Client, LocalCluster
    from joblib import parallel_config

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=2), n_models=2, proj_dim=16, random_state=0)
    expected = attr.fit(X_train, y_train).attribute(X_test, y_test)
    result = {}
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as own,
    ):

        def fit():
            with parallel_config(backend="dask", client=own):
                result["A"] = attr.fit(da.from_array(X_train, chunks=50), y_train).attribute(X_test, y_test)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "the fit deadlocked on a one-thread worker"
    np.testing.assert_array_equal(result["A"], expected)
