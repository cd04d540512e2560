"""Parallel loops through scikit-learn's joblib wrapper, so a user's
``joblib.parallel_config(backend="dask")`` (or Ray's) runs them on a cluster."""

from __future__ import annotations

from sklearn.utils.parallel import Parallel
from tqdm.auto import tqdm


def run(jobs, n_jobs: int | None, total: int, desc: str, verbose: int = 0) -> list:
    """Results of the delayed ``jobs`` in order, with a progress bar when verbose."""
    results = Parallel(n_jobs=n_jobs, return_as="generator")(jobs)
    return list(tqdm(results, total=total, desc=desc, disable=not verbose))
