"""Mislabeled-sample detection on digits with symmetric label noise: sktda's
OutlierGradientDetector configurations against cleanlab 2.9 and no filtering.

    python benchmarks/detection.py --readme

1200 training digits with 20%, 30% and 40% of their labels flipped, 597 clean test
digits; the MLP 64-128-10 trains for 80 epochs (long enough to memorise the noise).
For every configuration: AUROC of the outlier score against the true flips,
precision among the top-k suspects with k the true number of flips, wall time
(training included), and the test accuracy of the same net retrained on what the
detector keeps (it removes the noise rate's worth of samples, as does cleanlab's
``find_label_issues`` with ``num_to_remove_per_class`` unset: cleanlab decides its own
count, shown in 'removed'). cleanlab ranks by self-confidence on 5-fold
cross-validated probabilities of the same net; ``CleanLearning`` does its own
cross-validation, filtering and final fit.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from _common import digits_net, emit, markdown_table, parser
from sklearn.metrics import roc_auc_score

from sktda import OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split

EPOCHS = 80
LAST = dict(layers="last", proj_dim=None, n_checkpoints=8)  # the output layer, exact
CONFIGS = [
    ("paper: output layer, iforest, final model", LAST | dict(n_checkpoints=None)),
    ("output layer, l2, final model", LAST | dict(detector="l2", n_checkpoints=None)),
    ("output layer, iforest per class, 8 checkpoints", LAST | dict(per_class=True)),
    ("output layer, iforest, 8 checkpoints", LAST),
    ("output layer, l2, 8 checkpoints", LAST | dict(detector="l2")),
    ("all layers (proj 1024), l2, 8 checkpoints", dict(detector="l2", n_checkpoints=8)),
    ("all layers (proj 1024), iforest, 8 checkpoints", dict(n_checkpoints=8)),
    ("default: all layers (proj 1024), iforest, 4 checkpoints", dict()),
    ("default, 2 models", dict(n_models=2)),
]


def test_accuracy(X, y, X_test, y_test, seed=0):
    net = digits_net(max_epochs=EPOCHS)
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net.fit(X, y)
    return float((net.predict(X_test) == y_test).mean())


def precision_at_k(scores, flipped):
    k = int(flipped.sum())
    return float(flipped[np.argsort(-scores)[:k]].mean())


def filter_row(suspicion, keep, seconds, flipped, accuracy_of_kept) -> list:
    """AUROC and precision@k of ``suspicion`` against the flips, the wall time, how
    many samples the filter removes and the test accuracy after retraining on the
    kept samples (``accuracy_of_kept(keep)``)."""
    return [
        roc_auc_score(flipped, suspicion),
        precision_at_k(suspicion, flipped),
        seconds,
        int((~keep).sum()),
        accuracy_of_kept(keep),
    ]


def detector_row(detector, X, y_noisy, flipped, accuracy_of_kept) -> list:
    """:func:`filter_row` of an OutlierGradientDetector, its fit timed."""
    start = time.perf_counter()
    detector.fit(X, y_noisy)
    seconds = time.perf_counter() - start
    return filter_row(-detector.train_scores_, detector.labels_ == 1, seconds, flipped, accuracy_of_kept)


def self_confidence_row(net, X, y_noisy, flipped, accuracy_of_kept) -> list:
    """:func:`filter_row` of cleanlab 2.9: self-confidence on 5-fold cross-validated
    probabilities of ``net``; ``find_label_issues`` decides what is removed."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import cross_val_predict

    start = time.perf_counter()
    probs = cross_val_predict(net, X, y_noisy, cv=5, method="predict_proba")
    quality = get_label_quality_scores(y_noisy, probs)
    issues = find_label_issues(y_noisy, probs)
    seconds = time.perf_counter() - start
    return filter_row(-quality, ~issues, seconds, flipped, accuracy_of_kept)


def recipe_self_confidence_row(recipe, X, y_noisy, flipped, accuracy_of_kept) -> list | None:
    """The labelled cleanlab row of :func:`self_confidence_row` for a net factory
    ``recipe`` (seeded), or None when cleanlab is not installed."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            row = self_confidence_row(recipe(), X, y_noisy, flipped, accuracy_of_kept)
    except ImportError:
        print("cleanlab is not installed (pip install -e .[bench]): its row is skipped.")
        return None
    print(row, flush=True)
    return ["cleanlab 2.9 self-confidence (5-fold CV probabilities)", *row]


def main():
    p = parser(__doc__)
    p.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.3, 0.4])
    args = p.parse_args()
    X, X_test, y, y_test = load_digits_split(n_train=1200, n_test=597, random_state=0)
    OutlierGradientDetector(digits_net(max_epochs=1)).fit(X[:100], y[:100])  # warm-up
    rows = []
    for noise in args.noise:
        y_noisy, flipped = flip_labels(y, noise, random_state=0)
        rows.append(
            [f"{noise:.0%}", "no filtering", "", "", "", 0, test_accuracy(X, y_noisy, X_test, y_test)]
        )

        def accuracy_of_kept(keep, y_noisy=y_noisy):
            return test_accuracy(X[keep], y_noisy[keep], X_test, y_test)

        for name, config in CONFIGS:
            det = OutlierGradientDetector(
                digits_net(max_epochs=EPOCHS), contamination=noise, random_state=0, **config
            )
            rows.append(
                [f"{noise:.0%}", f"sktda {name}", *detector_row(det, X, y_noisy, flipped, accuracy_of_kept)]
            )
            print(rows[-1], flush=True)
        try:
            rows.extend(cleanlab_rows(X, y_noisy, flipped, X_test, y_test, noise, accuracy_of_kept))
        except ImportError:
            print("cleanlab is not installed (pip install -e .[bench]): its rows are skipped.")
    header = ["noise", "method", "AUROC", "precision@k", "wall s", "removed", "test accuracy"]
    emit(
        "detection", "Mislabeled digits: detection and retraining", markdown_table(header, rows), args.readme
    )


def cleanlab_rows(X, y_noisy, flipped, X_test, y_test, noise, accuracy_of_kept):
    from cleanlab.classification import CleanLearning

    rows = [
        [
            f"{noise:.0%}",
            "cleanlab 2.9 self-confidence (5-fold CV probabilities)",
            *self_confidence_row(digits_net(max_epochs=EPOCHS), X, y_noisy, flipped, accuracy_of_kept),
        ]
    ]
    start = time.perf_counter()
    clean = CleanLearning(digits_net(max_epochs=EPOCHS), seed=0).fit(X, y_noisy)
    seconds = time.perf_counter() - start
    removed = int(clean.label_issues_df["is_label_issue"].sum())
    rows.append(
        [
            f"{noise:.0%}",
            "cleanlab 2.9 CleanLearning",
            "",
            "",
            seconds,
            removed,
            float((clean.predict(X_test) == y_test).mean()),
        ]
    )
    for row in rows:
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
