"""Mislabeled fine-tuning data of a pretrained transformer (Outlier Gradient
Analysis's NLP setting, offline): sktda's OutlierGradientDetector against cleanlab
2.9 and no filtering, with a LoRA fine-tune.

    python benchmarks/finetune_detection.py --readme

A character-level transformer language model (2 layers, d_model 128) is pretrained
on two topics in three of the Python documentation that ships with Python
(``pydoc_data.topics``). Its weights start a classifier of the same shape, with
causal attention and a new head, that tells passages of three other topics apart
(compound statements, format strings, string methods). The user's recipe is a peft
LoRA fine-tune: rank-8 adapters on the feed-forward layers of both blocks, the head
and the final layer norm trained in full, Adam. 20% of the fine-tuning labels are
flipped. For every configuration: AUROC of the outlier score against the flips,
precision among the top-k suspects with k the number of flips, wall time (the
fine-tune included), and the test accuracy of the same recipe re-fine-tuned on what
is kept. The detector removes the noise rate's worth; cleanlab's
``find_label_issues`` decides its own count, shown in 'removed'. cleanlab ranks by
self-confidence on 5-fold cross-validated probabilities of the same recipe.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from _common import emit, markdown_table, parser, pydoc_topic_passages
from detection import detector_row, recipe_self_confidence_row
from finetune import fine_tuning_net, pretrain
from skorch import NeuralNetClassifier

from sktda import OutlierGradientDetector
from sktda.datasets import flip_labels
from sktda.models import TokenTransformer

# torch's transformer inference fast path reads the layers' weights directly and so
# skips peft adapters: without this, predict() would ignore the fine-tuned adapters
torch.backends.mha.set_fastpath_enabled(False)

CONFIGS = [
    ("default: adapters + head (proj 1024), iforest, 4 checkpoints", dict()),
    ("adapters + head (proj 1024), iforest, 8 checkpoints", dict(n_checkpoints=8)),
    ("paper: head, iforest, final model", dict(layers="last", proj_dim=None, n_checkpoints=None)),
    ("head, l2, 8 checkpoints", dict(layers="last", proj_dim=None, detector="l2", n_checkpoints=8)),
    ("adapters + head (proj 1024), l2, 8 checkpoints", dict(detector="l2", n_checkpoints=8)),
]


def classifier(language_model: TokenTransformer, n_classes: int, length: int) -> torch.nn.Module:
    """A causal classifier of the language model's shape, started from its weights
    (all but the head, which is new)."""
    enc = language_model.encoder.layers[0]
    module = TokenTransformer(
        language_model.embed.num_embeddings,
        n_outputs=n_classes,
        d_model=language_model.embed.embedding_dim,
        n_heads=enc.self_attn.num_heads,
        n_layers=len(language_model.encoder.layers),
        max_len=length,
        causal=True,
    )
    state = {k: v for k, v in language_model.state_dict().items() if not k.startswith("head.")}
    module.load_state_dict(state, strict=False)
    return module


def lora_net(module: torch.nn.Module, epochs: int, lr: float, rank: int = 8) -> NeuralNetClassifier:
    """The user's recipe: a peft LoRA fine-tune of ``module`` (a fresh copy)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["linear1", "linear2"], modules_to_save=["head", "norm"]
    )
    model = get_peft_model(copy.deepcopy(module), config)
    return fine_tuning_net(model, epochs, lr, net=NeuralNetClassifier, criterion=torch.nn.CrossEntropyLoss)


def main():
    p = parser(__doc__)
    p.add_argument("--n-pretrain", type=int, default=2000)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--n-per-class", type=int, default=330, help="passages per topic (2/3 for fine-tuning)")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--noise", type=float, default=0.2)
    args = p.parse_args()

    X, y, alphabet = pydoc_topic_passages(args.n_per_class, args.length)
    n = len(y) * 2 // 3
    X_train, X_test, y_train, y_test = X[:n], X[n:], y[:n], y[n:]
    y_noisy, flipped = flip_labels(y_train, args.noise, random_state=0)
    start = time.perf_counter()
    base = classifier(
        pretrain(len(alphabet), args.length, args.n_pretrain, args.pretrain_epochs), 3, args.length
    )
    pretrain_seconds = time.perf_counter() - start

    def recipe():
        return lora_net(base, args.epochs, args.lr)

    def test_accuracy(keep):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            net = recipe().fit(X_train[keep], y_noisy[keep])
        return float((net.predict(X_test) == y_test).mean())

    everything = np.ones(n, dtype=bool)
    rows = [["no filtering", "", "", "", 0, test_accuracy(everything)]]
    print(rows[-1], flush=True)
    for name, config in CONFIGS:
        det = OutlierGradientDetector(
            recipe(), contamination=args.noise, pretrained=True, random_state=0, **config
        )
        rows.append([f"sktda {name}", *detector_row(det, X_train, y_noisy, flipped, test_accuracy)])
        print(rows[-1], flush=True)
    cleanlab = recipe_self_confidence_row(recipe, X_train, y_noisy, flipped, test_accuracy)
    rows.extend([cleanlab] if cleanlab else [])

    header = ["method", "AUROC", "precision@k", "wall s", "removed", "test accuracy"]
    n_params = sum(p.numel() for p in base.parameters())
    adapter = recipe().initialize().module_
    n_trained = sum(p.numel() for p in adapter.parameters() if p.requires_grad)
    table = markdown_table(header, rows) + (
        f"\n\n{n} fine-tuning passages of {args.length} characters, {args.noise:.0%} of their labels "
        f"flipped; {len(y_test)} clean test passages. Classifier of {n_params} parameters started from a "
        f"language model pretrained on {args.n_pretrain} passages of other topics ({pretrain_seconds:.0f} s, "
        f"not counted); LoRA fine-tune: {n_trained} trained parameters (rank-8 adapters on the feed-forward "
        f"layers, the head and the final layer norm), {args.epochs} epochs, Adam lr {args.lr:g}. 'head' "
        "is layers='last'; 'adapters + head' every parameter the fine-tune trains."
    )
    emit(
        "finetune_detection", "Mislabeled fine-tuning data: detection and re-fine-tuning", table, args.readme
    )


if __name__ == "__main__":
    main()
