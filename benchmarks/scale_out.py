"""Past one machine's memory: the training features kept on a Dask cluster's
workers, and 10M samples on one machine with float16, memory-mapped features.

    python benchmarks/scale_out.py --readme

Both runs fit TRAK (one model, one training epoch) on an MLP 32-128-10 (5.5k
parameters, per-layer gradient routes) over synthetic samples labelled by a fixed
random linear teacher, then stream the top-10 proponents and opponents of 100 test
samples with ``most_influential``. Each runs in its own process, so that its peak
resident memory (ru_maxrss) is its own.

- ``cluster``: a ``LocalCluster`` of worker processes with a memory limit each.
  The training set is a dask array that the workers generate (the driver never
  holds it); under ``joblib.parallel_config(backend="dask")`` the features stay
  on the workers (``cluster_features="auto"``), so their total exceeds any one
  worker's limit. The table gives the driver's peak resident memory beside the
  features' total bytes, the workers' largest peak, and the wall time. The
  driver process also runs the LocalCluster's scheduler, so its peak counts the
  scheduler's memory too. Equality: a cluster fit on the first rows (as a dask
  array) against a local fit on the same rows (numpy): the attributions of the
  100 test samples bit for bit, and the top-10.
- ``one machine``: 10M samples in memory as numpy, features stored as float16 in
  a memory-mapped file (``features_dir``), with the memory that ``plan_memory``
  planned beside the measured peak. ru_maxrss counts the pages of the mapped file
  that were read (page cache, reclaimable); the anonymous peak (``RssAnon``,
  sampled every 20 ms) leaves them out, and is what the plan (which puts the file
  apart, ``features_on_disk``) should match.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

import numpy as np
from _common import _sgd, emit, markdown_table, parser
from skorch import NeuralNetClassifier
from speed import current_mib

from sktda import EnsembleAttributor
from sktda.models import MLP

D, BATCH, CHUNK = 32, 1024, 250_000
TEACHER = np.random.default_rng(123).standard_normal((D, 10)).astype(np.float32)


def rows(a: int, b: int) -> np.ndarray:
    """Rows ``a:b`` of the synthetic inputs, the same however they are chunked
    (each chunk of CHUNK rows drawn from its own seed)."""
    out = [
        np.random.default_rng([0, start]).standard_normal((CHUNK, D), dtype=np.float32)[
            max(a - start, 0) : min(b - start, CHUNK)
        ]
        for start in range(a // CHUNK * CHUNK, b, CHUNK)
    ]
    return np.concatenate(out)


def _block(block_info=None) -> np.ndarray:
    (a, b), _ = block_info[None]["array-location"]
    return rows(a, b)


def dask_inputs(n: int):
    """The first ``n`` synthetic inputs as a dask array that its workers generate."""
    import dask.array as da

    chunks = tuple(min(CHUNK, n - a) for a in range(0, n, CHUNK))
    return da.map_blocks(_block, chunks=(chunks, (D,)), dtype=np.float32, meta=np.empty((0, D), np.float32))


def labels(X) -> np.ndarray:
    y = (X @ TEACHER).argmax(1)
    return np.asarray(y.compute() if hasattr(y, "compute") else y).astype(np.int64)


def net() -> NeuralNetClassifier:
    return NeuralNetClassifier(
        MLP,
        module__n_features=D,
        module__n_outputs=10,
        module__hidden=(128,),
        **{**_sgd(1), "batch_size": BATCH},
    )


def attributor(**params) -> EnsembleAttributor:
    return EnsembleAttributor(net(), method="trak", batch_size=BATCH, random_state=0, **params)


def peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_peak_mib() -> float:
    return peak_mib()


def anonymous_mib() -> float:
    """This process's anonymous resident memory now (Linux's ``RssAnon``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (Linux's ``RssAnon``),
    sampled every 20 ms: unlike ru_maxrss it leaves out the pages of memory-mapped
    files, which the kernel reclaims as page cache."""

    def __enter__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anonymous_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure_cluster(n: int, n_workers: int, memory_limit: str, proj_dim: int, n_check: int) -> dict:
    from distributed import Client, LocalCluster
    from joblib import parallel_config

    X_test = rows(10**9, 10**9 + 100)
    y_test = labels(X_test)
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            memory_limit=memory_limit,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        X = dask_inputs(n)
        y = labels(X)  # computed on the workers: only the labels come here
        attr = attributor(proj_dim=proj_dim)
        start = time.perf_counter()
        with parallel_config(backend="dask"):
            plan = attr.plan_memory(X, y)
            planned = current_mib() + plan.peak / 2**20
            planned_worker = max(client.run(current_mib).values()) + plan.worker / 2**20
            attr.fit(X, y)
            top = attr.most_influential(X_test, y_test, k=10)
        seconds = time.perf_counter() - start
        features = attr.costs_["feature_bytes"]
        driver = peak_mib()
        workers = max(client.run(_worker_peak_mib).values())
        del attr, top

        # the same fit on the first rows, on the cluster and here
        X_check = rows(0, n_check)
        y_check = y[:n_check]
        with parallel_config(backend="dask"):
            remote = attributor(proj_dim=proj_dim).fit(dask_inputs(n_check), y_check)
            remote_A = remote.attribute(X_test, y_test)
            remote_top = remote.most_influential(X_test, y_test, k=10)
    local = attributor(proj_dim=proj_dim).fit(X_check, y_check)
    local_A = local.attribute(X_test, y_test)
    local_top = local.most_influential(X_test, y_test, k=10)
    return {
        "seconds": seconds,
        "train_seconds": None,
        "feature_mib": features / 2**20,
        "driver_mib": driver,
        "planned_mib": planned,
        "worker_mib": workers,
        "planned_worker_mib": planned_worker,
        "equal": bool(np.array_equal(remote_A, local_A)),
        "max_difference": float(np.abs(remote_A - local_A).max()),
        "top_equal": all(np.array_equal(a, b) for a, b in zip(remote_top, local_top)),
    }


def measure_local(n: int, proj_dim: int) -> dict:
    X = rows(0, n)
    y = labels(X)
    X_test = rows(10**9, 10**9 + 100)
    y_test = labels(X_test)
    with tempfile.TemporaryDirectory(prefix="sktda-scale-") as directory:
        attr = attributor(proj_dim=proj_dim, feature_dtype="float16", features_dir=directory)
        # the plan leaves the file apart: it is matched against the anonymous peak
        planned = anonymous_mib() + attr.plan_memory(X, y).peak / 2**20
        start = time.perf_counter()
        with AnonymousPeak() as anonymous:
            attr.fit(X, y)
            attr.most_influential(X_test, y_test, k=10)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "train_seconds": attr.costs_["train_seconds"],
            "feature_mib": attr.costs_["feature_bytes"] / 2**20,
            "driver_mib": peak_mib(),
            "anonymous_mib": anonymous.peak,
            "planned_mib": planned,
            "input_mib": X.nbytes / 2**20,
        }


def run(*args) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", *map(str, args)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"{args} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        kind, *args = sys.argv[2:]
        if kind == "cluster":
            n, n_workers, memory_limit, proj_dim, n_check = args
            result = measure_cluster(int(n), int(n_workers), memory_limit, int(proj_dim), int(n_check))
        else:
            n, proj_dim = args
            result = measure_local(int(n), int(proj_dim))
        print(json.dumps(result))
        return
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=2_000_000, help="training samples on the cluster")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--memory-limit", default="4GiB", help="per worker")
    p.add_argument("--proj-dim", type=int, default=1024, help="on the cluster")
    p.add_argument("--n-check", type=int, default=20_000, help="rows of the equality check")
    p.add_argument("--n-local", type=int, default=10_000_000, help="training samples on one machine")
    p.add_argument("--local-proj-dim", type=int, default=512)
    p.add_argument("--skip-local", action="store_true")
    args = p.parse_args()

    cluster = run("cluster", args.n, args.workers, args.memory_limit, args.proj_dim, args.n_check)
    print(cluster, flush=True)
    same = "bit for bit" if cluster["equal"] else f"max diff {cluster['max_difference']:.1e}"
    table = [
        {
            "run": f"cluster, {args.workers} workers x {args.memory_limit}",
            "n_train": f"{args.n:,}",
            "features": f"float32, k={args.proj_dim}",
            "feature MiB": f"{cluster['feature_mib']:,.0f}",
            "peak MiB (driver)": f"{cluster['driver_mib']:,.0f} ({cluster['driver_mib'] / cluster['feature_mib']:.1%} "
            "of the features)",
            "planned MiB (driver)": f"{cluster['planned_mib']:,.0f}",
            "worker peak MiB (planned)": f"{cluster['worker_mib']:,.0f} ({cluster['planned_worker_mib']:,.0f})",
            "fit + top-10 s": f"{cluster['seconds']:,.0f}",
            "equals a local run": f"{same}, top-10 {'identical' if cluster['top_equal'] else 'differs'} ({args.n_check:,} rows)",
        }
    ]
    if not args.skip_local:
        local = run("local", args.n_local, args.local_proj_dim)
        print(local, flush=True)
        table.append(
            {
                "run": "one machine, memory-mapped",
                "n_train": f"{args.n_local:,}",
                "features": f"float16, k={args.local_proj_dim}",
                "feature MiB": f"{local['feature_mib']:,.0f}",
                "peak MiB (driver)": f"{local['driver_mib']:,.0f} (anonymous: {local['anonymous_mib']:,.0f})",
                "planned MiB (driver)": f"{local['planned_mib']:,.0f} (anonymous)",
                "worker peak MiB (planned)": "",
                "fit + top-10 s": f"{local['seconds']:,.0f}",
                "equals a local run": "",
            }
        )
    header = list(table[0])
    emit(
        "scale_out",
        "Scale out: features on a Dask cluster, 10M samples on one machine",
        markdown_table(header, [[row[h] for h in header] for row in table]),
        args.readme,
    )


if __name__ == "__main__":
    main()
