"""What the benchmarks share: the data and nets of the digits settings, the command
line, the tables written to ``results/``, and :func:`compare`, the attribution
comparison (LDS, identical-class rate, time) of sktda's methods and the peers."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import summaries
import torch
from _bergson import METHODS as BERGSON_METHODS
from _bergson import bergson_python, bergson_scores
from skorch import NeuralNetClassifier

from sktda.datasets import load_digits_split
from sktda.models import MLP

RESULTS = summaries.RESULTS


def _sgd(max_epochs: int) -> dict:
    """The training recipe of the digits settings: SGD momentum 0.9, lr 0.05, batch 64."""
    return dict(
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=max_epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )


def digits_net(max_epochs: int = 30, **kwargs) -> NeuralNetClassifier:
    """MLP 64-128-10 with dropout 0.1, SGD momentum 0.9, lr 0.05, batch 64."""
    params = dict(module__n_features=64, module__n_outputs=10, module__hidden=(128,), module__dropout=0.1)
    return NeuralNetClassifier(MLP, **{**params, **_sgd(max_epochs), **kwargs})


def digits_data():
    """1000 training and 200 test digits, fixed seed."""
    return load_digits_split(n_train=1000, n_test=200, random_state=0)


README = Path(__file__).resolve().parents[1] / "README.md"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--readme",
        action="store_true",
        help="also refresh the headline table in README.md from the saved results",
    )
    return p


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = f"{torch.cuda.get_device_name()}, " if torch.cuda.is_available() else ""
    return (
        f"{gpu}{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def emit(name: str, title: str, table: str, readme: bool = False) -> None:
    """Print the table with the command that made it and save it under results/,
    where the documentation reads it; refresh the README's headline table from
    the saved results when asked."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    command = " ".join(["python", str(script), *sys.argv[1:]])
    text = f"{table}\n\nMade by `{command}` on {machine()}, {time.strftime('%Y-%m-%d')}.\n"
    print(f"### {title}\n\n{text}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"### {title}\n\n{text}")
    if readme:
        write_headline()


def write_headline() -> None:
    """Replace README.md's ``<!-- bench:NAME -->`` blocks (the headline table, the
    GPU table) with the summaries made from the saved results."""
    content = README.read_text()
    for name, make in (("headline", summaries.headline), ("gpu", summaries.gpu)):
        start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
        if start not in content or end not in content:
            raise SystemExit(f"README.md has no {start} ... {end} block to replace.")
        head, rest = content.split(start, 1)
        content = f"{head}{start}\n{make()}\n{end}{rest.split(end, 1)[1]}"
    README.write_text(content)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """:func:`summaries.markdown` of rows of any values, floats to 3 decimals (whole
    numbers from 100)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return summaries.markdown(header, [[fmt(v) for v in row] for row in rows])


def cnn_net(max_epochs: int = 30, **kwargs) -> NeuralNetClassifier:
    """ConvNet on 8x8 digits: two 3x3 conv blocks (32, 64 channels) with max pooling,
    dropout 0.1, linear output; SGD momentum 0.9, lr 0.05, batch 64."""
    from sktda.models import ConvNet

    params = dict(module__channels=(32, 64), module__dropout=0.1)
    return NeuralNetClassifier(ConvNet, **{**params, **_sgd(max_epochs), **kwargs})


def compare_parser(description: str, n_subsets: int = 100):
    """The command line of the benchmarks built on :func:`compare`."""
    p = parser(description)
    p.add_argument("--n-subsets", type=int, default=n_subsets)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--n-jobs", type=int, default=2)
    return p


def identical_class_rate(A, y_train, predicted) -> float:
    """Hanawa et al. (ICLR 2021)'s identical-class test: how often the top proponent
    of a test sample has the class the model predicts for it."""

    return float(np.mean(np.asarray(y_train)[np.argmax(A, axis=1)] == np.asarray(predicted)))


def relatif(A, self_influence):
    """RelatIF-normalised scores, with the scale ``normalize="relatif"`` uses."""
    from sktda._features import relatif_scale

    return A * relatif_scale(self_influence)[None, :]


DATTRI_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _installed(peer: str) -> bool:
    try:
        __import__(peer)
    except ImportError:
        print(f"{peer} is not installed: its rows are skipped.")
        return False
    return True


def compare(
    net,
    data,
    *,
    methods,
    sizes,
    proj_dim,
    n_subsets,
    n_jobs,
    variants=(),
    kind="margin",
    dattri_sizes=None,
    dattri_grid=DATTRI_GRID,
    bergson_sizes=None,
):
    """LDS, identical-class rate and time of sktda's methods (default RelatIF
    normalisation and raw scores, from one fit) and of the installed peers on the
    same trained models. ``variants``: extra ``(label, params)`` sktda rows;
    ``kind``: "margin" (classifiers) or "sequence" (language models, whose rows
    have no identical-class rate). dattri runs on ``dattri_sizes`` (default
    ``sizes``), its regularization the best of ``dattri_grid`` on the largest of
    them; bergson on ``bergson_sizes`` (default ``sizes``). Returns the table's rows
    and the ground truth's seconds."""
    from sktda.metrics import linear_datamodeling_score
    from sktda.model_selection import subset_retraining

    X_train, X_test, y_train, y_test = data
    start = time.perf_counter()
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=n_subsets, random_state=0, n_jobs=n_jobs
    )
    truth_seconds = time.perf_counter() - start

    def row(label, n, A, predicted, seconds, train_seconds):
        lds = linear_datamodeling_score(A, truth.subsets, truth.outputs)
        identical = "n/a" if predicted is None else identical_class_rate(A, y_train, predicted)
        rows.append([label, n, lds, identical, seconds, train_seconds])
        print(rows[-1], flush=True)

    rows, trained = [], {}
    for label, params in [(m, {"method": m}) for m in methods] + list(variants):
        for n in sizes:
            attr, A, self_influence, seconds, predicted = _sktda_fit(net, data, n, proj_dim, kind, params)
            # the default normalize="auto": RelatIF on classifiers, raw scores on language models
            normalised = relatif(A, self_influence)
            default, other, suffix = (
                (A, normalised, "relatif") if kind == "sequence" else (normalised, A, "raw")
            )
            row(f"sktda {label}", n, default, predicted, seconds, attr.costs_["train_seconds"])
            row(f"sktda {label}, {suffix}", n, other, predicted, seconds, attr.costs_["train_seconds"])
            if label == "trak":
                trained[n] = (attr, predicted)

    def modules(n):
        return [e.module_.eval() for e in trained[n][0].estimators_]

    def lds(A):
        return linear_datamodeling_score(A, truth.subsets, truth.outputs)

    dattri_sizes = sizes if dattri_sizes is None else dattri_sizes
    bergson_sizes = sizes if bergson_sizes is None else bergson_sizes
    for label, peer_sizes, attribute in _peers(
        modules, data, kind, proj_dim, sizes, dattri_sizes, dattri_grid, bergson_sizes, lds
    ):
        for n in peer_sizes:
            A, seconds = attribute(n)
            attr, predicted = trained[n]
            row(label, n, A, predicted, seconds, attr.costs_["train_seconds"])
    return rows, truth_seconds


def _sktda_fit(net, data, n, proj_dim, kind, params):
    """One sktda fit of ``n`` models: the estimator, its raw scores and
    self-influence, the seconds of featurizing and attributing, and the ensemble's
    predicted classes (None for language models)."""
    from sktda import EnsembleAttributor

    X_train, X_test, y_train, y_test = data
    attr = EnsembleAttributor(net, n_models=n, proj_dim=proj_dim, normalize=None, random_state=0, **params)
    attr.fit(X_train, y_train)
    start = time.perf_counter()
    A = attr.attribute(X_test, y_test)
    self_influence = attr.self_attribute()
    seconds = attr.costs_["featurize_seconds"] + time.perf_counter() - start
    predicted = None
    if kind == "margin":
        predicted = attr.classes_[np.argmax(sum(e.predict_proba(X_test) for e in attr.estimators_), 1)]
    return attr, A, self_influence, seconds, predicted


def _peers(modules, data, kind, proj_dim, sizes, dattri_sizes, dattri_grid, bergson_sizes, lds):
    """``(label, sizes, n -> (A, seconds))`` of each installed peer, on the trained
    ``modules(n)``; dattri's regularization is the best of ``dattri_grid`` by
    ``lds`` on the largest of ``dattri_sizes``."""
    from _peers import check_kronfluence_sign, dattri_trak, kronfluence_ekfac

    X_train, X_test, y_train, y_test = data
    peers = []
    if _installed("dattri"):

        def dattri_at(n, reg):
            return dattri_trak(modules(n), X_train, y_train, X_test, y_test, proj_dim, reg, kind)

        best = max(dattri_grid, key=lambda reg: lds(dattri_at(max(dattri_sizes), reg)[0]))
        peers.append((f"dattri 0.3.0 trak (reg={best:g})", dattri_sizes, lambda n: dattri_at(n, best)))
    if _installed("kronfluence"):
        check_kronfluence_sign(modules(min(sizes))[0], X_train, y_train, kind)

        def kronfluence_at(damping):
            return lambda n: kronfluence_ekfac(modules(n), X_train, y_train, X_test, y_test, kind, damping)

        peers.append(("kronfluence 1.0.1 ek-fac", sizes, kronfluence_at(1e-8)))
        peers.append(("kronfluence 1.0.1 ek-fac, damping 0.1 x mean eigenvalue", sizes, kronfluence_at(None)))
    if kind == "sequence" and bergson_python() and hasattr(modules(max(sizes))[0], "model"):
        for method, name in BERGSON_METHODS.items():
            peers.append((f"bergson 2.5.1 {name}", bergson_sizes, _bergson_at(modules, data, method)))
    return peers


def _bergson_at(modules, data, method):
    """``n -> (A, seconds)`` of bergson's ``method`` on the first ``n`` of the
    largest ensemble's models (each model is scored once; ``n`` models' scores
    are the sum of the first ``n``), its CPU seconds kept in ``BERGSON_CPU``."""
    X_train, X_test, y_train, y_test = data
    per_model = []

    def at(n):
        if len(per_model) < n:
            hf = [m.model for m in modules(n)[len(per_model) :]]
            vocab = hf[0].config.vocab_size
            per_model.extend(zip(*bergson_scores(hf, vocab, X_train, y_train, X_test, y_test, method)))
        BERGSON_CPU[method, n] = sum(cpu for _, _, cpu in per_model[:n])
        return sum(A for A, _, _ in per_model[:n]), sum(s for _, s, _ in per_model[:n])

    return at


BERGSON_CPU: dict = {}


def bergson_note(sizes) -> str:
    """The table note on bergson's rows: what ran, and its CPU seconds."""
    if not BERGSON_CPU:
        return (
            "bergson 2.5.1 did not run (set SKTDA_BERGSON_PYTHON to its own environment's "
            "interpreter, see benchmarks/_bergson.py). "
        )
    cpu = ", ".join(f"{BERGSON_METHODS[m]} with {n} {s:.0f} s" for (m, n), s in BERGSON_CPU.items())
    return (
        f"bergson 2.5.1 runs with {list(sizes)} models, in its own environment, on each trained model "
        "exported to a directory "
        "(its defaults: EK-FAC on unprojected gradients with sampled labels, TrackStar at its "
        f"projection_dim 16, gradient cosine unprojected); its CPU seconds: {cpu}. "
    )


def kronfluence_layers_variant(net):
    """An extra row of compare(): sktda's EK-FAC on the layers kronfluence tracks,
    its default set (every ``nn.Linear`` and ``nn.Conv2d``, transformers' ``Conv1D``
    rewritten as ``nn.Linear``; not the ``out_proj`` subclass inside
    ``nn.MultiheadAttention``, which its default wrapping cannot take)."""
    from _peers import kronfluence_layers

    module = net.initialize().module_
    return ("ekfac, kronfluence's layers", {"method": "ekfac", "layers": kronfluence_layers(module)})


# the dense reference path, as an extra row of compare()
VMAP_VARIANT = ("trak, vmap + dense projection", {"method": "trak", "gradient_path": "vmap"})
VARIANT_NOTE = (
    "sktda rows use the per-layer routes (Kronecker projection) unless they say 'vmap + dense projection' "
    "(the same proj_dim, the whole gradient formed and projected densely). "
)
HEADER = ["method", "models", "LDS", "identical class", "attribution s", "train s"]
NOTES = (
    "'attribution s' = featurizing the training set + attributing the test samples (training "
    "excluded); peers run on sktda TRAK's trained models, dattri at its best regularization of a grid chosen "
    "on the same ground truth. sktda rows use the default normalize='auto' (RelatIF on classifiers, raw "
    "scores on language models); ', raw' and ', relatif' rows are the same fit's other scores. "
    "'identical class' = how often the top proponent has the ensemble's "
    "predicted class (Hanawa et al., 2021)."
)


def _pydoc_text(keys):
    """The topics ``keys`` of the Python documentation that ships with Python
    (``pydoc_data.topics``), whitespace collapsed, printable characters only; the
    text, the character index and the alphabet."""
    import string
    from pydoc_data.topics import topics

    alphabet = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    index = {c: i for i, c in enumerate(alphabet)}
    text = " ".join(" ".join(topics[key].split()) for key in keys)
    return "".join(c for c in text if c in index), index, alphabet


def pydoc_passages(n: int, length: int, seed: int = 0, part: str | None = None):
    """``n`` random passages of ``length + 1`` characters of the Python documentation
    that ships with Python (``pydoc_data.topics``), as int64 character ids: inputs
    ``(n, length)`` and next tokens ``(n, length)``, and the alphabet. ``part``:
    ``"pretrain"`` (two topics in three) or ``"finetune"`` (the others), disjoint."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if part is not None:
        keys = [k for i, k in enumerate(keys) if (i % 3 == 0) == (part == "finetune")]
    text, index, alphabet = _pydoc_text(keys)
    starts = np.random.default_rng(seed).choice(len(text) // (length + 1), n, replace=False)
    ids = np.array([[index[c] for c in text[s * (length + 1) : (s + 1) * (length + 1)]] for s in starts])
    return ids[:, :-1], ids[:, 1:], alphabet


TOPIC_CLASSES = ("compound", "formatstrings", "string-methods")


def pydoc_topic_passages(n_per_class: int, length: int, seed: int = 0):
    """A text classification task: disjoint passages of ``length`` characters from
    three topics of the Python documentation's fine-tuning part (``TOPIC_CLASSES``:
    compound statements, format strings, string methods), ``n_per_class`` each,
    shuffled; int64 character ids ``(n, length)``, labels, and the alphabet."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for label, key in enumerate(TOPIC_CLASSES):
        text, index, alphabet = _pydoc_text([key])
        starts = rng.choice(len(text) // length, n_per_class, replace=False) * length
        X.extend([index[c] for c in text[s : s + length]] for s in starts)
        y.extend([label] * n_per_class)
    order = rng.permutation(len(y))
    return np.array(X)[order], np.array(y)[order], alphabet


def lm_net(vocab_size: int, length: int, max_epochs: int = 10, **kwargs):
    """A one-layer causal transformer (d_model 32, 2 heads) trained with Adam, lr 3e-3,
    batch 32, on the token-level cross-entropy: a skorch NeuralNet language model."""
    from skorch import NeuralNet

    from sktda.models import TokenCrossEntropy, TokenTransformer

    params = dict(
        module__vocab_size=vocab_size,
        module__d_model=32,
        module__n_heads=2,
        module__n_layers=1,
        module__max_len=length,
        module__dropout=0.1,
        criterion=TokenCrossEntropy,
        optimizer=torch.optim.Adam,
        lr=3e-3,
        max_epochs=max_epochs,
        batch_size=32,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNet(TokenTransformer, **params)
