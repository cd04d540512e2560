"""
Training features kept on a Dask cluster
========================================

Inside ``joblib.parallel_config(backend="dask")``, with a ``distributed.Client``,
sktda trains the members on the cluster's workers and keeps the training features
there: each shard of the training set is featurized, stored and scored by the
worker that holds it, and only the residuals, the fitted curvature and the results
come back (see "Clusters" in the Scaling guide). The training set can be a dask
array, which the workers read themselves.

Here the cluster is local (two worker processes on 127.0.0.1); for a real one,
start a scheduler and workers (``dask scheduler``, ``dask worker tcp://HOST:8786``
on each machine, each with sktda and its dependencies installed) and use
``Client("tcp://HOST:8786")``. The results equal those of a fit in this process,
bit for bit::

    pip install -e ".[distributed]"
    python examples/dask_cluster.py
"""

import time

import dask.array as da
import numpy as np
import torch
from distributed import Client, LocalCluster
from joblib import parallel_config
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor
from sktda.datasets import load_digits_split
from sktda.models import MLP

if __name__ == "__main__":
    X_train, X_test, y_train, y_test = load_digits_split(n_train=1000, n_test=100, random_state=0)
    net = NeuralNetClassifier(
        MLP,
        module__n_features=64,
        module__n_outputs=10,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=30,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    attr = EnsembleAttributor(net, method="trak", n_models=4, n_jobs=2, random_state=0)

    start = time.perf_counter()
    local = attr.fit(X_train, y_train).attribute(X_test, y_test)
    print(f"local fit + attribute: {time.perf_counter() - start:.1f} s")

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        with Client(cluster) as client:
            print(f"cluster: {client}")
            # a dask array: each worker reads the rows it featurizes
            X_dask = da.from_array(X_train, chunks=250)
            start = time.perf_counter()
            with parallel_config(backend="dask"):
                attr.fit(X_dask, y_train)
                remote = attr.attribute(X_test, y_test)
                top = attr.most_influential(X_test, y_test, k=5)
            print(f"dask fit + attribute: {time.perf_counter() - start:.1f} s")
            # the features are a lazy dask array of the shards the workers hold
            print(f"train_features_: {attr.train_features_!r}")
            print(f"top-5 proponents of the first test sample: {top.proponents[0]}")

    print(f"largest difference between the two runs: {np.abs(remote - local).max():.2e}")
    assert np.array_equal(remote, local)
