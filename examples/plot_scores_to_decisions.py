"""
From scores to decisions: find a corrupted data source, then check by retraining
================================================================================

1,000 training digits come from five sources; one of them has 40% of its labels
flipped. Group detection (:meth:`~sktda.OutlierGradientDetector.score_groups`) and
group attribution (``attribute(..., groups=...)``) both point at it; the scores,
calibrated to the margin's units, predict how much removing it helps each test
digit; and :func:`~sktda.model_selection.removal_effect` checks that prediction by
removing the source and retraining, beside the removal of a random source::

    python examples/plot_scores_to_decisions.py
"""

import os
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split
from sktda.model_selection import removal_effect
from sktda.models import MLP
from sktda.plotting import plot_removal_effect

OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"
SMALL = os.environ.get("SKTDA_EXAMPLES_SMALL") == "1"
N_TEST = 10 if SMALL else 20


def make_net():
    return NeuralNetClassifier(
        MLP,
        module__n_features=64,
        module__n_outputs=10,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=15 if SMALL else 30,
        batch_size=64,
        train_split=None,
        verbose=0,
    )


# %%
# Five sources, one corrupted
# ---------------------------
X, X_test, y, y_test = load_digits_split(n_train=1000, n_test=200, random_state=0)
rng = np.random.RandomState(0)
names = np.array(["clinic A", "clinic B", "clinic C", "clinic D", "clinic E"])
source = names[rng.permutation(np.arange(len(y)) % 5)]
y_noisy = y.copy()
corrupted = source == "clinic C"
y_noisy[corrupted], flipped = flip_labels(y[corrupted], 0.4, random_state=0)
print(f"{flipped.sum()} of the {corrupted.sum()} labels of clinic C flipped")

# %%
# Group detection
# ---------------
# The mean outlier score of each source's loss gradients: lower is more abnormal.
detector = OutlierGradientDetector(make_net(), random_state=0).fit(X, y_noisy)
for name, score in zip(np.unique(source), detector.score_groups(X, y_noisy, source)):
    print(f"{name}: mean outlier score {score:+.4f}")

# %%
# Group attribution
# -----------------
# Each source's summed scores for every test digit, with their standard errors
# across the five members. A corrupted source is an opponent of the test digits it
# confuses.
attr = EnsembleAttributor(make_net(), n_models=5, random_state=0).fit(X, y_noisy)
G, std = attr.attribute(X_test, y_test, groups=source, return_std=True)
for name, mean, share in zip(np.unique(source), G.mean(0), (G < -2 * std).mean(0)):
    print(f"{name}: mean score {mean:+.3f}; a significant opponent of {share:.0%} of test digits")

# %%
# What removing each test digit's top opponent source is predicted to do, and
# what it does
# ----------------------------------------------------------------------------
# The scores are calibrated to the margin's units on models retrained on half
# the training set; ``removal_effect`` removes each test digit's strongest
# opposing source, retrains with three seeds, and compares with removing a
# random source (the same removal with the same seed is trained once, so this
# trains at most 5 sources x 3 seeds models per condition).
X_check, y_check = X_test[:N_TEST], y_test[:N_TEST]
attr.calibrate_units(X_check, y_check)
effect = removal_effect(attr, X_check, y_check, k=1, groups=source, remove="opponents")
removed, counts = np.unique(np.unique(source)[effect.removed[:, 0]], return_counts=True)
print("top opponent source of the test digits: " + ", ".join(f"{n} ({c})" for n, c in zip(removed, counts)))
print(
    f"margin change, removing it: {effect.attributed.mean():+.3f} (predicted {effect.predicted.mean():+.3f}); "
    f"removing a random source: {effect.random.mean():+.3f}"
)
print(f"Spearman, predicted against retrained: {spearmanr(effect.predicted, effect.attributed)[0]:.2f}")

fig = plot_removal_effect(effect, title="removing each test digit's top opposing source")
OUTPUT.mkdir(exist_ok=True)
fig.savefig(OUTPUT / "scores_to_decisions.png", dpi=110)


# %%
# The decision: drop clinic C
# ---------------------------
# On the whole test set, one model with clinic C and one without it: the test
# digits' correct-class margins rise, which is what the attributions predicted.
# The accuracy of this easy task barely moves: the MLP outvotes most flipped
# labels with the clean ones, and loses a fifth of its training data.
def margins_and_accuracy(X_fit, y_fit):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        p = make_net().fit(X_fit, y_fit).predict_proba(X_test)
    correct = np.clip(p[np.arange(len(y_test)), y_test], 1e-7, 1 - 1e-7)
    return np.median(np.log(correct / (1 - correct))), (p.argmax(1) == y_test).mean()


for label, keep in [("with clinic C", np.ones(len(y), bool)), ("without it", ~corrupted)]:
    margin, accuracy = margins_and_accuracy(X[keep], y_noisy[keep])
    print(f"{label}: median test margin {margin:.2f}, test accuracy {accuracy:.3f}")
