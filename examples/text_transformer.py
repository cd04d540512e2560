"""
Generative attribution on real text: which training passages made a passage likely?
=====================================================================================

A character-level transformer language model (a skorch ``NeuralNet`` with
:class:`~sktda.models.TokenCrossEntropy`) is trained on passages of the Python
documentation that ships with Python itself (``pydoc_data.topics``).
:class:`~sktda.EnsembleAttributor` attributes the log-likelihood of held-out
passages (target ``"sequence_log_likelihood"``, chosen automatically for a
language model) to the training passages. One of the held-out passages is a copy
of a training passage: its strongest proponent should be that very passage::

    python examples/text_transformer.py

``SKTDA_EXAMPLES_SMALL=1`` trains on fewer passages for fewer epochs.
"""

import os
import string
from pydoc_data.topics import topics

import numpy as np
import torch
from skorch import NeuralNet

from sktda import EnsembleAttributor
from sktda.models import TokenCrossEntropy, TokenTransformer

SMALL = os.environ.get("SKTDA_EXAMPLES_SMALL") == "1"  # a faster, smaller run
LENGTH, N_TRAIN, N_TEST = 48, (300 if SMALL else 800), 12

# %%
# Passages of real English text, one character per token
# -------------------------------------------------------
alphabet = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
index = {c: i for i, c in enumerate(alphabet)}
text = " ".join(" ".join(topics[key].split()) for key in sorted(topics))
text = "".join(c for c in text if c in index)
starts = np.random.default_rng(0).choice(len(text) // (LENGTH + 1), N_TRAIN + N_TEST, replace=False)
passages = np.array([[index[c] for c in text[s * (LENGTH + 1) : (s + 1) * (LENGTH + 1)]] for s in starts])
passages[N_TRAIN] = passages[7]  # a held-out passage that is a copy of training passage 7
X, y = passages[:, :-1], passages[:, 1:]  # inputs and next tokens, int64
X_train, y_train, X_test, y_test = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]


def decode(ids) -> str:
    return "".join(alphabet[i] for i in ids)


# %%
# A language model and its attributions
# --------------------------------------
# The inputs are the token ids, ``y`` the next tokens ``(n, T)``; the integer
# ids reach the model's ``nn.Embedding`` as they are.
net = NeuralNet(
    TokenTransformer,
    module__vocab_size=len(alphabet),
    module__d_model=64,
    module__n_heads=4,
    module__n_layers=2,
    module__max_len=LENGTH,
    criterion=TokenCrossEntropy,
    optimizer=torch.optim.Adam,
    lr=3e-3,
    max_epochs=8 if SMALL else 20,
    batch_size=32,
    train_split=None,
    verbose=0,
)
# the default method="auto" is EK-FAC here: per-layer curvature, for a language model
attr = EnsembleAttributor(net, n_models=1, proj_dim=1024, random_state=0)
attr.fit(X_train, y_train)
print(
    f"language model of {sum(p.numel() for p in attr.estimators_[0].module_.parameters())} parameters "
    f"trained on {N_TRAIN} passages in {attr.costs_['train_seconds']:.0f} s; "
    f"featurized with {attr.method_} in {attr.costs_['featurize_seconds']:.0f} s"
)
top = attr.most_influential(X_test, y_test, k=2)
for i in range(4):
    print(f"\nheld-out passage: {decode(passages[N_TRAIN + i])!r}")
    for rank, j in enumerate(top.proponents[i]):
        print(f"  proponent {rank + 1} (train #{j}): {decode(passages[j])!r}")
found = top.proponents[0, 0] == 7
print(f"\nthe copied passage's strongest proponent is its source: {bool(found)}")
