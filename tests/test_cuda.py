"""CPU and CUDA give the same results (run on a GPU machine; skipped elsewhere).

Training draws dropout from the device's own generator, so the nets compared here
train without dropout (or not at all), and every difference left is float rounding.
"""

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.models import MLP

from .conftest import make_classifier_net

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not exercised here"
    ),
]


def _assert_close(A_gpu, A_cpu):
    scale = np.abs(A_cpu).max()
    np.testing.assert_allclose(A_gpu, A_cpu, rtol=1e-2, atol=1e-2 * scale)
    assert np.corrcoef(A_gpu.ravel(), A_cpu.ravel())[0, 1] > 0.999


def _fit_both(estimator, X, y, **kwargs):
    cpu = EnsembleAttributor(estimator, device="cpu", **kwargs).fit(X, y)
    gpu = EnsembleAttributor(estimator, device="cuda", **kwargs).fit(X, y)
    assert next(gpu.estimators_[0].module_.parameters()).is_cuda
    return cpu, gpu


@pytest.mark.parametrize("ensemble", ["independent", "lora"])
@pytest.mark.parametrize("method", ["trak", "tracin"])
def test_cpu_and_cuda_agree(digits, ensemble, method):
    if ensemble == "lora" and method == "tracin":
        pytest.skip("TracIn has no checkpoints of LoRA adapters")
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(module__dropout=0.0)
    cpu, gpu = _fit_both(
        net, X_train, y_train, ensemble=ensemble, method=method, n_adapters=2, proj_dim=64, random_state=0
    )
    _assert_close(gpu.attribute(X_test, y_test), cpu.attribute(X_test, y_test))
    _assert_close(gpu.self_attribute(), cpu.self_attribute())
    top_cpu, top_gpu = cpu.most_influential(X_test, y_test, k=3), gpu.most_influential(X_test, y_test, k=3)
    assert (top_cpu.proponents[:, 0] == top_gpu.proponents[:, 0]).mean() > 0.9


def test_dropout_masks_agree(digits):
    """The masks are drawn on the CPU, so a fixed module gets the same members on
    both devices (max_epochs=0: the pretrained weights are used as they are)."""
    X_train, X_test, y_train, y_test = digits
    torch.manual_seed(0)
    module = MLP(n_features=64, n_outputs=10, hidden=(32,), dropout=0.2)
    net = NeuralNetClassifier(module, criterion=torch.nn.CrossEntropyLoss, max_epochs=0, train_split=None)
    cpu, gpu = _fit_both(
        net, X_train, y_train, ensemble="dropout", n_masks=3, pretrained=True, proj_dim=64, random_state=0
    )
    _assert_close(gpu.attribute(X_test, y_test), cpu.attribute(X_test, y_test))


def test_detector_on_cuda(digits):
    X_train, X_test, y_train, _ = digits
    kwargs = dict(layers="all", random_state=0)
    net = make_classifier_net(module__dropout=0.0)
    cpu = OutlierGradientDetector(net, device="cpu", **kwargs).fit(X_train, y_train)
    gpu = OutlierGradientDetector(net, device="cuda", **kwargs).fit(X_train, y_train)
    np.testing.assert_allclose(gpu.train_scores_, cpu.train_scores_, rtol=1e-3)
    np.testing.assert_allclose(gpu.score_samples(X_test), cpu.score_samples(X_test), rtol=1e-3)
