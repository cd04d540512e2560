"""
A Hugging Face model: pretrain, save, reload, fine-tune on noisy labels, attribute, filter
==========================================================================================

A small GPT-2 (``transformers``, built from a config: nothing is downloaded) is
pretrained as a character language model on two topics in three of the Python
documentation that ships with Python (``pydoc_data.topics``), saved with
``save_pretrained`` and reloaded with ``from_pretrained`` as a sequence classifier,
the way a downloaded checkpoint is used. It is then fine-tuned to tell passages of
three other topics apart, padded to random lengths with an attention mask, with 20%
of the labels flipped. The model goes to sktda as it is, behind the usual thin
wrapper that returns its logits: its embeddings are tied and its layers are
``Conv1D``.

:class:`~sktda.OutlierGradientDetector` finds the flipped passages (the figure shows
its scores, also saved under ``examples/output/``) and
:class:`~sktda.EnsembleAttributor` names, for a test passage, the training passages
that drove its prediction::

    python examples/plot_huggingface_text.py
"""

import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from skorch import NeuralNet, NeuralNetClassifier
from skorch.helper import SliceDict

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.datasets import flip_labels
from sktda.models import TokenCrossEntropy

transformers.logging.set_verbosity_error()
OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"
LENGTH, NOISE = 64, 0.2
CLASSES = ("debugger", "formatstrings", "specialnames")
ALPHABET = sorted(set(chr(c) for c in range(32, 127)))
INDEX = {c: i + 1 for i, c in enumerate(ALPHABET)}  # 0 is padding


def passages(keys, n, seed):
    """``n`` passages of ``LENGTH`` characters from the topics ``keys``, as ids."""
    text = " ".join(" ".join(topics[k].split()) for k in keys)
    text = "".join(c for c in text if c in INDEX)
    starts = np.random.default_rng(seed).choice(len(text) // LENGTH, n, replace=False) * LENGTH
    return np.array([[INDEX[c] for c in text[s : s + LENGTH]] for s in starts])


# %%
# Pretrain a GPT-2 language model, save it, reload it as a classifier
# ---------------------------------------------------------------------
config = transformers.GPT2Config(
    vocab_size=len(ALPHABET) + 1, n_positions=LENGTH, n_embd=64, n_layer=2, n_head=2, pad_token_id=0
)


class LanguageModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gpt = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.gpt(input_ids=input_ids).logits


others = [k for i, k in enumerate(sorted(topics)) if i % 3 and k not in CLASSES]
corpus = passages(others, 1000, seed=1)
torch.manual_seed(0)
lm = NeuralNet(
    LanguageModel,
    criterion=TokenCrossEntropy,
    optimizer=torch.optim.Adam,
    lr=2e-3,
    max_epochs=3,
    batch_size=64,
    train_split=None,
    verbose=0,
).fit(corpus[:, :-1], corpus[:, 1:])

with tempfile.TemporaryDirectory() as checkpoint:
    lm.module_.gpt.save_pretrained(checkpoint)
    classifier = transformers.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=3)


class Logits(torch.nn.Module):
    """The thin wrapper skorch needs (sktda itself would also take the model as it
    is, and train on its ``.logits``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


pretrained = Logits(classifier)

# %%
# Fine-tuning data: three topics, padded, 20% of the labels flipped
# ------------------------------------------------------------------
X_ids = np.concatenate([passages([key], 200, seed=2) for key in CLASSES])
y = np.repeat(np.arange(3), 200)
rng = np.random.default_rng(0)
order = rng.permutation(len(y))
X_ids, y = X_ids[order], y[order]
mask = (np.arange(LENGTH)[None] < rng.integers(LENGTH // 2, LENGTH + 1, (len(y), 1))).astype(np.int64)
X = SliceDict(input_ids=X_ids * mask, attention_mask=mask)
X_train, X_test, y_train, y_test = X[:450], X[450:], y[:450], y[450:]
y_noisy, flipped = flip_labels(y_train, NOISE, random_state=0)

fine_tune = NeuralNetClassifier(
    pretrained,  # the reloaded checkpoint itself: pretrained=True fine-tunes it
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.Adam,
    lr=1e-3,
    max_epochs=8,
    batch_size=32,
    train_split=None,
    verbose=0,
)

# %%
# Find the flipped labels
# -----------------------
det = OutlierGradientDetector(
    fine_tune, contamination=NOISE, sampling_strategy="all", pretrained=True, random_state=0
)
X_kept, y_kept = det.fit_resample(X_train, y_noisy)
suspicion = -det.train_scores_
print(f"AUROC of the outlier score against the flips: {roc_auc_score(flipped, suspicion):.3f}")
print(f"flipped among the {len(y_train) - len(y_kept)} removed: {flipped[det.labels_ == -1].mean():.0%}")

OUTPUT.mkdir(exist_ok=True)
fig, ax = plt.subplots(figsize=(6, 3.5))
bins = np.linspace(suspicion.min(), suspicion.max(), 40)
ax.hist(suspicion[~flipped], bins, alpha=0.7, label="label kept")
ax.hist(suspicion[flipped], bins, alpha=0.7, label="label flipped")
ax.axvline(-det.offset_, color="k", linestyle="--", label="threshold")
ax.set_xlabel("suspicion (isolation forest on the gradients, averaged over checkpoints)")
ax.set_ylabel("passages")
ax.legend()
fig.tight_layout()
fig.savefig(OUTPUT / "huggingface_outliers.png", dpi=120)


def accuracy(X_fit, y_fit):
    """Test accuracy of the same fine-tune (a clone: a fresh copy of the checkpoint)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = clone(fine_tune).fit(X_fit, y_fit)
    return float((net.predict(X_test) == y_test).mean())


print(f"test accuracy, all noisy labels: {accuracy(X_train, y_noisy):.3f}")
print(f"test accuracy, suspects removed: {accuracy(X_kept, y_kept):.3f}")

# %%
# Which training passages drove a prediction?
# -------------------------------------------
attr = EnsembleAttributor(fine_tune, n_models=2, pretrained=True, random_state=0).fit(X_kept, y_kept)
top = attr.most_influential(X_test[:1], k=3)
reverse = {i: c for c, i in INDEX.items()}


def text(ids):
    return "".join(reverse.get(int(i), "") for i in ids)


print(f"test passage ({CLASSES[y_test[0]]}): {text(X_test['input_ids'][0])!r}")
for rank, (j, score) in enumerate(zip(top.proponents[0], top.proponent_scores[0]), 1):
    print(f"  proponent {rank} ({CLASSES[y_kept[j]]}, {score:+.3f}): {text(X_kept['input_ids'][j])!r}")
