"""LDS and wall time of every sktda method with 1, 5 and 10 independent models on
digits, and dattri 0.3.0's TRAK on the same trained models.

    python benchmarks/lds_digits.py --readme

dattri is a benchmark extra (``pip install -e .[bench]``); without it its rows are
skipped. dattri's TRAK inverts ``Phi^T Phi + regularization * I``; with more
projected dimensions than training samples it needs a regularization, and we give
it the best of a grid, chosen on the same ground truth (the same is true of
sktda's default damping, chosen once on this benchmark).
"""

from __future__ import annotations

import time

import torch
from _common import digits_data, digits_net, emit, markdown_table, parser

from sktda import EnsembleAttributor
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining

METHODS = ["trak", "if", "tracin", "grad_dot", "grad_cos"]


def dattri_trak(modules, X_train, y_train, X_test, y_test, proj_dim, regularization):
    """dattri's TRAK on the given trained modules; (n_test, n_train) scores, seconds."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask
    from torch.utils.data import DataLoader, TensorDataset

    model = modules[0]

    def margin(params, data):
        x, label = data
        logp = -torch.nn.functional.cross_entropy(
            torch.func.functional_call(model, params, x.unsqueeze(0)), label.unsqueeze(0)
        )
        return logp - torch.log(1 - torch.exp(logp))

    def correct_probability(params, data):
        x, label = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.exp(-torch.nn.functional.cross_entropy(logits, label.unsqueeze(0)))

    task = AttributionTask(loss_func=margin, model=model, checkpoints=[m.state_dict() for m in modules])
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=correct_probability,
        projector_kwargs={"proj_dim": proj_dim, "device": "cpu", "proj_seed": 0},
        device="cpu",
        regularization=regularization,
    )
    train = DataLoader(TensorDataset(torch.from_numpy(X_train), torch.from_numpy(y_train)), batch_size=64)
    test = DataLoader(TensorDataset(torch.from_numpy(X_test), torch.from_numpy(y_test)), batch_size=64)
    start = time.perf_counter()
    with torch.no_grad():
        attributor.cache(train)
        scores = attributor.attribute(test)
    return scores.T.numpy(), time.perf_counter() - start


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    X_train, X_test, y_train, y_test = digits_data()
    net = digits_net()
    start = time.perf_counter()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=args.n_subsets, random_state=0, n_jobs=args.n_jobs
    )
    truth_seconds = time.perf_counter() - start

    rows, trained = [], {}
    for method in METHODS:
        for n in args.sizes:
            attr = EnsembleAttributor(net, method=method, n_models=n, proj_dim=args.proj_dim, random_state=0)
            attr.fit(X_train, y_train)
            start = time.perf_counter()
            A = attr.attribute(X_test, y_test)
            seconds = attr.costs_["featurize_seconds"] + time.perf_counter() - start
            lds = linear_datamodeling_score(A, truth.subsets, truth.outputs)
            rows.append([f"sktda {method}", n, lds, seconds, attr.costs_["train_seconds"]])
            if method == "trak":
                trained[n] = attr
            print(rows[-1], flush=True)
            if method == "trak":  # the nn.Linear fast path against the dense vmap path
                dense = EnsembleAttributor(
                    net,
                    method=method,
                    n_models=n,
                    proj_dim=args.proj_dim,
                    gradient_path="vmap",
                    random_state=0,
                ).fit(X_train, y_train)
                start = time.perf_counter()
                A = dense.attribute(X_test, y_test)
                seconds = dense.costs_["featurize_seconds"] + time.perf_counter() - start
                lds = linear_datamodeling_score(A, truth.subsets, truth.outputs)
                rows.append(
                    [
                        f"sktda {method}, vmap + dense projection",
                        n,
                        lds,
                        seconds,
                        dense.costs_["train_seconds"],
                    ]
                )
                print(rows[-1], flush=True)

    try:
        import dattri  # noqa: F401
    except ImportError:
        print("dattri is not installed (pip install -e .[bench]): its rows are skipped.")
    else:
        largest = max(args.sizes)
        modules = [net_.module_.eval() for net_ in trained[largest].estimators_]
        grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
        best = max(
            grid,
            key=lambda reg: linear_datamodeling_score(
                dattri_trak(modules, X_train, y_train, X_test, y_test, args.proj_dim, reg)[0], *truth
            ),
        )
        for n in args.sizes:
            modules = [net_.module_.eval() for net_ in trained[n].estimators_]
            A, seconds = dattri_trak(modules, X_train, y_train, X_test, y_test, args.proj_dim, best)
            lds = linear_datamodeling_score(A, truth.subsets, truth.outputs)
            rows.append(
                [f"dattri 0.3.0 trak (reg={best:g})", n, lds, seconds, trained[n].costs_["train_seconds"]]
            )
            print(rows[-1], flush=True)

    table = markdown_table(["method", "models", "LDS", "attribution s", "train s"], rows)
    table += (
        f"\n\nGround truth: {args.n_subsets} models retrained on 50% subsets ({truth_seconds:.0f} s). "
        "'attribution s' = featurizing the training set + attributing the 200 test samples "
        "(training excluded); dattri's TRAK runs on sktda TRAK's trained models. sktda rows use the default "
        "nn.Linear fast path (Kronecker projection) unless they say 'vmap + dense projection'."
    )
    emit("lds_digits", "LDS on digits (1000 train / 200 test, MLP 64-128-10)", table, args.readme)


if __name__ == "__main__":
    main()
