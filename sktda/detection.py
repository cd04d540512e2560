"""OutlierGradientDetector: detrimental-sample detection from per-sample gradient
outliers, a scikit-learn outlier detector and an imbalanced-learn sampler
(``fit_resample``). How members' gradients are scored and cut is ``_scoring``'s."""

from __future__ import annotations

import numbers
import time
import warnings
from collections import OrderedDict

import numpy as np
from sklearn.base import OneToOneFeatureMixin, OutlierMixin
from sklearn.utils import check_random_state, indexable
from sklearn.utils.validation import check_is_fitted

from ._base import GradientEstimator, fill_doc
from ._compat import (
    HasMethods,
    Interval,
    StrOptions,
    safe_indexing,
)
from ._data import group_codes, is_dask, is_dataset, is_dict, n_samples, take, targets_of
from ._scoring import otsu_offset, scoring_rule

__all__ = ["OutlierGradientDetector"]


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
        groups, rule = self._groups(y), scoring_rule(self.detector)
        fitted = [rule.fit_score(shards, m, groups, seed) for m, seed in enumerate(seeds)]
        self.detectors_ = [detectors for detectors, _ in fitted]
        self.train_scores_ = _checked_mean([scores for _, scores in fitted])
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

    def _groups(self, y: np.ndarray) -> dict:
        if not self.per_class:
            return {None: np.arange(len(y))}
        y = np.asarray(y).reshape(-1)
        return {int(c): np.flatnonzero(y == c) for c in np.unique(y)}

    def _score(self, shards, groups: dict) -> np.ndarray:
        """The mean over members of their detectors' scores of the loss gradients in
        ``shards``."""
        rule = scoring_rule(self.detector)
        return _checked_mean([rule.score(shards, m, det, groups) for m, det in enumerate(self.detectors_)])

    def _offset(self, scores: np.ndarray) -> float:
        if self.contamination == "auto":  # outliers are the minority: at most half, as with a fraction
            return min(otsu_offset(scores), float(np.percentile(scores, 50)))
        return float(np.percentile(scores, 100 * self.contamination))


def _checked_mean(scores: list[np.ndarray]) -> np.ndarray:
    """The mean of the members' outlier ``scores``, refused unless finite."""
    mean = np.mean(scores, axis=0)
    if not np.all(np.isfinite(mean)):
        raise ValueError(
            "The outlier scores are not finite: the detector returned NaN or inf on the "
            "gradients. Use detector='l2' or 'iforest', or a projection (proj_dim)."
        )
    return mean


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
