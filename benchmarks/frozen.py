"""The model you already have: post-hoc ensembles on a digits MLP that the user
trained, against 10 models that sktda trains independently (TRAK, LDS).

    python benchmarks/frozen.py

The user's models are trained before sktda sees them, with the recipe of the
digits settings (MLP 64-128-10, dropout 0.1, SGD momentum 0.9, lr 0.05, batch 64,
30 epochs): one with skorch, one by a plain torch loop (wrapped by
``sktda.frozen_net``), and ten with skorch for the user's own ensemble. Each is
passed as ``FrozenEstimator(net)``, so sktda trains nothing but LoRA adapters:
'sktda train s' is the training sktda adds to the user's own, 'serve s' the
featurization of the training set plus the attribution of the 200 test samples.
The ground truth is the same for every row: models of the same recipe retrained
on 50% subsets.
"""

from __future__ import annotations

import time

import torch
from _common import digits_data, digits_net, emit, markdown_table, parser
from sklearn.frozen import FrozenEstimator

from sktda import EnsembleAttributor, frozen_net
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining
from sktda.models import MLP


def users_skorch_net(X, y, seed: int):
    """The user's own training: skorch's fit, seeded."""
    torch.manual_seed(seed)
    return digits_net().fit(X, y)


def users_plain_loop(X, y, seed: int):
    """The same recipe as a plain torch loop (no skorch)."""
    torch.manual_seed(seed)
    module = MLP(n_features=64, n_outputs=10, hidden=(128,), dropout=0.1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(30):
        for rows in torch.randperm(len(y)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(X[rows]), y[rows]).backward()
            optimizer.step()
    return module.eval()


def measure(name, estimator, config, data, truth, user_seconds):
    X_train, X_test, y_train, y_test = data
    attr = EnsembleAttributor(estimator, **{"method": "trak", **config}, random_state=0).fit(X_train, y_train)
    start = time.perf_counter()
    lds = linear_datamodeling_score(attr.attribute(X_test, y_test), truth.subsets, truth.outputs)
    serve = attr.costs_["featurize_seconds"] + time.perf_counter() - start
    print(name, round(lds, 4), attr.costs_, flush=True)
    return [name, attr.n_members_, lds, user_seconds, attr.costs_["train_seconds"], serve]


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    data = X_train, X_test, y_train, y_test = digits_data()
    truth = subset_retraining(
        digits_net(),
        X_train,
        y_train,
        X_test,
        y_test,
        n_subsets=args.n_subsets,
        random_state=0,
        n_jobs=args.n_jobs,
    )
    EnsembleAttributor(digits_net(max_epochs=1), random_state=0).fit(X_train[:100], y_train[:100])  # warm-up

    start = time.perf_counter()
    net = users_skorch_net(X_train, y_train, seed=0)
    one_model = time.perf_counter() - start
    start = time.perf_counter()
    module = users_plain_loop(X_train, y_train, seed=0)
    loop_seconds = time.perf_counter() - start
    start = time.perf_counter()
    own = [FrozenEstimator(users_skorch_net(X_train, y_train, seed=s)) for s in range(10)]
    own_seconds = time.perf_counter() - start
    frozen, looped = (
        FrozenEstimator(net),
        frozen_net(module, torch.nn.CrossEntropyLoss, lr=0.05, batch_size=64),
    )

    rows = [
        measure("sktda trains 10 independent models", digits_net(), dict(n_models=10), data, truth, ""),
        measure("your model as it is (1 member)", frozen, {}, data, truth, one_model),
        measure(
            "your model, dropout 1x10", frozen, dict(ensemble="dropout", n_masks=10), data, truth, one_model
        ),
        measure(
            "your model, dropout 1x10, unmasked gradients",
            frozen,
            dict(ensemble="dropout", n_masks=10, mask_gradients=False),
            data,
            truth,
            one_model,
        ),
        measure(
            "your model, lora 1x10", frozen, dict(ensemble="lora", n_adapters=10), data, truth, one_model
        ),
        measure(
            "your plain-torch model (frozen_net), dropout 1x10",
            looped,
            dict(ensemble="dropout", n_masks=10),
            data,
            truth,
            loop_seconds,
        ),
        measure("your own 10 models", own, {}, data, truth, own_seconds),
    ]
    reference = rows[0][2]
    for row in rows:
        row.insert(3, f"{row[2] / reference:.0%}")
    table = markdown_table(
        [
            "ensemble",
            "members",
            "LDS",
            "LDS vs 10 independent",
            "your training s",
            "sktda train s",
            "serve s",
        ],
        rows,
    )
    table += (
        f"\n\nTRAK, proj_dim 2048, the default damping; LoRA rank 4 on the hidden layer, 5 epochs per adapter; "
        f"ground truth: {args.n_subsets} models of the recipe retrained on 50% subsets."
    )
    emit("frozen", "The model you already have: post-hoc ensembles on a trained digits MLP", table)


if __name__ == "__main__":
    main()
