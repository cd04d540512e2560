"""Input validation shared by the estimators: numpy, torch or pandas in, float32
features and encoded targets out, with errors that say what to fix."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, validate_data

from ._nets import NetTask


def as_array_like(data):
    """Torch tensors become numpy arrays (on the CPU); anything else passes through."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    return data


def _float32(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X, dtype=np.float32)


def validate_fit_data(estimator, X, y, task: NetTask):
    """Validate ``(X, y)`` for ``fit``; set ``n_features_in_`` (and ``classes_``).

    Returns float32 ``X`` and the targets the net trains on: int64 class indices for
    classifiers, a float32 column for regressors.
    """
    X, y = as_array_like(X), as_array_like(y)
    if y is None:
        raise ValueError(f"{type(estimator).__name__} requires y to be passed, but the target y is None.")
    X, y = validate_data(
        estimator,
        X,
        y,
        dtype=[np.float64, np.float32],
        ensure_min_samples=2,
        y_numeric=not task.is_classifier,
    )
    if task.is_classifier:
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        estimator.classes_ = encoder.classes_
        if len(encoder.classes_) == 1:
            warnings.warn(
                f"y has a single class ({encoder.classes_[0]}): every training sample has the "
                "same label, so attributions and outlier scores carry no information about "
                "which label a sample should have. Pass y with at least two classes.",
                UserWarning,
                stacklevel=4,
            )
        return _float32(X), encoder.transform(y).astype(np.int64)
    return _float32(X), np.asarray(y, dtype=np.float32).reshape(-1, 1)


def validate_predict_data(estimator, X, y, task: NetTask):
    """Validate ``X`` (and ``y`` when given) against what ``fit`` saw.

    Returns float32 ``X`` and encoded targets, or ``None`` when ``y`` is ``None``.
    """
    X = validate_data(estimator, as_array_like(X), reset=False, dtype=[np.float64, np.float32])
    if y is None:
        return _float32(X), None
    y = check_array(as_array_like(y), ensure_2d=False, dtype=None, input_name="y")
    if y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1):
        raise ValueError(
            f"y must hold one target per sample, a 1-D array, but has shape {y.shape}; pass "
            "the labels (or values) as a 1-D array."
        )
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}; pass one target per sample.")
    if not task.is_classifier:
        y = check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        return _float32(X), y.astype(np.float32).reshape(-1, 1)
    return _float32(X), encode_labels(estimator.classes_, y)


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


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))
