"""What both estimators share through sktda/_base.py: one fit skeleton, and bad
input refused with a clear error before any result is returned."""

import numpy as np
import pytest
import torch
from skorch import NeuralNet
from torch import nn

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._base import GradientEstimator
from sktda.models import MLP

from .conftest import make_classifier_net

ESTIMATORS = [
    pytest.param(
        lambda net, **kw: EnsembleAttributor(net, proj_dim=32, random_state=0, **kw), id="attributor"
    ),
    pytest.param(
        lambda net, **kw: OutlierGradientDetector(net, n_checkpoints=2, random_state=0, **kw), id="detector"
    ),
]


class LogitsOut(MLP):
    """Returns logits although the criterion is skorch's default NLLLoss."""


class LogSoftmaxOut(MLP):
    def forward(self, X):
        return torch.log_softmax(super().forward(X), -1)


class NoParameters(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, X):
        return X[:, :10]


def test_both_estimators_share_the_base():
    for cls in (EnsembleAttributor, OutlierGradientDetector):
        assert issubclass(cls, GradientEstimator)
        assert cls.fit is GradientEstimator.fit
        shared = GradientEstimator._parameter_constraints
        assert {k: cls._parameter_constraints[k] for k in shared} == shared
        assert "%(" not in cls.__doc__  # every shared fragment was substituted
        assert "random_state : int, RandomState instance or None" in cls.__doc__


@pytest.mark.parametrize("make", ESTIMATORS)
def test_nll_loss_on_logits_is_refused(make, digits):
    X, _, y, _ = digits
    net = make_classifier_net(criterion=torch.nn.NLLLoss)
    net.module = LogitsOut
    with pytest.raises(ValueError, match="module must return probabilities.*CrossEntropyLoss"):
        make(net).fit(X, y)
    # a NeuralNetClassifier takes the log itself, so log-probabilities are refused too
    net.module = LogSoftmaxOut
    with pytest.raises(ValueError, match="module must return probabilities"):
        make(net).fit(X, y)


def test_plain_neural_net_with_nll_loss_takes_log_probabilities(digits):
    X, X_test, y, y_test = digits
    net = NeuralNet(
        LogSoftmaxOut,
        module__n_features=64,
        module__n_outputs=10,
        module__hidden=(16,),
        criterion=torch.nn.NLLLoss,
        max_epochs=3,
        lr=0.1,
        train_split=None,
        verbose=0,
    )
    attr = EnsembleAttributor(net, method="grad_dot", proj_dim=None, random_state=0).fit(X, y)
    with torch.no_grad():
        p = attr.estimators_[0].module_(torch.from_numpy(X)).exp()
    np.testing.assert_allclose(attr.train_residuals_[0], 1 - p[np.arange(len(y)), y].numpy(), rtol=1e-4)
    net.set_params(module=LogitsOut)
    with pytest.raises(ValueError, match="log-probabilities.*log_softmax"):
        EnsembleAttributor(net, random_state=0).fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_diverging_training_is_refused(make, digits):
    X, _, y, _ = digits
    with pytest.raises(
        ValueError, match=r"training diverged: the train loss became nan at epoch \d; lower lr"
    ):
        make(make_classifier_net(lr=1e12)).fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_input_size_mismatch_is_refused_before_training(make, digits):
    X, _, y, _ = digits
    with pytest.raises(ValueError, match=r"cannot take the training inputs.*\(2, 64\).*sizes match the data"):
        make(make_classifier_net(module__n_features=30)).fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_module_without_parameters_is_refused(make, digits):
    X, _, y, _ = digits
    net = make_classifier_net()
    net.set_params(module=NoParameters)
    with pytest.raises(ValueError, match="NoParameters has no parameters"):
        make(net).fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
@pytest.mark.parametrize("device", ["meta", torch.device("meta")])
def test_device_that_cannot_run_is_refused(make, digits, device):
    X, _, y, _ = digits
    with pytest.raises(ValueError, match="cannot run computations"):
        make(make_classifier_net(), device=device).fit(X, y)


def test_torch_device_is_accepted(digits):
    X, X_test, y, y_test = digits
    a = EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0, device=torch.device("cpu"))
    b = EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0, device="cpu")
    np.testing.assert_array_equal(
        a.fit(X, y).attribute(X_test, y_test), b.fit(X, y).attribute(X_test, y_test)
    )


@pytest.mark.parametrize("make", ESTIMATORS)
def test_zero_epochs_with_checkpoints_is_refused(make, digits):
    X, _, y, _ = digits
    kwargs = {"method": "tracin"} if make is ESTIMATORS[0].values[0] else {}
    with pytest.raises(ValueError, match="need at least one epoch.*max_epochs=0"):
        make(make_classifier_net(max_epochs=0), **kwargs).fit(X, y)


@pytest.mark.parametrize("make", ESTIMATORS)
def test_single_class_warns(make, digits):
    X, _, y, _ = digits
    with pytest.warns(UserWarning, match="single class"):
        make(make_classifier_net(max_epochs=1)).fit(X, np.zeros_like(y))


def test_y_with_several_columns_is_refused_at_prediction(fitted_trak, digits):
    X, X_test, y, y_test = digits
    two_columns = np.stack([y_test, y_test], 1)
    with pytest.raises(ValueError, match=r"one label per sample.*\(20, 2\)"):
        fitted_trak.attribute(X_test, two_columns)
    with pytest.raises(ValueError, match="one label per sample"):
        fitted_trak.most_influential(X_test, two_columns, k=2)
    det = OutlierGradientDetector(make_classifier_net(max_epochs=1), n_checkpoints=None).fit(X, y)
    for method in (det.score_samples, det.predict, det.decision_function):
        with pytest.raises(ValueError, match="one label per sample"):
            method(X_test, two_columns)
    # a single column is one label per sample
    np.testing.assert_array_equal(det.predict(X_test, y_test[:, None]), det.predict(X_test, y_test))
