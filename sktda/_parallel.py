"""Parallel loops through scikit-learn's joblib wrapper, so a user's
``joblib.parallel_config(backend="dask")`` (or Ray's) runs them on a cluster.

Results must not depend on ``n_jobs``. torch's CPU kernels round differently with
different thread counts (training's reductions over the batch, and the matrix
products of a few rows that featurizing a short chunk of tokens makes), so every
task runs with a thread count fixed by the work, never by ``n_jobs``: the
caller's threads shared among the models or members (:func:`delayed_tasks`),
whether the tasks then run one after another or in parallel.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

import torch
from sklearn import get_config
from sklearn.utils.parallel import Parallel, delayed
from tqdm.auto import tqdm

from ._data import materialize


def run(jobs, n_jobs: int | None, total: int, desc: str, verbose: int = 0) -> list:
    """Results of the delayed ``jobs`` in order, with a progress bar when verbose.
    Under joblib's Dask backend every job is a task on the cluster, whatever
    ``n_jobs`` and the number of workers (joblib itself runs the jobs here when
    they resolve to one), so that the driver never reads the training data."""
    client = active_client()
    if client is not None:
        # scikit-learn's configuration and warning filters travel with each job, as
        # scikit-learn's Parallel sends them
        config, filters = get_config(), warnings.filters
        futures = [
            client.submit(_invoke, _configured(function, config, filters), args, kwargs, pure=False)
            for function, args, kwargs in jobs
        ]
        results = (future.result() for future in futures)
    else:
        from joblib.parallel import get_active_backend

        # results as they come, for the progress bar, where the backend can (Ray's cannot)
        streams = getattr(get_active_backend()[0], "supports_return_generator", False)
        results = Parallel(n_jobs=n_jobs, return_as="generator" if streams else "list")(jobs)
    return list(tqdm(results, total=total, desc=desc, disable=not verbose))


def _configured(function, config, filters):
    with_config = getattr(function, "with_config_and_warning_filters", None)
    return function if with_config is None else with_config(config, filters)


def _invoke(function, args, kwargs):
    return function(*args, **kwargs)


@contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# sktda's tasks run one at a time in a process: they seed torch's global generator and
# set its thread count, and the gradient engine hooks the modules it differentiates, so
# two of them in threads of one Dask worker would change each other's results
TASK_LOCK = threading.RLock()


def _call(threads: int, function, args, kwargs):
    # a dask array is read before the lock is taken: reading it waits on other tasks,
    # which may need this worker's threads (and sktda's would wait on the lock)
    args = tuple(materialize(a) for a in args)
    with TASK_LOCK, num_threads(threads):
        return function(*args, **kwargs)


def delayed_tasks(function, arguments: list[tuple[tuple, dict]], share: int | None = None):
    """``delayed(function)(*args, **kwargs)`` for every task, each run with the
    caller's torch threads divided by ``share`` (default: the number of tasks): the
    same count whether the tasks then run one after another or in parallel, in
    any process."""
    share = len(arguments) if share is None else share
    threads = max(1, torch.get_num_threads() // max(1, share))
    return [delayed(_call)(threads, function, args, kwargs) for args, kwargs in arguments]


def active_client():
    """The ``distributed.Client`` of joblib's active Dask backend, or None."""
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    return getattr(backend, "client", None) if type(backend).__name__ == "DaskDistributedBackend" else None
