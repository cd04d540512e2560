"""Efficient ensembles on digits: LDS against training time, serving time, feature
bytes and model bytes for independent, dropout, LoRA and hybrid ensembles (TRAK).

    python benchmarks/ensembles.py --readme

'serve s' is what answering attribution queries costs once the models exist:
featurizing the training set plus attributing the 200 test samples. 'model bytes'
is what must be stored to serve: full models, or one base plus adapters (dropout
masks are regenerated from their seeds). Writes the Pareto figure of LDS against
training time to benchmarks/results/ensembles_pareto.png when matplotlib is there.
"""

from __future__ import annotations

import time

from _common import RESULTS, digits_data, digits_net, emit, markdown_table, parser

from sktda import EnsembleAttributor
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining

CONFIGS = [
    ("independent 1", dict(ensemble="independent", n_models=1)),
    ("independent 2", dict(ensemble="independent", n_models=2)),
    ("independent 5", dict(ensemble="independent", n_models=5)),
    ("independent 10", dict(ensemble="independent", n_models=10)),
    ("dropout 1x10", dict(ensemble="dropout", n_models=1, n_masks=10)),
    ("dropout 2x5", dict(ensemble="dropout", n_models=2, n_masks=5)),
    (
        "dropout 1x10, unmasked gradients",
        dict(ensemble="dropout", n_models=1, n_masks=10, mask_gradients=False),
    ),
    (
        "dropout 2x5, unmasked gradients",
        dict(ensemble="dropout", n_models=2, n_masks=5, mask_gradients=False),
    ),
    ("lora 1x10", dict(ensemble="lora", n_models=1, n_adapters=10)),
    ("lora 2x5", dict(ensemble="lora", n_models=2, n_adapters=5)),
    (
        "lora 1x10, all layers, rank 8, 10 epochs",
        dict(
            ensemble="lora",
            n_adapters=10,
            lora_target_modules=["layers.0", "layers.3"],
            lora_rank=8,
            lora_epochs=10,
        ),
    ),
]


def pareto_figure(results, path, title="Efficient ensembles on digits"):
    """LDS against training time of ``(name, lds, costs, serve_seconds)`` results."""
    rows = [(name, lds, costs["train_seconds"]) for name, lds, costs, _ in results]
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figure.")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, lds, train in rows:
        kind = name.split()[0]
        color = {"independent": "tab:blue", "dropout": "tab:orange", "lora": "tab:green"}[kind]
        ax.scatter(train, lds, color=color, label=kind)
        ax.annotate(
            name.replace(", unmasked gradients", "*").replace(", all layers, rank 8, 10 epochs", "+"),
            (train, lds),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    points = sorted((train, lds) for _, lds, train in rows)
    frontier, best = [], -1.0
    for train, lds in points:
        if lds > best:
            frontier.append((train, lds))
            best = lds
    ax.plot(*zip(*frontier), color="gray", linestyle="--", linewidth=1, label="Pareto frontier")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("LDS (TRAK)")
    ax.set_title(f"{title} (* unmasked gradients, + all layers rank 8)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def run_config(name, net, config, data, truth):
    """Fit ``config`` (TRAK unless it names a method) on ``net`` and measure it:
    ``(name, LDS, costs, serve seconds)``, serving being featurizing the training
    set plus attributing the test samples."""
    X_train, X_test, y_train, y_test = data
    attr = EnsembleAttributor(net, **{"method": "trak", **config}, random_state=0).fit(X_train, y_train)
    start = time.perf_counter()
    A = attr.attribute(X_test, y_test)
    serve = attr.costs_["featurize_seconds"] + time.perf_counter() - start
    lds = linear_datamodeling_score(A, truth.subsets, truth.outputs)
    print(name, round(lds, 4), attr.costs_, round(serve, 2), flush=True)
    return name, lds, attr.costs_, serve


def cost_table(results, reference: str) -> str:
    """The markdown table of ``(name, lds, costs, serve_seconds)`` results, each also
    relative to the ``reference`` row."""
    ref = next(r for r in results if r[0] == reference)
    rows = []
    for name, lds, costs, serve in results:
        rows.append(
            [
                name,
                costs["n_members"],
                lds,
                f"{lds / ref[1]:.0%}",
                costs["train_seconds"],
                f"{costs['train_seconds'] / ref[2]['train_seconds']:.0%}",
                serve,
                f"{serve / ref[3]:.0%}",
                f"{costs['feature_bytes'] / 2**20:.1f}",
                f"{costs['model_bytes'] / 2**10:.0f}",
                f"{costs['model_bytes'] / ref[2]['model_bytes']:.0%}",
            ]
        )
    header = [
        "ensemble",
        "members",
        "LDS",
        "LDS vs ind. 10",
        "train s",
        "train vs ind. 10",
        "serve s",
        "serve vs ind. 10",
        "feature MiB",
        "model KiB",
        "model vs ind. 10",
    ]
    return markdown_table(header, rows)


def main():
    p = parser(__doc__)
    p.add_argument("--n-subsets", type=int, default=100)
    p.add_argument("--lora-epochs", type=int, default=5)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    X_train, X_test, y_train, y_test = digits_data()
    net = digits_net()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=args.n_subsets, random_state=0, n_jobs=args.n_jobs
    )
    for _, config in CONFIGS:  # warm-up: imports and first calls are not what we measure
        EnsembleAttributor(digits_net(max_epochs=1), random_state=0, **{**config, "lora_epochs": 1}).fit(
            X_train[:100], y_train[:100]
        )
    results = [
        run_config(
            name, net, {"lora_epochs": args.lora_epochs, **config}, (X_train, X_test, y_train, y_test), truth
        )
        for name, config in CONFIGS
    ]

    table = cost_table(results, "independent 10")
    table += (
        f"\n\nTRAK, proj_dim 2048, damping 1.0; LoRA rank 4 on the hidden layer (the default: every nn.Linear "
        f"but the output), {args.lora_epochs} epochs per adapter, unless the row says otherwise; ground truth: "
        f"{args.n_subsets} models retrained on 50% subsets."
    )
    emit("ensembles", "Efficient ensembles on digits (TRAK)", table, args.readme)
    pareto_figure(
        results,
        RESULTS / "ensembles_pareto.png",
    )


if __name__ == "__main__":
    main()
