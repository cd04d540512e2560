"""Bundled data for examples, tests and benchmarks, with label-noise injection."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state

from ._compat import Interval, validate_params

__all__ = ["flip_labels", "load_digits_split"]


@validate_params(
    {
        "n_train": [Interval(numbers.Integral, 1, None, closed="left")],
        "n_test": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def load_digits_split(n_train: int = 1000, n_test: int = 200, random_state: int = 0):
    """scikit-learn's digits, scaled to [0, 1] as float32, split into a stratified
    training and test set.

    Returns
    -------
    X_train, X_test, y_train, y_test : ndarray
        ``(n_train, 64)``, ``(n_test, 64)`` float32 images, int64 labels.

    Examples
    --------
    >>> from sktda.datasets import load_digits_split
    >>> X_train, X_test, y_train, y_test = load_digits_split(100, 20)
    >>> X_train.shape, X_test.shape
    ((100, 64), (20, 64))
    """
    X, y = load_digits(return_X_y=True)
    if n_train + n_test > len(y):
        raise ValueError(f"digits has {len(y)} samples; n_train + n_test = {n_train + n_test}.")
    X_train, X_test, y_train, y_test = train_test_split(
        (X / 16.0).astype(np.float32),
        y.astype(np.int64),
        train_size=n_train,
        test_size=n_test,
        random_state=random_state,
        stratify=y,
    )
    return X_train, X_test, y_train, y_test


@validate_params(
    {
        "y": ["array-like"],
        "fraction": [Interval(numbers.Real, 0, 1, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def flip_labels(y, fraction: float, random_state=None):
    """Symmetric label noise: ``fraction`` of the labels, chosen at random, are
    replaced by a different class drawn uniformly.

    Returns
    -------
    y_noisy : ndarray
        The noisy labels (a copy; ``y`` is not modified).
    is_flipped : ndarray of bool
        Which samples were flipped.

    Examples
    --------
    >>> import numpy as np
    >>> from sktda.datasets import flip_labels
    >>> y_noisy, flipped = flip_labels(np.arange(10) % 2, 0.3, random_state=0)
    >>> int(flipped.sum()), bool(np.all((y_noisy != np.arange(10) % 2) == flipped))
    (3, True)
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D array of labels, got shape {y.shape}.")
    classes = np.unique(y)
    if classes.size < 2:
        raise ValueError("flip_labels needs at least two classes.")
    rng = check_random_state(random_state)
    n_flip = int(round(fraction * y.shape[0]))
    idx = rng.choice(y.shape[0], n_flip, replace=False)
    y_noisy = y.copy()
    for i in idx:
        y_noisy[i] = rng.choice(classes[classes != y[i]])
    is_flipped = np.zeros(y.shape[0], dtype=bool)
    is_flipped[idx] = True
    return y_noisy, is_flipped
