"""Featurization logistics: the gradient engines (``_gradients``) run over a data
set, chunk by chunk, and across jobs.

:func:`featurize` runs one engine over rows in chunks of ``batch_size``, checks
what it computes, and stores ``phi`` in its storage type (float16 checked to keep
each row's norm). :func:`featurize_members` splits the members and, when there are
more jobs than members, their rows into ranges of whole batches, runs
:func:`featurize_rows` on each in parallel (writing into one memory-mapped
``.npy`` file when asked), and joins the parts; :class:`FactorSums` adds up the
per-layer factor sums of K-FAC and EK-FAC in an order fixed by the data, so that
every result is the same whatever ``n_jobs``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn.utils import gen_batches

from ._data import n_samples, take, to_torch
from ._features import allocate_npy, empty_array
from ._gradients import (
    Features,
    GradientConfig,
    GradientEngine,
    assign_members,
    feature_dim,
    featurizing_setup,
    make_engine,
)
from ._parallel import delayed_tasks, run


class FactorSums:
    """The per-layer factor sums of a row range's chunks, kept so that their total
    is the same however the rows are split into ranges (``n_jobs``): chunks are
    added in order within aligned groups of ``GROUP`` chunks (numbered from the
    first row of the data), then the groups in order. A range keeps the groups it
    may share with a neighbouring range (its first and last) chunk by chunk, so
    memory stays bounded by ``2 GROUP`` chunks' sums plus one per group."""

    GROUP = 64

    def __init__(self, blocks, first_chunk: int, n_chunks: int):
        self.blocks = list(blocks)
        self.edges = {first_chunk // self.GROUP, (first_chunk + n_chunks - 1) // self.GROUP}
        self.groups: dict[int, list] = {}

    def add(self, index: int, sums: dict) -> None:
        """The sums ``{weight: (S, A)}`` of the chunk numbered ``index``."""
        part = tuple(tuple(t.cpu().numpy() for t in sums[w]) if w in sums else None for w in self.blocks)
        group = index // self.GROUP
        kept = self.groups.setdefault(group, [])
        if group in self.edges or not kept:
            kept.append(part)
        else:
            kept[0] = _add_factors(kept[0], part)

    @staticmethod
    def total(ranges: list[FactorSums]) -> tuple | None:
        """The total of consecutive ranges' sums, in the fixed order."""
        groups: dict[int, list] = {}
        for sums in ranges:
            for group, parts in sums.groups.items():
                groups.setdefault(group, []).extend(parts)
        total = None
        for group in sorted(groups):
            parts = groups[group]
            group_sum = parts[0]
            for part in parts[1:]:
                group_sum = _add_factors(group_sum, part)
            total = group_sum if total is None else _add_factors(total, group_sum)
        return total


def _add_factors(total: tuple, part: tuple) -> tuple:
    return tuple(
        b if a is None else a if b is None else (a[0] + b[0], a[1] + b[1]) for a, b in zip(total, part)
    )


def featurize(
    engine: GradientEngine, X, y: torch.Tensor, batch_size: int, out=None, first_chunk: int = 0
) -> Features:
    """Features of ``(X, y)`` in chunks of ``batch_size`` (memory bounded by one
    chunk of gradients, or of layer factors on the fast path). ``phi`` is written
    into ``out`` when given (any float dtype, possibly a memory-mapped file).
    ``first_chunk``: the number of the first chunk in the whole data (for the
    order of the factor sums). Non-finite gradients, residuals or targets are
    refused, naming the rows."""
    n = n_samples(X)
    phi = empty_array((n, engine.out_dim)) if out is None else out
    residual = np.empty(n, dtype=np.float32)
    factors = None
    if getattr(engine, "factor_sums", None) is not None:
        factors = FactorSums(engine.projector.blocks, first_chunk, -(-n // batch_size))
    for index, rows in enumerate(gen_batches(n, batch_size)):
        p, f, r = engine.chunk(to_torch(take(X, rows), engine.device), y[rows].to(engine.device))
        for name, t in (("per-sample gradients", p), ("targets", f), ("residuals -dL/df", r)):
            # one reduction: a NaN or an infinity anywhere makes the sum so
            if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
                raise ValueError(
                    f"The {name} of samples {rows.start}..{rows.stop - 1} are not finite: the "
                    "trained model overflows on them. Scale X, lower lr, or train fewer epochs."
                )
        phi[rows] = stored_as(p, phi.dtype, rows).cpu().numpy()
        residual[rows] = r.cpu().numpy()
        if factors is not None:
            factors.add(first_chunk + index, engine.factor_sums)
    return Features(phi=phi, residual=residual, layout=engine.layout, factors=factors)


HALF_TOLERANCE = 1e-2  # of a row's norm, lost to float16's range and rounding


def stored_as(p: torch.Tensor, dtype: np.dtype, rows: slice) -> torch.Tensor:
    """``p`` in the storage type ``dtype``. In float16, each row is checked to
    keep its norm to ``HALF_TOLERANCE`` (overflow past 65504, or features so small
    that they fall under float16's normal range, are refused, naming float32)."""
    if dtype != np.float16:
        return p
    half = p.to(torch.float16)
    norm = torch.linalg.vector_norm(p, dim=1)
    lost = torch.linalg.vector_norm(half.float() - p, dim=1)
    if not bool(torch.isfinite(half).all()) or bool((lost > HALF_TOLERANCE * norm).any()):
        big = float(p.abs().max())
        raise ValueError(
            f"The features of samples {rows.start}..{rows.stop - 1} do not fit float16 (largest "
            f"{big:.3g}; float16 holds 6.1e-05 to 65504 at full precision) and would be stored "
            f"with more than {HALF_TOLERANCE:.0%} error. Store them as feature_dtype='float32' "
            "(feature_dtype='auto' chooses float16 for features on disk)."
        )
    return half


def featurize_members(
    members, X, y, *, config: GradientConfig, assignments=None, n_jobs=None, verbose=0, out_file=None
) -> list[Features]:
    """Features of every member on ``(X, y)``, each with its own seeded projection
    and its checked ``assignments`` (:func:`assign_members`; checked here when
    None), in parallel over
    members and, when there are more jobs than members, over row ranges of whole
    batches (so every batch, and every result, is the same whatever ``n_jobs``).
    ``phi`` is stored as ``config.dtype``; with ``out_file`` the jobs write their
    rows of one ``(n_members, n, k)`` ``.npy`` file, memory-mapped, so the
    features never need to fit in memory."""
    n = n_samples(X)
    shape = (len(members), n, feature_dim(members[0], config))
    if out_file is not None:
        allocate_npy(out_file, shape, config.dtype)
    parts = math.ceil(effective_n_jobs(n_jobs) / len(members))
    step = max(1, math.ceil(n / parts / config.batch_size)) * config.batch_size  # whole batches
    ranges = [(start, min(start + step, n)) for start in range(0, n, step)]
    if assignments is None:
        assignments = assign_members(members, X, y, config)
    config = featurizing_setup(members, config)
    # the threads are shared among the members alone, so each batch is computed
    # alike whether its row range runs alone or beside others
    jobs = delayed_tasks(
        featurize_rows,
        [
            (
                (m, take(X, slice(a, b)), y[a:b]),
                dict(assignment=assignments[i], config=config, out_file=out_file, member_index=i, start=a),
            )
            for i, m in enumerate(members)
            for a, b in ranges
        ],
        share=len(members),
    )
    pieces = run(jobs, n_jobs, len(jobs), "featurizing", verbose)
    stored = np.load(out_file, mmap_mode="r+") if out_file is not None else None
    features = []
    for i in range(len(members)):
        own = pieces[i * len(ranges) : (i + 1) * len(ranges)]
        if stored is not None:
            phi = stored[i]
        else:
            phi = own[0].phi if len(own) == 1 else _joined([f.phi for f in own])
        features.append(
            Features(
                phi=phi,
                residual=np.concatenate([f.residual for f in own]),
                layout=own[0].layout,
                factors=FactorSums.total([f.factors for f in own]) if own[0].factors is not None else None,
            )
        )
    return features


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)``, into memory from :func:`empty_array`."""
    out = empty_array((sum(len(p) for p in parts), *parts[0].shape[1:]), parts[0].dtype)
    return np.concatenate(parts, out=out)


def featurize_rows(member, X, y, *, assignment, config, out_file, member_index, start) -> Features:
    """One member's features of the rows ``X, y`` that start at row ``start`` of
    the training set (a job of :func:`featurize_members`, or a shard's task on a
    Dask cluster): into ``out_file``'s rows of member ``member_index`` when given,
    ``phi`` then left None."""
    engine = make_engine(member, config, assignment=assignment)
    X, y = to_torch(X), to_torch(y)  # a dask array's rows read here, once
    n = n_samples(X)
    if out_file is None:
        out = empty_array((n, engine.out_dim), config.dtype)
        return featurize(engine, X, y, config.batch_size, out, start // config.batch_size)
    stored = np.load(out_file, mmap_mode="r+")
    features = featurize(
        engine,
        X,
        y,
        config.batch_size,
        stored[member_index, start : start + n],
        start // config.batch_size,
    )
    stored.flush()
    features.phi = None  # the rows live in the file (see Features)
    return features
