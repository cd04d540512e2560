"""Training features that stay on a Dask cluster's workers.

When joblib's Dask backend is active (``joblib.parallel_config(backend="dask")``
with a ``distributed.Client``), a fit featurizes each shard of the training set
(:func:`~sktda._features.shard_ranges`) in a task of its own and keeps the result
on the worker that computed it. Everything the methods do with the features then
runs there too, shard by shard (:class:`ClusterShards`): the members' Gram
matrices and curvature are sums of per-shard sums, added pairwise on the workers
in the fixed tree that :class:`~sktda._features.LocalShards` adds them in; the
scores, the self-attribution and each shard's top ``k`` are computed where the
shard lives, with the test side (and the fitted states) broadcast to every worker.
What comes back to the driver is small: the residuals, the fitted states, and the
results. Every task is a pure function of its inputs, so a worker lost mid-way is
replaced by recomputing its shards, with the same result.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import torch

from ._data import materialize, n_samples, take
from ._features import FeatureBlock, LocalShards, add_tree
from ._featurize import FactorSums, featurize_rows
from ._gradients import featurizing_setup
from ._parallel import TASK_LOCK, num_threads


def _on_cpu(result):
    if isinstance(result, torch.Tensor):
        return result.cpu()
    if isinstance(result, (tuple, list)):
        return type(result)(_on_cpu(r) for r in result)
    return result


def _shared(client, value):
    """A future of ``value`` that every task of an operation reads. Made by a task
    (``value`` travels in its spec), not scattered: the scheduler can rerun it
    when the workers holding it are lost, where scattered data would be gone."""
    return client.submit(_identity, value, pure=False)


def _identity(value):
    return value


def _float64(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.float64, copy=False)


def _apply(threads: int, fn, block, payload: bytes, extra):
    args = pickle.loads(payload)  # tensors in memory that torch allocates (see fresh_tensor)
    with TASK_LOCK, num_threads(threads):
        return _on_cpu(fn(block, *args, *extra))


class ClusterShards:
    """Shards of training features held by a Dask cluster's workers, one future
    per row range (see the module docstring). Scored on the workers' CPUs, each
    task with this process's torch threads, as the same work runs here (float32
    products round differently with different thread counts). A
    :class:`~sktda._features.Shards`."""

    remote = True

    def scoring_device(self, device):
        return torch.device("cpu")  # the workers'

    def __init__(self, client, ranges, blocks, dtype, shape, sources=()):
        self.client, self.ranges, self.blocks = client, ranges, blocks
        self.dtype, self.shape = np.dtype(dtype), shape  # (n_members, n, k)
        # what the blocks were computed from (the members), held so that the
        # scheduler can recompute the blocks of a worker lost later
        self.sources = sources

    @property
    def nbytes(self) -> int:
        n_members, n, k = self.shape
        return n_members * n * (k * self.dtype.itemsize + 4)

    def _submit(self, fn, args, per_shard=None) -> list:
        import cloudpickle  # a dependency of dask

        # pickled here and unpickled by torch on the worker: Dask's own transfer of a
        # tensor can leave it unaligned, and MKL's products round with alignment
        shared = _shared(self.client, cloudpickle.dumps(args))
        per_shard = per_shard or [()] * len(self.ranges)
        return [
            self.client.submit(_apply, torch.get_num_threads(), fn, block, shared, extra, pure=False)
            for block, extra in zip(self.blocks, per_shard)
        ]

    def map(self, fn, *args, per_shard=None) -> list:
        """``fn(block, *args, *per_shard[i])`` of every shard ``i``, each computed on
        the worker holding the shard, gathered here in order."""
        return self.client.gather(self._submit(fn, args, per_shard))

    def sum(self, fn, *args, per_shard=None):
        """The sum of ``fn(block, *args, *per_shard[i])`` over the shards ``i``, added
        pairwise on the workers in :func:`~sktda._features.tree_sum`'s order."""
        parts = self._submit(fn, args, per_shard)
        while len(parts) > 1:
            parts = [
                self.client.submit(add_tree, *parts[i : i + 2], pure=False)
                if i + 1 < len(parts)
                else parts[i]
                for i in range(0, len(parts), 2)
            ]
        return parts[0].result()

    def lazy(self, fn, *args, per_shard=None, rows: int):
        """``fn``'s ``(rows, shard size)`` results, as in :meth:`map`, left on the
        workers as one lazy float64 dask array ``(rows, n)``."""
        import dask
        import dask.array as da

        futures = self._submit(fn, args, per_shard)
        return da.concatenate(
            [
                da.from_delayed(dask.delayed(_float64)(f), (rows, b - a), np.float64)
                for f, (a, b) in zip(futures, self.ranges)
            ],
            axis=1,
        )

    def array(self):
        """The features as a lazy dask array ``(n_members, n, k)``, chunked by shard."""
        import dask
        import dask.array as da

        n_members, _, k = self.shape
        return da.concatenate(
            [
                da.from_delayed(dask.delayed(block).features, (n_members, b - a, k), self.dtype)
                for block, (a, b) in zip(self.blocks, self.ranges)
            ],
            axis=1,
        )

    def to_local(self) -> LocalShards:
        """The shards gathered into this process."""
        blocks = self.client.gather(self.blocks)
        return LocalShards(
            np.concatenate([b.features for b in blocks], 1),
            np.concatenate([b.residuals for b in blocks], 1),
            self.ranges,
        )


def featurize_on_cluster(client, members, X, y, *, config, assignments, ranges, threads: int):
    """Every member's features of each row range in ``ranges``, computed and kept
    on the workers, each task with ``threads`` torch threads: ``(ClusterShards,
    residuals (n_members, n), layouts, factor sums)``, one layout and one factor
    sum (or None) per member. A row range of a dask array is read by the worker
    that featurizes it."""
    config = featurizing_setup(members, config)
    shared = _shared(client, (members, assignments, config))
    blocks = [
        client.submit(_featurize_block, threads, shared, take(X, slice(a, b)), y[a:b], a, pure=False)
        for a, b in ranges
    ]
    metas = client.gather([client.submit(_meta, block, pure=False) for block in blocks])
    residuals = np.concatenate([residual for residual, _ in metas], 1)
    layouts, factors, widths = zip(*metas[0][1])
    factors = [
        None if factors[m] is None else FactorSums.total([meta[m][1] for _, meta in metas])
        for m in range(len(members))
    ]
    shape = (len(members), n_samples(y), widths[0])
    shards = ClusterShards(client, ranges, blocks, config.dtype, shape, sources=[shared])
    return shards, residuals, layouts, factors


def _featurize_block(threads: int, shared, X, y, start: int) -> FeatureBlock:
    # a private copy of the members: the engine hooks their modules while it runs
    members, assignments, config = copy.deepcopy(shared)
    X = materialize(X)
    with TASK_LOCK, num_threads(threads):
        parts = [
            featurize_rows(
                m, X, y, assignment=assignments[i], config=config, out_file=None, member_index=i, start=start
            )
            for i, m in enumerate(members)
        ]
    return FeatureBlock(
        np.stack([p.phi for p in parts]),
        np.stack([p.residual for p in parts]),
        [(p.layout, p.factors, p.phi.shape[1]) for p in parts],
    )


def _meta(block: FeatureBlock):
    return block.residuals, block.meta
