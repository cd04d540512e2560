"""Every skorch net and criterion that splits per sample: the training side of each
sample is minus the gradient of the net's own criterion, and the test side the
gradient of the attributed target, both checked against plain autograd."""

import copy

import numpy as np
import pytest
import torch
from skorch import NeuralNet, NeuralNetBinaryClassifier, NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._task import CLOSED, CRITERION, LOSS

from .conftest import make_classifier_net, make_regressor_net


class Binary(torch.nn.Module):
    """One score per sample: a logit, or a probability with ``sigmoid``."""

    def __init__(self, n_features=8, squeeze=True, sigmoid=False):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(n_features, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1)
        )
        self.squeeze, self.sigmoid = squeeze, sigmoid

    def forward(self, x):
        out = self.body(x)
        out = out.squeeze(-1) if self.squeeze else out
        return torch.sigmoid(out) if self.sigmoid else out


@pytest.fixture(scope="module")
def binary_data():
    rng = np.random.RandomState(0)
    X = rng.randn(90, 8).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.randn(90) > 0).astype(np.float32)
    return X[:70], X[70:], y[:70], y[70:]


def _binary_net(**kwargs):
    params = dict(module=Binary, max_epochs=5, lr=0.1, train_split=None, verbose=0)
    return NeuralNetBinaryClassifier(**{**params, **kwargs})


def _last_layer_gradients(module, fn, X):
    """Per-sample gradients of ``fn(output_i, i)`` with respect to the module's
    last two parameters (the output layer's weight and bias), by plain autograd."""
    module.eval()
    last = list(module.parameters())[-2:]
    rows = []
    for i in range(len(X)):
        value = fn(module(torch.as_tensor(X[i : i + 1])), i)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, last)]))
    return torch.stack(rows).double().numpy()


def _fit_exact(net, X, y, **kwargs):
    params = dict(method="grad_dot", proj_dim=None, layers="last", normalize=None, random_state=0)
    return EnsembleAttributor(net, **{**params, **kwargs}).fit(X, y)


def _criterion_loss(net, out, y_i):
    """The net's own criterion on one sample, as skorch computes it, summed: a
    weighted mean divides by the batch's summed weights, which a batch of one
    would cancel, and the sample's share of a batch's loss keeps its weight."""
    criterion = copy.copy(net.criterion_)
    criterion.reduction = "sum"
    if isinstance(net, NeuralNetClassifier) and isinstance(criterion, torch.nn.NLLLoss):
        out = torch.log(out + torch.finfo(out.dtype).eps)  # skorch's NeuralNetClassifier
    return criterion(out, y_i)


def _training_side(attr, X, y):
    """Assert that the attributor's training sides are minus the gradients of the
    net's criterion, sample by sample, and return them."""
    net = attr.estimators_[0]

    def loss(out, i):
        target = torch.as_tensor(y[i : i + 1])
        return _criterion_loss(
            net, out, target.reshape(out.shape) if target.numel() == out.numel() else target
        )

    expected = -_last_layer_gradients(net.module_, loss, X)
    got = attr.train_residuals_[0][:, None] * attr.train_features_[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    return expected


BINARY_CASES = {
    "BCEWithLogitsLoss": dict(),
    "BCEWithLogitsLoss pos_weight": dict(criterion__pos_weight=torch.tensor(3.0)),
    "BCEWithLogitsLoss (n, 1) output": dict(module__squeeze=False),
    "BCELoss on probabilities": dict(criterion=torch.nn.BCELoss, module__sigmoid=True),
}


@pytest.mark.parametrize("case", BINARY_CASES)
def test_binary_classifier_sides_are_the_criterion_s_and_the_margin_s(binary_data, case):
    X_train, X_test, y_train, y_test = binary_data
    attr = _fit_exact(_binary_net(**BINARY_CASES[case]), X_train, y_train)
    net = attr.estimators_[0]
    expected = _training_side(attr, X_train, y_train)

    # the test side: the margin (2y - 1) z, z the logit
    def margin(out, i):
        z = out.reshape(())
        z = torch.logit(z) if net.module_.sigmoid else z
        return (2 * y_test[i] - 1) * z

    test_side = _last_layer_gradients(net.module_, margin, X_test)
    np.testing.assert_allclose(attr.attribute(X_test, y_test), test_side @ expected.T, rtol=1e-3, atol=1e-6)
    # the ensemble's labels are the net's own predictions
    np.testing.assert_array_equal(attr.transform(X_test), attr.attribute(X_test, net.predict(X_test)))


def test_binary_classifier_labels_and_refusals(binary_data):
    X_train, _, y_train, _ = binary_data
    labels = np.where(y_train > 0, "spam", "ham")
    attr = EnsembleAttributor(_binary_net(), random_state=0).fit(X_train, labels)
    np.testing.assert_array_equal(attr.classes_, ["ham", "spam"])
    three = np.arange(len(y_train)) % 3
    with pytest.raises(ValueError, match="takes two"):
        EnsembleAttributor(_binary_net(), random_state=0).fit(X_train, three)

    class TwoScores(Binary):
        def forward(self, x):
            return torch.cat([self.body(x), self.body(x)], 1)

    # skorch's NeuralNetBinaryClassifier refuses it itself; a plain NeuralNet is refused by sktda
    two = NeuralNet(TwoScores, criterion=torch.nn.BCEWithLogitsLoss, max_epochs=1, train_split=None)
    with pytest.raises(ValueError, match="one score per sample"):
        EnsembleAttributor(two, random_state=0).fit(X_train, y_train)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        EnsembleAttributor(_binary_net(criterion=torch.nn.BCELoss), random_state=0).fit(X_train, y_train)
    det = OutlierGradientDetector(_binary_net(), n_checkpoints=2, random_state=0).fit(X_train, y_train)
    assert det.train_scores_.shape == (len(X_train),)


class _Softmax(torch.nn.Module):
    """The digits MLP ending in a softmax (NLLLoss in a NeuralNetClassifier)."""

    def __init__(self, n_features=64, n_outputs=10, hidden=(16,)):
        super().__init__()
        from sktda.models import MLP

        self.mlp = MLP(n_features=n_features, n_outputs=n_outputs, hidden=hidden)

    def forward(self, x):
        return torch.softmax(self.mlp(x), -1)


MULTICLASS_CASES = {  # (criterion parameters, the module if not the MLP, the training side)
    "CrossEntropyLoss weight": (dict(criterion__weight=torch.linspace(0.5, 2, 10)), None, CRITERION),
    "CrossEntropyLoss label_smoothing": (dict(criterion__label_smoothing=0.1), None, LOSS),
    "NLLLoss weight (probabilities)": (
        dict(criterion=torch.nn.NLLLoss, criterion__weight=torch.linspace(0.5, 2, 10)),
        _Softmax,
        CRITERION,
    ),
    "CrossEntropyLoss reduction=sum": (dict(criterion__reduction="sum"), None, CLOSED),
}


@pytest.mark.parametrize("case", MULTICLASS_CASES)
def test_criterion_parameters_are_honoured(digits, case):
    X_train, _, y_train, _ = digits
    params, module, side = MULTICLASS_CASES[case]
    net = make_classifier_net(**params)
    if module is not None:
        net.set_params(module=module)
    attr = _fit_exact(net, X_train, y_train)
    assert attr._task.train_side == side
    _training_side(attr, X_train, y_train)


@pytest.mark.parametrize(
    "criterion",
    [torch.nn.L1Loss, torch.nn.HuberLoss, torch.nn.SmoothL1Loss, torch.nn.MSELoss],
    ids=lambda c: c.__name__,
)
def test_regression_losses_use_their_own_per_sample_gradient(regression_data, criterion):
    X_train, X_test, y_train, y_test = regression_data
    kwargs = {"criterion__delta": 0.5} if criterion is torch.nn.HuberLoss else {}
    kwargs = {"criterion__beta": 0.5} if criterion is torch.nn.SmoothL1Loss else kwargs
    attr = _fit_exact(make_regressor_net(criterion=criterion, **kwargs), X_train, y_train)
    net = attr.estimators_[0]
    expected = _training_side(attr, X_train, y_train)
    # the test side is the prediction's gradient, whatever the loss
    test_side = _last_layer_gradients(net.module_, lambda out, i: out.reshape(()), X_test)
    np.testing.assert_allclose(attr.attribute(X_test, y_test), test_side @ expected.T, rtol=1e-3, atol=1e-6)


def test_the_closed_forms_equal_the_criterion_s_own_gradient(digits, regression_data):
    """The fast path, checked: a subclass with extra behaviour is differentiated from
    the criterion itself, and the plain criterion's closed form agrees with it."""

    class Scaled(torch.nn.CrossEntropyLoss):
        def forward(self, input, target):
            return super().forward(input, target)

    X_train, X_test, y_train, y_test = digits
    closed = _fit_exact(make_classifier_net(), X_train, y_train, method="trak")
    own = _fit_exact(
        make_classifier_net(criterion=Scaled, criterion__weight=torch.ones(10)),
        X_train,
        y_train,
        method="trak",
    )
    assert closed._task.train_side == CLOSED and own._task.train_side == CRITERION
    np.testing.assert_allclose(own.train_residuals_, closed.train_residuals_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        own.attribute(X_test, y_test), closed.attribute(X_test, y_test), rtol=1e-4, atol=1e-8
    )


def test_multi_output_regression(regression_data):
    X_train, X_test, _, _ = regression_data
    rng = np.random.RandomState(0)
    Y_train = np.column_stack([X_train[:, 0], X_train[:, 1] - X_train[:, 2]]).astype(np.float32)
    Y_test = np.column_stack([X_test[:, 0], X_test[:, 1] - X_test[:, 2]]).astype(np.float32)
    net = make_regressor_net(module__n_outputs=2)
    with pytest.raises(ValueError, match="target='loss'"):
        EnsembleAttributor(net, random_state=0).fit(X_train, Y_train)
    attr = _fit_exact(net, X_train, Y_train, target="loss")
    trained = attr.estimators_[0]
    expected = -_last_layer_gradients(
        trained.module_, lambda out, i: ((out - torch.tensor(Y_train[i : i + 1])) ** 2).sum(), X_train
    )
    np.testing.assert_allclose(
        attr.train_residuals_[0][:, None] * attr.train_features_[0], expected, rtol=1e-4, atol=1e-6
    )
    test_side = -_last_layer_gradients(
        trained.module_, lambda out, i: ((out - torch.tensor(Y_test[i : i + 1])) ** 2).sum(), X_test
    )
    np.testing.assert_allclose(attr.attribute(X_test, Y_test), test_side @ expected.T, rtol=1e-3, atol=1e-6)

    def first(out, y):
        return out[:, 0]

    picked = _fit_exact(net, X_train, Y_train, target=first)
    assert picked.attribute(X_test, Y_test).shape == (len(X_test), len(X_train))
    assert rng is not None


def test_the_criterion_s_residual_nests_in_the_vmap_engine(binary_data):
    """The criterion's ``-dL/df`` is taken by ``torch.func``, inside ``vmap(grad)``
    as in the layer engine's plain pass."""
    X_train, X_test, y_train, y_test = binary_data
    net = _binary_net(criterion__pos_weight=torch.tensor(2.0))
    layer = _fit_exact(net, X_train, y_train, method="trak", layers=None)
    vmapped = _fit_exact(net, X_train, y_train, method="trak", layers=None, gradient_path="vmap")
    np.testing.assert_allclose(vmapped.train_residuals_, layer.train_residuals_, rtol=1e-6)
    np.testing.assert_allclose(
        vmapped.attribute(X_test, y_test), layer.attribute(X_test, y_test), rtol=1e-5, atol=1e-9
    )
