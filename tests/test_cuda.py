"""CPU and CUDA give the same results (run on a GPU machine; skipped elsewhere)."""

import numpy as np
import pytest
import torch

from sktda import EnsembleAttributor, OutlierGradientDetector

from .conftest import make_classifier_net

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not exercised here"
    ),
]


@pytest.mark.parametrize("ensemble", ["independent", "dropout", "lora"])
def test_cpu_and_cuda_agree(digits, ensemble):
    X_train, X_test, y_train, y_test = digits
    kwargs = dict(ensemble=ensemble, n_masks=2, n_adapters=2, proj_dim=64, random_state=0)
    cpu = EnsembleAttributor(make_classifier_net(), device="cpu", **kwargs).fit(X_train, y_train)
    gpu = EnsembleAttributor(make_classifier_net(), device="cuda", **kwargs).fit(X_train, y_train)
    assert next(gpu.estimators_[0].module_.parameters()).is_cuda
    A_cpu, A_gpu = cpu.attribute(X_test, y_test), gpu.attribute(X_test, y_test)
    scale = np.abs(A_cpu).max()
    # training itself runs on different kernels, so agreement is to float tolerance
    np.testing.assert_allclose(A_gpu, A_cpu, rtol=5e-2, atol=5e-2 * scale)
    assert np.corrcoef(A_gpu.ravel(), A_cpu.ravel())[0, 1] > 0.99


def test_detector_on_cuda(digits):
    X_train, _, y_train, _ = digits
    cpu = OutlierGradientDetector(make_classifier_net(), device="cpu", random_state=0).fit(X_train, y_train)
    gpu = OutlierGradientDetector(make_classifier_net(), device="cuda", random_state=0).fit(X_train, y_train)
    assert np.corrcoef(cpu.train_scores_, gpu.train_scores_)[0, 1] > 0.99
