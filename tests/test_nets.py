import numpy as np
import pytest
import torch

from sktda._nets import (
    check_net,
    checkpoint_epochs,
    fit_net,
    parameter_names,
    resolve_device,
)
from sktda._task import NetTask
from sktda.models import MLP

from .conftest import make_classifier_net, make_regressor_net


def test_classification_target_is_the_margin_and_weight_is_minus_dloss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], requires_grad=True)
    y = torch.tensor([0, 2])
    margin, weight = NetTask(is_classifier=True).target_and_residual(logits, y)
    expected = torch.stack(
        [
            2.0 - torch.logsumexp(torch.tensor([-1.0, 0.5]), 0),
            0.3 - torch.logsumexp(torch.tensor([0.1, 0.2]), 0),
        ]
    )
    torch.testing.assert_close(margin, expected)
    p = torch.softmax(logits, 1)[torch.arange(2), y]
    torch.testing.assert_close(weight, 1 - p)
    # cross-entropy is log(1 + exp(-margin)), so -dCE/dmargin = 1 - p
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    torch.testing.assert_close(ce, torch.log1p(torch.exp(-margin)).sum())


def test_probability_outputs_are_logged_and_regression_weight_is_residual():
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    margin, weight = NetTask(is_classifier=True, output="probabilities").target_and_residual(
        probs, torch.tensor([0])
    )
    torch.testing.assert_close(weight, torch.tensor([0.3]), rtol=1e-5, atol=1e-6)
    f, w = NetTask(is_classifier=False).target_and_residual(
        torch.tensor([[1.5], [0.0]]), torch.tensor([[1.0], [2.0]])
    )
    torch.testing.assert_close(f, torch.tensor([1.5, 0.0]))
    torch.testing.assert_close(w, torch.tensor([-1.0, 4.0]))
    with pytest.raises(ValueError, match="target=.loss."):
        NetTask(is_classifier=False).target_and_residual(torch.zeros(2, 3), torch.zeros(2))


def test_check_net_reads_the_loss():
    assert check_net(make_classifier_net()) == NetTask(True)
    assert check_net(make_classifier_net(criterion=torch.nn.NLLLoss)) == NetTask(True, "probabilities")
    assert check_net(make_regressor_net()) == NetTask(False)
    with pytest.raises(TypeError, match="skorch"):
        check_net("net")


def test_parameter_names_for_layers():
    module = MLP(n_features=4, n_outputs=3, hidden=(5, 6))
    assert parameter_names(module, None) == [n for n, _ in module.named_parameters()]
    assert parameter_names(module, "all") == parameter_names(module, None)
    assert parameter_names(module, "last") == ["layers.6.weight", "layers.6.bias"]
    assert parameter_names(module, ["layers.0"]) == ["layers.0.weight", "layers.0.bias"]
    with pytest.raises(ValueError, match="not modules"):
        parameter_names(module, ["layers.9"])
    with pytest.raises(ValueError, match="no parameters"):
        parameter_names(module, ["layers.1"])
    with pytest.raises(TypeError, match="layers must be"):
        parameter_names(module, 3)


def test_checkpoint_epochs():
    assert checkpoint_epochs(30, 5) == [6, 12, 18, 24, 30]
    assert checkpoint_epochs(3, 5) == [1, 2, 3]
    assert checkpoint_epochs(10, 1) == [10]


def test_fit_net_is_seeded_and_leaves_eval_mode(digits):
    X, _, y, _ = digits
    net = make_classifier_net(max_epochs=2)
    a = fit_net(net, X, y, seed=3, device=torch.device("cpu"), task=NetTask(True))
    b = fit_net(net, X, y, seed=3, device=torch.device("cpu"), task=NetTask(True))
    c = fit_net(net, X, y, seed=4, device=torch.device("cpu"), task=NetTask(True))
    for pa, pb in zip(a.module_.parameters(), b.module_.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.module_.parameters(), c.module_.parameters()))
    assert not a.module_.training
    assert not hasattr(net, "module_")  # the user's net is never fitted


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda"}
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")


def test_flip_labels():
    from sktda.datasets import flip_labels

    y = np.repeat(np.arange(5), 20)
    y_noisy, flipped = flip_labels(y, 0.2, random_state=0)
    assert flipped.sum() == 20
    assert np.all((y_noisy != y) == flipped)
    np.testing.assert_array_equal(flip_labels(y, 0.2, random_state=0)[0], y_noisy)
    with pytest.raises(ValueError, match="fraction"):
        flip_labels(y, 1.0)
    with pytest.raises(ValueError, match="'fraction' parameter of flip_labels must be a float"):
        flip_labels(y, "0.2")
    with pytest.raises(ValueError, match="1-D array of labels"):
        flip_labels(np.stack([y, y], 1), 0.2)


def test_training_guard_is_appended_and_the_users_net_untouched(digits):
    X, _, y, _ = digits
    net = make_classifier_net(max_epochs=1)
    trained = fit_net(net, X, y, seed=0, device=torch.device("cpu"), task=NetTask(True))
    assert "sktda_guard" in dict(trained.callbacks_)
    assert net.callbacks is None


def test_checkpoint_epochs_need_an_epoch():
    with pytest.raises(ValueError, match="max_epochs=0"):
        checkpoint_epochs(0, 3)


def test_resolve_device_refuses_devices_that_cannot_run():
    with pytest.raises(ValueError, match="cannot run computations"):
        resolve_device("meta")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
