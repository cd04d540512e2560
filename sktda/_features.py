"""The training features: one owner for where they live, how long they live, and
the operations the attribution methods need on them.

The features are kept in *shards*, row ranges fixed by the data alone
(:func:`shard_ranges`), behind one interface (:class:`Shards`): in this process
(:class:`LocalShards`, in memory or memory-mapped from a ``.npy`` file) or on a
Dask cluster's workers (:class:`~sktda._cluster.ClusterShards`). :class:`FeatureStore` holds them with the
members' coefficients and fitted method states, and runs every operation shard by
shard, where the shards live: a member's sums for ``fit`` (:class:`MemberRows`),
the scores of the training columns, the self-attribution, the streaming top-k.
Sums over shards are added in one fixed pairwise tree, so the results are the same
wherever the shards live. A file is the store's own (:class:`FeatureFile`): sized
and checked before any training, its blocks reserved before it is written, removed
when the fit is released or collected; a pickled copy holds the features in memory
and owns no file. How much memory and disk they may take is ``_resources``'s
question.

Vocabulary: a *member* is one model of the ensemble as attribution sees it (a
trained model, a dropout mask of one, a LoRA adapter); a *feature set* is one
member's features at one set of weights (TracIn has one per checkpoint, every
other method one per member: ``sets_per_member``); *features* are always the
per-sample gradient features, never the inputs' columns.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import tempfile
import uuid
import weakref
from typing import NamedTuple, Protocol

import numpy as np
import torch
from sklearn.utils import gen_batches

from ._compat import get_chunk_n_rows
from ._methods import SCORE_DTYPE
from ._resources import SHARD_BYTES, no_space_message

# ---------------------------------------------------------------- storage


def empty_array(shape: tuple, dtype=np.float32) -> np.ndarray:
    """An uninitialised numpy array in memory that torch allocates. numpy asks the
    kernel for transparent huge pages for a large array, and where the kernel
    compacts memory to find them, the first write to a fresh feature matrix stalls
    (131 MB of features: 0.35 s against 0.07 s from torch's allocator, on the
    benchmark machine)."""
    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def allocate_npy(path: str, shape: tuple, dtype) -> None:
    """Create the ``.npy`` file ``path`` with every block of its data reserved on
    disk, so that a disk that fills up later fails here, with a ``ValueError``
    naming the space needed, and not as a crash (SIGBUS) in the middle of writing
    to a sparse memory map."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    size = os.path.getsize(path)
    try:
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
            except (AttributeError, OSError) as exc:  # no fallocate here: write the blocks
                if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                offset = size - math.prod(shape) * np.dtype(dtype).itemsize
                f.seek(offset)
                block = bytes(1 << 24)
                for start in range(offset, size, len(block)):
                    f.write(block[: min(len(block), size - start)])
    except OSError as exc:
        os.remove(path)
        raise ValueError(no_space_message(os.path.dirname(path), size)) from exc


class FeatureFile:
    """A features file and, when ``features_dir`` was None, the temporary directory
    holding it: both removed by :meth:`release`, or when this object is collected."""

    def __init__(self, directory: str, own_directory: bool):
        self.temporary = tempfile.mkdtemp(prefix="sktda-", dir=directory) if own_directory else None
        self.path = os.path.join(self.temporary or directory, f"train_features_{uuid.uuid4().hex}.npy")
        self._finalizer = weakref.finalize(self, _remove, self.path, self.temporary)

    def release(self) -> None:
        self._finalizer()


def _remove(path: str, temporary: str | None) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    if temporary is not None:
        shutil.rmtree(temporary, ignore_errors=True)


# --------------------------------------------------------------- the store


def shard_ranges(n: int, row_bytes: int, batch_size: int = 1) -> list[tuple[int, int]]:
    """The training set's row ranges that the features are stored and reduced in:
    whole batches of ``batch_size``, about :data:`SHARD_BYTES` of features each, fixed
    by the data alone, so that every sum over them (a Gram, a top-k) is added up in
    the same order wherever the shards live."""
    rows = max(1, SHARD_BYTES // max(1, row_bytes) // batch_size) * batch_size
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


class FeatureBlock(NamedTuple):
    """The features ``(n_members, rows, k)`` and residuals ``(n_members, rows)`` of
    one shard, with what its featurization found of each member (``meta``: the
    layouts and Kronecker factor sums, on a cluster)."""

    features: np.ndarray
    residuals: np.ndarray
    meta: object = None


class Shards(Protocol):
    """Where the training features live, and how an operation reaches them: the
    interface of :class:`LocalShards` and :class:`~sktda._cluster.ClusterShards`.

    ``ranges``: the shards' row ranges (:func:`shard_ranges`); ``shape``: the
    features' ``(n_members, n, k)``; ``remote``: the shards live outside this
    process, so that a large result can stay where they are (:meth:`lazy`)."""

    ranges: list
    shape: tuple
    remote: bool

    @property
    def nbytes(self) -> int: ...

    def scoring_device(self, device: torch.device) -> torch.device:
        """The device the shards' blocks are computed on, for an estimator on ``device``."""

    def map(self, fn, *args, per_shard=None) -> list:
        """``fn(block, *args, *per_shard[i])`` of every shard ``i``, in order, here."""

    def sum(self, fn, *args, per_shard=None):
        """The sum of :meth:`map`'s results, added in :func:`tree_sum`'s order."""

    def lazy(self, fn, *args, per_shard=None, rows: int):
        """Remote shards: :meth:`map`'s ``(rows, shard size)`` results left where the
        shards live, as one lazy ``(rows, n)`` dask array."""

    def array(self):
        """The features ``(n_members, n, k)``: an array, or a lazy dask array."""

    def to_local(self) -> LocalShards:
        """The shards in this process (themselves when they are)."""


class LocalShards:
    """The shards of features held by this process, in memory or memory-mapped:
    each shard's block is a view of one ``(n_members, n, k)`` array. A
    :class:`Shards`."""

    remote = False

    def __init__(self, features, residuals, ranges):
        self.features, self.residuals, self.ranges = features, residuals, ranges

    def scoring_device(self, device):
        return device  # its blocks are scored on the estimator's own device

    def to_local(self) -> LocalShards:
        return self

    def _results(self, fn, args, per_shard):
        per_shard = per_shard or [()] * len(self.ranges)
        for (a, b), extra in zip(self.ranges, per_shard):
            yield fn(FeatureBlock(self.features[:, a:b], self.residuals[:, a:b]), *args, *extra)

    def map(self, fn, *args, per_shard=None) -> list:
        """``fn(block, *args, *per_shard[i])`` of every shard ``i``, in order."""
        return list(self._results(fn, args, per_shard))

    def sum(self, fn, *args, per_shard=None):
        """The sum of ``fn(block, *args, *per_shard[i])`` over the shards ``i``,
        added pairwise in a fixed tree (as :class:`~sktda._cluster.ClusterShards`
        adds them on its workers), each shard's result added as soon as it is
        computed."""
        return tree_sum(self._results(fn, args, per_shard))

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.residuals.nbytes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.features.shape

    def array(self) -> np.ndarray:
        return self.features


def add_tree(a, b):
    """``a + b`` of nested tuples and lists of tensors (None stays None)."""
    if a is None:
        return None
    if isinstance(a, (tuple, list)):
        return type(a)(add_tree(x, y) for x, y in zip(a, b))
    return a + b


def tree_sum(parts):
    """The sum of the iterable ``parts``, added pairwise, level by level, in order:
    ``((p0 + p1) + (p2 + p3)) + ...``, a level's odd last part carried up. Streamed:
    at most one partial sum per level is held (a binary counter), and the partials
    left at the end are added from the right, which is the same tree."""
    stack: list[tuple[int, object]] = []  # (level, partial sum)
    for part in parts:
        level = 0
        while stack and stack[-1][0] == level:
            part, level = add_tree(stack.pop()[1], part), level + 1
        stack.append((level, part))
    total = stack.pop()[1]
    while stack:
        total = add_tree(stack.pop()[1], total)
    return total


class MemberRows:
    """One member's training features, as a method's ``fit`` sees them: their size
    ``n`` by ``k``, the ``device`` of the state fitted, and :meth:`sum` over row
    blocks, wherever the shards live."""

    def __init__(self, shards, member: int, n: int, k: int, device):
        self.shards, self.member, self.n, self.k, self.device = shards, member, n, k, device

    def sum(self, fn, *args):
        """``sum_j fn(*args, phi_j, residual_j)`` over row blocks of the member's
        features (float32 tensors), each block within ``working_memory``."""
        rows = max(1, get_chunk_n_rows(row_bytes=8 * self.k, max_n_rows=self.n))
        device = self.shards.scoring_device(self.device)
        return self.shards.sum(_member_sum, self.member, rows, device, fn, args)

    def gather(self, fn, *args) -> torch.Tensor:
        """``fn(*args, phi, residual)`` of every row of the member's features, in
        order, concatenated here: for a state built from all ``n`` rows at once
        (when ``n`` is smaller than ``k``, no larger than a ``k x k`` Gram)."""
        device = self.shards.scoring_device(self.device)
        parts = self.shards.map(_member_rows, self.member, device, fn, args)
        return torch.cat([part.to(self.device) for part in parts])


def fresh_tensor(array: np.ndarray, device, dtype) -> torch.Tensor:
    """A copy of ``array`` in memory that torch allocates: MKL's products round
    differently with the alignment of their operands, and a view into a shard
    starts wherever its rows fall, so every block is copied alike, wherever it
    lives."""
    return torch.tensor(np.asarray(array), device=device, dtype=dtype)


def _member_rows(block: FeatureBlock, member: int, device, fn, args):
    return fn(
        *args,
        fresh_tensor(block.features[member], device, torch.float32),
        fresh_tensor(block.residuals[member], device, torch.float32),
    )


def _member_sum(block: FeatureBlock, member: int, rows_per_block: int, device, fn, args):
    phi, residual = block.features[member], block.residuals[member]
    total = None
    for rows in gen_batches(len(phi), rows_per_block):
        part = fn(
            *args,
            fresh_tensor(phi[rows], device, torch.float32),
            fresh_tensor(residual[rows], device, torch.float32),
        )
        total = part if total is None else add_tree(total, part)
    return total


class FeatureStore:
    """Every member's training features and residuals, kept in shards (``shards``:
    :class:`LocalShards`, or :class:`~sktda._cluster.ClusterShards` on a Dask
    cluster's workers), the members' coefficients and fitted method ``states``, and
    the scores computed from them, shard by shard.

    ``file``: the :class:`FeatureFile` the features are memory-mapped from (None:
    in memory or on a cluster). ``sets_per_member``: the feature sets of each
    ensemble member, consecutive (its TracIn checkpoints; one otherwise), which the
    standard errors across members group. ``column_scale``: a factor per training
    sample applied to every score (RelatIF), or None.
    """

    def __init__(
        self,
        shards,
        coefs: list[float],
        n: int,
        k: int,
        file: FeatureFile | None = None,
        sets_per_member: int = 1,
    ):
        self.shards, self.coefs, self.n, self.k, self.file = shards, coefs, n, k, file
        self.sets_per_member = sets_per_member
        self.states: list = [None] * len(coefs)
        self.column_scale: np.ndarray | None = None

    @property
    def n_members(self) -> int:
        return len(self.coefs) // self.sets_per_member

    @property
    def nbytes(self) -> int:
        return self.shards.nbytes

    def member_rows(self, member: int, device) -> MemberRows:
        return MemberRows(self.shards, member, self.n, self.k, device)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["file"] = None  # a copy holds the features in memory and owns no file
        return state

    def gathered(self) -> FeatureStore:
        """This store with its features in this process: itself, or a copy of a
        cluster's (which a pickled copy, outliving the cluster, must hold)."""
        local = self.shards.to_local()
        if local is self.shards:
            return self
        copy = FeatureStore.__new__(FeatureStore)
        copy.__dict__.update(self.__dict__, shards=local)
        return copy

    # ------------------------------------------------------------- scores
    def _test_sides(self, method, test_phis, device):
        """The scoring device, the members' states there, and their test sides
        (``phi H^-1`` for TRAK), computed once for every shard."""
        where = self.shards.scoring_device(device)
        states = _states(self.states, where, SCORE_DTYPE)
        return (
            where,
            states,
            [method.test_side(state, phi.to(where)) for state, phi in zip(states, test_phis)],
        )

    def _scales(self) -> list[tuple]:
        scale = self.column_scale
        return [(None if scale is None else scale[a:b],) for a, b in self.shards.ranges]

    def _spread(self, return_std: bool) -> int:
        """``_reduce_members``'s ``per_member``: the standard errors' grouping of the
        feature sets into members, or 0 for none."""
        if return_std and self.n_members < 2:
            raise ValueError(
                "return_std=True needs the scores of at least 2 ensemble members to estimate a "
                "standard error, and this fit has 1. Fit with n_models >= 2 (or ensemble='dropout' "
                "or 'lora', whose masks and adapters are members)."
            )
        return self.sets_per_member if return_std else 0

    def columns(self, method, test_phis, device, *, return_std=False):
        """Checked scores of test features ``test_phis`` (one tensor per member)
        against every training sample, scaled by ``column_scale``; with
        ``return_std``, also their standard errors across members."""
        where, states, sides = self._test_sides(method, test_phis, device)
        parts = self.shards.map(
            _block_columns,
            method,
            self.coefs,
            states,
            sides,
            where,
            self._spread(return_std),
            per_shard=self._scales(),
        )
        scores = torch.cat([part[0].to(device) for part in parts], 1)
        if not return_std:
            return scores
        return scores, torch.cat([part[1].to(device) for part in parts], 1)

    def group_columns(self, method, test_phis, codes: np.ndarray, n_groups: int, device, *, return_std=False):
        """The scores of ``test_phis`` (as :meth:`columns` gives them) summed over
        each group of training samples (``codes``: each sample's group,
        ``0..n_groups-1``), ``(n_test, n_groups)``; with ``return_std``, also their
        standard errors across members.

        Every score is linear in a training sample's train side, so each member's
        train sides are first summed per group, weighted by TRAK's residual scale
        and ``column_scale`` (one pass over the features, independent of the test
        set), and the test sides are then scored against ``n_groups`` rows instead
        of ``n_train``."""
        spread = self._spread(return_std)
        where, states, sides = self._test_sides(method, test_phis, device)
        # the members' group sums within working_memory: in passes over the features,
        # each summing one block of groups (one pass for the usual tens or thousands)
        per_pass = get_chunk_n_rows(row_bytes=8 * self.k * len(self.coefs), max_n_rows=n_groups)
        scores = std = None
        for block in gen_batches(n_groups, per_pass):
            local = np.where((codes >= block.start) & (codes < block.stop), codes - block.start, -1)
            per_shard = [(local[a:b], *scale) for (a, b), scale in zip(self.shards.ranges, self._scales())]
            sums = self.shards.sum(
                _block_group_sides,
                method,
                self.coefs,
                states,
                block.stop - block.start,
                where,
                per_shard=per_shard,
            )
            parts = (sides[m] @ sums[m].to(where).T * coef for m, coef in enumerate(self.coefs))
            part, part_std = _ensemble_sum(parts, spread)
            scores = part if scores is None else torch.cat([scores, part], 1)
            if return_std:
                std = part_std if std is None else torch.cat([std, part_std], 1)
        scores = finite(scores, "attribution scores").to(device)
        return (scores, std.to(device)) if return_std else scores

    def columns_array(self, method, test_phis):
        """The same scores as a lazy dask array ``(n_test, n_train)``, each shard's
        columns computed (and kept) where the shard lives."""
        where, states, sides = self._test_sides(method, test_phis, torch.device("cpu"))
        return self.shards.lazy(
            _block_scores,
            method,
            self.coefs,
            states,
            sides,
            where,
            per_shard=self._scales(),
            rows=len(sides[0]),
        )

    def self_attribution(self, method, device, dtype=SCORE_DTYPE) -> torch.Tensor:
        """The diagonal of the training set's attribution to itself, unscaled, in
        row blocks (``dtype`` float32 where speed matters more than the last
        digits)."""
        where = self.shards.scoring_device(device)
        factors = [method.self_factor(state) for state in _states(self.states, where, dtype)]
        rows = max(1, get_chunk_n_rows(row_bytes=torch.finfo(dtype).bits // 8 * 3 * self.k * len(factors)))
        parts = self.shards.map(_block_self, method, self.coefs, factors, rows, where, dtype)
        return finite(torch.cat([part.to(device) for part in parts]), "self-attribution scores")

    def top_k(self, method, test_phis, k: int, device, *, return_std=False):
        """``((proponent scores, indices[, std]), (opponent scores, indices[,
        std]))``, each ``(n_test, k)``: every shard's own top ``k``, streamed over
        blocks of its columns, merged in shard order, so that the full score matrix
        is never held and only ``k`` scores per test sample and shard travel."""
        where, states, sides = self._test_sides(method, test_phis, device)
        # per training sample: its float64 scores (twice, while merging, and their
        # spread) and features
        chunk = max(k, get_chunk_n_rows(row_bytes=8 * ((2 + 2 * return_std) * len(sides[0]) + self.k)))
        per_shard = [(a, *scale) for (a, _), scale in zip(self.shards.ranges, self._scales())]
        spread = self._spread(return_std)
        top = bottom = None
        for shard_top, shard_bottom in self.shards.map(
            _block_top_k, method, self.coefs, states, sides, k, chunk, where, spread, per_shard=per_shard
        ):
            top = merge_topk(top, [t.to(device) for t in shard_top], k, largest=True)
            bottom = merge_topk(bottom, [t.to(device) for t in shard_bottom], k, largest=False)
        return top, bottom


def _block_columns(block: FeatureBlock, method, coefs, states, sides, device, per_member, scale):
    """The scores of a shard's columns and their standard errors across members
    (None without ``per_member``; see :meth:`FeatureStore.columns`)."""

    def score(m, state, phi, residual):
        return sides[m] @ method.train_side(state, phi, residual).T

    rows = slice(0, block.features.shape[1])
    scores, std = _reduce_members(method, coefs, states, block, rows, device, score, per_member=per_member)
    scores = finite(scores, "attribution scores")
    if scale is not None:
        scale = fresh_tensor(scale, device, SCORE_DTYPE)
        scores, std = scores * scale, None if std is None else std * scale
    return scores, std


def _block_scores(block: FeatureBlock, method, coefs, states, sides, device, scale) -> torch.Tensor:
    return _block_columns(block, method, coefs, states, sides, device, 0, scale)[0]


def _block_group_sides(block: FeatureBlock, method, coefs, states, n_groups, device, codes, scale):
    """Each member's train sides of a shard, weighted by TRAK's residual scale and
    the column ``scale``, summed per group: a list of ``(n_groups, k)`` float64
    tensors (rows of ``codes`` -1 left out)."""
    codes = np.asarray(codes)
    if (codes < 0).any():  # samples of groups summed in another pass
        rows = np.flatnonzero(codes >= 0)
        block = FeatureBlock(block.features[:, rows], block.residuals[:, rows])
        codes, scale = codes[rows], None if scale is None else np.asarray(scale)[rows]
    codes = torch.as_tensor(codes, device=device)
    weight = None if scale is None else fresh_tensor(scale, device, SCORE_DTYPE)
    if method.scales_by_residual:
        mean = sum(c * fresh_tensor(block.residuals[m], device, SCORE_DTYPE) for m, c in enumerate(coefs))
        weight = mean / sum(coefs) if weight is None else weight * mean / sum(coefs)
    sums = []
    for m, state in enumerate(states):
        phi = fresh_tensor(block.features[m], device, SCORE_DTYPE)
        side = method.train_side(state, phi, fresh_tensor(block.residuals[m], device, SCORE_DTYPE))
        if weight is not None:
            side = side * weight[:, None]
        sums.append(
            torch.zeros(n_groups, side.shape[1], dtype=SCORE_DTYPE, device=device).index_add_(0, codes, side)
        )
    return sums


def _block_self(block: FeatureBlock, method, coefs, factors, rows_per_block, device, dtype) -> torch.Tensor:
    def score(m, factor, phi, residual):
        return method.self_scores(factor, phi, residual)

    blocks = gen_batches(block.features.shape[1], rows_per_block)
    return torch.cat(
        [_reduce_members(method, coefs, factors, block, rows, device, score, dtype)[0] for rows in blocks]
    )


def _block_top_k(
    block: FeatureBlock, method, coefs, states, sides, k, chunk, device, per_member, offset, scale
):
    top = bottom = None
    n_test = len(sides[0])
    for columns in gen_batches(block.features.shape[1], chunk):
        part = FeatureBlock(block.features[:, columns], block.residuals[:, columns])
        scores, std = _block_columns(
            part, method, coefs, states, sides, device, per_member, None if scale is None else scale[columns]
        )
        index = torch.arange(offset + columns.start, offset + columns.stop, device=device).expand(n_test, -1)
        found = [scores, index] + ([] if std is None else [std])
        top = merge_topk(top, found, k, largest=True)
        bottom = merge_topk(bottom, found, k, largest=False)
    return top, bottom


def _states(states: list, device, dtype) -> list:
    """The members' method states on the scoring device, in ``dtype``: a fit on CUDA
    is scored on the CPU once ``device="auto"`` resolves there."""
    return [s.to(device, dtype) if hasattr(s, "to") else s for s in states]


def _ensemble_sum(parts, per_member: int):
    """``sum_f part_f`` over the feature sets' coefficient-weighted scores, and, with
    ``per_member`` (the consecutive feature sets of each member), the standard error
    of that sum across the members: each member's share ``B_e`` times the number of
    members ``M`` is one member's estimate of the ensemble's score, so the standard
    error of their mean is ``sqrt((M sum_e B_e^2 - (sum_e B_e)^2) / (M - 1))``."""
    total = member = squares = None
    n_members = 0
    for f, part in enumerate(parts):
        if per_member:
            member = part.clone() if f % per_member == 0 else member.add_(part)
            if (f + 1) % per_member == 0:
                squares = member.square() if squares is None else squares.add_(member.square())
                n_members += 1
        total = part if total is None else total.add_(part)
    if not per_member:
        return total, None
    variance = (n_members * squares - total.square()).clamp_(min=0) / (n_members - 1)
    return total, variance.sqrt_()


def _reduce_members(
    method, coefs, states, block: FeatureBlock, rows, device, score, dtype=SCORE_DTYPE, per_member=0
):
    """``s * sum_m c_m score(m, state_m, phi_m[rows], residual_m[rows])`` over the
    members' training features in ``block``, and its standard error across members
    with ``per_member`` (see :func:`_ensemble_sum`); ``s`` is TRAK's
    coefficient-weighted mean residual."""
    scale = None

    def parts():
        nonlocal scale
        for m, coef in enumerate(coefs):
            phi = fresh_tensor(block.features[m, rows], device, dtype)
            residual = fresh_tensor(block.residuals[m, rows], device, dtype)
            yield score(m, states[m], phi, residual).mul_(coef)
            if method.scales_by_residual:
                scale = coef * residual if scale is None else scale.add_(coef * residual)

    out, std = _ensemble_sum(parts(), per_member)
    if scale is not None:
        scale = scale / sum(coefs)
        out.mul_(scale)
        if std is not None:
            std.mul_(scale.abs())
    return out, std


def merge_topk(current, found, k: int, largest: bool):
    """The top ``k`` of ``found`` (scores, indices and any aligned tensors, each
    ``(n_test, columns)``) and ``current`` (the same, or None) by score."""
    if current is not None:
        found = [torch.cat([a, b], 1) for a, b in zip(current, found)]
    values, pos = torch.topk(found[0], min(k, found[0].shape[1]), dim=1, largest=largest, sorted=True)
    return [values] + [torch.gather(t, 1, pos) for t in found[1:]]


def finite(scores: torch.Tensor, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(
            f"The {what} are not finite: the gradient features or the inverse overflowed. "
            "Raise damping, lower proj_dim, or use feature_dtype='float32'."
        )
    return scores


def relatif_scale(self_influence) -> np.ndarray:
    """``1 / sqrt(|self-influence|)`` per training sample (RelatIF, Barshan et al.,
    2020): a sample whose own loss it moves a lot is an outlier of the training set,
    and its raw scores would dominate every test sample's ranking. Floored at a
    millionth of the largest root, so a sample with no self-influence stays finite."""
    root = np.sqrt(np.abs(np.asarray(self_influence, dtype=np.float64)))
    return 1.0 / np.maximum(root, 1e-6 * max(float(root.max()), np.finfo(np.float64).tiny))
