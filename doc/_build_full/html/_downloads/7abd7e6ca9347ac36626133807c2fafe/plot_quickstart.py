"""
Quickstart: which training digits drove each test prediction?
==============================================================

Trains an ensemble of 5 small MLPs on 1000 of scikit-learn's digits, attributes
200 test predictions to the training set with TRAK, measures the attributions'
quality (LDS) against models retrained on random halves of the training set, and
draws a few test digits with their strongest proponents and opponents (also saved
to ``examples/output/quickstart_influential.png``)::

    python examples/plot_quickstart.py
"""

from pathlib import Path

import numpy as np
import torch
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor
from sktda.datasets import load_digits_split
from sktda.models import MLP

# the examples' folder (the documentation build runs each example from there)
OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"

# %%
# A skorch net and an ensemble of five of it
# ------------------------------------------
# ``fit`` trains five MLPs from different seeds and caches the projected
# gradient features of the 1000 training digits; ``attribute`` scores every
# (test, training) pair. A positive score means the training digit pushed the
# test digit's correct-class margin up.
X_train, X_test, y_train, y_test = load_digits_split(n_train=1000, n_test=200, random_state=0)
net = NeuralNetClassifier(
    MLP,
    module__n_features=64,
    module__n_outputs=10,
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD,
    optimizer__momentum=0.9,
    lr=0.05,
    max_epochs=30,
    batch_size=64,
    train_split=None,
    verbose=0,
)
attr = EnsembleAttributor(net, method="trak", n_models=5, proj_dim=2048, score_n_subsets=30, random_state=0)
attr.fit(X_train, y_train)
A = attr.attribute(X_test, y_test)
print(f"attribution matrix: {A.shape} (test x train)")
print(
    f"costs: {attr.costs_['n_members']} members, trained in {attr.costs_['train_seconds']:.1f} s, "
    f"training set featurized in {attr.costs_['featurize_seconds']:.1f} s, "
    f"{attr.costs_['feature_bytes'] / 2**20:.1f} MiB of features"
)

# %%
# Proponents and opponents
# ------------------------
# ``most_influential`` streams over the training set and keeps the ``k``
# strongest proponents (largest scores) and opponents (most negative) per test
# sample, without forming the dense matrix.
top = attr.most_influential(X_test[:6], y_test[:6], k=4)
for i in range(6):
    same = np.mean(y_train[top.proponents[i]] == y_test[i])
    print(
        f"test {i} (digit {y_test[i]}): proponents are digits {y_train[top.proponents[i]].tolist()} "
        f"({same:.0%} same class), opponents are digits {y_train[top.opponents[i]].tolist()}"
    )
proponent_agreement = np.mean(y_train[np.argmax(A, axis=1)] == y_test)
print(f"the strongest proponent has the test digit's label for {proponent_agreement:.0%} of test digits")

# %%
# How good are the attributions?
# ------------------------------
# ``score`` is the linear datamodeling score: models are retrained on random
# halves of the training set, and the LDS is the Spearman correlation between
# each half's summed attribution and the retrained model's output, averaged
# over test digits.
print("scoring: retraining 30 models on random halves of the training set ...")
print(f"LDS (linear datamodeling score, higher is better): {attr.score(X_test, y_test):.3f}")

# %%
# The figure: each row is a test digit, then its proponents (green) and
# opponents (red).
try:
    from sktda.plotting import plot_influential
except ImportError:
    print("matplotlib is not installed: no figure (pip install -e '.[plot]').")
else:
    OUTPUT.mkdir(exist_ok=True)
    fig = plot_influential(X_test, X_train, top, y_test=y_test, y_train=y_train, n_show=6)
    fig.savefig(OUTPUT / "quickstart_influential.png", dpi=110)
    print(f"figure: {OUTPUT / 'quickstart_influential.png'}")
