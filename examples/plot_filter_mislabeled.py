"""
Find mislabeled digits from gradient outliers, then filter them before fitting
================================================================================

Flips 30% of the labels of 1200 training digits, trains an MLP long enough to
memorise them, and scores every training sample by an isolation forest on its loss
gradient at checkpoints along training (sktda's default
:class:`~sktda.OutlierGradientDetector`). Draws the most suspicious digits with
their given and predicted labels and the ROC curve (also saved under
``examples/output/``), prints the test accuracy before and after filtering, and
shows the two ways to filter inside a pipeline: imbalanced-learn's ``Pipeline``
(the detector is a sampler) and scikit-learn's (:class:`~sktda.FilteredEstimator`
wraps the final model)::

    python examples/plot_filter_mislabeled.py
"""

from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skorch import NeuralNetClassifier

from sktda import FilteredEstimator, OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split
from sktda.models import MLP

# the examples' folder (the documentation build runs each example from there)
OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"
NOISE = 0.3


def make_net():
    return NeuralNetClassifier(
        MLP,
        module__n_features=64,
        module__n_outputs=10,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=80,
        batch_size=64,
        train_split=None,
        verbose=0,
    )


def test_accuracy(X, y, X_test, y_test):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return float((make_net().fit(X, y).predict(X_test) == y_test).mean())


# %%
# Detect
# ------
# The detector trains the net on the noisy labels and averages, over 8
# checkpoints, an isolation forest's score of each sample's loss gradient (all
# layers, projected to 1024 features). A net that trains long enough memorises
# its mislabeled samples, and their final gradients shrink; along the way they
# stand out. ``contamination`` is the
# fraction flagged.
X, X_test, y, y_test = load_digits_split(n_train=1200, n_test=597, random_state=0)
y_noisy, flipped = flip_labels(y, NOISE, random_state=0)

# every class is cleaned: the noise is spread over classes of similar sizes
# (sampling_strategy="auto", as imbalanced-learn's cleaning samplers, spares the smallest)
detector = OutlierGradientDetector(make_net(), contamination=NOISE, sampling_strategy="all", random_state=0)
flags = detector.fit_predict(X, y_noisy)
suspicion = -detector.train_scores_
print(f"{flipped.sum()} of {len(y)} labels flipped; {np.sum(flags == -1)} samples flagged")
print(f"AUROC of the gradient-outlier score against the true flips: {roc_auc_score(flipped, suspicion):.3f}")
print(f"precision of the flagged samples: {flipped[flags == -1].mean():.3f}")
print(
    "time: training {train_seconds:.1f} s, gradients {featurize_seconds:.1f} s, "
    "detection {detect_seconds:.2f} s".format(**detector.costs_)
)

# %%
# Retrain on what is kept
# -----------------------
before = test_accuracy(X, y_noisy, X_test, y_test)
after = test_accuracy(X[flags == 1], y_noisy[flags == 1], X_test, y_test)
print(f"test accuracy of the net trained on all noisy labels: {before:.3f}; after filtering: {after:.3f}")

# %%
# Filtering inside pipelines
# --------------------------
# With imbalanced-learn the detector is a sampler: ``fit_resample`` drops the
# flagged samples before the next step is fitted, and only during ``fit``. In a
# plain scikit-learn pipeline, :class:`~sktda.FilteredEstimator` wraps the final
# model and fits it on the samples its detector keeps.
try:
    from imblearn.pipeline import Pipeline as ImbPipeline
except ImportError:
    print("imbalanced-learn is not installed: skipping its pipeline (pip install imbalanced-learn).")
else:
    imb = ImbPipeline([("filter", detector), ("model", LogisticRegression(max_iter=2000))])
    print(
        f"imblearn pipeline (filter -> logistic regression): test accuracy {imb.fit(X, y_noisy).score(X_test, y_test):.3f}"
    )
plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(X, y_noisy)
filtered = make_pipeline(StandardScaler(), FilteredEstimator(LogisticRegression(max_iter=2000), detector))
filtered.fit(X, y_noisy)
print(
    f"scikit-learn pipeline: logistic regression {plain.score(X_test, y_test):.3f} unfiltered, "
    f"{filtered.score(X_test, y_test):.3f} with FilteredEstimator ({filtered[-1].n_removed_} removed)"
)

# %%
# Figures
# -------
# The 24 most suspicious training digits, with their given and predicted labels
# (red titles: the label really was flipped).
try:
    import matplotlib.pyplot as plt
except ImportError:
    plt = None
    print("matplotlib is not installed: no figures (pip install -e '.[plot]').")
if plt is not None:
    OUTPUT.mkdir(exist_ok=True)
    with torch.no_grad():
        logits = detector.estimators_[0].module_.eval()(torch.from_numpy(X))
    predicted = logits.argmax(-1).numpy()
    top = np.argsort(-suspicion)[:24]
    fig, axes = plt.subplots(3, 8, figsize=(10, 4.4))
    for ax, i in zip(axes.ravel(), top):
        ax.imshow(X[i].reshape(8, 8), cmap="gray_r")
        color = "tab:red" if flipped[i] else "tab:green"
        ax.set_title(f"given {y_noisy[i]}, pred {predicted[i]}", fontsize=7, color=color)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Most suspicious training digits (red: label really flipped)", fontsize=10)
    fig.tight_layout()
    fig.savefig(OUTPUT / "mislabeled_digits.png", dpi=110)

# %%
# The ROC curve of the suspicion score against the true flips.
if plt is not None:
    fpr, tpr, _ = roc_curve(flipped, suspicion)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"gradient outliers (AUROC {roc_auc_score(flipped, suspicion):.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(OUTPUT / "mislabeled_roc.png", dpi=110)
    print(f"figures: {OUTPUT / 'mislabeled_digits.png'}, {OUTPUT / 'mislabeled_roc.png'}")
