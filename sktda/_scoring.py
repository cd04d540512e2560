"""The detector's scoring rules: how ``OutlierGradientDetector`` turns members'
per-sample loss gradients into outlier scores (lower is more abnormal), and where
it cuts them.

A rule (:class:`NormRule`, :class:`DetectorRule`, made by :func:`scoring_rule`)
fits one member's *detectors*, one per *class group* (every training row in one
group, or one group per class with ``per_class``), and scores that member's
rows. A norm needs nothing fitted and is computed shard by shard, where the
features live; a scikit-learn outlier detector is fitted on the member's
gradients gathered into this process. :func:`otsu_offset` is the threshold of
``contamination="auto"``.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone

NORMS = {"l1": 1, "l2": 2}


def loss_gradients(block, member: int) -> np.ndarray:
    """A shard's projected training-loss gradients of one member, ``-residual phi``."""
    return -block.residuals[member][:, None] * block.features[member]


class NormScore:
    """A fitted 'detector' whose score is minus the gradient's L_p norm."""

    def __init__(self, p: int):
        self.p = p

    def score_samples(self, G: np.ndarray) -> np.ndarray:
        return -np.linalg.norm(G, ord=self.p, axis=1)


def _norm_scores(block, member: int, p: int) -> np.ndarray:
    return NormScore(p).score_samples(loss_gradients(block, member))


class NormRule:
    """Minus the L_p norm of each loss gradient (``detector="l1"`` or ``"l2"``)."""

    def __init__(self, p: int):
        self.p = p

    def fit_score(self, shards, member: int, groups: dict, seed: int):
        """``(detectors, scores)``: the member's fitted detectors by class group, and
        its scores of the rows in ``shards``."""
        return {g: NormScore(self.p) for g in groups}, self.score(shards, member, None, groups)

    def score(self, shards, member: int, detectors, groups: dict) -> np.ndarray:
        """The member's scores of the rows in ``shards`` (computed where they live)."""
        return np.concatenate(shards.map(_norm_scores, member, self.p))


class DetectorRule:
    """A scikit-learn outlier detector's ``score_samples``, one detector per class
    group, each cloned and seeded per member (``"iforest"``: an
    ``IsolationForest``)."""

    def __init__(self, detector):
        self.detector = detector

    def _fitted(self, G: np.ndarray, seed: int):
        if isinstance(self.detector, str):
            from sklearn.ensemble import IsolationForest

            detector = IsolationForest(random_state=seed)
        else:
            detector = clone(self.detector)
            if "random_state" in detector.get_params():
                detector.set_params(random_state=seed)
        return detector.fit(G)

    def fit_score(self, shards, member: int, groups: dict, seed: int):
        G = _gathered(shards, member)
        detectors = {g: self._fitted(G[rows], seed) for g, rows in groups.items()}
        return detectors, self._scores(G, detectors, groups)

    def score(self, shards, member: int, detectors, groups: dict) -> np.ndarray:
        return self._scores(_gathered(shards, member), detectors, groups)

    @staticmethod
    def _scores(G, detectors, groups) -> np.ndarray:
        scores = np.empty(len(G))
        for g, rows in groups.items():
            scores[rows] = detectors[g].score_samples(G[rows])
        return scores


def _gathered(shards, member: int) -> np.ndarray:
    """A member's loss gradients, gathered here from its shards."""
    return np.concatenate(shards.map(loss_gradients, member))


def scoring_rule(detector) -> NormRule | DetectorRule:
    """The rule of the detector parameter: a norm's name, ``"iforest"``, or a
    scikit-learn outlier detector."""
    if isinstance(detector, str) and detector in NORMS:
        return NormRule(NORMS[detector])
    return DetectorRule(detector)


def otsu_offset(scores: np.ndarray) -> float:
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
