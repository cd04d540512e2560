"""Featurization speed and memory against one training epoch, and scaling with the
training-set size.

    python benchmarks/speed.py --readme

Synthetic data, 4000 x 256, 10 classes; MLP 256-512-512-10 (0.4M parameters);
proj_dim 2048. Every measurement runs in its own process so its peak resident
memory (ru_maxrss) is its own. dattri 0.3.0's TRAK cache runs on the same model on
a slice (it is slow). The scaling table fits TRAK (one training epoch, features,
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
from _common import digits_net, emit, markdown_table, parser

from sktda import EnsembleAttributor


def synthetic(n: int, d: int = 256, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d), dtype=np.float32)
    teacher = np.random.default_rng(123).standard_normal((d, classes)).astype(np.float32)
    return X, (X @ teacher).argmax(1).astype(np.int64)


def net(max_epochs=1):
    """The digits setting's net, resized to MLP 256-512-512-10 without dropout."""
    return digits_net(
        max_epochs=max_epochs,
        module__n_features=256,
        module__hidden=(512, 512),
        module__dropout=0.0,
    )


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, n: int, path: str = "auto") -> dict:
    """One measurement, in this process."""
    X, y = synthetic(n)
    if kind == "epoch":
        model = net(max_epochs=1).fit(X[:64], y[:64])  # warm-up
        start = time.perf_counter()
        net(max_epochs=3).fit(X, y)
        return {"seconds": (time.perf_counter() - start) / 3, "peak_mib": peak_mib()}
    if kind == "featurize":
        attr = EnsembleAttributor(
            net(), method="grad_dot", gradient_path=path, batch_size=256, random_state=0
        )
        attr.fit(X, y)
        return {"seconds": attr.costs_["featurize_seconds"], "peak_mib": peak_mib()}
    if kind == "dattri":
        from _peers import dattri_trak

        model = net().fit(X, y).module_.eval()
        _, seconds = dattri_trak([model], X, y, X[:1], y[:1], 2048, 0.01)
        return {"seconds": seconds, "peak_mib": peak_mib()}
    if kind == "scaling":
        X_test, y_test = synthetic(100, seed=1)
        start = time.perf_counter()
        attr = EnsembleAttributor(net(), method="trak", batch_size=1024, random_state=0).fit(X, y)
        attr.most_influential(X_test, y_test, k=10)
        return {
            "seconds": time.perf_counter() - start,
            "train_seconds": attr.costs_["train_seconds"],
            "peak_mib": peak_mib(),
        }
    raise ValueError(kind)


def run(kind: str, n: int, path: str = "auto") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", kind, str(n), path], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--vmap-n", type=int, default=512, help="samples for the slow dense vmap path")
    p.add_argument("--dattri-n", type=int, default=200)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    args = p.parse_args()

    epoch = run("epoch", args.n)
    epoch_rate = args.n / epoch["seconds"]
    rows = [["one training epoch (batch 64)", args.n, epoch_rate, epoch["peak_mib"], 1.0, ""]]
    results = [
        ("sktda, nn.Linear fast path (Kronecker)", args.n, run("featurize", args.n, "linear")),
        ("sktda, vmap + dense projection", args.vmap_n, run("featurize", args.vmap_n, "vmap")),
    ]
    try:
        import dattri  # noqa: F401

        results.append(("dattri 0.3.0 TRAK cache", args.dattri_n, run("dattri", args.dattri_n)))
    except ImportError:
        print("dattri is not installed (pip install -e .[bench]): its row is skipped.")
    fast_rate = args.n / results[0][2]["seconds"]
    for name, n, res in results:
        rate = n / res["seconds"]
        rows.append([name, n, rate, res["peak_mib"], epoch_rate / rate, f"{fast_rate / rate:.0f}x"])
        print(rows[-1], flush=True)
    table = markdown_table(
        ["featurization", "samples", "samples/s", "peak MiB", "time vs one epoch", "fast path speed-up"], rows
    )
    emit("speed", "Featurization speed (MLP 256-512-512-10, proj_dim 2048)", table, args.readme)

    scaling = []
    for n in args.sizes:
        res = run("scaling", n)
        scaling.append([n, res["seconds"], res["train_seconds"], res["peak_mib"], res["seconds"] / n * 1e6])
        print(scaling[-1], flush=True)
    table = markdown_table(
        ["training samples", "total s", "of which training s", "peak MiB", "us per sample"], scaling
    )
    table += (
        "\n\nTRAK, one model trained one epoch, proj_dim 2048, then the top-10 proponents and opponents of 100 "
        "test samples streamed with most_influential."
    )
    emit("scaling", "Scaling with the training-set size", table, args.readme)


if __name__ == "__main__":
    main()
