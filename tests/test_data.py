"""Every input a skorch net accepts, through both estimators: N-d images, integer
token ids, dicts of arrays and SliceDict; and the target parameter."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetClassifier
from skorch.helper import SliceDict

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda.model_selection import subset_retraining
from sktda.models import ConvNet, TokenTransformer

from .conftest import make_classifier_net, make_language_model_net, make_regressor_net

COMMON = dict(criterion=torch.nn.CrossEntropyLoss, lr=0.05, batch_size=32, train_split=None, verbose=0)


@pytest.fixture(scope="module")
def images(digits):
    X_train, X_test, y_train, y_test = digits
    return X_train.reshape(-1, 1, 8, 8), X_test.reshape(-1, 1, 8, 8), y_train, y_test


@pytest.fixture(scope="module")
def tokens():
    """Label = whether token 1 appears more often than token 2."""
    rng = np.random.default_rng(0)
    X = rng.integers(0, 8, size=(120, 10)).astype(np.int64)
    y = ((X == 1).sum(1) > (X == 2).sum(1)).astype(np.int64)
    return X[:100], X[100:], y[:100], y[100:]


def cnn_net(**kwargs):
    return NeuralNetClassifier(ConvNet, **{**COMMON, "module__channels": (4, 8), "max_epochs": 3, **kwargs})


def transformer_net(**kwargs):
    params = dict(
        module__vocab_size=8, module__n_outputs=2, module__d_model=16, module__n_heads=2, max_epochs=2
    )
    return NeuralNetClassifier(TokenTransformer, **{**COMMON, **params, **kwargs})


def _grads(module, X, y, target):
    out = []
    for x, label in zip(torch.as_tensor(X), torch.as_tensor(y)):
        f = target(module(x[None]), label[None])[0]
        out.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, list(module.parameters()))]))
    return torch.stack(out).double().numpy()


def _log_prob(out, y):
    return torch.log_softmax(out, -1).gather(-1, y[:, None])[:, 0]


# ------------------------------------------------------------------ images
def test_cnn_on_images_matches_autograd(images):
    X_train, X_test, y_train, y_test = images
    attr = EnsembleAttributor(
        cnn_net(), method="grad_dot", target="log_prob", proj_dim=None, normalize=None, random_state=0
    )
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    assert not hasattr(attr, "n_features_in_")
    module = attr.estimators_[0].module_.eval()
    expected = _grads(module, X_test, y_test, _log_prob) @ _grads(module, X_train, y_train, _log_prob).T
    np.testing.assert_allclose(A, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match=r"per-sample shape.*\(1, 8, 8\)"):
        attr.attribute(X_test[:, :, :4], y_test)
    bad = X_train.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        attr.fit(bad, y_train)


def test_detector_and_subset_retraining_on_images(images):
    X_train, X_test, y_train, y_test = images
    det = OutlierGradientDetector(cnn_net(), n_checkpoints=2, random_state=0).fit(X_train, y_train)
    assert det.predict(X_test, y_test).shape == (len(X_test),)
    X_kept, y_kept = det.fit_resample(torch.from_numpy(X_train), y_train)
    assert isinstance(X_kept, torch.Tensor) and X_kept.shape[1:] == (1, 8, 8)
    torch.testing.assert_close(X_kept, torch.from_numpy(X_train[det.sample_indices_]))
    truth = subset_retraining(cnn_net(max_epochs=1), X_train, y_train, X_test, y_test, n_subsets=3)
    assert truth.outputs.shape == (3, len(X_test)) and np.all(np.isfinite(truth.outputs))


# ------------------------------------------------------------------ tokens
def test_token_ids_reach_the_embedding_as_integers(tokens):
    X_train, X_test, y_train, y_test = tokens
    attr = EnsembleAttributor(transformer_net(), n_models=2, proj_dim=64, random_state=0).fit(
        X_train, y_train
    )
    assert attr.n_features_in_ == 10  # a 2-D table of ids
    A = attr.attribute(X_test, y_test)
    assert A.shape == (len(X_test), len(X_train)) and np.all(np.isfinite(A))
    top = attr.most_influential(X_test, None, k=3)
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-attr.transform(X_test), 1)[:, :3], rtol=1e-5)
    det = OutlierGradientDetector(transformer_net(), n_checkpoints=None, random_state=0).fit(X_train, y_train)
    assert det.score_samples(X_test, y_test).shape == (len(X_test),)
    # without an embedding, integer tables are features and become float32
    MLPattr = EnsembleAttributor(make_classifier_net(module__n_features=10), proj_dim=16, random_state=0)
    assert np.isfinite(MLPattr.fit(X_train, y_train).attribute(X_test, y_test)).all()


def test_dict_and_slicedict_inputs(tokens):
    X_train, X_test, y_train, y_test = tokens

    def as_dict(X, kind=dict):
        return kind(input_ids=X, attention_mask=np.ones_like(X))

    kwargs = dict(method="grad_dot", proj_dim=64, random_state=0)
    plain = EnsembleAttributor(transformer_net(), **kwargs).fit(X_train, y_train)
    keyed = EnsembleAttributor(transformer_net(), **kwargs).fit(as_dict(X_train), y_train)
    # an all-ones mask changes nothing: the same attributions as the plain array
    A = plain.attribute(X_test, y_test)
    np.testing.assert_allclose(
        keyed.attribute(as_dict(X_test), y_test), A, rtol=1e-4, atol=1e-6 * np.abs(A).max()
    )
    with pytest.raises(ValueError, match="per-sample shape"):
        keyed.attribute({"input_ids": X_test}, y_test)
    search = GridSearchCV(
        EnsembleAttributor(transformer_net(max_epochs=1), proj_dim=32, score_n_subsets=3, random_state=0),
        {"method": ["trak", "grad_dot"]},
        cv=2,
    ).fit(as_dict(X_train, SliceDict), y_train)
    assert (
        search.best_params_ == search.cv_results_["params"][np.argmax(search.cv_results_["mean_test_score"])]
    )
    det = OutlierGradientDetector(transformer_net(), contamination=0.2, n_checkpoints=None, random_state=0)
    for kind in (dict, SliceDict):
        X_kept, y_kept = det.fit_resample(as_dict(X_train, kind), y_train)
        assert type(X_kept) is kind
        np.testing.assert_array_equal(X_kept["input_ids"], X_train[det.sample_indices_])
        np.testing.assert_array_equal(y_kept, y_train[det.sample_indices_])


# ----------------------------------------------------------------- targets
def test_callable_target_on_test_samples_loss_gradient_on_training_samples(digits):
    X_train, X_test, y_train, y_test = digits

    def first_logit(out, y):
        return out[:, 0]

    attr = EnsembleAttributor(
        make_classifier_net(), method="grad_dot", target=first_logit, proj_dim=None, normalize=None
    )
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    module = attr.estimators_[0].module_.eval()
    expected = _grads(module, X_test, y_test, first_logit) @ _grads(module, X_train, y_train, _log_prob).T
    np.testing.assert_allclose(A, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    np.testing.assert_array_equal(attr.train_residuals_, 1)  # Q = I
    with pytest.raises(ValueError, match=r"shape \(n_samples,\)"):
        EnsembleAttributor(make_classifier_net(), target=lambda out, y: out).fit(X_train, y_train).attribute(
            X_test, y_test
        )


def test_loss_target_for_a_regressor(regression_data):
    X_train, X_test, y_train, y_test = regression_data
    attr = EnsembleAttributor(
        make_regressor_net(), method="grad_dot", target="loss", proj_dim=None, normalize=None
    )
    A = attr.fit(X_train, y_train).attribute(X_test, y_test)
    module = attr.estimators_[0].module_.eval()

    def minus_loss(out, y):
        return -((out[:, 0] - y) ** 2)

    expected = _grads(module, X_test, y_test, minus_loss) @ _grads(module, X_train, y_train, minus_loss).T
    np.testing.assert_allclose(A, expected, rtol=1e-3, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match="needs a classification loss"):
        EnsembleAttributor(make_regressor_net(), target="log_prob").fit(X_train, y_train)


def test_language_model_sequence_log_likelihood():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 8, size=(60, 9)).astype(np.int64)
    inputs, next_tokens = X[:, :-1], X[:, 1:].copy()
    next_tokens[:5, -2:] = -100  # padding, ignored
    net = make_language_model_net(8, module__d_model=16, max_epochs=2, lr=0.05, batch_size=16)
    attr = EnsembleAttributor(net, method="grad_dot", proj_dim=64, random_state=0).fit(
        inputs[:50], next_tokens[:50]
    )
    assert attr._task.is_sequence and not hasattr(attr, "classes_")
    A = attr.attribute(inputs[50:], next_tokens[50:])
    assert A.shape == (10, 50) and np.all(np.isfinite(A))
    # the target: the sum of the label log-probabilities over the tokens that are not padding
    module = attr.estimators_[0].module_.eval()
    with torch.no_grad():
        log_p = torch.log_softmax(module(torch.from_numpy(inputs[:5])), -1)
    y = torch.from_numpy(next_tokens[:5])
    expected = (log_p.gather(-1, y.clamp_min(0)[..., None])[..., 0] * (y != -100)).sum(1)
    task = attr._task.as_test()
    torch.testing.assert_close(task.target_and_residual(module(torch.from_numpy(inputs[:5])), y)[0], expected)
    # predicted next tokens when y is None, and the same target in subset retraining
    assert attr.transform(inputs[50:]).shape == (10, 50)
    truth = subset_retraining(net, inputs[:50], next_tokens[:50], inputs[50:], next_tokens[50:], n_subsets=3)
    assert truth.outputs.shape == (3, 10) and np.all(truth.outputs < 0)


def test_relatif_divides_columns_by_root_self_influence(digits):
    X_train, X_test, y_train, y_test = digits
    base = dict(n_models=2, proj_dim=64, random_state=0)
    raw = EnsembleAttributor(make_classifier_net(), normalize=None, **base).fit(X_train, y_train)
    rel = EnsembleAttributor(make_classifier_net(), normalize="relatif", **base).fit(X_train, y_train)
    expected = raw.attribute(X_test, y_test) / np.sqrt(np.abs(raw.self_attribute()))[None, :]
    np.testing.assert_allclose(rel.attribute(X_test, y_test), expected, rtol=1e-4)
    np.testing.assert_allclose(rel.self_attribute(), raw.self_attribute(), rtol=1e-6)
    top = rel.most_influential(X_test, y_test, k=3)
    np.testing.assert_allclose(top.proponent_scores, -np.sort(-expected, 1)[:, :3], rtol=1e-4)
