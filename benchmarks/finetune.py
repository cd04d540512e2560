"""Attributing the fine-tuning data of a pretrained transformer: LDS against
training time, serving time, feature bytes and model bytes for independent full
fine-tunes, LoRA adapters on the frozen pretrained model, and dropout masks of one
fine-tune (TRAK, and EK-FAC, the default on language models; ``pretrained=True``).

    python benchmarks/finetune.py --readme

A character-level transformer language model (2 layers, d_model 128; about 290k
parameters) is pretrained on two topics in three of the Python documentation that
ships with Python (``pydoc_data.topics``), then fine-tuned on passages of the other
topics; the attributed target is held-out passages' log-likelihood, and the LDS
ground truth is full fine-tunes of the pretrained weights on 50% subsets of the
fine-tuning set. 'serve s' is featurizing the fine-tuning set plus attributing the
test passages; 'model bytes' is what must be stored to serve: the fine-tuned models,
or the pretrained base once plus the adapters. Writes the Pareto figure of LDS
against training time to benchmarks/results/finetune_pareto.png.
"""

from __future__ import annotations

import time

import torch
from _common import RESULTS, emit, lm_net, parser, pydoc_passages
from ensembles import cost_table, pareto_figure, run_config
from skorch import NeuralNet

from sktda.model_selection import subset_retraining
from sktda.models import TokenCrossEntropy, TokenTransformer

CONFIGS = [
    ("independent 1", dict(ensemble="independent", n_models=1)),
    ("independent 2", dict(ensemble="independent", n_models=2)),
    ("independent 5", dict(ensemble="independent", n_models=5)),
    ("independent 10", dict(ensemble="independent", n_models=10)),
    ("dropout 1x10", dict(ensemble="dropout", n_models=1, n_masks=10)),
    ("lora 1x10, rank 4", dict(ensemble="lora", n_models=1, n_adapters=10, lora_rank=4)),
    ("lora 1x10, rank 8", dict(ensemble="lora", n_models=1, n_adapters=10, lora_rank=8)),
    ("lora 2x5, rank 8", dict(ensemble="lora", n_models=2, n_adapters=5, lora_rank=8)),
    ("lora 1x10, rank 16", dict(ensemble="lora", n_models=1, n_adapters=10, lora_rank=16)),
    ("independent 1, ekfac", dict(ensemble="independent", n_models=1, method="ekfac")),
    ("independent 5, ekfac", dict(ensemble="independent", n_models=5, method="ekfac")),
    ("independent 10, ekfac", dict(ensemble="independent", n_models=10, method="ekfac")),
    ("dropout 1x10, ekfac", dict(ensemble="dropout", n_models=1, n_masks=10, method="ekfac")),
    (
        "lora 1x10, rank 8, ekfac",
        dict(ensemble="lora", n_models=1, n_adapters=10, lora_rank=8, method="ekfac"),
    ),
    (
        "lora 1x10, rank 16, ekfac",
        dict(ensemble="lora", n_models=1, n_adapters=10, lora_rank=16, method="ekfac"),
    ),
]


def pretrain(vocab_size: int, length: int, n: int, epochs: int) -> TokenTransformer:
    """The pretrained language model: ``n`` passages of the pretraining topics."""
    X, y, _ = pydoc_passages(n, length, seed=1, part="pretrain")
    net = lm_net(
        vocab_size,
        length,
        max_epochs=epochs,
        module__d_model=128,
        module__n_heads=4,
        module__n_layers=2,
        lr=2e-3,
        batch_size=64,
    )
    torch.manual_seed(0)
    return net.fit(X, y).module_


def fine_tuning_net(module, epochs: int, lr: float = 5e-4, net=NeuralNet, criterion=TokenCrossEntropy):
    """Fine-tuning of ``module`` (the language model's by default): Adam, batch 32."""
    return net(
        module,
        criterion=criterion,
        optimizer=torch.optim.Adam,
        lr=lr,
        max_epochs=epochs,
        batch_size=32,
        train_split=None,
        verbose=0,
    )


def main():
    p = parser(__doc__)
    p.add_argument("--n-pretrain", type=int, default=3000)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4, help="full fine-tuning epochs")
    p.add_argument("--lora-epochs", type=int, default=2, help="epochs per LoRA adapter")
    p.add_argument("--lora-lr", type=float, default=2e-3, help="learning rate of the adapters")
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()

    X, y, alphabet = pydoc_passages(args.n_train + args.n_test, args.length, part="finetune")
    n = args.n_train
    X_train, X_test, y_train, y_test = X[:n], X[n:], y[:n], y[n:]
    start = time.perf_counter()
    base = pretrain(len(alphabet), args.length, args.n_pretrain, args.pretrain_epochs)
    pretrain_seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in base.parameters())
    net = fine_tuning_net(base, args.epochs)
    start = time.perf_counter()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=args.n_subsets, n_jobs=args.n_jobs, pretrained=True
    )
    truth_seconds = time.perf_counter() - start

    results = []
    for name, config in CONFIGS:
        estimator = net
        if config["ensemble"] == "lora":
            estimator = fine_tuning_net(base, args.epochs).set_params(lr=args.lora_lr)
            config = {**config, "lora_epochs": args.lora_epochs}
        data = (X_train, X_test, y_train, y_test)
        results.append(run_config(name, estimator, {**config, "pretrained": True}, data, truth))

    table = cost_table(results, "independent 10")
    table += (
        f"\n\nTRAK unless the row says EK-FAC, proj_dim 2048; a transformer language model of {n_params} parameters pretrained on "
        f"{args.n_pretrain} passages of {args.length} characters ({pretrain_seconds:.0f} s, not counted), "
        f"fine-tuned on {args.n_train} passages of other topics ({args.epochs} epochs, Adam lr 5e-4); "
        f"{args.n_test} held-out passages of the fine-tuning topics, target their log-likelihood. LoRA: "
        f"adapters on every nn.Linear of the encoder blocks (the default) and the output layer trained "
        f"in full, {args.lora_epochs} epochs each "
        f"at lr {args.lora_lr:g}, on the frozen pretrained weights (no base training); 2x5 is ten adapters "
        f"on the same base, seeded apart (rank 8 is the default; the recipe is chosen on other splits in "
        f"lora_recipe.md). Ground truth: {args.n_subsets} full fine-tunes on 50% subsets "
        f"({truth_seconds:.0f} s)."
    )
    emit("finetune", "Attributing fine-tuning data of a pretrained transformer", table, args.readme)
    pareto_figure(
        results,
        RESULTS / "finetune_pareto.png",
        "Fine-tuning a pretrained transformer",
    )


if __name__ == "__main__":
    main()
