"""EK-FAC's projection: sktda's random Kronecker projection against one chosen by the
curvature, LoGra's proposal, at the same feature width, on the same trained models.

The curvature-chosen projection keeps, for every routed weight (``Conv1D``,
``nn.Linear``, ``nn.Embedding``), the top ``k_out`` eigenvectors of its output-side
K-FAC factor ``sum_t d_t d_t^T`` and the top ``k_in`` of its input-side factor
``sum_t a_t a_t^T`` (the input augmented by the bias's constant 1), both summed over
the training set in one extra forward and backward pass per model. sktda does not
ship it (this benchmark is why): the script swaps the projection matrices of
sktda's Kronecker blocks for those eigenvectors and refits on the same models.
Each model is one ``n_models=1`` fit of its own seed; ``n`` models' attributions
are the sum of the first ``n``.

    python benchmarks/projection.py
"""

from __future__ import annotations

import time

import torch
from _common import emit, markdown_table, parser, pydoc_passages
from huggingface import gpt2_net

from sktda import EnsembleAttributor, _projection
from sktda._gradients import GradientConfig, make_engine
from sktda._layers import EmbeddingRoute, WeightRoute
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining


class CurvatureBases:
    """While active, Kronecker blocks of the weights in ``bases`` project on the
    given eigenvectors instead of their random matrices."""

    def __init__(self):
        self.bases = {}
        self._init, self._bias = _projection.KroneckerBlock.__init__, _projection.KroneckerBlock.add_bias

    def __enter__(self):
        bases, init, add_bias = self.bases, self._init, self._bias

        def chosen_init(block, weight, n_left, n_right, factors, *args, **kwargs):
            init(block, weight, n_left, n_right, factors, *args, **kwargs)
            if weight in bases:
                q_left, q_right = bases[weight]
                block.p_left = q_left[:, : factors[0]].float().contiguous()
                block.p_right = q_right[:n_right, : factors[1]].float().contiguous()

        def chosen_bias(block, name):
            if block.weight in bases and name not in block.bias_rows:
                block.bias_rows[name] = bases[block.weight][1][block.n_right, : block.factors[1]].float()
            else:
                add_bias(block, name)

        _projection.KroneckerBlock.__init__, _projection.KroneckerBlock.add_bias = chosen_init, chosen_bias
        return self

    def __exit__(self, *exc):
        _projection.KroneckerBlock.__init__, _projection.KroneckerBlock.add_bias = self._init, self._bias


def top_eigenvectors(attr, X, y, batch: int = 64) -> dict:
    """``{weight: (Q_out, Q_in)}``, eigenvectors by decreasing eigenvalue of each
    routed weight's raw K-FAC factors over ``(X, y)``, for the fitted one-model
    ``attr``."""
    (member,) = attr.ensemble_.members()
    engine = make_engine(member, GradientConfig(task=attr._task, proj_dim=attr.proj_dim, per_layer=True))
    S, A = {}, {}

    def accumulate(route, context, d):
        if d is None or not isinstance(route, WeightRoute):
            return
        with torch.no_grad():
            if isinstance(route, EmbeddingRoute):
                left, right = torch.nn.functional.one_hot(context, route.module.num_embeddings).to(d.dtype), d
            else:
                left, right = route.factors(context, d)
            b = max(left.shape[0], right.shape[0])
            left = (
                left.reshape(left.shape[0], -1, left.shape[-1]).expand(b, -1, -1).reshape(-1, left.shape[-1])
            )
            right = (
                right.reshape(right.shape[0], -1, right.shape[-1])
                .expand(b, -1, -1)
                .reshape(-1, right.shape[-1])
            )
            right = torch.cat([right, torch.ones(len(right), 1, dtype=right.dtype)], 1).double()
            weight = route.params["weight"]
            S[weight] = S.get(weight, 0) + left.double().T @ left.double()
            A[weight] = A.get(weight, 0) + right.T @ right

    X, y = torch.as_tensor(X), torch.as_tensor(y)
    for start in range(0, len(X), batch):
        engine._pass(X[start : start + batch], y[start : start + batch], accumulate)
    return {w: (torch.linalg.eigh(S[w])[1].flip(1), torch.linalg.eigh(A[w])[1].flip(1)) for w in S}


def main():
    p = parser(__doc__)
    p.add_argument("--models", type=int, default=5)
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()
    X, y, alphabet = pydoc_passages(340, 32)
    data = X[:300], X[300:], y[:300], y[300:]
    net = gpt2_net(len(alphabet), 32)
    truth = subset_retraining(
        net, data[0], data[2], data[1], data[3], n_subsets=args.n_subsets, random_state=0, n_jobs=args.n_jobs
    )
    totals, rows = {}, []
    for m in range(args.models):
        attr = EnsembleAttributor(net, method="ekfac", n_models=1, normalize=None, random_state=m)
        attr.fit(data[0], data[2])
        random_seconds = attr.costs_["featurize_seconds"]
        totals["random"] = totals.get("random", 0) + attr.attribute(data[1], data[3])
        start = time.perf_counter()
        with CurvatureBases() as chosen:
            chosen.bases.update(top_eigenvectors(attr, data[0], data[2]))
            extra = time.perf_counter() - start
            attr.fit(data[0], data[2])  # the same model: the same recipe and seed
            totals["curvature"] = totals.get("curvature", 0) + attr.attribute(data[1], data[3])
        for label, seconds in (
            ("random (sktda)", random_seconds),
            ("curvature-chosen", extra + attr.costs_["featurize_seconds"]),
        ):
            key = "random" if label.startswith("random") else "curvature"
            lds = linear_datamodeling_score(totals[key], truth.subsets, truth.outputs)
            rows.append([label, m + 1, lds, seconds])
            print(rows[-1], flush=True)
    rows.sort(key=lambda r: (r[0] != "random (sktda)", r[1]))
    header = ["projection", "models", "LDS", "featurization s (last model)"]
    note = (
        "GPT-2 of huggingface.py (300 training and 40 held-out passages of 32 characters), EK-FAC at "
        f"proj_dim 2048 and the default damping; ground truth: {args.n_subsets} models retrained on 50% "
        "subsets. The curvature-chosen projection's seconds include its extra pass and eigendecompositions."
    )
    emit(
        "projection",
        "EK-FAC's projection: random or chosen by the curvature",
        markdown_table(header, rows) + "\n\n" + note,
    )


if __name__ == "__main__":
    main()
