"""Input validation shared by the estimators, and the few operations the rest of
the library needs on inputs of any kind.

Inputs are whatever a skorch net accepts: 2-D tables (numpy, pandas, lists), N-d
arrays (images ``(n, C, H, W)``, sequences ``(n, T, d)``), integer arrays (token
ids, kept integer all the way to the module), torch tensors, and dicts of arrays
(skorch's convention for multi-input modules, ``SliceDict`` included), passed to
``module.forward`` as keyword arguments. Floating inputs become float32; integer
inputs keep their dtype. After validation an input is a numpy array or a plain
dict of them, and :func:`n_samples`, :func:`take`, :func:`to_torch` and
:func:`call` work on either.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from scipy.sparse import issparse
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_consistent_length, validate_data

from ._compat import num_samples
from ._task import BINARY, NetTask


def as_array_like(data):
    """Torch tensors become numpy arrays (on the CPU); anything else passes through."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    return data


# ---------------------------------------------------------------- operations
def n_samples(X) -> int:
    """Rows of an array-like, a tensor, or a dict of them (not its number of keys)."""
    return num_samples(next(iter(X.values()))) if isinstance(X, Mapping) else num_samples(X)


def take(X, index):
    """Rows ``index`` (a slice, indices or a boolean mask) of an array, tensor or
    dict of them, or of a torch ``Dataset`` (a ``Subset``: nothing is read)."""
    if is_dataset(X):
        return torch.utils.data.Subset(X, _positions(index, len(X)))
    if isinstance(X, Mapping):
        return {k: v[index] for k, v in X.items()}
    return X[index]


def to_torch(X, device=None):
    """Tensors (on ``device``) of a validated numpy input (a dask array's rows
    computed, a ``Dataset``'s inputs read and collated), or of a dict of them."""
    X = collate_inputs(X) if is_dataset(X) else materialize(X)
    if isinstance(X, Mapping):
        return {k: to_torch(v, device) for k, v in X.items()}
    if isinstance(X, torch.Tensor):
        return X.to(device) if device is not None else X
    X = np.ascontiguousarray(X)
    with warnings.catch_warnings():
        # a read-only array (from Ray's or joblib's shared memory) is shared, not copied:
        # sktda never writes to its inputs' tensors
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(X)
    return tensor.to(device) if device is not None else tensor


def map_tensors(function, x):
    """``function`` applied to a tensor or to every tensor of a dict."""
    if isinstance(x, Mapping):
        return {k: function(v) for k, v in x.items()}
    return function(x)


def call(function, x, *args):
    """``function(x, *args)``, or ``function(*args, **x)`` for a dict input (as skorch
    passes dicts to ``module.forward``)."""
    if isinstance(x, Mapping):
        return function(*args, **x)
    return function(x, *args)


def is_dataset(X) -> bool:
    """A map-style torch ``Dataset`` (what skorch takes as X, the targets inside)."""
    return isinstance(X, torch.utils.data.Dataset) and hasattr(X, "__len__")


def _positions(index, n: int):
    if isinstance(index, slice):
        return range(*index.indices(n))
    index = np.asarray(index)
    return np.flatnonzero(index).tolist() if index.dtype == bool else index.tolist()


def _items(dataset):
    """The dataset's items, each checked to be an ``(input, target)`` pair."""
    for i in range(len(dataset)):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"Item {i} of the Dataset is a {type(item).__name__}, not an (input, target) pair; sktda "
                "reads the targets from the Dataset, as skorch does: return (x, y) from __getitem__."
            )
        yield item


def collate_inputs(dataset):
    """The inputs of every item of ``dataset``, collated into one batch (a tensor,
    or a dict of them) by torch's ``default_collate``."""
    from torch.utils.data import default_collate

    inputs = [x for x, _ in _items(dataset)]
    try:
        return default_collate(inputs)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(_not_stackable(inputs, exc)) from exc


def _shape_of(x):
    if is_dict(x):
        return tuple(sorted((k, _shape_of(v)) for k, v in x.items()))
    return tuple(np.shape(as_array_like(x)))


def _not_stackable(inputs, reason) -> str:
    shapes = sorted({str(_shape_of(x)) for x in inputs})
    seen = f" (input shapes {', '.join(shapes[:4])})" if len(shapes) > 1 else ""
    return (
        f"The Dataset's inputs cannot be stacked into one batch{seen}: {reason}. sktda batches its "
        "samples as skorch does, so every item's input must have the same shape: pad them to one "
        "length (with an attention mask, in a dict of tensors), or crop them."
    )


_CHECKED_ITEMS = 8  # the first items, which the driver reads anyway (a cluster's workers read the rest)


def check_items(dataset, task: NetTask) -> None:
    """Refuse, before training, a ``Dataset`` whose first items' inputs differ in
    shape (featurizing stacks them all; a later item that differs is named when
    they are stacked), or, for a classifier that takes class indices, whose items'
    targets are not integers (skorch hands them to the loss as they are)."""
    first = None
    takes_indices = task.is_classifier and not task.is_sequence and task.output not in BINARY
    head = torch.utils.data.Subset(dataset, range(min(len(dataset), _CHECKED_ITEMS)))
    for i, (x, y) in enumerate(_items(head)):
        if first is None:
            first = x
        elif _shape_of(x) != _shape_of(first):
            raise ValueError(_not_stackable([first, x], f"item 0 and item {i} differ"))
        kind = np.asarray(as_array_like(y)).dtype
        if takes_indices and kind.kind not in "iub":
            raise ValueError(
                f"Item {i} of the Dataset has a {kind} target ({as_array_like(y)!r}), and skorch passes "
                "the items' targets to the classifier's loss as they are, which needs integer class "
                "indices: make __getitem__ return int64 targets (torch.long)."
            )


def dataset_targets(dataset) -> np.ndarray:
    """The targets of a ``Dataset``: its ``targets`` or ``y`` attribute when it has
    one of the right length (torchvision's and skorch's datasets), a ``Subset``'s
    taken from its dataset's, else read item by item."""
    if isinstance(dataset, torch.utils.data.Subset):
        return dataset_targets(dataset.dataset)[np.asarray(dataset.indices, dtype=np.int64)]
    for name in ("targets", "y"):
        targets = getattr(dataset, name, None)
        if targets is not None and not callable(targets) and len(targets) == len(dataset):
            return np.asarray(as_array_like(targets))
    return np.stack([np.asarray(as_array_like(y)) for _, y in _items(dataset)])


def targets_of(X, y):
    """``y``, or a ``Dataset``'s own targets when ``y`` is None (given, ``y`` must be
    them: skorch trains on the Dataset's items); the kinds of ``X`` and ``y`` that
    sktda cannot read by rows are refused first (:func:`check_rows_readable`)."""
    check_rows_readable(X, "X")
    check_rows_readable(y, "y")
    return dataset_targets(X) if y is None and is_dataset(X) else y


def check_rows_readable(data, name: str) -> None:
    """Refuse inputs whose rows cannot be counted and read in any order: an
    ``IterableDataset`` (a stream), or a dask array with unknown chunk sizes."""
    if isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(
            f"{name} is an IterableDataset, a stream: sktda reads training samples by index (for every "
            "member, checkpoint and retraining), as a map-style Dataset allows. Pass a Dataset with "
            "__getitem__ and __len__ (for example a TensorDataset of the streamed samples)."
        )
    if is_dask(data) and any(np.isnan(size) for size in data.shape):
        raise ValueError(
            f"{name} is a dask array with unknown chunk sizes (shape {data.shape}, as a boolean filter "
            f"leaves it), so its samples cannot be counted. Call {name}.compute_chunk_sizes() first."
        )


def is_dask(X) -> bool:
    return hasattr(X, "__dask_graph__")


def materialize(X):
    """A dask collection computed (on the worker running this task, which reads its
    own rows, or here), anything else as it is."""
    if not is_dask(X):
        return X
    try:
        from distributed import worker_client

        with worker_client() as client:  # secedes from the worker's pool while it waits
            return client.compute(X).result()
    except ValueError:  # not in a worker
        return X.compute()


def by_reference(X) -> bool:
    """Inputs that sktda keeps a reference to, never a copy (they may not fit in
    memory): a dask array, a ``Dataset``."""
    return is_dask(X) or is_dataset(X)


def copy_inputs(X):
    """A copy that does not change when the caller's arrays do; a dask array or a
    ``Dataset`` is kept as it is (a reference: it may not fit in memory)."""
    if by_reference(X):
        return X
    return {k: np.array(v) for k, v in X.items()} if isinstance(X, Mapping) else np.array(X)


# ----------------------------------------------------------------- validation
def is_dict(X) -> bool:
    return isinstance(X, Mapping) and not issparse(X)  # a DOK sparse matrix is a dict


def _check_array(X, name: str, min_samples: int, keep_integers: bool = True) -> np.ndarray:
    X = np.asarray(as_array_like(X)) if not hasattr(X, "iloc") else X
    integer = keep_integers and getattr(X, "dtype", None) is not None and np.dtype(X.dtype).kind in "iu"
    X = check_array(
        X,
        allow_nd=True,
        ensure_2d=False,
        dtype=None if integer else [np.float32, np.float64],
        ensure_min_samples=min_samples,
        input_name=name,
    )
    if X.ndim == 0:
        raise ValueError(f"{name} must hold one entry per sample; got a scalar.")
    return X if integer else np.ascontiguousarray(X, dtype=np.float32)


def check_inputs(X, name: str = "X", min_samples: int = 1, keep_integers: bool = True):
    """Validate an input of any kind without fitted-state bookkeeping: a float32 or
    integer numpy array, or a dict of them with one length. Integer arrays stay
    integer when ``keep_integers`` (token ids for an ``nn.Embedding``) and become
    float32 features otherwise; in a dict they always stay as they are."""
    X = as_array_like(X)
    if X is None:
        raise ValueError(f"{name} is None; pass the samples.")
    if is_dask(X):
        return check_dask(X, name, min_samples, keep_integers)
    if is_dataset(X):
        return _check_dataset(X, name, min_samples)
    if issparse(X):
        raise TypeError(f"Sparse data was passed for {name}, but dense data is required; use X.toarray().")
    if isinstance(X, Mapping):
        if not X:
            raise ValueError(f"{name} is an empty dict; pass the module's inputs by keyword.")
        out = {k: _check_array(v, f"{name}[{k!r}]", min_samples) for k, v in X.items()}
        lengths = {k: len(v) for k, v in out.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"The arrays of {name} have different numbers of samples: {lengths}.")
        return out
    X = _check_array(X, name, min_samples, keep_integers)
    if X.ndim == 1:
        raise ValueError(
            f"{name} is 1-D, shape {X.shape}; pass one row per sample, for example X.reshape(-1, 1)."
        )
    return X


def input_spec(X):
    """Per-sample shape and kind (float or integer) of every part of an input (a
    ``Dataset``'s from its first item)."""
    if is_dataset(X):
        return input_spec(map_tensors(as_array_like, to_torch(take(X, slice(0, 1)))))
    if isinstance(X, Mapping):
        return {k: input_spec(v) for k, v in X.items()}
    return (tuple(X.shape[1:]), "integer" if X.dtype.kind in "iu" else "float")


def _validate_X(estimator, X, *, reset: bool, keep_integers: bool):
    """``X`` for ``fit`` (``reset``) or for prediction, checked against fit. 2-D
    numeric tables go through scikit-learn's ``validate_data`` (feature counts and
    names); N-d arrays and dicts are checked against the shapes seen in fit, and
    ``n_features_in_`` is not set for them. A dask array is checked without being
    brought here for ``fit`` (:func:`check_dask`), and computed for prediction
    (test sets fit in memory)."""
    X = as_array_like(X)
    if by_reference(X) and reset:
        X = check_dask(X, min_samples=2, keep_integers=keep_integers) if is_dask(X) else _check_dataset(X)
        _forget_feature_counts(estimator)
        if is_dask(X) and X.ndim == 2:
            estimator.n_features_in_ = X.shape[1]
        estimator._input_spec = input_spec(X)
        return X
    # for prediction: a test set fits in memory
    X = map_tensors(as_array_like, to_torch(X)) if is_dataset(X) else materialize(X)
    if not (is_dict(X) or hasattr(X, "iloc") or issparse(X)):
        X = np.asarray(X)  # lists and other array-likes
    if not is_dict(X) and (hasattr(X, "iloc") or issparse(X) or X.ndim <= 2):
        integer = keep_integers and not hasattr(X, "iloc") and np.asarray(X).dtype.kind in "iu"
        X = validate_data(
            estimator,
            X,
            reset=reset,
            dtype=None if integer else [np.float32, np.float64],
            ensure_min_samples=2 if reset else 1,
        )
        X = X if integer else np.ascontiguousarray(X, dtype=np.float32)
    else:
        X = check_inputs(X, min_samples=2 if reset else 1, keep_integers=keep_integers)
        if reset:
            _forget_feature_counts(estimator)
    spec = input_spec(X)
    if reset:
        estimator._input_spec = spec
    elif spec != estimator._input_spec:
        raise ValueError(
            f"X has per-sample shape and kind {spec}, but fit saw {estimator._input_spec}; pass "
            "inputs shaped like the training data."
        )
    return X


def _forget_feature_counts(estimator) -> None:
    """Drop a previous fit's ``n_features_in_`` and ``feature_names_in_``."""
    for attr in ("n_features_in_", "feature_names_in_"):
        if hasattr(estimator, attr):
            delattr(estimator, attr)


def _check_dataset(X, name: str = "X", min_samples: int = 2):
    if len(X) < min_samples:
        raise ValueError(
            f"The Dataset {name} has {len(X)} item(s) while a minimum of {min_samples} is required."
        )
    return X


def check_dask(X, name: str = "X", min_samples: int = 1, keep_integers: bool = True):
    """A dask array of inputs, checked lazily: its shape and kind here, its values
    by one pass where it lives (the cluster, under a distributed client). Float
    inputs become float32, lazily."""
    if any(isinstance(s, float) for s in X.shape):  # NaN: chunks of unknown size
        raise ValueError(
            f"{name} is a dask array with unknown chunk sizes; call {name}.compute_chunk_sizes()."
        )
    if X.ndim < 2:
        raise ValueError(
            f"{name} is 1-D, shape {X.shape}; pass one row per sample, for example reshape(-1, 1)."
        )
    if X.shape[0] < min_samples:
        raise ValueError(f"{name} has {X.shape[0]} sample(s) while a minimum of {min_samples} is required.")
    if X.dtype.kind not in "iuf":
        raise TypeError(f"{name} is a dask array of dtype {X.dtype}; pass numbers (float or integer).")
    if keep_integers and X.dtype.kind in "iu":
        return X
    import dask.array as da

    X = X.astype(np.float32)
    if not bool(da.isfinite(X).all().compute()):
        raise ValueError(f"Input {name} contains NaN or infinity.")
    return X


def validate_fit_data(estimator, X, y, task: NetTask, keep_integers: bool = True, module=None):
    """Validate ``(X, y)`` for ``fit``; set ``n_features_in_`` (2-D tables) and
    ``classes_`` (classifiers).

    ``module``: a module that holds trained or pretrained weights, whose output
    units are the classes (see :func:`output_classes`); None: the classes are
    those present in ``y``, encoded in sorted order, as scikit-learn does.

    Returns the inputs and the targets the net trains on: int64 class indices for
    classifiers, int64 token ids ``(n, T)`` for sequence targets, a float32 column
    for regressors.
    """
    y = targets_of(X, y)
    if y is None:
        raise ValueError(f"{type(estimator).__name__} requires y to be passed, but the target y is None.")
    y = check_y(as_array_like(y), task)
    X = as_array_like(X)
    if is_dataset(X):
        check_items(X, task)
    first = as_array_like(next(iter(X.values()))) if is_dict(X) and X else X
    check_consistent_length(first, y)  # before X's bookkeeping: a failed fit leaves nothing fitted
    X = _validate_X(estimator, X, reset=True, keep_integers=keep_integers)
    estimator._keep_integers = keep_integers
    if task.is_sequence:
        return X, y
    if task.is_classifier:
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        estimator.classes_ = encoder.classes_
        if module is not None:
            estimator.classes_ = output_classes(module, X, task, y)
        if task.output in BINARY and len(encoder.classes_) > 2:
            raise ValueError(
                f"y has {len(encoder.classes_)} classes, and binary cross-entropy (skorch's "
                "NeuralNetBinaryClassifier) takes two. Use a NeuralNetClassifier with CrossEntropyLoss and "
                "one output per class."
            )
        if len(encoder.classes_) == 1 and module is None:
            warnings.warn(
                f"y has a single class ({encoder.classes_[0]}): every training sample has the "
                "same label, so attributions and outlier scores carry no information about "
                "which label a sample should have. Pass y with at least two classes.",
                UserWarning,
                stacklevel=4,
            )
        if is_dataset(X) and not np.array_equal(estimator.classes_, np.arange(len(estimator.classes_))):
            raise ValueError(
                f"The Dataset's targets are the classes {estimator.classes_.tolist()[:10]}, and skorch trains "
                "the net on them as they are: make __getitem__ return class indices 0..n_classes-1."
            )
    return X, encode_y(y, task, getattr(estimator, "classes_", None))


def output_classes(module, X, task: NetTask, y) -> np.ndarray:
    """The classes of a module that holds weights: its output units ``0 ..
    n_outputs - 1``, as skorch trains on class indices. Labels are never
    re-encoded from the classes present in ``y`` (a class missing from the data
    must not shift the others onto the wrong output units), so ``y`` must hold
    those indices."""
    first = take(X, slice(0, 1))
    device = next(iter(module.parameters())).device
    training = module.training
    module.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            n_outputs = int(task.logits(call(module, to_torch(first, device))).shape[-1])
    finally:
        module.train(training)
    labels = np.unique(np.asarray(y))
    integral = labels.dtype.kind in "iu" or (labels.dtype.kind == "f" and np.all(labels == np.round(labels)))
    if not integral or labels.min() < 0 or labels.max() >= n_outputs:
        shown = labels.tolist()[:10]
        raise ValueError(
            f"The module holds trained weights (a FrozenEstimator, pretrained=True or a peft model), so "
            f"class labels are its output units 0..{n_outputs - 1}, as skorch trains on them; y holds "
            f"{shown}{'...' if len(labels) > 10 else ''}. Pass the class indices the module was trained "
            "with (for example LabelEncoder fitted on the original training labels)."
        )
    return np.arange(n_outputs)


def check_y(y, task: NetTask) -> np.ndarray:
    if task.is_sequence:
        y = check_array(y, ensure_2d=True, dtype=None, input_name="y")
        if y.dtype.kind not in "iu":
            raise ValueError(
                f"A sequence target needs y of integer token ids, shape (n_samples, T); got dtype {y.dtype}."
            )
        return y.astype(np.int64)
    y = check_array(y, ensure_2d=False, dtype=None if task.is_classifier else np.float64, input_name="y")
    if not task.is_classifier and y.ndim == 2 and y.shape[1] > 1:  # a multi-output regressor
        return y
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise ValueError(
            f"y must hold one {'label' if task.is_classifier else 'target'} per sample, a 1-D array, but "
            f"has shape {y.shape}; pass the labels as a 1-D array (a regressor takes (n_samples, "
            "n_outputs) values)."
        )
    return y.reshape(-1)


def validate_predict_data(estimator, X, y, task: NetTask):
    """Validate ``X`` (and ``y`` when given) against what ``fit`` saw.

    Returns the inputs and encoded targets, or ``None`` when ``y`` is ``None``.
    """
    y = targets_of(X, y)
    X = _validate_X(estimator, X, reset=False, keep_integers=estimator._keep_integers)
    if y is None:
        return X, None
    y = check_y(as_array_like(y), task)
    if len(y) != n_samples(X):
        raise ValueError(f"X has {n_samples(X)} samples but y has {len(y)}; pass one target per sample.")
    return X, encode_y(y, task, getattr(estimator, "classes_", None))


def encode_y(y: np.ndarray, task: NetTask, classes) -> np.ndarray:
    """What a checked ``y`` gives the net to train on: token ids as they are,
    indices into ``classes`` for classifiers, a float32 column for regressors."""
    if task.is_sequence:
        return y
    if task.output in BINARY:  # binary cross-entropy takes the class index as a float
        return encode_labels(classes, y).astype(np.float32)
    if task.is_classifier:
        return encode_labels(classes, y)
    return np.asarray(y, dtype=np.float32).reshape(len(y), -1)


def encode_labels(classes: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of ``y`` in ``classes``; a clear error for labels never seen in fit."""
    y = np.asarray(y).reshape(-1)
    unseen = np.setdiff1d(np.unique(y), classes)
    if unseen.size:
        raise ValueError(
            f"y contains labels {unseen.tolist()} that were not in the training data "
            f"(classes {classes.tolist()}); the net has no output for them."
        )
    return np.searchsorted(classes, y).astype(np.int64)


def _missing(values: np.ndarray) -> np.ndarray:
    """Where ``values`` holds a missing label: NaN, NaT, None or pandas' NA (a
    column cast to object keeps them as objects)."""
    if values.dtype.kind in "fc":
        return np.isnan(values)
    if values.dtype.kind in "mM":
        return np.isnat(values)
    if values.dtype.kind != "O":
        return np.zeros(values.shape, dtype=bool)

    def missing(v) -> bool:
        if v is None:
            return True
        try:
            return bool(v != v)  # NaN, NaT
        except (TypeError, ValueError):  # pandas' NA: its comparisons are NA
            return True

    return np.fromiter((missing(v) for v in values), dtype=bool, count=len(values))


def group_codes(groups, n: int, what: str = "training sample") -> tuple[np.ndarray, int]:
    """Each sample's index into ``np.unique(groups)`` (``groups``: one label per
    each of the ``n`` samples), and the number of groups."""
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise ValueError(
            f"groups must hold one label per {what}, shape ({n},); got shape {groups.shape}. "
            f"Pass the group of each {what}, in order."
        )
    missing = np.flatnonzero(_missing(groups))
    if missing.size:
        raise ValueError(
            f"groups has no label (NaN or None) for {missing.size} {what}(s), the first at index "
            f"{missing[0]}: give every {what} a group label (for example fillna('unknown') on a "
            "pandas column)."
        )
    try:
        labels, codes = np.unique(groups, return_inverse=True)
    except TypeError as exc:
        raise TypeError(
            f"groups' labels must be comparable, to order them as np.unique does ({exc}). "
            "Pass strings or numbers of one kind."
        ) from exc
    return codes.astype(np.int64), len(labels)
