"""Parallel loops through scikit-learn's joblib wrapper, so a user's
``joblib.parallel_config(backend="dask")`` (or Ray's) runs them on a cluster.

Results must not depend on ``n_jobs``. Training reduces over the batch in its
weight gradients, and torch's CPU kernels round those reductions differently with
different thread counts, so every training task runs with a thread count fixed by
the number of tasks, never by ``n_jobs`` (:func:`delayed_tasks`).
Featurization reduces only within samples, so its row ranges may split the cores
by ``n_jobs`` (:func:`torch_threads`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from joblib import effective_n_jobs
from sklearn.utils.parallel import Parallel, delayed
from tqdm.auto import tqdm


def run(jobs, n_jobs: int | None, total: int, desc: str, verbose: int = 0) -> list:
    """Results of the delayed ``jobs`` in order, with a progress bar when verbose."""
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    return list(tqdm(results, total=total, desc=desc, disable=not verbose))


@contextmanager
def _num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def torch_threads(n_jobs: int | None):
    """Share the cores among ``n_jobs`` parallel workers (no change when
    sequential), restoring torch's thread count afterwards."""
    jobs = effective_n_jobs(n_jobs)
    if jobs <= 1:
        yield
        return
    with _num_threads(max(1, (os.cpu_count() or 1) // jobs)):
        yield


def _call(threads: int, function, args, kwargs):
    with _num_threads(threads):
        return function(*args, **kwargs)


def delayed_tasks(function, arguments: list[tuple[tuple, dict]]):
    """``delayed(function)(*args, **kwargs)`` for every task, each run with the
    caller's torch threads divided among the tasks: the same count whether the
    tasks then run one after another or in parallel, in any process."""
    threads = max(1, torch.get_num_threads() // max(1, len(arguments)))
    return [delayed(_call)(threads, function, args, kwargs) for args, kwargs in arguments]
