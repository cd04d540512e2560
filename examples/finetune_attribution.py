"""
Attribute and clean the fine-tuning data of a pretrained transformer
=====================================================================

1. Pretrain a character-level transformer language model on part of the Python
   documentation that ships with Python (``pydoc_data.topics``).
2. Start a classifier from its weights (a new head) that tells passages of three
   other topics apart: compound statements, format strings and string methods.
   20% of the fine-tuning labels are flipped.
3. LoRA ensemble attribution (``ensemble="lora", pretrained=True``): adapters on
   the frozen pretrained weights, no training from scratch. Shows the most
   influential fine-tuning passages of a few test passages.
4. Mislabeled passages: :class:`~sktda.OutlierGradientDetector` on the user's
   own peft LoRA fine-tune, then :class:`~sktda.FilteredEstimator` re-fine-tunes
   on what it keeps.

::

    python examples/finetune_attribution.py

A few minutes on 2 CPU cores; ``SKTDA_EXAMPLES_SMALL=1`` runs smaller settings.
"""

import copy
import os
import string
from pydoc_data.topics import topics

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from sklearn.metrics import roc_auc_score
from skorch import NeuralNet, NeuralNetClassifier

from sktda import EnsembleAttributor, FilteredEstimator, OutlierGradientDetector
from sktda.datasets import flip_labels
from sktda.models import TokenCrossEntropy, TokenTransformer

# torch's transformer inference fast path reads the layers' weights directly and so
# skips peft adapters; turn it off so that predict() uses the fine-tuned adapters
torch.backends.mha.set_fastpath_enabled(False)

SMALL = os.environ.get("SKTDA_EXAMPLES_SMALL") == "1"  # a faster, smaller run
LENGTH, NOISE = 64, 0.2
N_PRETRAIN, PRETRAIN_EPOCHS = (600, 4) if SMALL else (2000, 8)
N_PER_CLASS, EPOCHS = (120, 10) if SMALL else (330, 20)
CLASSES = ["compound", "formatstrings", "string-methods"]
alphabet = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
index = {c: i for i, c in enumerate(alphabet)}
rng = np.random.default_rng(0)


def clean(keys) -> str:
    text = " ".join(" ".join(topics[key].split()) for key in keys)
    return "".join(c for c in text if c in index)


def passages(text: str, n: int, length: int) -> np.ndarray:
    """``n`` disjoint passages of ``length`` characters, as character ids."""
    starts = rng.choice(len(text) // length, n, replace=False) * length
    return np.array([[index[c] for c in text[s : s + length]] for s in starts])


def decode(ids) -> str:
    return "".join(alphabet[i] for i in ids)


# %%
# Pretraining: next-character prediction on the other topics
# ------------------------------------------------------------
text = clean(k for k in sorted(topics) if k not in CLASSES)
ids = passages(text, N_PRETRAIN, LENGTH + 1)
shape = dict(vocab_size=len(alphabet), d_model=128, n_heads=4, n_layers=2, max_len=LENGTH)
language_model = NeuralNet(
    TokenTransformer,
    **{f"module__{k}": v for k, v in shape.items()},
    criterion=TokenCrossEntropy,
    optimizer=torch.optim.Adam,
    lr=2e-3,
    max_epochs=PRETRAIN_EPOCHS,
    batch_size=64,
    train_split=None,
    verbose=0,
)
torch.manual_seed(0)
language_model.fit(ids[:, :-1], ids[:, 1:])

# %%
# The fine-tuning task: which topic a passage comes from
# ------------------------------------------------------
# The classifier attends causally, like the language model, and starts from all
# its weights but the head.
X = np.concatenate([passages(clean([key]), N_PER_CLASS, LENGTH) for key in CLASSES])
y = np.repeat(np.arange(len(CLASSES)), N_PER_CLASS)
order = rng.permutation(len(y))
X, y = X[order], y[order]
n = len(y) * 2 // 3
X_train, X_test, y_train, y_test = X[:n], X[n:], y[:n], y[n:]
y_noisy, flipped = flip_labels(y_train, NOISE, random_state=0)

pretrained = TokenTransformer(**shape, n_outputs=len(CLASSES), causal=True)
weights = {k: v for k, v in language_model.module_.state_dict().items() if not k.startswith("head.")}
pretrained.load_state_dict(weights, strict=False)  # everything but the new head
print(
    f"pretrained a language model of {sum(p.numel() for p in pretrained.parameters())} parameters on "
    f"{N_PRETRAIN} passages; fine-tuning set: {n} passages, {flipped.sum()} labels flipped"
)


def classifier(module, lr: float) -> NeuralNetClassifier:
    return NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.Adam,
        lr=lr,
        max_epochs=EPOCHS,
        batch_size=32,
        train_split=None,
        verbose=0,
    )


# %%
# LoRA ensemble attribution
# -------------------------
# Four adapters, each with its own copy of the new head, trained on the frozen
# pretrained weights; the gradients are taken on the adapters and the head.
attr = EnsembleAttributor(
    classifier(pretrained, lr=2e-3),
    ensemble="lora",
    n_adapters=4,
    lora_rank=8,
    lora_epochs=EPOCHS // 2,
    pretrained=True,
    random_state=0,
)
attr.fit(X_train, y_noisy)
costs = attr.costs_
print(
    f"LoRA ensemble: {costs['n_members']} adapters trained in {costs['train_seconds']:.0f} s, "
    f"featurized in {costs['featurize_seconds']:.0f} s; {costs['model_bytes'] / 1e6:.2f} MB to store "
    "(the pretrained weights once, plus the adapters)"
)
top = attr.most_influential(X_test[:3], y_test[:3], k=2)
for i in range(3):
    print(f"\ntest passage ({CLASSES[y_test[i]]}): {decode(X_test[i])!r}")
    for kind, rows in (("proponent", top.proponents[i]), ("opponent", top.opponents[i])):
        for j in rows:
            note = ", flipped" if flipped[j] else ""
            print(f"  {kind} #{j} (labelled {CLASSES[y_noisy[j]]}{note}): {decode(X_train[j])!r}")

# %%
# Mislabeled passages, found on the user's own peft LoRA fine-tune
# ----------------------------------------------------------------
# The detector gets the ``PeftModel`` with ``pretrained=True`` and differentiates
# the parameters it trains; ``layers="last"`` picks the trained copy of the head.
config = LoraConfig(
    r=8, lora_alpha=8, target_modules=["linear1", "linear2"], modules_to_save=["head", "norm"]
)
recipe = classifier(get_peft_model(copy.deepcopy(pretrained), config), lr=2e-3)
detector = OutlierGradientDetector(
    recipe, contamination=NOISE, sampling_strategy="all", pretrained=True, random_state=0
)
detector.fit(X_train, y_noisy)
suspicion = -detector.train_scores_
k = int(flipped.sum())
print(
    f"\ndetector: AUROC {roc_auc_score(flipped, suspicion):.3f} against the flips, "
    f"{flipped[np.argsort(-suspicion)[:k]].mean():.0%} of its top {k} suspects are flipped"
)
torch.manual_seed(0)
noisy = copy.deepcopy(recipe).fit(X_train, y_noisy)
torch.manual_seed(0)
filtered = FilteredEstimator(recipe, detector).fit(X_train, y_noisy)
print(
    f"test accuracy: {noisy.score(X_test, y_test):.3f} fine-tuned on every passage, "
    f"{filtered.score(X_test, y_test):.3f} after removing {filtered.n_removed_} suspects"
)
