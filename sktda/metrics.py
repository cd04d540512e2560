"""Quality metrics for training data attribution."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

__all__ = ["linear_datamodeling_score", "units_calibration"]


def _column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each column of ``a`` with the same column of ``b``;
    NaN where either column is constant."""
    ra = rankdata(a, axis=0)
    rb = rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra**2).sum(0) * (rb**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / np.where(denom > 0, denom, 1), np.nan)


def linear_datamodeling_score(attributions, subsets, outputs, *, average: bool = True):
    """Linear datamodeling score (LDS, Park et al. 2023).

    For every test sample, the Spearman correlation, across training subsets,
    between the summed attribution of each subset's members and the output of the
    model retrained on that subset.

    Parameters
    ----------
    attributions : array-like of shape (n_test, n_train)
        Attribution scores, for instance from ``EnsembleAttributor.attribute``.
    subsets : array-like of shape (n_subsets, n_train)
        Boolean (or 0/1) membership masks of the retraining subsets.
    outputs : array-like of shape (n_subsets, n_test)
        Output of the model retrained on each subset for each test sample (the
        correct-class margin for classifiers, the prediction for regressors).
    average : bool, default=True
        Return the mean over test samples (ignoring samples whose correlation is
        undefined); otherwise the per-sample scores.

    Returns
    -------
    score : float or ndarray of shape (n_test,)
        Higher is better; 1 is a perfect linear datamodel.

    See Also
    --------
    sktda.model_selection.subset_retraining : computes ``subsets`` and ``outputs``.

    Examples
    --------
    >>> import numpy as np
    >>> from sktda.metrics import linear_datamodeling_score
    >>> A = np.array([[1.0, 0.0, -1.0]])
    >>> subsets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> outputs = np.array([[2.0], [-2.0], [0.5]])
    >>> float(linear_datamodeling_score(A, subsets, outputs))
    1.0
    """
    A = np.asarray(attributions, dtype=np.float64)
    S = np.asarray(subsets)
    Y = np.asarray(outputs, dtype=np.float64)
    if A.ndim != 2 or S.ndim != 2 or Y.ndim != 2:
        raise ValueError(
            "attributions, subsets and outputs must be 2-D: (n_test, n_train), "
            f"(n_subsets, n_train), (n_subsets, n_test); got {A.shape}, {S.shape}, {Y.shape}."
        )
    if S.shape[1] != A.shape[1]:
        raise ValueError(
            f"subsets cover {S.shape[1]} training samples but attributions have {A.shape[1]} columns."
        )
    if Y.shape != (S.shape[0], A.shape[0]):
        raise ValueError(
            f"outputs must have shape (n_subsets, n_test) = {(S.shape[0], A.shape[0])}, got {Y.shape}."
        )
    if S.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets to rank, got {S.shape[0]}.")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(Y))):
        raise ValueError("attributions and outputs must be finite (no NaN or inf).")
    predicted = S.astype(np.float64) @ A.T
    scores = _column_spearman(predicted, Y)
    if not average:
        return scores
    if np.all(np.isnan(scores)):
        return float("nan")
    return float(np.nanmean(scores))


def units_calibration(scores, subsets, outputs) -> tuple[float, float]:
    """The factor from attribution scores to the target's units, and how well the
    scores predict the retrained models in those units.

    The scores are the linear datamodel's coefficients: a subset's predicted output
    is the sum of its members' scores. The factor is the least-squares scale from
    these predictions to the subset models' outputs, both centred over the subsets
    for each test sample (an attributor's scale is arbitrary up to the damping and
    normalisation; the factor turns a score into a predicted change of the target).

    Parameters
    ----------
    scores : array-like of shape (n_test, n_train)
        Attribution scores, for instance from ``EnsembleAttributor.attribute``.
    subsets : array-like of shape (n_subsets, n_train)
        Boolean (or 0/1) membership masks of the retraining subsets.
    outputs : array-like of shape (n_subsets, n_test)
        Output of the model retrained on each subset for each test sample.

    Returns
    -------
    scale : float
        Least-squares factor from the centred predictions to the centred outputs.
    correlation : float
        Pearson correlation of the two, over every subset and test sample (0 when
        the outputs do not vary).

    Raises
    ------
    ValueError
        When the scores predict no difference between the subsets (all zero).

    See Also
    --------
    sktda.EnsembleAttributor.calibrate_units : sets ``units_scale_`` this way.

    Examples
    --------
    >>> import numpy as np
    >>> from sktda.metrics import units_calibration
    >>> scores = np.array([[1.0, 0.0, -1.0]])
    >>> subsets = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    >>> outputs = 2 * (subsets @ scores.T)  # the retrained models move twice as far
    >>> scale, correlation = units_calibration(scores, subsets, outputs)
    >>> round(scale, 6), round(correlation, 6)
    (2.0, 1.0)
    """
    scores = np.asarray(scores, dtype=np.float64)
    outputs = np.asarray(outputs, dtype=np.float64)
    masks = np.asarray(subsets, dtype=np.float64)
    predicted = (masks - masks.mean(0)) @ scores.T
    observed = outputs - outputs.mean(0)
    spread = float((predicted**2).sum())
    if not spread > 0:
        raise ValueError(
            "The scores predict no difference between the subset models (all scores are 0), so "
            "they cannot be calibrated to the target's units."
        )
    products = float((predicted * observed).sum())
    observed_spread = float((observed**2).sum())
    correlation = float(products / np.sqrt(spread * observed_spread)) if observed_spread > 0 else 0.0
    return products / spread, correlation
