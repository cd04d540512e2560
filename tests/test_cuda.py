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
@pytest.mark.parametrize("method", ["trak", "tracin", "ekfac"])
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


def _features_on(device, member_factory, X, y, task, proj_dim):
    from sktda._data import map_tensors, take
    from sktda._featurize import featurize
    from sktda._gradients import GradientConfig, make_engine

    member = member_factory()
    config = GradientConfig(task=task, proj_dim=proj_dim, device=torch.device(device))
    X = map_tensors(lambda t: t.to(device), X)
    y = y.to(device)
    engine = make_engine(member, config, (take(X, slice(0, 3)), y[:3]))
    return featurize(engine, X, y, batch_size=4).phi, engine


@pytest.mark.parametrize("model", ["bert", "gpt2", "tied-arange", "tied-sequence-first"])
def test_routes_traced_and_row_by_row_gradients_agree(model):
    """Every way the engine takes gradients (routes, operations that use a
    parameter, row by row) gives the CPU's features on CUDA."""
    pytest.importorskip("transformers")
    from .test_huggingface import CLASSIFY, GENERATE, GPT2, BertClassifier, _frozen, padded_tokens
    from .test_layers import Tied

    ids, mask, labels = padded_tokens(10)
    if model == "bert":
        X = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        y, task, make = torch.from_numpy(labels), CLASSIFY, BertClassifier
    elif model == "gpt2":
        X, y, task, make = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:]), GENERATE, GPT2
    else:
        X, y, task = torch.from_numpy(ids[:, :5] % 10), torch.from_numpy(labels), CLASSIFY
        make = lambda: Tied(model.split("-", 1)[1].replace("-", "_"))  # noqa: E731

    def factory():
        torch.manual_seed(0)
        return _frozen(make())

    for proj_dim in (64, None):
        cpu, engine_cpu = _features_on("cpu", factory, X, y, task, proj_dim)
        gpu, engine_gpu = _features_on("cuda", factory, X, y, task, proj_dim)
        assert (engine_gpu.traced, engine_gpu.rowwise) == (engine_cpu.traced, engine_cpu.rowwise)
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4 * np.abs(cpu).max())


def test_padded_bert_attribution_on_cuda():
    pytest.importorskip("transformers")
    from skorch.helper import SliceDict

    from .test_huggingface import _bert_net, padded_tokens

    ids, mask, y = padded_tokens(40)
    X = SliceDict(input_ids=ids, attention_mask=mask)
    net = _bert_net(module__hidden_dropout_prob=0.0, module__attention_probs_dropout_prob=0.0)
    cpu, gpu = _fit_both(net, X, y, proj_dim=64, random_state=0)
    _assert_close(gpu.attribute(X[:5], y[:5]), cpu.attribute(X[:5], y[:5]))


@pytest.mark.parametrize("method", ["trak", "ekfac"])
def test_fit_on_cuda_scored_on_the_cpu(digits, method):
    """The fitted curvature follows the scoring device: an attributor fitted on
    the GPU attributes on the CPU once its device says so."""
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(module__dropout=0.0)
    gpu = EnsembleAttributor(net, device="cuda", method=method, proj_dim=64, random_state=0).fit(
        X_train, y_train
    )
    on_gpu = gpu.attribute(X_test, y_test)
    on_cpu = gpu.set_params(device="cpu").attribute(X_test, y_test)
    _assert_close(on_cpu, on_gpu)
