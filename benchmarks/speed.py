"""Featurization speed and memory against one training epoch at the same batch size,
and scaling with the training-set size.

    python benchmarks/speed.py --readme
    python benchmarks/speed.py --small --readme   # the small fits' table alone

Three models on synthetic data, 10 classes, proj_dim 2048, batch 256 for training
and featurizing alike:

- ``mlp``: MLP 256-512-512-10 (0.4M parameters) on 256 features;
- ``cnn``: ``ConvNet`` with three 3x3 conv blocks (32, 64, 128 channels) on 3x32x32
  images (114k parameters);
- ``transformer``: ``TokenTransformer`` classifier, 2 layers, d_model 64, on 64
  token ids of a 128-token vocabulary (token and position embeddings, attention,
  layer norms; 80k parameters);
- ``gpt2``: a transformers GPT-2 language model, 4 layers, n_embd 128, tied
  embeddings, on 64 tokens of a 128-token vocabulary (0.8M parameters);
- ``bert``: a transformers BERT classifier, 4 layers, hidden size 128, on 64 token
  ids padded to random lengths with a 2-D attention mask (0.8M parameters).

The per-layer routes' row projects every layer into one feature vector (TRAK's
features); the EK-FAC row keeps every layer's block side by side, accumulates its
Kronecker factors and fits EK-FAC's per-layer inverses (``method="ekfac"``).
The small fits' table (``--small``; also made by a full run) is where fixed costs
show: the README's quickstart (5 MLPs on 1000 digits, TRAK), TRAK on a BERT and a
Llama-style classifier of 300 rows, and a transformers ViT classifier (its class
token expanded to the batch).

Every measurement runs in its own process so its peak resident memory (ru_maxrss)
is its own. The dense vmap path and dattri 0.3.0's TRAK cache (MLP only) run on a
slice (they are slow). The scaling table fits TRAK (one training epoch, features,
Gram inverse) and streams the top-10 proponents and opponents of 100 test samples
with ``most_influential``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from _common import _sgd, emit, markdown_table, parser
from sklearn.base import clone
from skorch import NeuralNet, NeuralNetClassifier

from sktda import EnsembleAttributor
from sktda.models import MLP, ConvNet, TokenCrossEntropy, TokenTransformer

BATCH = 256


def _labels(features: np.ndarray, seed: int = 123) -> np.ndarray:
    teacher = np.random.default_rng(seed).standard_normal((features.shape[1], 10)).astype(np.float32)
    return (features @ teacher).argmax(1).astype(np.int64)


def synthetic(model: str, n: int, seed: int = 0):
    """``n`` samples of the model's input kind, labelled by a fixed random teacher."""
    rng = np.random.default_rng(seed)
    if model == "mlp":
        X = rng.standard_normal((n, 256), dtype=np.float32)
        return X, _labels(X)
    if model in ("cnn", "vit"):
        X = rng.standard_normal((n, 3, 32, 32), dtype=np.float32)
        return X, _labels(X.reshape(n, 3, 4, 8, 4, 8).mean((3, 5)).reshape(n, -1))
    if model == "gpt2":
        tokens = rng.integers(0, 128, (n, 65))
        return tokens[:, :-1], tokens[:, 1:]
    X = rng.integers(0, 128, (n, 64))
    counts = np.stack([np.bincount(row // 8, minlength=16) for row in X]).astype(np.float32)
    y = _labels(counts - counts.mean(0))
    if model == "bert":
        from skorch.helper import SliceDict

        mask = (np.arange(64)[None] < rng.integers(16, 65, (n, 1))).astype(np.int64)
        return SliceDict(input_ids=X * mask, attention_mask=mask), y
    return X, y


def net(model: str, max_epochs: int = 1, device: str = "cpu") -> NeuralNetClassifier:
    recipe = {**_sgd(max_epochs), "batch_size": BATCH, "device": device}
    if model == "mlp":
        params = dict(
            module__n_features=256, module__n_outputs=10, module__hidden=(512, 512), module__dropout=0.0
        )
        return NeuralNetClassifier(MLP, **params, **recipe)
    if model == "cnn":
        params = dict(module__in_channels=3, module__channels=(32, 64, 128), module__image_size=32)
        return NeuralNetClassifier(ConvNet, **params, module__dropout=0.0, **recipe)
    del recipe["optimizer__momentum"]
    recipe.update(optimizer=torch.optim.Adam, lr=1e-3)
    if model == "gpt2":
        from _hf import GPT2LM

        recipe["criterion"] = TokenCrossEntropy
        return NeuralNet(GPT2LM, module__dropout=0.0, **recipe)
    if model == "bert":
        from _hf import BertClassifier

        return NeuralNetClassifier(BertClassifier, module__n_labels=10, module__dropout=0.0, **recipe)
    if model == "llama":
        from _hf import LlamaClassifier

        return NeuralNetClassifier(LlamaClassifier, module__n_labels=10, **recipe)
    if model == "vit":
        from _hf import ViTClassifier

        return NeuralNetClassifier(ViTClassifier, module__n_labels=10, **recipe)
    params = dict(module__vocab_size=128, module__n_outputs=10, module__d_model=64, module__max_len=64)
    return NeuralNetClassifier(TokenTransformer, **params, module__dropout=0.0, **recipe)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib() -> float:
    """Resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_gpu_mib() -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def measure(
    kind: str, model: str, n: int, path: str = "auto", device: str = "cpu", method: str = "grad_dot"
) -> dict:
    """One measurement, in this process."""
    X, y = synthetic(model, n)
    if kind == "epoch":
        net(model, device=device).fit(X[:BATCH], y[:BATCH])  # warm-up
        start = time.perf_counter()
        net(model, max_epochs=3, device=device).fit(X, y)
        return {
            "seconds": (time.perf_counter() - start) / 3,
            "peak_mib": peak_mib(),
            "gpu_mib": peak_gpu_mib(),
        }
    if kind == "featurize":
        attr = EnsembleAttributor(
            net(model),
            method=method,
            gradient_path=path,
            batch_size=BATCH,
            device=device,
            random_state=0,
        )
        attr.fit(X[:BATCH], y[:BATCH])  # warm-up, as for the epoch
        attr.fit(X, y)
        return {
            "seconds": attr.costs_["featurize_seconds"],
            "peak_mib": peak_mib(),
            "gpu_mib": peak_gpu_mib(),
        }
    if kind == "dattri":
        from _peers import dattri_trak

        module = net(model).fit(X, y).module_.eval()
        _, seconds = dattri_trak([module], X, y, X[:1], y[:1], 2048, 0.01)
        return {"seconds": seconds, "peak_mib": peak_mib(), "gpu_mib": peak_gpu_mib()}
    if kind == "quickstart":  # the README's demo: 5 MLPs on 1000 digits, TRAK at proj_dim 2048
        from _common import digits_data

        X, _, y, _ = digits_data()
        recipe = dict(module__n_features=64, module__n_outputs=10, criterion=torch.nn.CrossEntropyLoss)
        recipe.update(optimizer=torch.optim.SGD, optimizer__momentum=0.9, lr=0.05, batch_size=64)
        quick = NeuralNetClassifier(MLP, **recipe, max_epochs=30, train_split=None, verbose=0)
        attr = EnsembleAttributor(quick, method=method, n_models=5, proj_dim=2048, random_state=0)
        clone(attr).set_params(n_models=1).fit(X[:BATCH], y[:BATCH])  # warm-up
        start = time.perf_counter()
        attr.fit(X[:n], y[:n])
        seconds = time.perf_counter() - start
        return {
            "train_seconds": attr.costs_["train_seconds"],
            "seconds": seconds - attr.costs_["train_seconds"],  # everything after training
            "peak_mib": peak_mib(),
            "gpu_mib": peak_gpu_mib(),
        }
    if kind == "scaling":
        X_test, y_test = synthetic(model, 100, seed=1)
        attr = EnsembleAttributor(net(model), method="trak", batch_size=1024, device=device, random_state=0)
        # a warm-up fit on a few samples loads the libraries that a first fit loads (their
        # code and workspaces are the process's, not the fit's), as the timings' warm-up does
        clone(attr).fit(X[:BATCH], y[:BATCH]).most_influential(X_test[:2], y_test[:2], k=2)
        planned = current_mib() + attr.plan_memory(X, y).peak / 2**20
        start = time.perf_counter()
        attr.fit(X, y).most_influential(X_test, y_test, k=10)
        return {
            "seconds": time.perf_counter() - start,
            "train_seconds": attr.costs_["train_seconds"],
            "peak_mib": peak_mib(),
            "planned_mib": planned,
            "gpu_mib": peak_gpu_mib(),
        }
    raise ValueError(kind)


def run(kind: str, model: str, n: int, path: str = "auto", device: str = "cpu", method="grad_dot") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", kind, model, str(n), path, device, method],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), *sys.argv[5:])))
        return
    p = parser(__doc__)
    p.add_argument(
        "--models",
        nargs="*",
        default=["mlp", "cnn", "transformer", "gpt2", "bert"],
        help="none: scaling only",
    )
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--vmap-n", type=int, default=256, help="samples for the slow dense vmap path")
    p.add_argument("--dattri-n", type=int, default=200)
    p.add_argument("--mlp-sizes", type=int, nargs="*", default=[1000, 10000, 100000, 1000000])
    p.add_argument("--cnn-sizes", type=int, nargs="*", default=[1000, 10000, 100000])
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of training and featurization; 'cuda' writes *_cuda tables",
    )
    p.add_argument("--name", default="speed", help="name of the featurization table in results/")
    p.add_argument("--small", action="store_true", help="only the small fits' table (results/speed_small.md)")
    args = p.parse_args()
    device = args.device
    suffix = "" if device == "cpu" else f"_{torch.device(device).type}"

    small_fits(args.readme)
    if args.small:
        return
    rows = []
    for model in args.models:
        epoch = run("epoch", model, args.n, device=device)
        epoch_rate = args.n / epoch["seconds"]
        gpu = [epoch["gpu_mib"]] if suffix else []
        rows.append([model, "one training epoch", args.n, epoch_rate, epoch["peak_mib"], *gpu, 1.0, ""])
        results = [("sktda, per-layer routes", args.n, run("featurize", model, args.n, "layers", device))]
        per_layer = run("featurize", model, args.n, "layers", device, "ekfac")
        results.append(("sktda, per-layer blocks + EK-FAC", args.n, per_layer))
        if model != "bert":  # transformers' padding-mask code cannot run under vmap
            vmap = run("featurize", model, args.vmap_n, "vmap", device)
            results.append(("sktda, vmap + dense projection", args.vmap_n, vmap))
        if model == "mlp" and device == "cpu":
            try:
                import dattri  # noqa: F401

                results.append(
                    ("dattri 0.3.0 TRAK cache", args.dattri_n, run("dattri", model, args.dattri_n))
                )
            except ImportError:
                print("dattri is not installed: its row is skipped.")
        fast_rate = args.n / results[0][2]["seconds"]
        for name, n, res in results:
            rate = n / res["seconds"]
            gpu = [res["gpu_mib"]] if suffix else []
            rows.append(
                [model, name, n, rate, res["peak_mib"], *gpu, epoch_rate / rate, f"{fast_rate / rate:.0f}x"]
            )
            print(rows[-1], flush=True)
    header = [
        "model",
        "featurization",
        "samples",
        "samples/s",
        "peak MiB",
        *(["peak GPU MiB"] if suffix else []),
        "time vs one epoch",
        "routes' speed-up",
    ]
    if rows:
        emit(
            f"{args.name}{suffix}",
            f"Featurization speed (proj_dim 2048, batch {BATCH}, {device})",
            markdown_table(header, rows)
            + (
                "\n\nbert has no vmap row: transformers' padding-mask code branches on the data, "
                "which vmap cannot run."
                if "bert" in args.models
                else ""
            ),
            args.readme,
        )

    scaling = []
    for model, sizes in (("mlp", args.mlp_sizes), ("cnn", args.cnn_sizes)):
        for n in sizes:
            res = run("scaling", model, n, device=device)
            gpu = [res["gpu_mib"]] if suffix else []
            scaling.append(
                [
                    model,
                    n,
                    res["seconds"],
                    res["train_seconds"],
                    res["peak_mib"],
                    res["planned_mib"],
                    *gpu,
                    res["seconds"] / n * 1e6,
                ]
            )
            print(scaling[-1], flush=True)
    table = markdown_table(
        [
            "model",
            "training samples",
            "total s",
            "of which training s",
            "peak MiB",
            "planned MiB",
            *(["peak GPU MiB"] if suffix else []),
            "us per sample",
        ],
        scaling,
    )
    table += (
        "\n\nTRAK, one model trained one epoch, proj_dim 2048, then the top-10 proponents and opponents of 100 "
        "test samples streamed with most_influential. 'peak MiB': the process's peak resident memory; "
        "'planned MiB': its resident memory before the fit plus plan_memory's peak, asked before any training "
        "(both after a warm-up fit on 256 samples, which loads the libraries a first fit loads)."
    )
    if scaling:
        emit(f"scaling{suffix}", f"Scaling with the training-set size ({device})", table, args.readme)


def small_fits(readme: bool) -> None:
    """Small fits, where a fixed cost shows: the quickstart, TRAK on transformers
    classifiers with a few hundred rows, and a ViT."""
    rows = []
    quick = run("quickstart", "mlp", 1000, method="trak")
    rows.append(["quickstart: 5 MLPs, 1000 digits", "trak", 1000, quick["train_seconds"], quick["seconds"]])
    for model, n, method in (("bert", 300, "trak"), ("llama", 300, "trak"), ("vit", 1000, "trak")):
        epoch = run("epoch", model, n)
        res = run("featurize", model, n, "layers", method=method)
        rows.append([f"{model} classifier", method, n, epoch["seconds"], res["seconds"]])
    for row in rows:
        row.append(row[4] / row[3])
        print(row, flush=True)
    table = markdown_table(
        ["fit", "method", "training samples", "training s", "featurization s", "featurization / training"],
        rows,
    ) + (
        "\n\nThe quickstart's 'training s' is its five members' 30 epochs and its 'featurization s' "
        "everything its fit does after training (features, the damped Gram's factor); the classifiers' "
        f"'training s' is one epoch at batch {BATCH}, their featurization that of the training set and "
        "the method's fit. bert, llama: transformers' BERT and a Llama-style classifier (4 layers, hidden "
        "size 128) on 64 token ids; vit: transformers' ViTForImageClassification (2 layers, hidden size "
        "64, 4x4 patches, a class token) on 3x32x32 images."
    )
    emit("speed_small", "Fixed costs: small fits (cpu)", table, readme)


if __name__ == "__main__":
    main()
