"""FilteredEstimator: fit an estimator on the training samples that a filter (an
``OutlierGradientDetector`` by default) keeps, as one scikit-learn estimator."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, clone
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from ._compat import HasMethods, check_method_params, estimator_has, fit_context, num_samples
from .detection import OutlierGradientDetector

__all__ = ["FilteredEstimator"]


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


def _kept_indices(detector, fit_params: dict) -> np.ndarray:
    """Indices of the samples a fitted filter kept, to route per-sample fit params."""
    if hasattr(detector, "sample_indices_"):  # as imbalanced-learn's samplers record it
        return np.asarray(detector.sample_indices_)
    raise ValueError(
        f"fit params {sorted(fit_params)} cannot be routed to the kept samples: the detector "
        f"{type(detector).__name__} does not say which samples it kept (no sample_indices_). "
        "Fit without them, or use a detector that records its selection."
    )
