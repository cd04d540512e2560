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
from sklearn.utils import Bunch, check_random_state
from sklearn.utils.parallel import Parallel
from sklearn.utils.validation import check_is_fitted, check_scalar

from ._compat import HasMethods, Interval, StrOptions, validate_params
from ._data import (
    as_array_like,
    check_inputs,
    check_y,
    encode_y,
    group_codes,
    input_spec,
    n_samples,
    output_classes,
    take,
    targets_of,
    to_torch,
)
from ._nets import (
    check_net,
    check_pretrained,
    fit_net,
    frozen_nets,
    initialized_module,
    resolve_device,
    retraining_net,
    takes_token_ids,
)
from ._parallel import delayed_tasks
from ._task import TARGETS
from .metrics import units_calibration

__all__ = [
    "Retraining",
    "SubsetRetraining",
    "best_under_budget",
    "cost_scorer",
    "lds_scorer",
    "removal_effect",
    "subset_retraining",
]

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 32


class SubsetRetraining(NamedTuple):
    """Subset masks ``(n_subsets, n_train)`` and the retrained models' outputs on
    the test set ``(n_subsets, n_test)``."""

    subsets: np.ndarray
    outputs: np.ndarray


class Retraining(NamedTuple):
    """How a fitted attributor's models are retrained, as
    ``EnsembleAttributor.retraining_`` describes them: what ``score``,
    ``calibrate_units``, :func:`subset_retraining` and :func:`removal_effect`
    retrain. ``estimator``: the net (a frozen net's recipe, or
    ``retrain_estimator``); ``X``, ``y``: the training data, as given (sktda's
    copy); ``target``, ``pretrained``, ``classes`` (the classes' order, or None),
    ``device`` and ``n_jobs``: as the attributor was fitted; ``random_state``: the
    seed of the retrained models."""

    estimator: object
    X: object
    y: np.ndarray
    target: str
    pretrained: bool
    classes: np.ndarray | None
    device: object
    n_jobs: int | None
    random_state: int

    def subsets(self, X_test, y_test, *, n_subsets: int = 50, subset_fraction: float = 0.5) -> SubsetRetraining:
        """:func:`subset_retraining` of this recipe, measured on ``(X_test, y_test)``."""
        return subset_retraining(
            self.estimator,
            self.X,
            self.y,
            X_test,
            y_test,
            n_subsets=n_subsets,
            subset_fraction=subset_fraction,
            pretrained=self.pretrained,
            random_state=self.random_state,
            n_jobs=self.n_jobs,
            device=self.device,
            target=self.target,
            classes=self.classes,
        )


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


def _prepare(estimator, X, y, X_test, y_test, target, pretrained=False, classes=None):
    """The net that retrains (a frozen net's recipe), the task measured on the test
    set, and validated inputs with their encoded targets: class labels as
    ``classes`` orders them, else the module's output indices where its weights
    are given (a frozen net, ``pretrained``), else the classes present in ``y``."""
    y, y_test = targets_of(X, y), targets_of(X_test, y_test)
    held = frozen_nets(estimator) is not None or pretrained
    estimator = retraining_net(estimator)
    if getattr(estimator, "max_epochs", 1) < 1:
        raise ValueError(
            f"The net has max_epochs={estimator.max_epochs}: retraining it on subsets trains nothing, so "
            "every subset model would be the same and the measure meaningless. For a model you trained "
            "yourself, pass FrozenEstimator(net) to attribute it, and its training recipe (max_epochs >= 1) "
            "as retrain_estimator to score it."
        )
    check_pretrained(estimator, pretrained)
    task = check_net(estimator, target, as_array_like(y))
    module = initialized_module(estimator)
    integers = takes_token_ids(module)
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
    if task.is_classifier and not task.is_sequence and classes is None:
        classes = output_classes(module, X, task, y) if held else np.unique(y)
    return (
        estimator,
        task.as_test(),
        X,
        encode_y(y, task, classes),
        X_test,
        encode_y(y_test, task, classes),
    )


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
        "classes": ["array-like", None],
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
    classes=None,
) -> SubsetRetraining:
    """Retrain ``estimator`` on random subsets of ``(X, y)`` and record its outputs
    on ``(X_test, y_test)``: the ground truth of the linear datamodeling score.

    Results are cached in memory (keyed by the net's configuration, the data and
    the subset settings), so scoring several attribution strategies on the same
    data retrains once. Pass ``memory`` (a path or ``joblib.Memory``) to share the
    cache across processes, as a parallel grid search does.

    Parameters
    ----------
    estimator : skorch.NeuralNet or sklearn.frozen.FrozenEstimator
        Unfitted skorch net; cloned and trained once per subset. A
        ``FrozenEstimator`` (or a list of them) is retrained from its recipe:
        the frozen net's unfitted clone, refused when its module is the trained
        instance itself (pass the recipe as an unfitted net instead).
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
    classes : array-like or None, default=None
        The class labels in the order of the module's outputs (an attributor's
        ``classes_``). None: the module's output indices with a frozen net or
        ``pretrained=True`` (its weights already map outputs to classes), else
        the classes present in ``y``, sorted.

    Returns
    -------
    SubsetRetraining
        ``subsets`` (n_subsets, n_train) boolean masks and ``outputs``
        (n_subsets, n_test): the correct-class margin for classifiers, the
        prediction for regressors.
    """
    estimator, task, X, y, X_test, y_test = _prepare(
        estimator, X, y, X_test, y_test, target, pretrained, None if classes is None else np.asarray(classes)
    )
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
    outputs = _retrained_outputs(
        estimator, task, X, y, X_test, y_test, subsets, seeds, resolve_device(device), n_jobs, memory
    )
    return SubsetRetraining(subsets=subsets, outputs=outputs)


def _retrained_outputs(estimator, task, X, y, X_test, y_test, masks, seeds, device, n_jobs, memory):
    """The test targets ``(n_masks, n_test)`` of ``estimator`` retrained on each
    mask of the training set with its seed: cached in this process (keyed by the
    net's configuration, the data, the masks, the seeds and the device) and in
    ``memory``."""
    try:
        key = joblib.hash(
            (joblib.hash(clone(estimator)), X, y, X_test, y_test, masks, seeds, str(device), task.target)
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
    outputs = compute(estimator, task, X, y, masks, seeds, X_test, y_test, device, n_jobs)
    if key is not None:
        _CACHE[key] = outputs
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return outputs


@validate_params(
    {
        "k": [Interval(numbers.Integral, 1, None, closed="left")],
        "groups": ["array-like", None],
        "remove": [StrOptions({"proponents", "opponents"})],
        "n_retrains": [Interval(numbers.Integral, 1, None, closed="left")],
        "flip_sizes": [StrOptions({"auto"}), "array-like", None],
        "random_state": ["random_state"],
        "n_jobs": [numbers.Integral, None],
        "memory": [str, HasMethods(["cache"]), None],
    },
    prefer_skip_nested_validation=True,
)
def removal_effect(
    attributor,
    X,
    y,
    *,
    k: int = 10,
    groups=None,
    remove: str = "proponents",
    n_retrains: int = 3,
    flip_sizes="auto",
    random_state=None,
    n_jobs: int | None = None,
    memory=None,
) -> Bunch:
    """Check attributions by retraining: remove each test sample's top ``k``
    proponents from the training set, retrain with the same recipe, and measure how
    the test target moves, beside the move that removing ``k`` random samples
    causes and the move that the attributions predicted.

    Every condition is retrained ``n_retrains`` times, with the same seeds as the
    model trained on the whole training set, and the change is the mean over those
    seeds of the retrained target minus the whole-set model's. The models are
    trained as ``subset_retraining`` trains them (the attributor's net, device,
    target and ``pretrained``), in parallel and through the same cache.

    Parameters
    ----------
    attributor : EnsembleAttributor
        Fitted; its training set is the one the samples are removed from.
    X : array-like of shape (n_test, n_features)
        Test inputs.
    y : array-like of shape (n_test,)
        Their targets, whose prediction is attributed and measured.
    k : int, default=10
        Proponents removed per test sample (with ``groups``: groups removed).
    groups : array-like of shape (n_train,), default=None
        One label per training sample: remove each test sample's ``k`` top
        proponent groups by their summed scores (see
        ``EnsembleAttributor.attribute``), beside ``k`` random groups.
    remove : {"proponents", "opponents"}, default="proponents"
        Which to remove: the top proponents (the target should drop), or the
        top opponents (it should rise: the check of a decision to drop harmful
        samples or sources).
    n_retrains : int, default=3
        Seeds each condition is retrained with: more average out more of the
        training noise, which removing a handful of samples hardly exceeds.
    flip_sizes : "auto", array-like of int or None, default="auto"
        Removal sizes tried, in increasing order, for the brittleness: the
        smallest size whose removal of top proponents flips the prediction
        (with ``remove="proponents"`` only).
        ``"auto"``: ``k, 2k, 4k, 8k, 16k`` up to half the training set (with
        ``groups``: 1 up to all groups but one). None skips it.
    random_state : int, RandomState instance or None, default=None
        Draws the random removals and the training seeds; None uses the
        attributor's ``random_state`` (0 if it is not an integer).
    n_jobs : int, default=None
        Models trained in parallel (the attributor's ``n_jobs`` when None).
    memory : str, joblib.Memory or None, default=None
        Persistent cache in addition to the in-process one.

    Returns
    -------
    effect : sklearn.utils.Bunch
        Arrays of shape ``(n_test,)`` unless said otherwise:

        - ``attributed``: the change of each test target when its top ``k``
          proponents (or opponents) are removed and the model retrained
          (negative: the target dropped, as removing proponents should make it);
        - ``random``: the same for ``k`` random training samples (or groups);
        - ``predicted``: the change the attributions predict for the top-``k``
          removal, minus the removed samples' scores summed, in the target's
          units (``units_scale_``, calibrated on the subset models that
          ``score`` trains when the attributor has not been calibrated);
        - ``random_predicted``: the same for the random removal;
        - ``baseline``: the test targets of the models trained on the whole
          training set (mean over seeds);
        - ``brittleness``: for a classifier's margin (``target="auto"``), the
          smallest of ``flip_sizes`` whose top proponents' removal makes the mean
          retrained margin negative, so that the attributed label loses its
          majority (for two classes, the prediction flips); ``inf`` when none
          does, NaN where the whole-set models' margin is not positive; None
          otherwise, or with ``flip_sizes=None``;
        - ``removed``, ``random_removed``: ``(n_test, k)`` training indices (or
          group indices) removed per test sample;
        - ``flip_sizes``: the removal sizes tried, a tuple;
        - ``units_scale``: the factor from scores to the target's units.
    """
    check_is_fitted(attributor)
    if y is None:
        raise ValueError("removal_effect needs the test targets y: it measures how y's prediction moves.")
    recipe = attributor.retraining_
    estimator, task, X_train, y_train, X_test, y_test = _prepare(
        recipe.estimator, recipe.X, recipe.y, X, y, recipe.target, recipe.pretrained, recipe.classes
    )
    n_train, n_test = len(y_train), len(y_test)
    # the removal sizes checked before any scoring or retraining
    units, n_units = (np.arange(n_train), n_train) if groups is None else group_codes(groups, n_train)
    if k >= n_units:
        raise ValueError(
            f"k={k} would remove every one of the {n_units} training {'groups' if groups is not None else 'samples'}; "
            "use a smaller k."
        )
    sizes = _flip_sizes(
        flip_sizes if remove == "proponents" else None, k, n_units, grouped=groups is not None
    )
    scores = attributor.attribute(X, y, groups=groups)
    scale = _units_scale(attributor, recipe, X, y, scores, groups)
    rng = check_random_state(recipe.random_state if random_state is None else random_state)
    seeds = rng.randint(0, 2**31 - 1, size=n_retrains)

    # each test sample's removal order: its proponents (or opponents), strongest first
    order = np.argsort(scores if remove == "opponents" else -scores, axis=1, kind="stable")[:, : max([k, *sizes])]
    random_removed = np.stack([rng.choice(n_units, k, replace=False) for _ in range(n_test)])
    retrain = _Removals(
        (estimator, task, X_train, y_train, X_test, y_test),
        units,
        seeds,
        resolve_device(recipe.device),
        recipe.n_jobs if n_jobs is None else n_jobs,
        memory,
    )
    everyone = np.arange(n_test)
    full = retrain.run(np.ones((n_retrains, n_train), dtype=bool), seeds).mean(0)  # one model per seed
    attributed = retrain.outputs(order[:, :k], everyone) - full
    brittleness = None
    if sizes and task.is_classifier and not task.is_sequence and task.target == "auto":
        brittleness = _brittleness(retrain, order, full, attributed, sizes, k)

    def predicted(removed):
        return -scale * np.take_along_axis(scores, removed, 1).sum(1)

    return Bunch(
        attributed=attributed,
        random=retrain.outputs(random_removed, everyone) - full,
        predicted=predicted(order[:, :k]),
        random_predicted=predicted(random_removed),
        baseline=full,
        brittleness=brittleness,
        removed=order[:, :k],
        random_removed=random_removed,
        flip_sizes=tuple(sizes),
        units_scale=float(scale),
    )


def _units_scale(attributor, recipe: Retraining, X, y, scores, groups) -> float:
    """The factor from scores to the target's units: the attributor's calibration,
    else one on the subset models that ``score`` trains, fitted to the per-sample
    scores (the group sums' terms) of the test samples ``(X, y)``."""
    if hasattr(attributor, "units_scale_"):
        return attributor.units_scale_
    truth = recipe.subsets(
        X, y, n_subsets=attributor.score_n_subsets, subset_fraction=attributor.score_subset_fraction
    )
    samples = scores if groups is None else attributor.attribute(X, y)
    return units_calibration(samples, truth.subsets, truth.outputs)[0]


class _Removals:
    """Models retrained with some training units removed, each with every seed:
    ``data`` is ``(estimator, task, X, y, X_test, y_test)``, validated; ``units``
    each training sample's unit (itself, or its group)."""

    def __init__(self, data, units, seeds, device, n_jobs, memory):
        self.data, self.units, self.seeds = data, units, seeds
        self.device, self.n_jobs, self.memory = device, n_jobs, memory

    def run(self, masks, mask_seeds) -> np.ndarray:
        """The test targets ``(n_masks, n_test)`` of the models trained on each mask."""
        estimator, task, X, y, X_test, y_test = self.data
        return _retrained_outputs(
            estimator, task, X, y, X_test, y_test, masks, mask_seeds, self.device, self.n_jobs, self.memory
        )

    def outputs(self, removed_rows, tests) -> np.ndarray:
        """The mean over seeds of each test sample's retrained target, its own row
        of ``removed_rows`` left out of the training set."""
        n_seeds = len(self.seeds)
        masks = np.repeat(np.stack([~np.isin(self.units, removed) for removed in removed_rows]), n_seeds, 0)
        mask_seeds = np.tile(self.seeds, len(tests))
        # the same removal with the same seed is one model (test samples often share
        # their top groups)
        keys = np.column_stack(
            [np.packbits(masks, axis=1), mask_seeds.astype(">u4").view(np.uint8).reshape(-1, 4)]
        )
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        out = self.run(masks[first], mask_seeds[first])[inverse.ravel()]
        return out[np.arange(len(out)), np.repeat(tests, n_seeds)].reshape(len(tests), n_seeds).mean(1)


def _brittleness(retrain: _Removals, order, full, attributed, sizes, k: int) -> np.ndarray:
    """The smallest of ``sizes`` whose top proponents' removal makes each test
    sample's mean retrained margin negative (inf: none does; NaN: the whole-set
    margin is not positive)."""
    brittleness = np.where(full > 0, np.inf, np.nan)
    for size in sizes:
        tests = np.flatnonzero(np.isinf(brittleness))
        if not len(tests):
            break
        after = attributed[tests] + full[tests] if size == k else retrain.outputs(order[tests, :size], tests)
        brittleness[tests[after < 0]] = size
    return brittleness


def _flip_sizes(flip_sizes, k: int, n_units: int, grouped: bool) -> list[int]:
    if flip_sizes is None:
        return []
    if isinstance(flip_sizes, str):  # "auto"
        if grouped:
            return list(range(1, n_units))
        return [s for s in (k, 2 * k, 4 * k, 8 * k, 16 * k) if s <= n_units // 2] or [k]
    sizes = np.asarray(flip_sizes).ravel().tolist()
    if not sizes:
        raise ValueError("flip_sizes is empty: pass removal sizes, 'auto', or None to skip the brittleness.")
    for size in sizes:  # whole numbers of samples (or groups), fewer than all of them
        check_scalar(size, "each of flip_sizes", numbers.Integral, min_val=1, max_val=n_units - 1)
    return sorted(set(sizes))


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
