"""Hugging Face transformers models as users bring them (built from configs, nothing
downloaded): a GPT-2 language model and a padded BERT classifier on the Python
documentation that ships with Python (``pydoc_data.topics``).

    python benchmarks/huggingface.py --readme

- ``lds``: a GPT-2 (4 layers, n_embd 128, 4 heads, tied embeddings, ``Conv1D``
  layers) trained as a character language model on passages; the attributed
  target is each held-out passage's log-likelihood. LDS and time of sktda's TRAK
  with 1, 5 and 10 models, the model untouched, against dattri 0.3.0's TRAK and
  kronfluence 1.0.1's EK-FAC on the same trained models (kronfluence gets its
  ``Conv1D`` layers rewritten as ``nn.Linear``, as its documentation asks).
- ``detection``: a BERT classifier (2 layers, hidden size 64) telling passages of
  three topics apart, padded to random lengths with a 2-D attention mask, 20% of
  the labels flipped; sktda's default ``OutlierGradientDetector`` against cleanlab
  2.9's self-confidence on 5-fold cross-validated probabilities of the same net,
  and no filtering: AUROC, precision at the number of flips, wall time (training
  included) and test accuracy after retraining on what is kept.

Featurization time against one epoch of the same GPT-2 and BERT is in the speed
benchmark (``speed.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from _common import (
    HEADER,
    NOTES,
    bergson_note,
    compare,
    compare_parser,
    emit,
    kronfluence_layers_variant,
    markdown_table,
    pydoc_passages,
    pydoc_topic_passages,
)
from _hf import GPT2LM, BertClassifier
from detection import detector_row, recipe_self_confidence_row
from skorch import NeuralNet, NeuralNetClassifier
from skorch.helper import SliceDict

from sktda import OutlierGradientDetector
from sktda.datasets import flip_labels
from sktda.models import TokenCrossEntropy


def gpt2_net(vocab_size: int, length: int, max_epochs: int = 10) -> NeuralNet:
    """GPT-2, 4 layers, n_embd 128, tied; Adam lr 1e-3, batch 32, token cross-entropy."""
    return NeuralNet(
        GPT2LM,
        module__vocab_size=vocab_size,
        module__n_positions=length,
        criterion=TokenCrossEntropy,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=max_epochs,
        batch_size=32,
        train_split=None,
        verbose=0,
    )


def bert_net(vocab_size: int, length: int, max_epochs: int = 20) -> NeuralNetClassifier:
    """BERT classifier, 2 layers, hidden size 64, 3 classes; Adam lr 1e-3, batch 32."""
    return NeuralNetClassifier(
        BertClassifier,
        module__vocab_size=vocab_size,
        module__n_labels=3,
        module__hidden=64,
        module__n_layer=2,
        module__n_head=2,
        module__max_len=length,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=1e-3,
        max_epochs=max_epochs,
        batch_size=32,
        train_split=None,
        verbose=0,
    )


def padded_topic_passages(n_per_class: int, length: int, seed: int = 0):
    """Topic passages (see ``pydoc_topic_passages``) cut to random lengths from a
    third of ``length`` up and padded: ids shifted by one so that 0 is padding,
    as a ``SliceDict`` of ``input_ids`` and ``attention_mask``; labels; vocabulary size."""
    X, y, alphabet = pydoc_topic_passages(n_per_class, length, seed)
    lengths = np.random.default_rng(seed + 1).integers(length // 3, length + 1, len(y))
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    return SliceDict(input_ids=(X + 1) * mask, attention_mask=mask), y, len(alphabet) + 1


def lds(args) -> None:
    X, y, alphabet = pydoc_passages(args.n_train + args.n_test, args.length)
    n = args.n_train
    net = gpt2_net(len(alphabet), args.length)
    rows, truth_seconds = compare(
        net,
        (X[:n], X[n:], y[:n], y[n:]),
        methods=["trak", "kfac", "ekfac"],
        variants=[kronfluence_layers_variant(net)],
        sizes=args.sizes,
        proj_dim=args.proj_dim,
        n_subsets=args.n_subsets,
        n_jobs=args.n_jobs,
        kind="sequence",
        dattri_sizes=args.dattri_sizes,
        dattri_grid=args.dattri_grid,
        bergson_sizes=args.bergson_sizes,
    )
    n_params = sum(p.numel() for p in net.initialize().module_.parameters())
    table = markdown_table(HEADER, rows) + (
        f"\n\n{args.n_train} training and {args.n_test} held-out passages of {args.length} characters; "
        f"GPT-2 of {n_params} parameters; ground truth: {args.n_subsets} models retrained on 50% subsets "
        f"({truth_seconds:.0f} s), measured by the held-out passages' log-likelihood. dattri ran with "
        f"{args.dattri_sizes} models and its regularization chosen among {args.dattri_grid} (its cache takes "
        "minutes per model on this GPT-2). " + bergson_note(args.bergson_sizes) + NOTES
    )
    emit("huggingface_gpt2", "A transformers GPT-2 language model on Python's docs", table, args.readme)


def detection(args) -> None:
    X, y, vocab = padded_topic_passages(args.n_per_class, args.bert_length)
    n = len(y) * 2 // 3
    X_train, X_test, y_train, y_test = X[:n], X[n:], y[:n], y[n:]
    y_noisy, flipped = flip_labels(y_train, args.noise, random_state=0)

    def recipe():
        return bert_net(vocab, args.bert_length, args.epochs)

    def test_accuracy(keep):
        keep = np.flatnonzero(keep)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = recipe().fit(X_train[keep], y_noisy[keep])
        return float((net.predict(X_test) == y_test).mean())

    rows = [["no filtering", "", "", "", 0, test_accuracy(np.ones(n, dtype=bool))]]
    det = OutlierGradientDetector(recipe(), contamination=args.noise, random_state=0)
    rows.append(["sktda default", *detector_row(det, X_train, y_noisy, flipped, test_accuracy)])
    print(rows[-1], flush=True)
    cleanlab = recipe_self_confidence_row(recipe, X_train, y_noisy, flipped, test_accuracy)
    rows.extend([cleanlab] if cleanlab else [])
    header = ["method", "AUROC", "precision@k", "wall s", "removed", "test accuracy"]
    n_params = sum(p.numel() for p in recipe().initialize().module_.parameters())
    table = markdown_table(header, rows) + (
        f"\n\n{n} training passages of up to {args.bert_length} characters (padded, 2-D attention mask), "
        f"{args.noise:.0%} of their labels flipped; {len(y_test)} clean test passages; BERT of {n_params} "
        f"parameters, {args.epochs} epochs of Adam. The detector removes the noise rate's worth; cleanlab's "
        "find_label_issues decides its own count."
    )
    emit("huggingface_bert", "A padded transformers BERT classifier: mislabeled passages", table, args.readme)


def main():
    p = compare_parser(__doc__, n_subsets=50)
    p.add_argument("--parts", nargs="+", default=["lds", "detection"])
    p.add_argument("--dattri-sizes", type=int, nargs="+", default=[1, 5])
    p.add_argument("--dattri-grid", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--bergson-sizes", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-test", type=int, default=40)
    p.add_argument("--length", type=int, default=32, help="characters per language-model passage")
    p.add_argument("--bert-length", type=int, default=48, help="characters per classified passage, at most")
    p.add_argument("--n-per-class", type=int, default=300, help="passages per topic (2/3 for training)")
    p.add_argument("--epochs", type=int, default=20, help="BERT's training epochs")
    p.add_argument("--noise", type=float, default=0.2)
    args = p.parse_args()
    if "lds" in args.parts:
        lds(args)
    if "detection" in args.parts:
        detection(args)


if __name__ == "__main__":
    main()
