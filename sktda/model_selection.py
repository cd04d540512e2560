"""Ground truth for attribution quality: models retrained on training subsets."""

from __future__ import annotations

import numbers
import pickle
from collections import OrderedDict
from typing import NamedTuple

import joblib
import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils.parallel import Parallel

from ._compat import HasMethods, Interval, StrOptions, validate_params
from ._data import (
    as_array_like,
    check_inputs,
    check_y,
    encode_y,
    input_spec,
    n_samples,
    take,
    targets_of,
    to_torch,
)
from ._nets import (
    check_net,
    check_pretrained,
    fit_net,
    initialized_module,
    resolve_device,
    takes_token_ids,
)
from ._parallel import delayed_tasks
from ._task import TARGETS

__all__ = ["SubsetRetraining", "best_under_budget", "cost_scorer", "lds_scorer", "subset_retraining"]

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32


class SubsetRetraining(NamedTuple):
    """Subset masks ``(n_subsets, n_train)`` and the retrained models' outputs on
    the test set ``(n_subsets, n_test)``."""

    subsets: np.ndarray
    outputs: np.ndarray


def _target_outputs(net, task, X, y) -> np.ndarray:
    """The attributed target of a trained net on ``(X, y)``, through skorch's
    batched forward (eval mode, no gradients)."""
    with torch.no_grad():
        out = net.forward(X, training=False)
        return task.target_and_residual(out, to_torch(y))[0].numpy()


def _subset_outputs(estimator, task, X, y, mask, X_test, y_test, seed, device):
    net = fit_net(estimator, take(X, mask), y[mask], seed=seed, device=device, task=task)
    return _target_outputs(net, task, X_test, y_test)


def _retrain(estimator, task, X, y, subsets, seeds, X_test, y_test, device, n_jobs):
    jobs = delayed_tasks(
        _subset_outputs,
        [
            ((estimator, task, X, y, mask, X_test, y_test, seed, device), {})
            for mask, seed in zip(subsets, seeds)
        ],
    )
    outputs = Parallel(n_jobs=n_jobs)(jobs)
    outputs = np.stack(outputs).astype(np.float64)
    if not np.all(np.isfinite(outputs)):
        bad = int(np.flatnonzero(~np.isfinite(outputs).all(1))[0])
        raise ValueError(
            f"The model retrained on subset {bad} gives non-finite outputs on the test set; "
            "lower lr or scale X so that training is stable."
        )
    return outputs


def _prepare(estimator, X, y, X_test, y_test, target):
    """Validated inputs and encoded targets, and the task measured on the test set."""
    y, y_test = targets_of(X, y), targets_of(X_test, y_test)
    task = check_net(estimator, target, as_array_like(y))
    integers = takes_token_ids(initialized_module(estimator))
    X, X_test = (
        check_inputs(X, "X", keep_integers=integers),
        check_inputs(X_test, "X_test", keep_integers=integers),
    )
    if input_spec(X) != input_spec(X_test):
        raise ValueError(
            f"X and X_test must have the same per-sample shape and kind; got {input_spec(X)} "
            f"and {input_spec(X_test)}."
        )
    y, y_test = check_y(as_array_like(y), task), check_y(as_array_like(y_test), task)
    if n_samples(X) != len(y) or n_samples(X_test) != len(y_test):
        raise ValueError(
            f"X has {n_samples(X)} samples and y {len(y)}; X_test has {n_samples(X_test)} "
            f"and y_test {len(y_test)}. Pass one target per sample."
        )
    classes = np.unique(y) if task.is_classifier and not task.is_sequence else None
    return task.as_test(), X, encode_y(y, task, classes), X_test, encode_y(y_test, task, classes)


@validate_params(
    {
        "n_subsets": [Interval(numbers.Integral, 3, None, closed="left")],
        "subset_fraction": [Interval(numbers.Real, 0, 1, closed="neither")],
        "random_state": ["random_state"],
        "n_jobs": [numbers.Integral, None],
        "device": [str, torch.device],
        "memory": [str, HasMethods(["cache"]), None],
        "target": [StrOptions(set(TARGETS)), callable],
        "pretrained": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def subset_retraining(
    estimator,
    X,
    y,
    X_test,
    y_test,
    *,
    n_subsets: int = 50,
    subset_fraction: float = 0.5,
    random_state=0,
    n_jobs: int | None = None,
    device: str = "auto",
    memory=None,
    target="auto",
    pretrained: bool = False,
) -> SubsetRetraining:
    """Retrain ``estimator`` on random subsets of ``(X, y)`` and record its outputs
    on ``(X_test, y_test)``: the ground truth of the linear datamodeling score.

    Results are cached in memory (keyed by the net's configuration, the data and
    the subset settings), so scoring several attribution strategies on the same
    data retrains once. Pass ``memory`` (a path or ``joblib.Memory``) to share the
    cache across processes, as a parallel grid search does.

    Parameters
    ----------
    estimator : skorch.NeuralNet
        Unfitted skorch net; cloned and trained once per subset.
    X, y : array-like, torch.Tensor or dict of arrays
        Training data the subsets are drawn from (any input the net accepts).
    X_test, y_test : array-like, torch.Tensor or dict of arrays
        Where the retrained models are evaluated.
    n_subsets : int, default=50
        Number of subsets (and retrained models); at least 3.
    subset_fraction : float, default=0.5
        Fraction of the training set in each subset, in (0, 1).
    random_state : int, RandomState instance or None, default=0
        Draws the subsets and the training seeds.
    n_jobs : int, default=None
        Models trained in parallel through ``sklearn.utils.parallel.Parallel``.
    device : str, default="auto"
        Torch device; ``"auto"`` is CUDA when available.
    memory : str, joblib.Memory or None, default=None
        Persistent cache in addition to the in-process one.
    target : {"auto", "log_prob", "loss", "sequence_log_likelihood"} or callable, default="auto"
        The output measured on the test set, as in ``EnsembleAttributor``.
    pretrained : bool, default=False
        The net's module is an instance holding pretrained weights, and every
        retrained model is a full fine-tune of them on its subset (what a user
        fine-tuning the model trains, whatever ensemble the attribution uses).

    Returns
    -------
    SubsetRetraining
        ``subsets`` (n_subsets, n_train) boolean masks and ``outputs``
        (n_subsets, n_test): the correct-class margin for classifiers, the
        prediction for regressors.
    """
    check_pretrained(estimator, pretrained)
    task, X, y, X_test, y_test = _prepare(estimator, X, y, X_test, y_test, target)
    n = len(y)
    size = int(round(subset_fraction * n))
    if size < 2 or size >= n:
        raise ValueError(
            f"subset_fraction={subset_fraction} of {n} training samples gives subsets of "
            f"{size}; each subset needs at least 2 samples and fewer than all {n}. "
            "Use more training data or another fraction."
        )
    rng = check_random_state(random_state)
    subsets = np.zeros((n_subsets, n), dtype=bool)
    for s in range(n_subsets):
        subsets[s, rng.choice(n, size, replace=False)] = True
    seeds = rng.randint(0, 2**31 - 1, size=n_subsets)
    device = resolve_device(device)

    try:
        key = joblib.hash(
            (joblib.hash(clone(estimator)), X, y, X_test, y_test, subsets, seeds, str(device), task.target)
        )
    except (
        pickle.PicklingError,
        TypeError,
        AttributeError,
    ):  # a module class defined where pickle cannot find it
        key = None
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]

    compute = _retrain
    if memory is not None and key is not None:
        compute = (joblib.Memory(memory, verbose=0) if isinstance(memory, str) else memory).cache(
            _retrain, ignore=["n_jobs"]
        )
    outputs = compute(estimator, task, X, y, subsets, seeds, X_test, y_test, device, n_jobs)
    result = SubsetRetraining(subsets=subsets, outputs=outputs)
    if key is not None:
        _CACHE[key] = result
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return result


def lds_scorer(estimator, X, y) -> float:
    """Scorer for ``GridSearchCV(scoring=...)``: the attributor's LDS on ``(X, y)``
    (what ``EnsembleAttributor.score`` returns)."""
    return estimator.score(X, y)


def cost_scorer(cost: str = "train_seconds"):
    """A scorer that reports one entry of the fitted attributor's ``costs_``
    (``train_seconds``, ``featurize_seconds``, ``feature_bytes``, ``model_bytes``,
    ``n_members``), so ``cv_results_`` shows it beside the LDS.

    Examples
    --------
    >>> from sktda.model_selection import cost_scorer, lds_scorer
    >>> scoring = {"lds": lds_scorer, "train_seconds": cost_scorer("train_seconds")}
    """
    costs = ("train_seconds", "featurize_seconds", "feature_bytes", "model_bytes", "n_members")
    if cost not in costs:
        raise ValueError(f"cost must be one of {costs}, got {cost!r}.")

    def scorer(estimator, X, y=None) -> float:
        return float(estimator.costs_[cost])

    scorer.__name__ = f"{cost}_scorer"
    return scorer


def best_under_budget(budget: float, cost: str = "train_seconds", score: str = "lds"):
    """A ``refit`` callable for ``GridSearchCV`` with multi-metric scoring: the
    candidate with the best mean ``score`` among those whose mean ``cost`` is at
    most ``budget`` (the cheapest candidate if none is).

    Use it with ``scoring={score: lds_scorer, cost: cost_scorer(cost)}``.

    Examples
    --------
    >>> import numpy as np
    >>> from sktda.model_selection import best_under_budget
    >>> results = {"mean_test_lds": np.array([0.6, 0.5, 0.55]),
    ...            "mean_test_train_seconds": np.array([10.0, 2.0, 3.0])}
    >>> best_under_budget(5.0)(results)
    2
    """

    def refit(cv_results) -> int:
        scores = np.asarray(cv_results[f"mean_test_{score}"], dtype=float)
        costs = np.asarray(cv_results[f"mean_test_{cost}"], dtype=float)
        within = costs <= budget
        if not within.any():
            return int(np.argmin(costs))
        return int(np.flatnonzero(within)[np.argmax(scores[within])])

    return refit
