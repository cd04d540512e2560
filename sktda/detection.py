"""Detrimental-sample detection from per-sample gradient outliers."""

from __future__ import annotations

import numbers
import time
import warnings
from collections import OrderedDict

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, OneToOneFeatureMixin, OutlierMixin, clone
from sklearn.utils import check_random_state, indexable
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._base import GradientEstimator, fill_doc
from ._compat import (
    HasMethods,
    Interval,
    StrOptions,
    check_method_params,
    estimator_has,
    fit_context,
    num_samples,
    safe_indexing,
)
from ._data import group_codes, is_dask, is_dataset, is_dict, n_samples, take, targets_of

__all__ = ["FilteredEstimator", "OutlierGradientDetector"]

_NORMS = {"l1": 1, "l2": 2}


class _NormScore:
    """A fitted 'detector' whose score is minus the gradient's L_p norm."""

    def __init__(self, p: int):
        self.p = p

    def score_samples(self, G: np.ndarray) -> np.ndarray:
        return -np.linalg.norm(G, ord=self.p, axis=1)


def _loss_gradients(block, member: int) -> np.ndarray:
    """A shard's projected training-loss gradients of one member, ``-residual phi``."""
    return -block.residuals[member][:, None] * block.features[member]


def _norm_scores(block, member: int, p: int) -> np.ndarray:
    """Minus the L_p norm of each of a shard's loss gradients (see :class:`_NormScore`)."""
    return _NormScore(p).score_samples(_loss_gradients(block, member))


def _strategy_classes(result, strategy) -> list:
    """The classes a ``sampling_strategy`` callable names: a dict's keys (as
    imbalanced-learn's callables return), or a list-like of class labels."""
    if isinstance(result, dict):
        return list(result)
    if isinstance(result, (list, tuple, set, frozenset, np.ndarray)):
        return np.asarray(list(result)).ravel().tolist()
    raise TypeError(
        f"sampling_strategy={getattr(strategy, '__name__', strategy)!r} returned {type(result).__name__} "
        f"({result!r}); a callable must return the classes to clean, as a list of labels of y or a "
        "dict keyed by them."
    )


def _otsu_offset(scores: np.ndarray) -> float:
    """Otsu's threshold (1979): the cut that splits the scores into the two groups
    with the largest between-group variance, ``w_low w_high (m_low - m_high)^2``,
    so the low group is the most separated set of outliers the scores hold."""
    s = np.sort(scores)
    n = len(s)
    if n < 2 or s[0] == s[-1]:
        return float(s[0])  # nothing to split: nothing flagged
    low = np.arange(1, n)  # the lowest ``low`` scores on one side
    sums = np.cumsum(s)[:-1]
    mean_low, mean_high = sums / low, (sums[-1] + s[-1] - sums) / (n - low)
    between = low * (n - low) * (mean_low - mean_high) ** 2
    between[s[1:] == s[:-1]] = -1  # a cut must fall between distinct scores
    k = int(np.argmax(between))
    return float((s[k] + s[k + 1]) / 2)


_STRATEGIES = ("auto", "all", "majority", "not minority", "not majority")


@fill_doc
class OutlierGradientDetector(OneToOneFeatureMixin, OutlierMixin, GradientEstimator):
    """Detrimental or mislabeled training samples as outliers in gradient space.

    ``fit`` trains the skorch net (or an ensemble of it), computes every training
    sample's gradient of the training loss at its given label, and fits an outlier
    detector on those gradients; no Hessian is involved (Chhabra et al., 2025).
    Beyond the paper, the gradients can be taken at checkpoints along training,
    where memorisation has not yet hidden the mislabeled samples, and scores are
    averaged over checkpoints and ensemble members. The defaults (an isolation
    forest on all layers' gradients, projected to 1024 features, at 4 checkpoints)
    were the best trade of AUROC, test accuracy after filtering and time, against
    cleanlab, of every combination of layers, score and checkpoints on an MLP, a
    CNN, a transformers BERT classifier and a LoRA fine-tune (the documentation's
    Benchmarks page, "Detector defaults").

    Parameters
    ----------
    %(estimator)s
    detector : {"iforest", "l2", "l1"} or scikit-learn outlier detector, default="iforest"
        ``"iforest"``: an ``IsolationForest`` on the gradients; ``"l1"``/``"l2"``:
        the norm of the loss gradient (larger = more abnormal); or any unfitted
        detector with ``fit`` and ``score_samples`` (cloned for every member,
        checkpoint and class, its ``random_state`` seeded from ours).
    contamination : float in (0, 0.5] or "auto", default=0.1
        Expected fraction of outliers: ``offset_`` is that quantile of the training
        scores, so this fraction of the training set is flagged (set it to the
        expected noise rate). ``"auto"``: Otsu's threshold on the training scores,
        the cut that best splits them into two groups, so the flagged fraction
        estimates the noise rate when there is a group of outliers (mislabeled
        samples) to find, never more than half; on clean data it still flags the
        least typical samples (see the user guide's measurements).
    layers : "all", "last", None or list of str, default="all"
        Parameters whose gradients are used: all ("all" or None), the output
        layer's (``"last"``, as in the paper), or those of the named modules.
    n_checkpoints : int or None, default=4
        Gradients at this many checkpoints evenly spread over training (the last
        included), scores averaged; None uses the final model only (the paper's
        recipe). Checkpoints need ``max_epochs >= 1``. A frozen net is scored at
        the ``checkpoints`` given (all of them), else at its own weights only.
    %(checkpoints)s
    per_class : bool, default=False
        Fit one detector per class on the samples given that label (classifiers).
    sampling_strategy : {"auto", "all", "majority", "not minority", "not majority"}, \
            list or callable, default="auto"
        The classes whose flagged samples ``fit_resample`` removes, as
        imbalanced-learn's cleaning samplers choose them: ``"auto"`` is ``"not
        minority"``, so the smallest class is never emptied; ``"all"`` cleans
        every class; a list names the classes; a callable ``y -> list`` returns
        them. Detection itself (``labels_``, ``predict``, the scores) covers every
        sample; regressors clean every sample whatever it says.
    ensemble : {"independent", "dropout"}, default="independent"
        Members whose scores are averaged: ``n_models`` trained nets, times
        ``n_masks`` fixed dropout masks with ``"dropout"``.
    %(n_models)s
    %(n_masks)s
    %(dropout_rate)s
    proj_dim : int or None, default=1024
        Random projection of the gradients; a member with at most ``proj_dim``
        differentiated parameters keeps them exact, as does None.
    %(projection)s
    %(gradient_path)s
    %(pretrained)s
    %(batch_size)s
    %(device)s
    %(n_jobs)s
    %(random_state)s
    %(verbose)s

    Attributes
    ----------
    %(estimators_)s
    %(ensemble_)s
    detectors_ : list of dict
        One dict per member and checkpoint, from group to its fitted detector:
        the single group ``None``, or each class's encoded label with
        ``per_class=True``. The ``"l1"`` and ``"l2"`` scores are norms, with no
        detector to fit, and appear as small scoring objects.
    offset_ : float
        ``decision_function = score_samples - offset_``; negative = outlier.
    train_scores_ : ndarray of shape (n_samples,)
        ``score_samples`` of the training set (lower = more abnormal).
    labels_ : ndarray of shape (n_samples,)
        +1 inlier, -1 outlier, for the training set.
    sample_indices_ : ndarray of shape (n_kept,)
        Indices of the training samples kept (the inliers, and every sample of a
        class that ``sampling_strategy`` leaves alone), what ``fit_resample``
        returns, as imbalanced-learn's samplers record it.
    sampling_strategy_ : OrderedDict
        Classifiers: the classes cleaned, each with the size of the smallest class,
        as imbalanced-learn's cleaning samplers record it.
    %(classes_)s
    %(n_features_in_)s
    %(feature_names_in_)s
    costs_ : dict
        ``train_seconds``, ``featurize_seconds``, ``detect_seconds``.

    See Also
    --------
    FilteredEstimator : fit a downstream estimator on what the detector keeps.
    sktda.EnsembleAttributor : attribution on the same gradient engine.

    References
    ----------
    .. [1] Chhabra et al., "Outlier Gradient Analysis: Efficiently Identifying
       Detrimental Training Samples for Deep Learning Models", ICML 2025.

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from sktda import OutlierGradientDetector
    >>> from sktda.datasets import flip_labels, load_digits_split
    >>> from sktda.models import MLP
    >>> X, _, y, _ = load_digits_split(n_train=300, n_test=10)
    >>> y_noisy, flipped = flip_labels(y, 0.1, random_state=0)
    >>> net = NeuralNetClassifier(MLP, module__n_features=64, module__n_outputs=10,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=20,
    ...                           lr=0.1, train_split=None, verbose=0)
    >>> det = OutlierGradientDetector(net, contamination=0.1, random_state=0)
    >>> flags = det.fit_predict(X, y_noisy)
    >>> float((flags == -1).mean())
    0.1
    """

    _parameter_constraints: dict = {
        **GradientEstimator._parameter_constraints,
        "detector": [StrOptions({"l1", "l2", "iforest"}), HasMethods(["fit", "score_samples"])],
        "contamination": [StrOptions({"auto"}), Interval(numbers.Real, 0, 0.5, closed="right")],
        "n_checkpoints": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "per_class": ["boolean"],
        "sampling_strategy": [StrOptions(set(_STRATEGIES)), list, callable],
        "ensemble": [StrOptions({"independent", "dropout"})],
    }

    def __init__(
        self,
        estimator,
        *,
        detector="iforest",
        contamination=0.1,
        layers="all",
        n_checkpoints=4,
        checkpoints=None,
        per_class=False,
        sampling_strategy="auto",
        ensemble="independent",
        n_models=1,
        n_masks=5,
        dropout_rate=None,
        proj_dim=1024,
        projection="gaussian",
        gradient_path="auto",
        pretrained=False,
        batch_size=256,
        device="auto",
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.estimator = estimator
        self.detector = detector
        self.contamination = contamination
        self.layers = layers
        self.n_checkpoints = n_checkpoints
        self.checkpoints = checkpoints
        self.per_class = per_class
        self.sampling_strategy = sampling_strategy
        self.ensemble = ensemble
        self.n_models = n_models
        self.n_masks = n_masks
        self.dropout_rate = dropout_rate
        self.proj_dim = proj_dim
        self.projection = projection
        self.gradient_path = gradient_path
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.device = device
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ fit
    def _check_fit(self, task):
        if self.per_class and (not task.is_classifier or task.is_sequence):
            raise ValueError(
                "per_class=True needs a classifier with one label per sample; the net is a "
                f"{'language model' if task.is_sequence else 'regressor'}."
            )

    def _check_targets(self, task, y):
        if task.is_classifier and not task.is_sequence:
            self._cleaned_classes(self._labels(y))  # a sampling_strategy that cannot apply, refused now

    def _labels(self, y) -> np.ndarray:
        """The training labels as given, from their indices (floats for binary cross-entropy)."""
        return self.classes_[np.asarray(y).astype(np.int64)]

    def _n_checkpoints(self):
        return self.n_checkpoints

    def _fit_features(self, X, y, *, task, device):
        start = time.perf_counter()
        shards = self._shards(X, y, task=task, device=device)
        featurize_seconds = time.perf_counter() - start

        start = time.perf_counter()
        seeds = check_random_state(self.random_state).randint(0, 2**31 - 1, size=shards.shape[0])
        groups = self._groups(y)
        # a norm reads nothing to fit; any other detector fits on each member's gradients
        gradients = [None if self._is_norm() else self._gradients(shards, m) for m in range(len(seeds))]
        self.detectors_ = [
            {g: self._fit_detector(None if G is None else G[rows], seed) for g, rows in groups.items()}
            for G, seed in zip(gradients, seeds)
        ]
        self.train_scores_ = self._score(shards, groups, gradients)
        self.offset_ = self._offset(self.train_scores_)
        self.labels_ = np.where(self.train_scores_ < self.offset_, -1, 1)
        keep = self.labels_ == 1
        if task.is_classifier and not task.is_sequence:
            labels = self._labels(y)
            self.sampling_strategy_ = self._cleaned_classes(labels)
            keep |= ~np.isin(labels, list(self.sampling_strategy_))
        self.sample_indices_ = np.flatnonzero(keep)
        return {"featurize_seconds": featurize_seconds, "detect_seconds": time.perf_counter() - start}

    # -------------------------------------------------------------- predict
    def score_samples(self, X, y=None) -> np.ndarray:
        """Outlier score of each sample: lower is more abnormal.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,), default=None
            Labels whose loss gradients are scored; None uses the ensemble's
            predicted labels.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            The mean over members and checkpoints of the detectors' scores.
        """
        task, X, y, device = self._prepare_predict(X, y)
        return self._score(self._shards(X, y, task=task, device=device, local=True), self._groups(y))

    def score_groups(self, X, y, groups) -> np.ndarray:
        """Outlier score of each group of samples (a data source, an annotator, a
        file): the mean of its samples' ``score_samples``, so that lower is more
        abnormal and a group's size does not decide its rank.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score, usually the training set.
        y : array-like of shape (n_samples,)
            As in ``score_samples``.
        groups : array-like of shape (n_samples,)
            One label per sample.

        Returns
        -------
        scores : ndarray of shape (n_groups,)
            In ``np.unique(groups)`` order.
        """
        check_is_fitted(self)
        codes, _ = group_codes(groups, n_samples(X), "sample of X")
        scores = self.score_samples(X, y)
        return np.bincount(codes, weights=scores) / np.bincount(codes)

    def decision_function(self, X, y=None) -> np.ndarray:
        """Shifted outlier score: negative for outliers.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to score.
        y : array-like of shape (n_samples,), default=None
            As in ``score_samples``.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            ``score_samples(X, y) - offset_``.
        """
        return self.score_samples(X, y) - self.offset_

    def predict(self, X, y=None) -> np.ndarray:
        """Flag outliers (detrimental samples).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Samples to flag.
        y : array-like of shape (n_samples,), default=None
            As in ``score_samples``.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            +1 for inliers, -1 for outliers.
        """
        return np.where(self.decision_function(X, y) < 0, -1, 1)

    def fit_predict(self, X, y=None) -> np.ndarray:
        """Fit on ``(X, y)`` and flag its outliers.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,)
            The given (possibly noisy) labels or targets; required.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            ``labels_``: +1 for inliers, -1 for outliers.
        """
        return self.fit(X, y).labels_

    def fit_resample(self, X, y=None):
        """Fit, then return the training samples kept (inliers), so the detector
        is a sampler in an ``imblearn.pipeline.Pipeline``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), or torch Dataset
            Training inputs.
        y : array-like of shape (n_samples,), default=None
            The given (possibly noisy) labels or targets; None only with a
            ``Dataset``, whose own targets are used.

        Returns
        -------
        X_kept, y_kept
            The inlier rows, in the types given (numpy arrays, pandas objects,
            tensors; a ``Subset`` of a ``Dataset``), and their targets.
        """
        labels = _one_vs_all_labels(y)
        self.fit(X, y if labels is None else labels)
        if hasattr(self, "classes_") and len(self.classes_) < 2:
            raise ValueError(
                f"fit_resample cleans the classes of y, and y has a single class ({self.classes_[0]}): "
                "there is nothing to keep apart. Use fit_predict to flag its outliers."
            )
        return self._fit_resample(X, y)

    def _cleaned_classes(self, labels) -> OrderedDict:
        """``sampling_strategy`` resolved on the training ``labels`` (as given): the
        classes to clean, each with the smallest class's size."""
        counts = dict(zip(*(a.tolist() for a in np.unique(labels, return_counts=True))))
        strategy = self.sampling_strategy
        if callable(strategy):
            strategy = _strategy_classes(strategy(labels), strategy)
        if isinstance(strategy, list):
            unknown = [c for c in strategy if c not in counts]
            if unknown:
                raise ValueError(
                    f"sampling_strategy names the classes {unknown}, which y does not have (its classes: "
                    f"{list(counts)}). Name classes of y."
                )
            chosen = set(strategy)
        elif strategy == "all":
            chosen = set(counts)
        elif strategy == "majority":
            chosen = {max(counts, key=counts.get)}
        elif strategy == "not majority":
            chosen = set(counts) - {max(counts, key=counts.get)}
        else:  # "auto", "not minority"
            chosen = set(counts) - {min(counts, key=counts.get)}
        smallest = min(counts.values())
        return OrderedDict((c, smallest) for c in counts if c in chosen)

    def _fit_resample(self, X, y):
        keep = self.sample_indices_
        y = targets_of(X, y)
        if hasattr(self, "classes_"):
            labels = np.asarray(indexable(y)[0])
            lost = np.setdiff1d(np.unique(labels), labels[keep])
            if lost.size:
                warnings.warn(
                    f"fit_resample removes every training sample of class(es) {lost.tolist()}, so a model "
                    "fitted on what is kept cannot predict them. The samples are removed all the same (as "
                    "imbalanced-learn's cleaning samplers do); lower contamination to keep some, or drop "
                    "the class on purpose.",
                    UserWarning,
                    stacklevel=3,
                )
        if is_dataset(X):  # a Subset, read by whoever fits on it
            return take(X, keep), safe_indexing(indexable(y)[0], keep)
        if is_dict(X):  # a dict of inputs, or skorch's SliceDict, keeps its type
            return type(X)(**{k: safe_indexing(v, keep) for k, v in X.items()}), safe_indexing(
                indexable(y)[0], keep
            )
        X, y = indexable(X, y)
        return self._outputs(safe_indexing(X, keep)), safe_indexing(y, keep)

    def set_output(self, *, transform=None):
        """Set the container of ``fit_resample``'s kept inputs.

        Parameters
        ----------
        transform : {"default", "pandas", "polars"} or None, default=None
            ``"pandas"`` or ``"polars"``: a DataFrame whose columns are
            ``get_feature_names_out()``, whatever type the 2-D input had;
            ``"default"``: the type given; None: unchanged.

        Returns
        -------
        self : OutlierGradientDetector
        """
        if transform not in (None, "default", "pandas", "polars"):
            raise ValueError(f"transform must be 'default', 'pandas', 'polars' or None, got {transform!r}.")
        if transform is not None:
            self._output = transform
        return self

    def _outputs(self, X):
        """The kept inputs in the container ``set_output`` asked for."""
        container = getattr(self, "_output", "default")
        if container == "default" or is_dataset(X) or is_dict(X):
            return X
        if np.ndim(X) != 2:
            raise ValueError(
                f"set_output(transform={container!r}) needs 2-D inputs; X has shape {np.shape(X)}."
            )
        columns = self.get_feature_names_out()
        if container == "pandas":
            import pandas as pd

            return X if isinstance(X, pd.DataFrame) else pd.DataFrame(np.asarray(X), columns=columns)
        import polars as pl

        return (
            X
            if isinstance(X, pl.DataFrame)
            else pl.DataFrame(np.asarray(X), schema=list(columns), orient="row")
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # gradients need dense inputs (sparse ones are refused)
        return _with_sampler_tags(tags)

    # ------------------------------------------------------------- helpers
    def _shards(self, X, y, *, task, device, local=False):
        """The members' features of ``(X, y)`` in shards (training features on a
        Dask cluster's workers, unless ``local``)."""
        checkpoints = bool(self.n_checkpoints) and self.ensemble_.has_checkpoints
        members = self.ensemble_.members(checkpoints=checkpoints)
        return self._training_features(members, X, y, task=task, device=device, local=local)[0]

    def _is_norm(self) -> bool:
        return isinstance(self.detector, str) and self.detector in _NORMS

    def _groups(self, y: np.ndarray) -> dict:
        if not self.per_class:
            return {None: np.arange(len(y))}
        y = np.asarray(y).reshape(-1)
        return {int(c): np.flatnonzero(y == c) for c in np.unique(y)}

    def _fit_detector(self, G: np.ndarray | None, seed: int):
        if self._is_norm():
            return _NormScore(_NORMS[self.detector])
        if isinstance(self.detector, str):
            from sklearn.ensemble import IsolationForest

            detector = IsolationForest(random_state=seed)
        else:
            detector = clone(self.detector)
            if "random_state" in detector.get_params():
                detector.set_params(random_state=seed)
        return detector.fit(G)

    @staticmethod
    def _gradients(shards, member: int) -> np.ndarray:
        """A member's loss gradients, gathered here from its shards."""
        return np.concatenate(shards.map(_loss_gradients, member))

    def _score(self, shards, groups: dict, gradients=None) -> np.ndarray:
        """The mean over members of the detectors' scores of the loss gradients in
        ``shards``: a norm computed shard by shard (where the shards live), any
        other detector on the member's gradients gathered here (or ``gradients``,
        gathered already)."""
        scores = np.zeros(sum(len(rows) for rows in groups.values()))
        for m, detectors in enumerate(self.detectors_):
            if self._is_norm():
                scores += np.concatenate(shards.map(_norm_scores, m, _NORMS[self.detector]))
                continue
            G = gradients[m] if gradients is not None else self._gradients(shards, m)
            for g, rows in groups.items():
                scores[rows] += detectors[g].score_samples(G[rows])
        if not np.all(np.isfinite(scores)):
            raise ValueError(
                "The outlier scores are not finite: the detector returned NaN or inf on the "
                "gradients. Use detector='l2' or 'iforest', or a projection (proj_dim)."
            )
        return scores / len(self.detectors_)

    def _offset(self, scores: np.ndarray) -> float:
        if self.contamination == "auto":  # outliers are the minority: at most half, as with a fraction
            return min(_otsu_offset(scores), float(np.percentile(scores, 50)))
        return float(np.percentile(scores, 100 * self.contamination))


class FilteredEstimator(MetaEstimatorMixin, BaseEstimator):
    """Fit ``estimator`` on the training samples that ``detector`` keeps.

    The filtering step as a plain scikit-learn meta-estimator, so it works inside
    ``Pipeline``, ``GridSearchCV`` and ``cross_validate`` (scikit-learn pipelines
    have no samplers). Prediction and scoring are the fitted estimator's, on
    unfiltered data.

    Parameters
    ----------
    estimator : estimator
        The downstream model, cloned and fitted on the kept samples.
    detector : object with ``fit_resample``, default=None
        The filter, cloned; None means ``OutlierGradientDetector`` on
        ``estimator`` itself (which must then be a skorch net).

    Attributes
    ----------
    estimator_ : estimator
        Fitted on the kept samples.
    detector_ : object
        The fitted filter.
    n_removed_ : int
        Training samples removed.
    classes_ : ndarray
        The estimator's classes (classifiers).

    Examples
    --------
    >>> import torch
    >>> from skorch import NeuralNetClassifier
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sktda import FilteredEstimator, OutlierGradientDetector
    >>> from sktda.datasets import flip_labels, load_digits_split
    >>> from sktda.models import MLP
    >>> X, X_test, y, y_test = load_digits_split(n_train=300, n_test=100)
    >>> y_noisy, _ = flip_labels(y, 0.2, random_state=0)
    >>> net = NeuralNetClassifier(MLP, module__n_features=64, module__n_outputs=10,
    ...                           criterion=torch.nn.CrossEntropyLoss, max_epochs=20,
    ...                           lr=0.1, train_split=None, verbose=0)
    >>> detector = OutlierGradientDetector(net, contamination=0.2, sampling_strategy="all",
    ...                                    random_state=0)
    >>> model = FilteredEstimator(LogisticRegression(max_iter=500), detector)
    >>> model.fit(X, y_noisy).n_removed_
    60
    """

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit"])],
        "detector": [HasMethods(["fit_resample"]), None],
    }

    def __init__(self, estimator, detector=None):
        self.estimator = estimator
        self.detector = detector

    @fit_context(prefer_skip_nested_validation=False)  # the inner estimators are validated
    def fit(self, X, y, **fit_params):
        """Filter ``(X, y)`` with the detector, then fit the estimator on the rest.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs.
        y : array-like of shape (n_samples,)
            Training targets (possibly noisy).
        **fit_params : dict
            Passed to the estimator's ``fit``; per-sample ones (``sample_weight``,
            any array of length ``n_samples``) are restricted to the kept samples.

        Returns
        -------
        self : FilteredEstimator
        """
        sample_weight = fit_params.get("sample_weight")
        if sample_weight is not None and num_samples(sample_weight) != num_samples(y):
            raise ValueError(
                f"sample_weight has {num_samples(sample_weight)} entries but y has {num_samples(y)} "
                "samples: pass one weight per training sample (they are filtered with the samples)."
            )
        detector = OutlierGradientDetector(self.estimator) if self.detector is None else clone(self.detector)
        X_kept, y_kept = detector.fit_resample(X, y)
        if fit_params:
            # y, not X, counts the samples: X may be a dict of arrays
            fit_params = check_method_params(y, fit_params, indices=_kept_indices(detector, fit_params))
        estimator = clone(self.estimator).fit(X_kept, y_kept, **fit_params)
        # assigned together once both fits are done: an error leaves the previous fit as it was
        self.detector_, self.estimator_ = detector, estimator
        self.n_removed_ = int(num_samples(y) - num_samples(y_kept))
        if hasattr(estimator, "n_features_in_"):
            self.n_features_in_ = estimator.n_features_in_
        return self

    @property
    def classes_(self):
        """The fitted estimator's class labels."""
        check_is_fitted(self)
        return self.estimator_.classes_

    @available_if(estimator_has("predict"))
    def predict(self, X):
        """The fitted estimator's ``predict`` on ``X`` (unfiltered).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        return self.estimator_.predict(X)

    @available_if(estimator_has("predict_proba"))
    def predict_proba(self, X):
        """The fitted estimator's ``predict_proba`` on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self.estimator_.predict_proba(X)

    @available_if(estimator_has("predict_log_proba"))
    def predict_log_proba(self, X):
        """The fitted estimator's ``predict_log_proba`` on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        check_is_fitted(self)
        return self.estimator_.predict_log_proba(X)

    @available_if(estimator_has("decision_function"))
    def decision_function(self, X):
        """The fitted estimator's ``decision_function`` on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        scores : ndarray
        """
        check_is_fitted(self)
        return self.estimator_.decision_function(X)

    @available_if(estimator_has("transform"))
    def transform(self, X):
        """The fitted estimator's ``transform`` of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        X_new : ndarray
        """
        check_is_fitted(self)
        return self.estimator_.transform(X)

    @available_if(estimator_has("score"))
    def score(self, X, y, **kwargs):
        """The fitted estimator's ``score`` on ``(X, y)`` (unfiltered).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        **kwargs : dict
            Passed to the estimator's ``score`` (``sample_weight``, say).

        Returns
        -------
        score : float
        """
        check_is_fitted(self)
        return self.estimator_.score(X, y, **kwargs)

    def __sklearn_tags__(self):
        from sklearn.utils import get_tags

        tags = super().__sklearn_tags__()
        inner = get_tags(self.estimator)
        tags.estimator_type = inner.estimator_type
        tags.classifier_tags = inner.classifier_tags
        tags.regressor_tags = inner.regressor_tags
        tags.input_tags.pairwise = inner.input_tags.pairwise
        tags.input_tags.sparse = False  # the gradient detector needs dense inputs
        tags.input_tags.allow_nan = False
        tags.target_tags = inner.target_tags
        tags.target_tags.required = True
        return tags


def _with_sampler_tags(tags):
    """``tags`` with imbalanced-learn's sampler tags (it records
    ``sample_indices_``, takes DataFrames), in imbalanced-learn's own tag classes
    when it is installed, so that its sampler checks read them."""
    try:
        from imblearn.utils._tags import InputTags, SamplerTags, Tags
    except ImportError:  # imbalanced-learn is optional
        return tags
    from dataclasses import fields

    inputs = InputTags(**{f.name: getattr(tags.input_tags, f.name) for f in fields(tags.input_tags)})
    inputs.dataframe = True
    given = {f.name: getattr(tags, f.name) for f in fields(tags) if f.name != "input_tags"}
    return Tags(**given, input_tags=inputs, sampler_tags=SamplerTags(sample_indices=True))


def _one_vs_all_labels(y):
    """The class of each row of a one-vs-all label indicator ``y`` (one 1 per row,
    as ``label_binarize`` gives it), or None for any other ``y``; refuses a
    multilabel one."""
    if y is None or is_dask(y):
        return None
    values = np.asarray(y)
    if values.ndim != 2 or values.shape[1] < 2:
        return None
    if not np.isin(values, (0, 1)).all():
        return None  # a multi-output regression target, checked by fit
    if not (values.sum(1) == 1).all():
        raise ValueError(
            "Multilabel and multioutput targets are not supported: y is a label indicator with "
            f"{values.sum(1).max()} labels in a row. Pass one label per sample, or a one-vs-all "
            "indicator with a single 1 per row."
        )
    return values.argmax(1)


def _kept_indices(detector, fit_params: dict) -> np.ndarray:
    """Indices of the samples a fitted filter kept, to route per-sample fit params."""
    if hasattr(detector, "sample_indices_"):  # as imbalanced-learn's samplers record it
        return np.asarray(detector.sample_indices_)
    raise ValueError(
        f"fit params {sorted(fit_params)} cannot be routed to the kept samples: the detector "
        f"{type(detector).__name__} does not say which samples it kept (no sample_indices_). "
        "Fit without them, or use a detector that records its selection."
    )
