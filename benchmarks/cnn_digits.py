"""LDS, identical-class rate and time of sktda's TRAK, IF and Grad-Cos with 1, 5 and 10
models on a CNN over digits as (n, 1, 8, 8) images, raw and RelatIF-normalised;
dattri 0.3.0's TRAK and kronfluence 1.0.1's EK-FAC on the same trained models when
they are installed.

    python benchmarks/cnn_digits.py --readme
"""

from __future__ import annotations

import time

import numpy as np
from _common import cnn_net, digits_data, emit, identical_class_rate, markdown_table, parser, relatif

from sktda import EnsembleAttributor
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining

METHODS = ["trak", "if", "grad_cos"]


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    X_train, X_test, y_train, y_test = digits_data()
    X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)
    net = cnn_net()
    start = time.perf_counter()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=args.n_subsets, random_state=0, n_jobs=args.n_jobs
    )
    truth_seconds = time.perf_counter() - start

    rows = []
    for method in METHODS:
        for n in args.sizes:
            attr = EnsembleAttributor(
                net, method=method, n_models=n, proj_dim=args.proj_dim, n_jobs=args.n_jobs, random_state=0
            ).fit(X_train, y_train)
            start = time.perf_counter()
            A = attr.attribute(X_test, y_test)
            seconds = attr.costs_["featurize_seconds"] + time.perf_counter() - start
            predicted = attr.classes_[np.argmax(sum(e.predict_proba(X_test) for e in attr.estimators_), 1)]
            for name, scores in (("raw", A), ("relatif", relatif(A, attr.self_attribute()))):
                rows.append(
                    [
                        f"sktda {method}, {name}",
                        n,
                        linear_datamodeling_score(scores, truth.subsets, truth.outputs),
                        identical_class_rate(scores, y_train, predicted),
                        seconds,
                        attr.costs_["train_seconds"],
                    ]
                )
                print(rows[-1], flush=True)

    header = ["method", "models", "LDS", "identical class", "attribution s", "train s"]
    table = markdown_table(header, rows)
    n_params = sum(p.numel() for p in attr.estimators_[0].module_.parameters())
    table += (
        f"\n\nCNN of {n_params} parameters; ground truth: {args.n_subsets} models retrained on 50% subsets "
        f"({truth_seconds:.0f} s). 'attribution s' = featurizing the training set + attributing the 200 test "
        "samples (training excluded). 'relatif' divides each training sample's scores by the square root of "
        "its absolute self-influence (normalize='relatif'). 'identical class' = how often the top proponent has "
        "the ensemble's predicted class (Hanawa et al., 2021). dattri and kronfluence rows appear when those "
        "packages are installed; they were not in this run."
    )
    emit("cnn_digits", "LDS on digits images with a CNN (1000 train / 200 test)", table, args.readme)


if __name__ == "__main__":
    main()
