import os

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import sktda._resources as features_module
from sktda import EnsembleAttributor
from sktda.models import MLP

from .conftest import make_classifier_net, make_language_model_net, make_regressor_net, short_memory

METHODS = ["trak", "if", "tracin", "grad_dot", "grad_cos"]


def _exact_gradients(module, X, y):
    """Per-sample gradient of the margin, and 1 - p_y, by plain autograd."""
    module.eval()
    grads, weights = [], []
    for x, label in zip(torch.from_numpy(X), torch.from_numpy(y)):
        logits = module(x[None])[0]
        others = torch.cat([logits[:label], logits[label + 1 :]])
        margin = logits[label] - torch.logsumexp(others, 0)
        g = torch.autograd.grad(margin, list(module.parameters()))
        grads.append(torch.cat([t.reshape(-1) for t in g]))
        weights.append(1 - torch.softmax(logits, 0)[label])
    return torch.stack(grads).double().numpy(), torch.stack(weights).detach().double().numpy()


@pytest.mark.parametrize("method", METHODS)
def test_fit_attribute_shapes_and_attributes(digits, method):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), method=method, n_models=2, proj_dim=64, random_state=0)
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    assert A.shape == (len(X_test), len(X_train))
    assert A.dtype == np.float64 and np.all(np.isfinite(A))
    assert len(attr.estimators_) == 2 and attr.n_members_ == 2
    assert attr.n_features_in_ == 64
    np.testing.assert_array_equal(attr.classes_, np.arange(10))
    assert set(attr.costs_) == {
        "train_seconds",
        "featurize_seconds",
        "feature_bytes",
        "model_bytes",
        "n_members",
    }
    assert attr.costs_["feature_bytes"] == attr.train_features_.nbytes + attr.train_residuals_.nbytes
    n_params = sum(p.numel() for p in attr.estimators_[0].module_.parameters())
    assert attr.costs_["model_bytes"] == 2 * 4 * n_params
    blocks = 2 * (min(attr.n_checkpoints, 4) if method == "tracin" else 1)
    assert attr.train_features_.shape == (blocks, len(X_train), 64)


def test_grad_dot_matches_autograd(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(), method="grad_dot", proj_dim=None, normalize=None, random_state=0
    )
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    module = attr.estimators_[0].module_
    g_train, w_train = _exact_gradients(module, X_train, y_train)
    g_test, _ = _exact_gradients(module, X_test, y_test)
    np.testing.assert_allclose(A, g_test @ (w_train[:, None] * g_train).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(attr.train_residuals_[0], w_train, rtol=1e-5)


def test_trak_and_if_match_their_formulas(digits):
    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net()
    common = dict(proj_dim=None, layers="last", damping=0.1, normalize=None, random_state=0)
    trak = EnsembleAttributor(net, method="trak", **common).fit(X_train, y_train)
    module = trak.estimators_[0].module_
    last = list(module.parameters())[-2:]
    n_last = sum(p.numel() for p in last)
    g_train, w = _exact_gradients(module, X_train, y_train)
    g_test, _ = _exact_gradients(module, X_test, y_test)
    phi, phi_test = g_train[:, -n_last:], g_test[:, -n_last:]

    expected = phi_test @ _damped_inv(phi.T @ phi, 0.1, len(phi)) @ phi.T * w[None, :]
    np.testing.assert_allclose(trak.attribute(X_test, y_test), expected, rtol=2e-3, atol=1e-4)

    inf = EnsembleAttributor(net, method="if", **common).fit(X_train, y_train)
    g = w[:, None] * phi
    inv = _damped_inv(g.T @ g / len(g), 0.1, len(g))
    np.testing.assert_allclose(inf.attribute(X_test, y_test), phi_test @ inv @ g.T, rtol=2e-3, atol=1e-4)


def test_grad_cos_is_bounded_cosine(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), method="grad_cos", proj_dim=None, random_state=0)
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    assert np.all(np.abs(A) <= 1 + 1e-5)
    module = attr.estimators_[0].module_
    g_train, _ = _exact_gradients(module, X_train[:5], y_train[:5])
    g_test, _ = _exact_gradients(module, X_test[:3], y_test[:3])
    cos = (g_test / np.linalg.norm(g_test, axis=1, keepdims=True)) @ (
        g_train / np.linalg.norm(g_train, axis=1, keepdims=True)
    ).T
    np.testing.assert_allclose(A[:3, :5], cos, rtol=1e-4, atol=1e-5)


def test_same_random_state_same_attributions_whatever_batch_size_and_jobs(digits):
    X_train, X_test, y_train, y_test = digits
    base = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=128, random_state=3)
    A1 = clone(base).fit(X_train, y_train).attribute(X_test, y_test)
    A2 = clone(base).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_array_equal(A1, A2)
    A3 = clone(base).set_params(batch_size=7).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_allclose(A1, A3, rtol=1e-4, atol=1e-5 * np.abs(A1).max())
    A4 = clone(base).set_params(n_jobs=2).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_allclose(A1, A4, rtol=1e-4, atol=1e-5 * np.abs(A1).max())
    A5 = clone(base).set_params(random_state=4).fit(X_train, y_train).attribute(X_test, y_test)
    assert not np.allclose(A1, A5)


def test_fit_leaves_torch_global_rng_alone(digits):
    X_train, _, y_train, _ = digits
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16, random_state=0).fit(X_train, y_train)
    np.testing.assert_array_equal(torch.rand(3), expected)


def test_self_attribute_is_the_diagonal(fitted_trak, digits):
    X_train, _, y_train, _ = digits
    A = fitted_trak.attribute(X_train, y_train)
    np.testing.assert_allclose(fitted_trak.self_attribute(), np.diag(A), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["trak", "grad_cos"])
def test_most_influential_streams_to_the_dense_top_k(digits, method):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), method=method, proj_dim=64, random_state=0).fit(
        X_train, y_train
    )
    A = attr.attribute(X_test, y_test)
    from sklearn import config_context

    row_bytes = 8 * (2 * len(X_test) + 64)
    with config_context(working_memory=16 * row_bytes / 2**20):  # 16 training samples a chunk
        top = attr.most_influential(X_test, y_test, k=5)
    assert top.proponents.shape == top.opponents.shape == (len(X_test), 5)
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-A, axis=1)[:, :5], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(top.opponent_scores, np.sort(A, axis=1)[:, :5], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        np.take_along_axis(A, top.proponents, 1), top.proponent_scores, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.take_along_axis(A, top.opponents, 1), top.opponent_scores, rtol=1e-5, atol=1e-7
    )


def test_transform_attributes_the_ensemble_prediction(fitted_trak, digits):
    _, X_test, _, _ = digits
    with torch.no_grad():
        probs = sum(
            torch.softmax(n.module_.eval()(torch.from_numpy(X_test)), -1) for n in fitted_trak.estimators_
        )
    predicted = fitted_trak.classes_[probs.argmax(-1).numpy()]
    np.testing.assert_allclose(
        fitted_trak.transform(X_test), fitted_trak.attribute(X_test, predicted), rtol=1e-6
    )
    assert fitted_trak.get_feature_names_out()[0] == "ensembleattributor0"


def test_torch_and_pandas_inputs_match_numpy_and_are_not_modified(fitted_trak, digits):
    X_train, X_test, y_train, y_test = digits
    X_copy, y_copy = X_test.copy(), y_test.copy()
    A = fitted_trak.attribute(X_test, y_test)
    np.testing.assert_array_equal(X_test, X_copy)
    np.testing.assert_array_equal(y_test, y_copy)
    np.testing.assert_allclose(fitted_trak.attribute(torch.from_numpy(X_test), torch.from_numpy(y_test)), A)
    np.testing.assert_allclose(
        fitted_trak.attribute(X_test.astype(np.float64), pd.Series(y_test)), A, rtol=1e-6
    )


def test_string_labels_and_pandas_frames(digits):
    X_train, X_test, y_train, y_test = digits
    names = np.array(list("abcdefghij"))
    frame = pd.DataFrame(X_train, columns=[f"px{i}" for i in range(64)])
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0).fit(frame, names[y_train])
    np.testing.assert_array_equal(attr.classes_, names)
    test_frame = pd.DataFrame(X_test, columns=frame.columns)
    A = attr.attribute(test_frame, names[y_test])
    B = (
        EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0)
        .fit(X_train, y_train)
        .attribute(X_test, y_test)
    )
    np.testing.assert_allclose(A, B, rtol=1e-5)
    with pytest.raises(ValueError, match="not in the training data"):
        attr.attribute(test_frame, np.array(["z"] * len(X_test)))


@pytest.mark.parametrize("method", ["trak", "if", "grad_dot"])
def test_regressor(regression_data, method):
    X_train, X_test, y_train, y_test = regression_data
    attr = EnsembleAttributor(make_regressor_net(), method=method, n_models=2, random_state=0).fit(
        X_train, y_train
    )
    A = attr.attribute(X_test, y_test)
    assert A.shape == (len(X_test), len(X_train)) and np.all(np.isfinite(A))
    assert not hasattr(attr, "classes_")
    # the target is the prediction, which does not depend on y
    np.testing.assert_allclose(attr.transform(X_test), A)
    # TRAK's reweighting for the squared error is the residual: -dL/df = 2 (y - f)
    module = attr.estimators_[0].module_.eval()
    with torch.no_grad():
        f = module(torch.from_numpy(X_train))[:, 0].numpy()
    np.testing.assert_allclose(attr.train_residuals_[0], 2 * (y_train - f), rtol=1e-4, atol=1e-5)


def test_nll_loss_on_probabilities(digits):
    X_train, X_test, y_train, y_test = digits

    class SoftmaxMLP(MLP):
        def forward(self, X):
            return torch.softmax(super().forward(X), -1)

    net = make_classifier_net(criterion=torch.nn.NLLLoss)
    net.module = SoftmaxMLP
    attr = EnsembleAttributor(net, method="grad_dot", proj_dim=64, random_state=0).fit(X_train, y_train)
    with torch.no_grad():
        p = attr.estimators_[0].module_(torch.from_numpy(X_train))
    expected = 1 - p[torch.arange(len(y_train)), torch.from_numpy(y_train)].numpy()
    np.testing.assert_allclose(attr.train_residuals_[0], expected, rtol=1e-3, atol=1e-5)
    assert np.all(np.isfinite(attr.attribute(X_test, y_test)))


def test_layers_restrict_the_gradient(digits):
    X_train, _, y_train, _ = digits
    last = EnsembleAttributor(make_classifier_net(), layers="last", proj_dim=None, random_state=0).fit(
        X_train, y_train
    )
    assert last.train_features_.shape[2] == 16 * 10 + 10
    named = EnsembleAttributor(make_classifier_net(), layers=["layers.0"], proj_dim=None, random_state=0).fit(
        X_train, y_train
    )
    assert named.train_features_.shape[2] == 64 * 16 + 16
    with pytest.raises(ValueError, match="not modules of the net"):
        EnsembleAttributor(make_classifier_net(), layers=["nope"], random_state=0).fit(X_train, y_train)


def test_score_is_lds_and_cached(digits, monkeypatch):
    import sktda.model_selection as ms

    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=64, random_state=0, score_n_subsets=5).fit(
        X_train, y_train
    )
    attr.score(X_test, y_test)
    calls = []
    monkeypatch.setattr(ms, "_subset_outputs", lambda *a, **k: calls.append(1))
    other = clone(attr).set_params(method="grad_dot").fit(X_train, y_train)
    other.score(X_test, y_test)
    assert calls == []  # the ground truth came from the cache


@pytest.mark.slow
def test_ensembled_trak_attributions_predict_retraining(digits):
    from sktda.metrics import linear_datamodeling_score
    from sktda.model_selection import subset_retraining

    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=10)
    truth = subset_retraining(net, X_train, y_train, X_test, y_test, n_subsets=20, random_state=0)
    single = EnsembleAttributor(net, n_models=1, proj_dim=512, random_state=0).fit(X_train, y_train)
    ensemble = EnsembleAttributor(net, n_models=4, proj_dim=512, random_state=0).fit(X_train, y_train)
    lds_single = linear_datamodeling_score(single.attribute(X_test, y_test), *truth)
    lds_ensemble = linear_datamodeling_score(ensemble.attribute(X_test, y_test), *truth)
    assert lds_ensemble > 0.1
    assert lds_ensemble > lds_single


# ----------------------------------------------------------------- bad input
def test_bad_parameters_and_estimators(digits):
    X_train, X_test, y_train, y_test = digits
    with pytest.raises(ValueError, match="method"):
        EnsembleAttributor(make_classifier_net(), method="shapley").fit(X_train, y_train)
    with pytest.raises(ValueError, match="ensemble"):
        EnsembleAttributor(make_classifier_net(), ensemble="bagging").fit(X_train, y_train)
    with pytest.raises(TypeError, match="skorch"):
        EnsembleAttributor(torch.nn.Linear(64, 10)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="NeuralNetClassifier is trained with L1Loss, a regression loss"):
        EnsembleAttributor(make_classifier_net(criterion=torch.nn.L1Loss)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="one score per class"):
        EnsembleAttributor(make_classifier_net(module__n_outputs=5), proj_dim=8).fit(X_train, y_train)


def test_bad_data(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=16, random_state=0)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        attr.fit(X_train, y_train[:-1])
    X_nan = X_train.copy()
    X_nan[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attr.fit(X_nan, y_train)
    X_inf = X_train.copy()
    X_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="infinity"):
        attr.fit(X_inf, y_train)
    with pytest.raises(ValueError, match="minimum of 2"):
        attr.fit(X_train[:1], y_train[:1])
    with pytest.raises(ValueError, match="requires y"):
        attr.fit(X_train, None)
    with pytest.raises(NotFittedError):
        attr.transform(X_test)
    attr.fit(X_train, y_train)
    with pytest.raises(ValueError, match="features"):
        attr.attribute(X_test[:, :10], y_test)
    with pytest.raises(ValueError, match="samples but y has"):
        attr.attribute(X_test, y_test[:-2])
    with pytest.raises(ValueError, match=r"k == 151, must be <= 150"):
        attr.most_influential(X_test, y_test, k=len(X_train) + 1)


def test_dense_matrix_that_cannot_fit_is_refused(fitted_trak, digits, monkeypatch):
    _, X_test, _, y_test = digits
    n_train = fitted_trak.train_features_.shape[1]
    monkeypatch.setattr(features_module, "available_memory", lambda: 16 * len(X_test) * n_train - 1)
    with pytest.raises(ValueError, match="most_influential"):
        fitted_trak.attribute(X_test, y_test)
    monkeypatch.setattr(features_module, "available_memory", lambda: 2 * 16 * len(X_test) * n_train)
    with pytest.warns(ResourceWarning, match="most_influential"):
        fitted_trak.attribute(X_test, y_test)
    assert fitted_trak.most_influential(X_test, y_test, k=3).proponents.shape == (len(X_test), 3)


def test_float16_and_memory_mapped_features(digits, tmp_path):
    X_train, X_test, y_train, y_test = digits
    base = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=64, random_state=0)
    A = clone(base).fit(X_train, y_train).attribute(X_test, y_test)
    half = clone(base).set_params(feature_dtype="float16").fit(X_train, y_train)
    assert half.train_features_.dtype == np.float16
    np.testing.assert_allclose(half.attribute(X_test, y_test), A, rtol=1e-2, atol=1e-2 * np.abs(A).max())
    assert clone(base).fit(X_train, y_train).train_features_.dtype == np.float32  # "auto", in memory
    mapped = clone(base).set_params(features_dir=str(tmp_path), n_jobs=2, feature_dtype="float32")
    mapped.fit(X_train, y_train)
    assert isinstance(mapped.train_features_, np.memmap)
    assert len(list(tmp_path.glob("train_features_*.npy"))) == 1
    auto = clone(base).set_params(features_dir=str(tmp_path / "auto")).fit(X_train, y_train)
    assert auto.train_features_.dtype == np.float16  # "auto", on disk
    np.testing.assert_allclose(auto.attribute(X_test, y_test), A, rtol=1e-2, atol=1e-2 * np.abs(A).max())
    np.testing.assert_allclose(mapped.attribute(X_test, y_test), A, rtol=1e-4, atol=1e-5 * np.abs(A).max())
    np.testing.assert_allclose(
        mapped.self_attribute(), clone(base).fit(X_train, y_train).self_attribute(), rtol=1e-4
    )


def test_features_go_to_disk_when_memory_is_short(digits, monkeypatch):
    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0)
    short_memory(monkeypatch, attr, X_train, y_train)
    assert isinstance(attr.fit(X_train, y_train).train_features_, np.memmap)


def test_a_fit_that_cannot_fit_in_memory_is_refused_before_training(digits, monkeypatch, tmp_path):
    import sktda._ensembles as ensembles

    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=32, features_dir=str(tmp_path))
    plan = attr.plan_memory(X_train, y_train)
    needed = plan.models + plan.inputs + plan.curvature + plan.working + plan.features  # residuals
    monkeypatch.setattr(ensembles, "fit_net", lambda *a, **k: pytest.fail("trained before the check"))
    monkeypatch.setattr(features_module, "available_memory", lambda: needed - 1)
    with pytest.raises(ValueError, match=r"would hold about .* MiB .*\(models .* MiB, inputs .*curvature"):
        attr.fit(X_train, y_train)
    assert not hasattr(attr, "ensemble_")


# ------------------------------------------------------------ value tests
def _last_layer(module, X, y):
    """Exact last-layer target gradients and residuals 1 - p of one trained module."""
    g, w = _exact_gradients(module, X, y)
    n_last = sum(p.numel() for p in list(module.parameters())[-2:])
    return g[:, -n_last:], w


def _damped_inv(gram, damping, n_rows):
    """The inverse with damping relative to the mean nonzero eigenvalue."""
    k = gram.shape[0]
    return np.linalg.inv(gram + damping * np.trace(gram) / min(n_rows, k) * np.eye(k))


@pytest.mark.parametrize("hidden", [16, 8], ids=["k>n", "k<n"])
def test_two_member_trak_and_if_match_numpy(digits, hidden):
    """The damping's unit, the mean nonzero eigenvalue trace / min(n, k), with the
    output layer's k = 10 x (hidden + 1) features above and below n = 150."""
    X_train, X_test, y_train, y_test = digits
    common = dict(n_models=2, proj_dim=None, layers="last", damping=0.1, normalize=None, random_state=0)
    net = make_classifier_net(module__hidden=(hidden,))
    trak = EnsembleAttributor(net, method="trak", **common).fit(X_train, y_train)
    inf = EnsembleAttributor(net, method="if", **common).fit(X_train, y_train)
    assert (trak.train_features_.shape[2] > len(X_train)) == (hidden == 16)
    kernels, residuals, influences = [], [], []
    for net in trak.estimators_:
        phi, w = _last_layer(net.module_, X_train, y_train)
        phi_test, _ = _last_layer(net.module_, X_test, y_test)
        kernels.append(phi_test @ _damped_inv(phi.T @ phi, 0.1, len(phi)) @ phi.T)
        residuals.append(w)
        g = w[:, None] * phi
        influences.append(phi_test @ _damped_inv(g.T @ g / len(g), 0.1, len(g)) @ g.T)
    # TRAK: the kernel averaged over members, times the ensemble-mean 1 - p
    expected = np.mean(kernels, 0) * np.mean(residuals, 0)[None, :]
    np.testing.assert_allclose(trak.attribute(X_test, y_test), expected, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(inf.attribute(X_test, y_test), np.mean(influences, 0), rtol=2e-3, atol=1e-4)


def test_unmasked_dropout_trak_matches_numpy(digits):
    X_train, X_test, y_train, y_test = digits
    common = dict(
        ensemble="dropout",
        n_masks=3,
        proj_dim=None,
        layers="last",
        damping=0.1,
        normalize=None,
        random_state=0,
    )
    net = make_classifier_net(module__dropout=0.5)
    fast = EnsembleAttributor(net, mask_gradients=False, **common).fit(X_train, y_train)
    masked = EnsembleAttributor(net, mask_gradients=True, **common).fit(X_train, y_train)
    # the residual is 1 - p averaged over the same masks as the masked members use
    np.testing.assert_allclose(fast.train_residuals_[0], masked.train_residuals_.mean(0), rtol=1e-5)
    assert not np.allclose(fast.train_residuals_[0], masked.train_residuals_[0])
    # the gradients come from the unmasked model
    phi, _ = _last_layer(fast.estimators_[0].module_, X_train, y_train)
    phi_test, _ = _last_layer(fast.estimators_[0].module_, X_test, y_test)
    expected = phi_test @ _damped_inv(phi.T @ phi, 0.1, len(phi)) @ phi.T * fast.train_residuals_[0][None, :]
    np.testing.assert_allclose(fast.attribute(X_test, y_test), expected, rtol=2e-3, atol=1e-4)


def test_grad_cos_takes_the_sign_of_the_residual(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    attr = EnsembleAttributor(make_regressor_net(), method="grad_cos", proj_dim=None, random_state=0)
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    module = attr.estimators_[0].module_.eval()

    def grads(X):
        out = []
        for x in torch.from_numpy(X):
            g = torch.autograd.grad(module(x[None])[0, 0], list(module.parameters()))
            out.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(out).double().numpy()

    g_train, g_test = grads(X_train), grads(X_test)
    residual = attr.train_residuals_[0]
    assert (residual < 0).any() and (residual > 0).any()
    unit = lambda g: g / np.linalg.norm(g, axis=1, keepdims=True)  # noqa: E731
    expected = unit(g_test) @ (np.sign(residual)[:, None] * unit(g_train)).T
    np.testing.assert_allclose(A, expected, rtol=1e-4, atol=1e-5)


def test_tracin_under_a_learning_rate_schedule(digits):
    from skorch.callbacks import LRScheduler
    from torch.optim.lr_scheduler import StepLR

    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=4, callbacks=[LRScheduler(StepLR, step_size=1, gamma=0.5)])
    attr = EnsembleAttributor(
        net, method="tracin", n_checkpoints=2, proj_dim=None, layers="last", normalize=None, random_state=0
    )
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    checkpoints = attr.ensemble_.models[0].checkpoints
    assert [epoch for epoch, _, _ in checkpoints] == [2, 4]
    lrs = [lr for _, lr, _ in checkpoints]
    assert lrs[0] == pytest.approx(4 * lrs[1])  # two halvings between epochs 2 and 4
    expected = 0
    module = MLP(n_features=64, n_outputs=10, hidden=(16,))
    for _, lr, state in checkpoints:
        module.load_state_dict(state)
        phi, w = _last_layer(module, X_train, y_train)
        phi_test, _ = _last_layer(module, X_test, y_test)
        expected = expected + lr * phi_test @ (w[:, None] * phi).T
    np.testing.assert_allclose(A, expected, rtol=1e-3, atol=1e-6)


def test_each_model_keeps_its_own_tracin_checkpoints(digits):
    """Every model's last checkpoint is its own final weights (a callback shared by
    the models would give all of them the last model's checkpoints)."""
    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(
        make_classifier_net(max_epochs=2), method="tracin", n_models=3, n_checkpoints=1, proj_dim=16
    )
    attr.fit(X_train, y_train)
    for model in attr.ensemble_.models:
        ((_, _, state),) = model.checkpoints
        for name, value in model.net.module_.state_dict().items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=0)


def test_score_is_the_lds_against_subset_retraining(digits):
    from sktda.metrics import linear_datamodeling_score
    from sktda.model_selection import subset_retraining

    X_train, X_test, y_train, y_test = digits
    net = make_classifier_net(max_epochs=3)
    attr = EnsembleAttributor(net, proj_dim=64, random_state=2, score_n_subsets=4, score_subset_fraction=0.6)
    attr.fit(X_train, y_train)
    truth = subset_retraining(
        net, X_train, y_train, X_test, y_test, n_subsets=4, subset_fraction=0.6, random_state=2
    )
    expected = linear_datamodeling_score(attr.attribute(X_test, y_test), truth.subsets, truth.outputs)
    assert attr.score(X_test, y_test) == expected


def test_fitted_attributor_does_not_depend_on_the_callers_arrays(digits):
    X_train, X_test, y_train, y_test = digits
    X, y = X_train.copy(), y_train.copy()
    attr = EnsembleAttributor(
        make_classifier_net(max_epochs=2), proj_dim=32, score_n_subsets=3, random_state=0
    )
    attr.fit(X, y)
    before = attr.score(X_test, y_test), attr.attribute(X_test, y_test)
    X[:] = 0
    y[:] = 0
    after = attr.score(X_test, y_test), attr.attribute(X_test, y_test)
    assert before[0] == after[0]
    np.testing.assert_array_equal(before[1], after[1])


def test_chunked_gram_and_self_attribution_equal_the_unchunked(digits):
    from sklearn import config_context

    X_train, X_test, y_train, y_test = digits
    for method in ("trak", "if"):
        base = EnsembleAttributor(
            make_classifier_net(), method=method, n_models=2, proj_dim=64, normalize=None, random_state=0
        )
        whole = clone(base).fit(X_train, y_train)
        with config_context(working_memory=4 * 8 * 3 * 64 * 2 / 2**20):
            chunked = clone(base).fit(X_train, y_train)  # row chunks of a few samples
            self_chunked = chunked.self_attribute()
        A = whole.attribute(X_test, y_test)
        np.testing.assert_allclose(
            chunked.attribute(X_test, y_test), A, rtol=1e-4, atol=1e-5 * np.abs(A).max()
        )
        np.testing.assert_allclose(self_chunked, whole.self_attribute(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            self_chunked, np.diag(whole.attribute(X_train, y_train)), rtol=1e-3, atol=1e-6
        )


def test_same_random_state_bitwise_whatever_n_jobs(digits):
    X_train, X_test, y_train, y_test = digits
    base = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=128, random_state=3)
    A1 = clone(base).fit(X_train, y_train).attribute(X_test, y_test)
    A2 = clone(base).set_params(n_jobs=2).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_array_equal(A1, A2)


@pytest.mark.parametrize("batch_size", [7, 16])
def test_a_language_model_bitwise_whatever_n_jobs(batch_size):
    """Chunks of a few sequences make matrix products of a few rows, which torch's
    CPU kernels round differently with another thread count: the featurizing
    threads are fixed by the members, never by n_jobs."""
    tokens = np.random.default_rng(0).integers(0, 13, (60, 9))
    X, y = tokens[:, :-1], tokens[:, 1:]
    base = EnsembleAttributor(
        make_language_model_net(13), n_models=2, proj_dim=32, batch_size=batch_size, random_state=0
    )
    sequential = clone(base).fit(X[:50], y[:50])
    parallel = clone(base).set_params(n_jobs=2).fit(X[:50], y[:50])
    np.testing.assert_array_equal(sequential.train_features_, parallel.train_features_)
    np.testing.assert_array_equal(sequential.attribute(X[50:], y[50:]), parallel.attribute(X[50:], y[50:]))


# ------------------------------------------------------------- bad input II
def test_features_dir_that_cannot_be_written_is_refused_before_training(digits, tmp_path, monkeypatch):
    import sktda._ensembles as ensembles

    X_train, _, y_train, _ = digits
    monkeypatch.setattr(ensembles, "fit_net", lambda *a, **k: pytest.fail("trained before the check"))
    a_file = tmp_path / "file.npy"
    a_file.write_text("x")
    for bad in (a_file, a_file / "below"):
        with pytest.raises(ValueError, match="features_dir=.*cannot hold the training features"):
            EnsembleAttributor(make_classifier_net(), features_dir=str(bad)).fit(X_train, y_train)


def test_feature_files_are_replaced_on_refit_and_removed_with_the_estimator(digits, tmp_path, monkeypatch):
    import gc

    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16, features_dir=str(tmp_path))
    attr.fit(X_train, y_train)
    first = list(tmp_path.glob("*.npy"))
    attr.fit(X_train, y_train)
    second = list(tmp_path.glob("*.npy"))
    assert len(first) == len(second) == 1 and first != second
    del attr
    gc.collect()
    assert list(tmp_path.glob("*.npy")) == []

    # temporary directories, used when memory is short, go too
    short_memory(
        monkeypatch, EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16), X_train, y_train
    )
    made = []
    real_mkdtemp = features_module.tempfile.mkdtemp
    monkeypatch.setattr(
        features_module.tempfile, "mkdtemp", lambda **k: made.append(real_mkdtemp(**k)) or made[-1]
    )
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16).fit(X_train, y_train)
    attr.fit(X_train, y_train)
    import os

    assert len(made) == 2 and not os.path.exists(made[0]) and os.path.exists(made[1])
    copy = __import__("pickle").loads(__import__("pickle").dumps(attr))  # a copy owns no file
    del attr
    gc.collect()
    assert not os.path.exists(made[1])
    assert copy.self_attribute().shape == (len(X_train),)


def test_damping_zero_warns_for_methods_that_invert(digits):
    X_train, _, y_train, _ = digits
    with pytest.warns(UserWarning, match="damping=0"):
        EnsembleAttributor(make_classifier_net(max_epochs=1), method="if", damping=0, proj_dim=16).fit(
            X_train, y_train
        )


def test_non_finite_scores_are_refused(fitted_trak, digits):
    import copy

    _, X_test, _, y_test = digits
    broken = copy.deepcopy(fitted_trak)
    shards = broken._store.shards
    shards.features = shards.features.copy()
    shards.features[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="attribution scores are not finite"):
        broken.attribute(X_test, y_test)
    with pytest.raises(ValueError, match="not finite"):
        broken.self_attribute()


def test_a_refused_fit_sets_nothing(digits):
    """Parameters are checked before any data: a refused fit leaves an unfitted
    estimator (no classes_ from data validation)."""
    from sklearn.utils.validation import check_is_fitted

    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(make_classifier_net(), method="tracin", ensemble="lora")
    with pytest.raises(ValueError, match="method='tracin' needs checkpoints"):
        attr.fit(X_train, y_train)
    assert not hasattr(attr, "classes_")
    with pytest.raises(NotFittedError):
        check_is_fitted(attr)


def test_a_relative_features_dir_is_resolved_when_fitting(digits, tmp_path, monkeypatch):
    """The file is found and removed whatever the working directory later is."""
    import gc

    X_train, _, y_train, _ = digits
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    attr = EnsembleAttributor(make_classifier_net(max_epochs=1), proj_dim=16, features_dir="features")
    attr.fit(X_train[:50], y_train[:50])
    (stored,) = (tmp_path / "run" / "features").glob("*.npy")
    assert os.path.isabs(attr.train_features_.filename)
    monkeypatch.chdir(tmp_path)  # elsewhere: a relative path would now point nowhere
    del attr
    gc.collect()
    assert not stored.exists()


def test_predicted_labels_are_classes_seen_in_fit(digits):
    """A module with more outputs than the classes seen in fit: transform attributes
    the most probable *class*, never an output that is no class."""
    X_train, X_test, y_train, _ = digits
    seen = y_train < 5
    attr = EnsembleAttributor(make_classifier_net(), proj_dim=32, random_state=0)
    attr.fit(X_train[seen], y_train[seen])
    head = [m for m in attr.estimators_[0].module_.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias[9] += 100.0  # output 9 now wins every argmax, and is no class
    predicted = attr.ensemble_.predict_labels(X_test[:10], attr._task, 256, torch.device("cpu"), 5)
    assert set(predicted) <= set(range(5))
    np.testing.assert_array_equal(
        attr.transform(X_test[:10]), attr.attribute(X_test[:10], attr.classes_[predicted])
    )
