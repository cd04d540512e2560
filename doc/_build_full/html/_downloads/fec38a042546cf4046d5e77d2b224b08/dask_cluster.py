"""
The same EnsembleAttributor fit on a Dask cluster as on this machine
=====================================================================

sktda runs member training and featurization through scikit-learn's joblib
wrapper, so ``joblib.parallel_config(backend="dask")`` sends the jobs to whatever
cluster the active ``dask.distributed.Client`` points at. Here the cluster is
local (two worker processes on 127.0.0.1); for a real one, start a scheduler and
workers (``dask scheduler``, ``dask worker tcp://HOST:8786`` on each machine, each
with sktda and its dependencies installed) and use ``Client("tcp://HOST:8786")``.
Results do not depend on where the jobs ran::

    pip install -e ".[distributed]"
    python examples/dask_cluster.py
"""

import time

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
            start = time.perf_counter()
            with parallel_config(backend="dask"):
                remote = attr.fit(X_train, y_train).attribute(X_test, y_test)
            print(f"dask fit + attribute: {time.perf_counter() - start:.1f} s")

    print(f"largest difference between the two runs: {np.abs(remote - local).max():.2e}")
    assert np.allclose(remote, local, rtol=1e-5, atol=1e-6 * np.abs(local).max())
