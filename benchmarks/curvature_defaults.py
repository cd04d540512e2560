"""The defaults of the per-layer curvature methods, chosen on the same trained models
for every value: EK-FAC's damping (``--part damping``: LDS against the damping, for
the rule relative to each block's mean eigenvalue and for the previous rule,
relative to ``trace / min(n_train, width)``) and the parameters attributed
(``--part layers``: every parameter, the linear-like layers only, with the
embeddings, and without the output layer).

Settings: the sequence benchmark's language model (1 layer, 300 passages), a
2-layer one on 600 longer passages of another part of the docs, the GPT-2 of
``huggingface.py``, the digits MLP and CNN, and (``--part layers``) the BERT
classifier of ``huggingface.py`` under TRAK, its default method. Each damping
refits only the method's per-member state, on the features of one fit.

    python benchmarks/curvature_defaults.py --part damping
    python benchmarks/curvature_defaults.py --part layers
"""

from __future__ import annotations

from _common import cnn_net, digits_data, digits_net, emit, lm_net, markdown_table, parser, pydoc_passages
from torch import nn

from sktda import EnsembleAttributor, _methods
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import subset_retraining

DAMPINGS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)


def setting(name: str):
    """``(net, (X_train, X_test, y_train, y_test))`` of a named setting."""
    if name in ("sequence", "sequence, 2 layers"):
        two = name != "sequence"
        n, length = (600, 48) if two else (300, 32)
        X, y, alphabet = pydoc_passages(n + 40, length, seed=3 if two else 0)
        extra = dict(module__n_layers=2, module__d_model=48) if two else {}
        return lm_net(len(alphabet), length, **extra), (X[:n], X[n:], y[:n], y[n:])
    if name == "gpt2":
        from huggingface import gpt2_net

        X, y, alphabet = pydoc_passages(340, 32)
        return gpt2_net(len(alphabet), 32), (X[:300], X[300:], y[:300], y[300:])
    if name == "bert":
        from huggingface import bert_net, padded_topic_passages

        X, y, vocab = padded_topic_passages(200, 48)
        n = len(y) * 2 // 3
        return bert_net(vocab, 48), (X[:n], X[n : n + 100], y[:n], y[n : n + 100])
    X_train, X_test, y_train, y_test = digits_data()
    if name == "mlp":
        return digits_net(), (X_train, X_test[:100], y_train, y_test[:100])
    if name == "cnn":
        images = (X_train.reshape(-1, 1, 8, 8), X_test[:100].reshape(-1, 1, 8, 8))
        return cnn_net(), (images[0], images[1], y_train, y_test[:100])
    raise ValueError(name)


def parameter_sets(net) -> dict:
    """``layers=`` of each candidate set: every parameter; the outermost linear-like
    modules (``nn.Linear``, convolutions, ``Conv1D``, ``nn.MultiheadAttention``);
    those and the embeddings; those but the output layer."""
    module = net.initialize().module_
    modules = dict(module.named_modules())

    def linear(m):
        return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)) or (
            type(m).__name__ == "Conv1D"
        )

    nested = {f"{n}.{c}" for n, m in modules.items() if n and linear(m) for c, _ in m.named_modules() if c}
    top = [n for n, m in modules.items() if n and linear(m) and n not in nested]
    embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
    owners = [n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))]
    sets = {"every parameter": None, "linear-like layers": top}
    if embeddings:
        sets["linear-like layers and embeddings"] = top + embeddings
    if owners[-1] in top:
        sets["linear-like layers but the output"] = [n for n in top if n != owners[-1]]
    return sets


class _Refits:
    """Captures each member's per-layer inverse inputs during a fit, so that other
    dampings refit only the states (the features and factors are the fit's)."""

    def __init__(self):
        self.calls, self._fit = [], _methods._layer_inverse

    def __enter__(self):
        def capture(rows, layout, damping, corrected, factors=None):
            self.calls.append((rows, layout, corrected, factors))
            return self._fit(rows, layout, damping, corrected, factors)

        _methods._layer_inverse = capture
        return self

    def __exit__(self, *exc):
        _methods._layer_inverse = self._fit

    def states(self, attr, damping, rule=None):
        if not self.calls:  # a dense method (TRAK): its own fit of each member's rows
            method = attr._method()()
            return [
                method.fit(attr._store.member_rows(i, "cpu"), damping) for i in range(len(attr._store.states))
            ]
        saved = _methods.block_damping
        try:
            out = []
            for rows, layout, corrected, factors in self.calls:
                if rule is not None:
                    _methods.block_damping = lambda d, eig, n=rows.n: rule(d, eig, n)
                out.append(self._fit(rows, layout, damping, corrected, factors))
            return out
        finally:
            _methods.block_damping = saved


def previous_rule(damping, eigenvalues, n_rows):
    """The rule before: relative to ``trace / min(n_train, width)``, a Gram's mean
    nonzero eigenvalue (the rule TRAK's Gram keeps)."""
    return _methods._damping_of(float(eigenvalues.sum()), damping, n_rows, eigenvalues.numel())


def lds_by_damping(net, data, truth, n_models, method, dampings, layers=None, rule=None):
    X_train, X_test, y_train, y_test = data
    with _Refits() as refits:
        attr = EnsembleAttributor(
            net, method=method, n_models=n_models, layers=layers, normalize=None, random_state=0
        ).fit(X_train, y_train)
    out = []
    for damping in dampings:
        attr._store.states = refits.states(attr, damping, rule)
        out.append(linear_datamodeling_score(attr.attribute(X_test, y_test), truth.subsets, truth.outputs))
    return out


def main():
    p = parser(__doc__)
    p.add_argument("--part", choices=["damping", "layers"], default="damping")
    p.add_argument("--settings", nargs="+", default=None)
    p.add_argument("--models", type=int, nargs="+", default=[1, 5])
    p.add_argument("--n-subsets", type=int, default=50)
    p.add_argument("--n-jobs", type=int, default=2)
    args = p.parse_args()
    lms = ["sequence", "sequence, 2 layers", "gpt2"]
    settings = args.settings or (lms + ["mlp", "cnn"] + (["bert"] if args.part == "layers" else []))
    rows = []
    for name in settings:
        net, data = setting(name)
        X_train, X_test, y_train, y_test = data
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
        for n_models in args.models:
            if args.part == "damping":
                for label, rule in (
                    ("mean eigenvalue", None),
                    ("previous: trace / min(n, width)", previous_rule),
                ):
                    lds = lds_by_damping(net, data, truth, n_models, "ekfac", DAMPINGS, rule=rule)
                    rows.append([name, n_models, label, *lds])
                    print(rows[-1], flush=True)
            else:
                method = "ekfac" if name in lms else "trak"
                damping = 0.01 if method == "ekfac" else 1.0
                for label, layers in parameter_sets(net).items():
                    (lds,) = lds_by_damping(net, data, truth, n_models, method, [damping], layers=layers)
                    rows.append([name, n_models, method, label, lds])
                    print(rows[-1], flush=True)
    if args.part == "damping":
        header = ["setting", "models", "damping relative to", *(f"{d:g}" for d in DAMPINGS)]
        note = (
            "LDS of EK-FAC (proj_dim 2048, per-layer blocks) against its damping, on the same trained models "
            f"for every value; ground truth: {args.n_subsets} models retrained on 50% subsets. 'mean "
            "eigenvalue': each block damped by damping x the mean of all its eigenvalues (today's rule); "
            "'previous': damping x trace / min(n_train, width), which damps a block wider than the training "
            "set width / n_train times more."
        )
        emit("damping", "EK-FAC's damping", markdown_table(header, rows) + "\n\n" + note)
    else:
        header = ["setting", "models", "method", "parameters attributed", "LDS"]
        note = (
            "LDS of the default method (EK-FAC at damping 0.01 on the language models, TRAK at 1.0 on the "
            "classifiers, proj_dim 2048) on each parameter set; the same recipe and seed, so the same trained "
            f"models; ground truth: {args.n_subsets} models retrained on 50% subsets. 'linear-like layers': "
            "the outermost nn.Linear, convolution, Conv1D and nn.MultiheadAttention modules, without "
            "embeddings and normalisation layers. The MLP and CNN have no other parameters."
        )
        emit("parameters", "Which parameters to attribute", markdown_table(header, rows) + "\n\n" + note)


if __name__ == "__main__":
    main()
