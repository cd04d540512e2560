"""From scores to decisions, on the digits MLP and the CNN (5 models each):

1. removal checked by retraining (``sktda.model_selection.removal_effect``): the
   change of each test target when its top-10 proponents are removed and the
   model retrained, beside 10 random samples removed, and beside the change the
   calibrated attributions predicted; the brittleness (smallest removal that
   flips the prediction);
2. group detection: of 5 data sources, one with 40% flipped labels, ranked by
   ``OutlierGradientDetector.score_groups`` and by group attribution, 10 seeds;
3. the cost of group attribution against per-sample attribution summed per group,
   on a larger synthetic training set.

    python benchmarks/decisions.py
"""

from __future__ import annotations

import time

import numpy as np
from _common import cnn_net, digits_data, digits_net, emit, markdown_table, parser
from scipy.stats import spearmanr
from sklearn.datasets import make_classification

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.datasets import flip_labels
from sktda.model_selection import removal_effect

N_MODELS = 5


def _image(X):
    return X.reshape(-1, 1, 8, 8)


SETTINGS = {"MLP": (digits_net, lambda X: X), "CNN": (cnn_net, _image)}


def removal_rows(n_test: int, n_retrains: int, n_jobs: int) -> list[list]:
    X_train, X_test, y_train, y_test = digits_data()
    rows = []
    for name, (make_net, shape) in SETTINGS.items():
        start = time.perf_counter()
        attr = EnsembleAttributor(make_net(), n_models=N_MODELS, random_state=0, n_jobs=n_jobs)
        attr.fit(shape(X_train), y_train)
        X, y = shape(X_test[:n_test]), y_test[:n_test]
        attr.calibrate_units(X, y)
        effect = removal_effect(attr, X, y, k=10, n_retrains=n_retrains, n_jobs=n_jobs)
        seconds = time.perf_counter() - start
        drop, random_drop = -effect.attributed.mean(), -effect.random.mean()
        noise = np.abs(effect.random).mean()
        flipped = np.isfinite(effect.brittleness)
        judged = ~np.isnan(effect.brittleness)
        rows.append(
            [
                name,
                f"{drop:.3f}",
                f"{random_drop:.3f}",
                f"{noise:.3f}",
                f"{drop / noise:.1f}",
                f"{spearmanr(effect.predicted, effect.attributed)[0]:.2f}",
                f"{attr.units_correlation_:.2f}",
                f"{flipped.sum()}/{judged.sum()}",
                f"{np.median(effect.brittleness[judged]):.0f}" if judged.any() else "",
                f"{seconds:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def _sources(n: int, seed: int):
    """Five sources of equal size at random, and the one whose labels are corrupted."""
    rng = np.random.RandomState(seed)
    return rng.permutation(np.arange(n) % 5), int(rng.randint(5))


def group_rows(n_seeds: int, n_jobs: int) -> list[list]:
    X_train, X_test, y_train, y_test = digits_data()
    rows = []
    for name, (make_net, shape) in SETTINGS.items():
        detected, attributed = [], []
        start = time.perf_counter()
        for seed in range(n_seeds):
            groups, bad = _sources(len(y_train), seed)
            y_noisy = y_train.copy()
            in_bad = np.flatnonzero(groups == bad)
            flipped_labels, _ = flip_labels(y_train[in_bad], 0.4, random_state=seed)
            y_noisy[in_bad] = flipped_labels
            X = shape(X_train)
            det = OutlierGradientDetector(make_net(), random_state=seed, n_jobs=n_jobs).fit(X, y_noisy)
            detected.append(int(np.argsort(det.score_groups(X, y_noisy, groups)).tolist().index(bad)) + 1)
            attr = EnsembleAttributor(make_net(), n_models=N_MODELS, random_state=seed, n_jobs=n_jobs)
            attr.fit(X, y_noisy)
            mean = attr.attribute(shape(X_test), y_test, groups=groups).mean(0)
            attributed.append(int(np.argsort(mean).tolist().index(bad)) + 1)
            print(name, seed, detected[-1], attributed[-1], flush=True)
        rows.append(
            [
                name,
                f"{sum(r == 1 for r in detected)}/{n_seeds}",
                " ".join(map(str, detected)),
                f"{sum(r == 1 for r in attributed)}/{n_seeds}",
                " ".join(map(str, attributed)),
                f"{time.perf_counter() - start:.0f}",
            ]
        )
    return rows


def speed_rows(n_train: int, n_test: int, n_groups: int) -> list[list]:
    X, y = make_classification(
        n_samples=n_train + n_test, n_features=64, n_informative=32, n_classes=10, random_state=0
    )
    X = X.astype(np.float32)
    X_train, X_test, y_train, y_test = X[:n_train], X[n_train:], y[:n_train], y[n_train:]
    attr = EnsembleAttributor(
        digits_net(max_epochs=2), n_models=N_MODELS, proj_dim=1024, normalize=None, random_state=0
    ).fit(X_train, y_train)
    groups = np.random.RandomState(0).randint(n_groups, size=n_train)
    attr.attribute(X_test[:10], y_test[:10], groups=groups)  # warm-up
    start = time.perf_counter()
    A = attr.attribute(X_test, y_test)
    summed = np.stack([A[:, groups == g].sum(1) for g in range(n_groups)], 1)
    per_sample = time.perf_counter() - start
    start = time.perf_counter()
    G = attr.attribute(X_test, y_test, groups=groups)
    grouped = time.perf_counter() - start
    error = float(np.abs(G - summed).max() / np.abs(summed).max())
    return [
        [
            f"{n_train:,}",
            f"{n_test:,}",
            n_groups,
            f"{per_sample:.1f}",
            f"{grouped:.1f}",
            f"{per_sample / grouped:.1f}x",
            f"{error:.0e}",
        ]
    ]


def main():
    p = parser(__doc__)
    p.add_argument("--n-test", type=int, default=30, help="test samples whose removals are retrained")
    p.add_argument("--n-retrains", type=int, default=3)
    p.add_argument("--n-seeds", type=int, default=10, help="seeds of the group-detection experiment")
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--speed-train", type=int, default=20000)
    args = p.parse_args()

    removal = markdown_table(
        [
            "model",
            "drop, top-10 removed",
            "drop, 10 random removed",
            "mean abs change, random",
            "top-10 drop / random",
            "Spearman predicted vs retrained",
            "units correlation (subsets)",
            "flipped",
            "median brittleness",
            "seconds",
        ],
        removal_rows(args.n_test, args.n_retrains, args.n_jobs),
    )
    groups = markdown_table(
        [
            "model",
            "detection ranks it first",
            "detection ranks per seed",
            "group attribution ranks it first",
            "attribution ranks per seed",
            "seconds",
        ],
        group_rows(args.n_seeds, args.n_jobs),
    )
    speed = markdown_table(
        [
            "training samples",
            "test samples",
            "groups",
            "per-sample then summed (s)",
            "groups= (s)",
            "speed-up",
            "max relative difference",
        ],
        speed_rows(args.speed_train, 2000, 5),
    )
    table = (
        f"**Removal checked by retraining.** Digits, 1,000 training samples, the first {args.n_test} test "
        f"samples, {N_MODELS} models, TRAK with RelatIF (the defaults), scores calibrated with "
        f"`calibrate_units` on the same test samples (50 subset models); each removal retrained with "
        f"{args.n_retrains} seeds, paired with the whole-set models' seeds. A drop is minus the mean change "
        "of the test target (the correct-class margin). Brittleness: the smallest of 10, 20, 40, 80, 160 "
        "top proponents whose removal makes the mean margin negative, over the test samples the "
        f"whole-set models classify correctly.\n\n{removal}\n\n"
        f"**A corrupted data source.** The 1,000 training samples split at random into 5 sources of 200; "
        "one, chosen at random, has 40% of its labels flipped; its rank (1 = most abnormal) by "
        "`OutlierGradientDetector(net).score_groups` (defaults) and by the test set's mean group "
        f"attribution (most negative first), {args.n_seeds} seeds.\n\n{groups}\n\n"
        f"**Cost of `groups=`.** `attribute(X_test, y_test, groups=...)` against `attribute(X_test, y_test)` "
        f"summed per group, test featurization included in both; synthetic 64-feature data, the digits MLP "
        f"trained 2 epochs, {N_MODELS} models, proj_dim 1024.\n\n{speed}"
    )
    emit("decisions", "From scores to decisions", table, args.readme)


if __name__ == "__main__":
    main()
