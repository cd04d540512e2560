"""Resources: the memory and disk a fit will need, sized before any training, and
the checks that refuse a fit that cannot have them.

A fit is described by its :class:`FitSizes` (rows, models, feature sets and
blocks, parameters, inputs: known from the untrained module and the validated
data). :func:`resident_sizes` gives what a fit holds at once and where its
features go (:class:`FeatureStorage`: in memory, memory-mapped from a file, or on
a cluster's workers), and :func:`memory_plan` the whole :class:`MemoryPlan`,
stage by stage. The checks (:func:`check_memory`, :func:`check_plan`,
:func:`check_free_space`, :func:`check_writable_directory`,
:func:`check_dense_fits`) raise a ``ValueError`` naming what is short and what to
change; they compute, and hold nothing. The estimator keeps the decisions it acts
on (:class:`FitPlan`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ._data import by_reference, call, is_dask, is_dataset

SHARD_BYTES = 64 * 2**20  # the training features of a shard, about


def available_memory() -> int | None:
    """Bytes of memory available now without swapping: Linux's ``MemAvailable``
    (free pages and the page cache it can reclaim), else the free physical pages,
    else None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class MemoryPlan(NamedTuple):
    """Bytes that a fit, and then scoring, need in this process beyond what it
    holds already (the interpreter, torch, the caller's own inputs).

    ``models``: the trained models, kept; ``training``: the models trained at once,
    with their gradients, optimizer state and a batch's activations;
    ``featurizing``: a chunk's activations, output gradients and layer inputs as
    the gradient routes read them; ``inputs``:
    sktda's copy of the training inputs (for ``score``); ``features``: the
    training features and residuals held in memory, ``features_on_disk`` those
    memory-mapped from a file instead, and ``features_on_workers`` those kept on a
    Dask cluster's workers; ``curvature``: the Gram matrices and
    inverses; ``working``: the row blocks that the curvature, the self-attribution
    and ``most_influential`` stream through (scikit-learn's ``working_memory``);
    ``scores``: ``attribute``'s dense matrix of ``n_test`` test samples.

    On a Dask cluster, training, featurizing and the streamed blocks run on the
    workers, so those stages are 0 here, and ``worker`` estimates what each worker
    needs at its peak: training a model on the whole training set, or featurizing,
    beside its share of the features and a few shards' float64 working copies (0
    without a cluster).

    ``chunk_rows`` is not bytes: the rows featurized at once, ``batch_size`` or
    fewer where that many rows would not fit in the memory available (the
    featurizing stage is then sized at those rows; the results are the same, to
    float rounding).
    """

    models: int
    training: int
    featurizing: int
    inputs: int
    features: int
    features_on_disk: int
    features_on_workers: int
    curvature: int
    working: int
    scores: int
    worker: int = 0
    chunk_rows: int = 0

    @property
    def fit_peak(self) -> int:
        """The largest of ``fit``'s stages: training, then features and curvature."""
        after_training = self.models + self.features
        return (
            max(self.training, after_training + max(self.featurizing, self.curvature + self.working))
            + self.inputs
        )

    @property
    def peak(self) -> int:
        """The fit's peak, or scoring's when larger."""
        return max(self.fit_peak, self.models + self.features + self.inputs + max(self.working, self.scores))

    def with_chunk_that_fits(self, members: int, copy_bytes: int, row_bytes: int) -> MemoryPlan:
        """This plan, its featurization chunk shrunk where the fit's peak would
        exceed the memory available: ``members`` featurized at once, each holding
        ``copy_bytes`` (its working copy) and ``row_bytes`` per row of its chunk."""
        available = available_memory()
        if not members or not row_bytes or available is None or self.fit_peak <= available:
            return self
        room = available - self.inputs - self.models - self.features
        rows = int((room // members - copy_bytes) // row_bytes)
        if not 1 <= rows < self.chunk_rows:
            return self
        return self._replace(featurizing=members * (copy_bytes + row_bytes * rows), chunk_rows=rows)

    def __str__(self) -> str:
        stages = {k: v for k, v in self._asdict().items() if k != "chunk_rows"}
        rows = [*stages.items(), ("fit peak", self.fit_peak), ("peak", self.peak)]
        lines = [f"{name.replace('_', ' '):>18}: {size / 2**20:12,.1f} MiB" for name, size in rows]
        return "\n".join([*lines, f"{'chunk rows':>18}: {self.chunk_rows:12,d}"])


def dense_fits(n_test: int, n_train: int) -> bool:
    """Whether a dense attribution matrix takes under a quarter of the memory
    available (float64 scores, then the float64 result)."""
    available = available_memory()
    return available is None or 16 * n_test * n_train < available // 4


def check_dense_fits(n_test: int, n_train: int) -> None:
    """Refuse a dense attribution matrix that cannot fit in memory, and warn when it
    would take a large share of it; ``most_influential`` streams instead."""
    if dense_fits(n_test, n_train):
        return
    available, needed = available_memory(), 16 * n_test * n_train
    message = (
        f"attribute would build a dense ({n_test}, {n_train}) matrix, about {needed / 2**30:.1f} GiB, "
        f"with {available / 2**30:.1f} GiB of memory available. Use most_influential(X, y, k), which "
        "streams over the training set, or attribute fewer test samples at a time."
    )
    if needed >= available:
        raise ValueError(message)
    warnings.warn(message, ResourceWarning, stacklevel=3)


class FeatureStorage(NamedTuple):
    """Where a fit's training features go, and in what type."""

    dtype: np.dtype
    directory: str | None  # None: in memory (or on a cluster's workers)


def feature_storage(values: int, feature_dtype: str, features_dir, resident: int = 0, on_workers=False):
    """The :class:`FeatureStorage` of ``values`` training features: in
    ``features_dir`` when set, in the temporary directory when they would take
    over half the memory that the fit's other ``resident`` bytes leave available,
    else in memory (``on_workers``: on a cluster's). ``feature_dtype="auto"`` is
    float16 on disk and float32 elsewhere. The directory is absolute, so that the
    file is found (and removed) whatever the working directory later."""
    wide = widest_dtype(feature_dtype)
    directory = None
    if features_dir is not None and not on_workers:
        directory = os.path.abspath(features_dir)
    elif not on_workers:
        available = available_memory()
        if available is not None and values * wide.itemsize > (available - resident) // 2:
            directory = tempfile.gettempdir()
    dtype = np.dtype(np.float16) if feature_dtype == "auto" and directory is not None else wide
    return FeatureStorage(dtype, directory)


def widest_dtype(feature_dtype: str) -> np.dtype:
    """The storage type ``feature_dtype`` gives features in memory ("auto": float32)."""
    return np.dtype(np.float32 if feature_dtype == "auto" else feature_dtype)


def check_memory(stages: dict[str, int]) -> None:
    """Refuse, before any training, a fit whose resident ``stages`` (bytes) exceed
    the memory available, naming each."""
    available, needed = available_memory(), sum(stages.values())
    if available is None or needed <= available:
        return
    listed = ", ".join(f"{name} {size / 2**20:,.0f} MiB" for name, size in stages.items())
    raise ValueError(
        f"This fit would hold about {needed / 2**20:,.0f} MiB beyond what the process holds now "
        f"({listed}), and {available / 2**20:,.0f} MiB of memory is available. Lower proj_dim or "
        "n_models, store features on disk (features_dir), lower scikit-learn's working_memory, or "
        "use a machine with more memory; plan_memory(X, y) shows every stage."
    )


def check_plan(plan: MemoryPlan) -> None:
    """Refuse, before any training, a fit whose planned peak exceeds the memory
    available even at the smallest chunk, naming its stages."""
    available = available_memory()
    if available is None or plan.fit_peak <= available:
        return
    stages = ", ".join(
        f"{name} {size / 2**20:,.0f} MiB"
        for name, size in plan._asdict().items()
        if name not in ("chunk_rows", "scores", "worker") and size
    )
    raise ValueError(
        f"This fit would need about {plan.fit_peak / 2**20:,.0f} MiB at its peak ({stages}; featurizing "
        f"{plan.chunk_rows} row(s) at once), and {available / 2**20:,.0f} MiB of memory is available. "
        "Train fewer models at once (n_jobs), a smaller net batch_size, fewer members, features on disk "
        "(features_dir), or use a machine with more memory; plan_memory(X, y) shows every stage."
    )


def check_writable_directory(directory) -> None:
    """Refuse a ``features_dir`` that is a file or cannot be written, before any
    training is spent."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ValueError(
            f"features_dir={os.fspath(directory)!r} cannot hold the training features: "
            f"{exc.strerror or exc}. Pass a writable directory, or None to keep them in memory."
        ) from exc


def check_free_space(directory: str, nbytes: int) -> None:
    """Refuse to store ``nbytes`` in ``directory`` when its disk has less free."""
    free = shutil.disk_usage(directory).free
    if nbytes > free:
        raise ValueError(no_space_message(directory, nbytes, free))


def no_space_message(directory: str, nbytes: int, free: int | None = None) -> str:
    has = "" if free is None else f", and its disk has {free / 2**20:,.0f} MiB free"
    return (
        f"The training features need {nbytes / 2**20:,.0f} MiB ({nbytes} bytes) in {directory!r}{has}. "
        "Free space there, set features_dir to a directory on a disk with room (None, and the "
        "temporary directory, TMPDIR, is used only when the features would not fit in memory), or "
        "store less: a smaller proj_dim, feature_dtype='float16', fewer members."
    )


# ------------------------------------------------------------ a fit's sizes


def feature_width(blocks, dense: int) -> int:
    """The width of features made of Kronecker ``blocks`` ``[(k_out, k_in), ...]``
    and a ``dense`` block."""
    return sum(a * b for a, b in blocks) + dense


class FitSizes(NamedTuple):
    """What a fit will train and store, known before any training: ``n`` training
    rows; ``n_models`` models of ``param_bytes`` parameters each; ``n_members``
    feature sets (members, times TracIn's checkpoints), each of Kronecker
    ``blocks`` ``[(k_out, k_in), ...]`` and a ``dense`` block; the ``curvature``
    the method inverts (None, ``"per_layer"`` or ``"gram"``); the inputs'
    ``input_bytes``, and ``copied_bytes`` of them that sktda copies."""

    n: int
    n_models: int
    n_members: int
    blocks: list
    dense: int
    curvature: str | None
    param_bytes: int
    input_bytes: int
    copied_bytes: int

    @property
    def width(self) -> int:
        """The width of a feature set: its Kronecker blocks and its dense block."""
        return feature_width(self.blocks, self.dense)

    @property
    def values(self) -> int:
        """The number of training features stored (residuals aside)."""
        return self.n_members * self.n * self.width


class Resident(NamedTuple):
    """``features``: the training features' bytes; ``stages``: the bytes of
    everything else a fit holds at once that is sized exactly before training;
    ``storage``: where the features go, and in what type."""

    features: int
    stages: dict
    storage: FeatureStorage


class FitPlan(NamedTuple):
    """The resource decisions a fit acts on: where its features go
    (``storage``), and the rows featurized at once (``chunk_rows``, None for the
    net's ``batch_size``)."""

    storage: FeatureStorage | None = None
    chunk_rows: int | None = None


def resident_sizes(sizes: FitSizes, feature_dtype: str, features_dir, on_workers: bool) -> Resident:
    """The :class:`Resident` bytes of a fit of ``sizes``: the models, sktda's copy
    of the inputs, the residuals, the curvature and the streamed row blocks, and
    the features' storage (:func:`feature_storage`)."""
    from sklearn import get_config

    n, n_members, width = sizes.n, sizes.n_members, sizes.width
    if sizes.curvature is None:
        curvature = 0
    elif sizes.curvature == "per_layer":  # each block's two eigenbases and its inverse eigenvalues
        curvature = sum(a * a + b * b + a * b for a, b in sizes.blocks) + 2 * sizes.dense**2
    else:  # the Gram, then its inverse and Cholesky factor
        curvature = 2 * width * width

    def working(dtype) -> int:
        # the blocks streamed within one shard at a time: at most a member's rows of a
        # shard in float64 and their train side, within scikit-learn's working_memory
        return min(
            get_config()["working_memory"] * 2**20,
            n * n_members * 3 * width * 4,
            2 * (8 // dtype.itemsize) * SHARD_BYTES // n_members,
        )

    stages = {
        "models": sizes.n_models * sizes.param_bytes,
        "inputs": sizes.copied_bytes,
        "residuals": n_members * n * 4,  # float32, in memory
        "curvature": n_members * 8 * curvature,
        "working": working(widest_dtype(feature_dtype)),  # until the storage is decided
    }
    storage = feature_storage(sizes.values, feature_dtype, features_dir, sum(stages.values()), on_workers)
    stages["working"] = working(storage.dtype)
    return Resident(sizes.values * storage.dtype.itemsize, stages, storage)


def memory_plan(
    sizes: FitSizes,
    resident: Resident,
    *,
    row_bytes: int,
    training_rows: int,
    trains: bool,
    at_once: int,
    chunk_rows: int,
    n_workers: int = 0,
    n_test: int = 0,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of a fit of ``sizes`` whose forward and backward pass
    takes ``row_bytes`` a row: models trained on batches of ``training_rows``
    (none unless ``trains``), ``at_once`` of them at a time in this process, and
    featurized ``chunk_rows`` at a time (shrunk where that would not fit);
    ``n_workers``: the Dask workers keeping the features (0: none); ``n_test``:
    the test samples that ``attribute`` scores at once."""
    features, stages, storage = resident
    on_disk = storage.directory is not None
    params = sizes.param_bytes
    # weights, gradients and two optimizer moments, and a batch's rows
    training = 4 * params + row_bytes * training_rows if trains else 0
    here = 0 if n_workers else at_once
    featurizing = params + row_bytes * chunk_rows  # a member's working copy, and a chunk
    worker = 0
    if n_workers:  # the worker that trains reads the whole inputs
        worker = max(training + sizes.input_bytes, featurizing) + features // n_workers + 3 * SHARD_BYTES
    plan = MemoryPlan(
        models=stages["models"],
        training=here * training,
        featurizing=here * featurizing,
        inputs=stages["inputs"],
        features=(0 if on_disk or n_workers else features) + stages["residuals"],
        features_on_disk=features if on_disk else 0,
        features_on_workers=features if n_workers else 0,
        curvature=stages["curvature"],
        working=0 if n_workers else stages["working"],
        scores=16 * n_test * sizes.n,
        worker=worker,
        chunk_rows=chunk_rows,
    )
    return plan.with_chunk_that_fits(here, params, row_bytes)


def check_fit_resources(resident: Resident, plan: MemoryPlan | None, on_workers: bool) -> None:
    """Refuse, before any training, a fit whose features have no room (on disk or
    in memory) or whose planned peak does not fit (``plan`` None: not planned)."""
    features, stages, storage = resident
    if on_workers:  # the features stay on the workers
        check_memory(stages)
        return
    if storage.directory is not None:
        check_free_space(storage.directory, features)
    else:
        stages = {**stages, "features": features}
    check_memory(stages)
    if plan is not None:
        check_plan(plan)


def copied_bytes(X) -> int:
    """Bytes of sktda's copy of the inputs (none of a dask array or a Dataset)."""
    return 0 if by_reference(X) else input_bytes(X)


def input_bytes(X) -> int:
    """Bytes of the inputs (a dask array's as computed; 0 for a Dataset, unknown)."""
    if is_dataset(X):
        return 0
    return sum(
        int(v.nbytes if is_dask(v) else np.asarray(v).nbytes)
        for v in (X.values() if isinstance(X, dict) else [X])
    )


def row_bytes(module: torch.nn.Module, sample) -> int:
    """Bytes that one more row of a batch adds to a forward and backward pass:
    the larger of twice every leaf module's output (what a pass of a small net
    holds, as measured on an MLP and a CNN) and 1.75 times what autograd saves
    for the backward pass, the target's log-probabilities included (as measured
    on GPT-2- and Llama-size language models, whose attention and vocabulary
    save more than their layers output)."""
    outputs, saved = 0, {}

    def count(_module, _inputs, output):
        nonlocal outputs
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                outputs += t.numel() * t.element_size()

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    try:
        with torch.enable_grad(), torch.random.fork_rng(devices=[]):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = call(module, sample)
    finally:
        for handle in handles:
            handle.remove()
    out_bytes = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else 0
    backward = sum(size for ptr, size in saved.items() if ptr not in weights) + out_bytes
    return max(2 * outputs, 7 * backward // 4)
