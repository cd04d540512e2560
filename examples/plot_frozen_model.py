"""
The model you already trained: attribute it and clean its data, with nothing retrained
=======================================================================================

A digits classifier trained by a plain torch loop on labels of which 20% are
flipped, the way most models are trained: no skorch, no sktda. Wrapped as it is by
:func:`sktda.frozen_net`, it is attributed by a DROPOUT ENSEMBLE (ten fixed masks
on its own weights: no training at all), its mislabeled samples are found by
:class:`~sktda.OutlierGradientDetector` at the checkpoints the loop saved, and the
finding is checked by :func:`~sktda.model_selection.removal_effect`, which needs
the recipe to retrain: the same training as a skorch net::

    python examples/plot_frozen_model.py
"""

import os
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector, frozen_net
from sktda.datasets import flip_labels, load_digits_split
from sktda.model_selection import removal_effect
from sktda.models import MLP
from sktda.plotting import plot_removal_effect

OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"
SMALL = os.environ.get("SKTDA_EXAMPLES_SMALL") == "1"
EPOCHS, LR, BATCH = (15 if SMALL else 30), 0.05, 64

# %%
# A model trained elsewhere, with its checkpoints
# -----------------------------------------------
# An ordinary training loop, which saves the weights and the learning rate at a few
# epochs (as skorch's ``Checkpoint`` callback or a ``Trainer`` would).
X, X_test, y, y_test = load_digits_split(n_train=800, n_test=200, random_state=0)
y_noisy, flipped = flip_labels(y, 0.2, random_state=0)

torch.manual_seed(0)
module = MLP(n_features=64, n_outputs=10, hidden=(128,), dropout=0.1)
optimizer = torch.optim.SGD(module.parameters(), lr=LR, momentum=0.9)
inputs, labels = torch.as_tensor(X), torch.as_tensor(y_noisy)
checkpoints = []
for epoch in range(1, EPOCHS + 1):
    for rows in torch.randperm(len(labels)).split(BATCH):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(inputs[rows]), labels[rows]).backward()
        optimizer.step()
    if epoch % (EPOCHS // 5) == 0:
        checkpoints.append(({k: v.clone() for k, v in module.state_dict().items()}, LR))
module.eval()
accuracy = (module(torch.as_tensor(X_test)).argmax(1).numpy() == y_test).mean()
print(f"test accuracy of the model trained on noisy labels: {accuracy:.3f}")

# %%
# Frozen, as it is
# ----------------
# ``frozen_net`` wraps the module in a ``FrozenEstimator`` around a skorch net that
# was never fitted; the estimators work on copies, so the module stays bitwise as
# it is. The learning rate and batch size are what LoRA adapters would train with.
frozen = frozen_net(module, torch.nn.CrossEntropyLoss, lr=LR, batch_size=BATCH)
before = {k: v.clone() for k, v in module.state_dict().items()}

# %%
# Its mislabeled samples
# ----------------------
# Outlier Gradient Analysis at the loop's own checkpoints, where memorisation has
# not yet hidden the flipped labels.
detector = OutlierGradientDetector(frozen, contamination=0.2, checkpoints=checkpoints, random_state=0)
detector.fit(X, y_noisy)
found = detector.labels_ == -1
print(
    f"AUROC of the flipped labels: {roc_auc_score(flipped, -detector.train_scores_):.3f}; "
    f"{found.sum()} flagged, of which {(found & flipped).sum()} flipped"
)

# %%
# A dropout ensemble on the given weights
# ---------------------------------------
# Ten fixed dropout masks on the one trained model: ten members, no training
# (``costs_["train_seconds"]`` is the time it took to set them up).
# ``retrain_estimator`` is the recipe, a skorch net that trains as the loop did,
# for what must retrain: the calibration to the margin's units and the removal
# check below.
recipe = NeuralNetClassifier(
    MLP,
    module__n_features=64,
    module__n_outputs=10,
    module__hidden=(128,),
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD,
    optimizer__momentum=0.9,
    lr=LR,
    max_epochs=EPOCHS,
    batch_size=BATCH,
    train_split=None,
    verbose=0,
)
attr = EnsembleAttributor(
    frozen, ensemble="dropout", n_masks=10, retrain_estimator=recipe, score_n_subsets=10, random_state=0
).fit(X, y_noisy)
print(f"{attr.n_members_} members, set up in {attr.costs_['train_seconds']:.3f} s")

# The test digits the model gets wrong, and their strongest opponents: training
# samples that pull the prediction away from the true label.
wrong = np.flatnonzero(module(torch.as_tensor(X_test)).argmax(1).numpy() != y_test)[:5]
top = attr.most_influential(X_test[wrong], y_test[wrong], k=10)
share = flipped[top.opponents].mean()
print(f"{share:.0%} of their top-10 opponents are flipped labels ({flipped.mean():.0%} of the training set)")

# %%
# Checked by retraining
# ---------------------
# Remove each test digit's ten strongest opponents, retrain with the recipe, and
# compare the margin's change with the removal of ten random samples and with the
# change the scores predicted.
effect = removal_effect(
    attr, X_test[wrong], y_test[wrong], k=10, remove="opponents", n_retrains=2, flip_sizes=None
)
print(
    f"margin change, top-10 opponents removed: {effect.attributed.mean():+.3f}; "
    f"10 random removed: {effect.random.mean():+.3f}; predicted: {effect.predicted.mean():+.3f}"
)
assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # the model is untouched

fig = plot_removal_effect(effect)
OUTPUT.mkdir(exist_ok=True)
fig.savefig(OUTPUT / "frozen_model_removal.png", dpi=100)
