import numpy as np
import pytest
import torch
from sklearn.datasets import make_regression
from skorch import NeuralNet, NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback

from sktda.datasets import load_digits_split
from sktda.models import MLP, TokenCrossEntropy, TokenTransformer


class InputShapeSetter(Callback):
    """Sizes the module from the data at the start of training (skorch's idiom), so
    one net works on the differently shaped data of scikit-learn's checks."""

    def on_train_begin(self, net, X, y):
        n_out = int(np.max(y)) + 1 if net.criterion is not torch.nn.MSELoss else 1
        net.set_params(module__n_features=X.shape[1], module__n_outputs=max(n_out, 2))


def make_classifier_net(**kwargs):
    params = dict(
        module__n_features=64,
        module__n_outputs=10,
        module__hidden=(16,),
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=4,
        batch_size=32,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetClassifier(MLP, **params)


def make_language_model_net(vocab_size, **kwargs):
    """A small skorch ``NeuralNet`` language model (``TokenTransformer``, token
    cross-entropy), one epoch."""
    params = dict(
        module__vocab_size=vocab_size,
        module__d_model=8,
        module__n_heads=2,
        criterion=TokenCrossEntropy,
        max_epochs=1,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNet(TokenTransformer, **params)


def make_regressor_net(n_features=5, **kwargs):
    params = dict(
        module__n_features=n_features,
        module__n_outputs=1,
        module__hidden=(8,),
        criterion=torch.nn.MSELoss,
        optimizer=torch.optim.SGD,
        lr=0.01,
        max_epochs=4,
        batch_size=16,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetRegressor(MLP, **params)


def bert_config(**kwargs):
    """A tiny transformers BERT classifier's config (nothing downloaded)."""
    import transformers

    params = dict(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertConfig(**{**params, **kwargs})


_cuda_is_available = torch.cuda.is_available


@pytest.fixture(scope="session", autouse=True)
def _cpu_reference():
    """The suite computes its references on the CPU, so device="auto" resolves to
    the CPU, session fixtures included (a test's own ``monkeypatch.undo()`` does
    not lift it)..."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield


@pytest.fixture(autouse=True)
def _cuda_when_marked(request, monkeypatch):
    """...except in the CUDA tests, which compare the GPU with the CPU explicitly."""
    if request.node.get_closest_marker("cuda") is not None:
        monkeypatch.setattr(torch.cuda, "is_available", _cuda_is_available)


@pytest.fixture(scope="session")
def digits():
    return load_digits_split(n_train=150, n_test=20, random_state=0)


@pytest.fixture(scope="session")
def regression_data():
    X, y = make_regression(n_samples=80, n_features=5, noise=0.1, random_state=0)
    X = (X / X.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    return X[:60], X[60:], y[:60], y[60:]


@pytest.fixture
def clf_net():
    return make_classifier_net()


@pytest.fixture
def reg_net():
    return make_regressor_net()


@pytest.fixture(scope="session")
def fitted_trak(digits):
    from sktda import EnsembleAttributor

    X_train, _, y_train, _ = digits
    return EnsembleAttributor(
        make_classifier_net(), n_models=2, proj_dim=256, normalize=None, random_state=0
    ).fit(X_train, y_train)


def short_memory(monkeypatch, attributor, X, y):
    """Fake a machine whose memory holds what a fit of ``attributor`` needs beside
    its features, and not the features too: they go to disk."""
    import sktda._resources as features_module

    plan = attributor.plan_memory(X, y)
    available = plan.models + plan.inputs + plan.curvature + plan.working + plan.features
    monkeypatch.setattr(features_module, "available_memory", lambda: available)
