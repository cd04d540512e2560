"""Parallel loops through scikit-learn's joblib wrapper, so a user's
``joblib.parallel_config(backend="dask")`` (or Ray's) runs them on a cluster."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from joblib import effective_n_jobs
from sklearn.utils.parallel import Parallel
from tqdm.auto import tqdm


def run(jobs, n_jobs: int | None, total: int, desc: str, verbose: int = 0) -> list:
    """Results of the delayed ``jobs`` in order, with a progress bar when verbose."""
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    return list(tqdm(results, total=total, desc=desc, disable=not verbose))


@contextmanager
def torch_threads(n_jobs: int | None):
    """Share the cores among ``n_jobs`` parallel workers (no change when
    sequential), restoring torch's thread count afterwards."""
    jobs = effective_n_jobs(n_jobs)
    if jobs <= 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)
