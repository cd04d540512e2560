"""
A CNN on images: which training images drove each prediction, and which labels are wrong?
==========================================================================================

Digits as ``(n, 1, 8, 8)`` images, a small convolutional net wrapped by skorch.

1. :class:`~sktda.EnsembleAttributor` (TRAK over 5 CNNs, RelatIF-normalised)
   attributes 200 test predictions to the 1000 training images; a figure shows
   test images with their strongest proponents and opponents.
2. :class:`~sktda.OutlierGradientDetector` finds the 10% of training labels that
   were flipped.

::

    python examples/plot_images_cnn.py
"""

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.datasets import flip_labels, load_digits_split
from sktda.models import ConvNet

# the examples' folder (the documentation build runs each example from there)
OUTPUT = (Path(__file__).parent if "__file__" in globals() else Path.cwd()) / "output"

X_train, X_test, y_train, y_test = load_digits_split(n_train=1000, n_test=200, random_state=0)
X_train, X_test = X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8)  # images
net = NeuralNetClassifier(
    ConvNet,
    module__channels=(16, 32),
    criterion=torch.nn.CrossEntropyLoss,
    optimizer=torch.optim.SGD,
    optimizer__momentum=0.9,
    lr=0.05,
    max_epochs=30,
    batch_size=64,
    train_split=None,
    verbose=0,
)

# %%
# Attribution
# -----------
# The convolutions are differentiated by their own route: each layer's gradient
# is projected from its input patches and output gradients, so neither the
# per-sample gradient nor the patches are formed.
attr = EnsembleAttributor(net, method="trak", n_models=5, normalize="relatif", random_state=0)
attr.fit(X_train, y_train)
top = attr.most_influential(X_test, y_test, k=4)
same = np.mean(y_train[top.proponents[:, 0]] == y_test)
print(
    f"{attr.n_members_} CNNs trained in {attr.costs_['train_seconds']:.1f} s, "
    f"featurized in {attr.costs_['featurize_seconds']:.1f} s"
)
print(f"the strongest proponent shows the test image's digit for {same:.0%} of 200 test images")
# %%
# Each row: a test image, its 4 strongest proponents (green) and opponents (red).
try:
    from sktda.plotting import plot_influential

    OUTPUT.mkdir(exist_ok=True)
    fig = plot_influential(X_test, X_train, top, y_test=y_test, y_train=y_train, n_show=6)
    fig.savefig(OUTPUT / "images_cnn_influential.png", dpi=120)
    print(f"figure: {OUTPUT / 'images_cnn_influential.png'}")
except ImportError:
    print("matplotlib is not installed (pip install sktda[plot]): no figure")

# %%
# Mislabeled images
# -----------------
y_noisy, flipped = flip_labels(y_train, 0.1, random_state=0)
det = OutlierGradientDetector(net.set_params(max_epochs=40), contamination=0.1, random_state=0)
flags = det.fit_predict(X_train, y_noisy)
print(
    f"flipped labels found: AUROC {roc_auc_score(flipped, -det.train_scores_):.3f}, "
    f"precision {flipped[flags == -1].mean():.0%} at the true noise rate"
)
