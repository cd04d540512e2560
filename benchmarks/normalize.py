"""RelatIF normalisation (normalize="relatif") against raw scores on the digits MLP
of lds_digits: LDS and the identical-class rate of every method with 1 and 5 models.

    python benchmarks/normalize.py --readme
"""

from __future__ import annotations

import numpy as np
from _common import digits_data, digits_net, emit, identical_class_rate, markdown_table, parser, relatif

from sktda import EnsembleAttributor
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining

METHODS = ["trak", "if", "tracin", "grad_dot", "grad_cos"]


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 5])
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    rows = []
    for split in args.splits:
        from sktda.datasets import load_digits_split

        X_train, X_test, y_train, y_test = (
            digits_data() if split == 0 else load_digits_split(1000, 200, random_state=split)
        )
        net = digits_net()
        truth = subset_retraining(
            net,
            X_train,
            y_train,
            X_test,
            y_test,
            n_subsets=args.n_subsets,
            random_state=0,
            n_jobs=args.n_jobs,
        )
        for method in METHODS:
            for n in args.sizes:
                attr = EnsembleAttributor(
                    net, method=method, n_models=n, normalize=None, n_jobs=args.n_jobs, random_state=0
                )
                A = attr.fit(X_train, y_train).attribute(X_test, y_test)
                predicted = np.argmax(sum(e.predict_proba(X_test) for e in attr.estimators_), 1)
                R = relatif(A, attr.self_attribute())
                row = [split, method, n]
                for scores in (A, R):
                    row += [
                        linear_datamodeling_score(scores, truth.subsets, truth.outputs),
                        identical_class_rate(scores, y_train, predicted),
                    ]
                rows.append(row)
                print(row, flush=True)
    header = ["split", "method", "models", "LDS raw", "identical raw", "LDS relatif", "identical relatif"]
    table = markdown_table(header, rows)
    table += (
        f"\n\nDigits MLP 64-128-10 of lds_digits; split 0 is the benchmark's, others are other random "
        f"1000/200 splits. Ground truth: {args.n_subsets} models retrained on 50% subsets per split."
    )
    emit("normalize", "RelatIF normalisation on the digits MLP", table, args.readme)


if __name__ == "__main__":
    main()
