"""LDS of TRAK on digits against proj_dim around a prime, on the per-layer routes
(Kronecker projection) and the dense vmap path: no proj_dim should be worse than
its neighbours.

    python benchmarks/proj_dim.py --readme
"""

from __future__ import annotations

from _common import digits_data, digits_net, emit, markdown_table, parser

from sktda import EnsembleAttributor
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--n-jobs", type=int, default=2)
    p.add_argument("--dims", type=int, nargs="+", default=[254, 255, 256, 257, 258, 509, 512, 521])
    p.add_argument("--models", type=int, nargs="+", default=[1, 5])
    args = p.parse_args()

    X_train, X_test, y_train, y_test = digits_data()
    net = digits_net()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=args.n_subsets, random_state=0, n_jobs=args.n_jobs
    )
    rows = []
    for k in args.dims:
        row = [k]
        for n_models in args.models:
            for path in ("layers", "vmap"):
                attr = EnsembleAttributor(
                    net, n_models=n_models, proj_dim=k, gradient_path=path, n_jobs=args.n_jobs, random_state=0
                ).fit(X_train, y_train)
                row.append(linear_datamodeling_score(attr.attribute(X_test, y_test), *truth))
        rows.append(row)
        print(row, flush=True)
    header = ["proj_dim"] + [
        f"{m} model{'s' if m > 1 else ''}, {p}" for m in args.models for p in ("routes", "vmap")
    ]
    emit("proj_dim", "LDS against proj_dim (TRAK, digits)", markdown_table(header, rows), args.readme)


if __name__ == "__main__":
    main()
