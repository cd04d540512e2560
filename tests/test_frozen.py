"""The model the user already has: FrozenEstimator, the user's own ensembles and
checkpoints, frozen_net for modules trained elsewhere, labels on the module's
output units, half precision, and what retrains."""

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNet, NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor

from sktda import EnsembleAttributor, OutlierGradientDetector, frozen_net
from sktda.metrics import linear_datamodeling_score
from sktda.model_selection import removal_effect, subset_retraining
from sktda.models import MLP, TokenCrossEntropy

from .conftest import bert_config, make_classifier_net


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def user_net(digits):
    """A net the user trained with skorch, as skorch leaves it (train mode on)."""
    X, _, y, _ = digits
    net = make_classifier_net(module__dropout=0.2, max_epochs=8)
    torch.manual_seed(0)
    return net.fit(X, y)


def _margin_gradients(module, X, y):
    """Per-sample gradients of the correct-class margin, by autograd, sample by sample."""
    training = module.training
    module.eval()
    rows = []
    for x, c in zip(torch.as_tensor(X), torch.as_tensor(y)):
        z = module(x[None])[0]
        f = z[c] - torch.logsumexp(torch.cat([z[:c], z[c + 1 :]]), 0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, list(module.parameters()))]))
    module.train(training)
    return torch.stack(rows).numpy()


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("missing", [None, 3])
def test_frozen_attribution_is_of_the_given_weights(digits, user_net, monkeypatch, missing):
    X, _, y, _ = digits
    keep = np.ones(len(y), bool) if missing is None else y != missing
    before, training = _state(user_net.module_), user_net.module_.training
    monkeypatch.setattr(NeuralNet, "fit", lambda *a, **k: pytest.fail("a skorch training loop ran"))
    attr = EnsembleAttributor(FrozenEstimator(user_net), method="grad_dot", proj_dim=None, normalize=None)
    attr.fit(X[keep], y[keep])
    reference = _margin_gradients(user_net.module_, X[keep], y[keep])
    # with a class missing from the data, labels still address the module's own units
    assert _cosines(attr.train_features_[0], reference).min() >= 0.9999
    np.testing.assert_array_equal(attr.classes_, np.arange(10))
    assert attr.estimators_[0] is user_net and attr.n_members_ == 1
    assert _same(before, _state(user_net.module_)) and user_net.module_.training == training


def test_labels_must_be_the_module_output_units(digits, user_net):
    X, _, y, _ = digits
    attr = EnsembleAttributor(FrozenEstimator(user_net), proj_dim=32)
    with pytest.raises(ValueError, match=r"output units 0\.\.9.*class indices"):
        attr.fit(X, y + 5)
    with pytest.raises(ValueError, match="output units"):
        attr.fit(X, np.array(list("abcdefghij"))[y])
    fitted = attr.fit(X[y < 5], y[y < 5])
    with pytest.raises(ValueError, match="not in the training data"):
        fitted.attribute(X[:3], [1, 2, 12])
    assert fitted.attribute(X[:3], [7, 8, 9]).shape == (3, int((y < 5).sum()))  # units the data lacks


def test_a_fitted_net_without_frozen_estimator_is_refit(digits, user_net):
    X, _, y, _ = digits
    attr = EnsembleAttributor(user_net, proj_dim=32, random_state=0).fit(X, y)
    assert attr.estimators_[0] is not user_net
    assert not _same(_state(user_net.module_), _state(attr.estimators_[0].module_))


@pytest.mark.parametrize("ensemble", ["dropout", "lora"])
def test_post_hoc_ensembles_equal_the_trained_ones(digits, ensemble):
    """Dropout masks and LoRA adapters on a frozen net are those the same seed puts
    on the model sktda trains: the post-hoc ensemble is the seed's strategy."""
    X_train, X_test, y_train, y_test = digits
    params = dict(ensemble=ensemble, n_masks=3, n_adapters=2, lora_epochs=2, proj_dim=64, random_state=0)
    trained = EnsembleAttributor(make_classifier_net(), **params).fit(X_train, y_train)
    base = _state(trained.estimators_[0].module_)
    frozen = EnsembleAttributor(FrozenEstimator(trained.estimators_[0]), **params).fit(X_train, y_train)
    assert frozen.n_members_ == trained.n_members_ == (3 if ensemble == "dropout" else 2)
    np.testing.assert_allclose(frozen.attribute(X_test, y_test), trained.attribute(X_test, y_test), rtol=1e-6)
    assert _same(base, _state(frozen.estimators_[0].module_))
    if ensemble == "dropout":
        assert frozen.costs_["train_seconds"] < trained.costs_["train_seconds"]


def test_the_users_own_ensemble(digits):
    X_train, X_test, y_train, y_test = digits
    trained = EnsembleAttributor(make_classifier_net(), n_models=2, proj_dim=64, random_state=0)
    trained.fit(X_train, y_train)
    own = [FrozenEstimator(net) for net in trained.estimators_]
    frozen = EnsembleAttributor(own, proj_dim=64, random_state=0).fit(X_train, y_train)
    np.testing.assert_allclose(frozen.attribute(X_test, y_test), trained.attribute(X_test, y_test), rtol=1e-6)
    assert frozen.n_members_ == 2 and clone(frozen).estimator[0] is own[0]
    with pytest.raises(ValueError, match="n_models=3"):
        EnsembleAttributor(own, n_models=3).fit(X_train, y_train)
    with pytest.raises(TypeError, match="each must be a sklearn.frozen.FrozenEstimator"):
        EnsembleAttributor([make_classifier_net()]).fit(X_train, y_train)
    with pytest.raises(TypeError, match="Every model of your own ensemble"):
        EnsembleAttributor([own[0], make_classifier_net()]).fit(X_train, y_train)
    other = make_classifier_net(module__hidden=(8,)).fit(X_train, y_train)
    other.set_params(criterion=torch.nn.NLLLoss)
    with pytest.raises(ValueError, match="same kind of net"):
        EnsembleAttributor([own[0], FrozenEstimator(other)]).fit(X_train, y_train)
    with pytest.raises(ValueError, match="not fitted"):
        EnsembleAttributor(FrozenEstimator(make_classifier_net())).fit(X_train, y_train)


def test_the_users_own_checkpoints(digits, tmp_path):
    X_train, X_test, y_train, y_test = digits
    params = dict(method="tracin", n_checkpoints=3, proj_dim=64, random_state=0)
    trained = EnsembleAttributor(make_classifier_net(), **params).fit(X_train, y_train)
    recorded = trained.ensemble_.models[0].checkpoints
    paths = []
    for epoch, _, state in recorded:  # as skorch's Checkpoint callback writes f_params
        paths.append(tmp_path / f"params_{epoch}.pt")
        torch.save(state, paths[-1])
    net = FrozenEstimator(trained.estimators_[0])
    expected = trained.attribute(X_test, y_test)
    for given in ([(s, lr) for _, lr, s in recorded], [(p, lr) for p, (_, lr, _) in zip(paths, recorded)]):
        frozen = EnsembleAttributor(net, checkpoints=given, **params).fit(X_train, y_train)
        np.testing.assert_allclose(frozen.attribute(X_test, y_test), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="frozen net comes without them"):
        EnsembleAttributor(net, **params).fit(X_train, y_train)
    state = dict(recorded[0][2])
    state.pop("layers.0.bias")
    with pytest.raises(ValueError, match=r"missing \['layers.0.bias'\]"):
        EnsembleAttributor(net, checkpoints=[(state, 0.1)], **params).fit(X_train, y_train)
    with pytest.raises(ValueError, match="learning rate"):
        EnsembleAttributor(net, checkpoints=[(recorded[0][2], -1.0)], **params).fit(X_train, y_train)
    with pytest.raises(ValueError, match="cannot load"):
        EnsembleAttributor(net, checkpoints=[(tmp_path / "nowhere.pt", 0.1)], **params).fit(X_train, y_train)
    with pytest.raises(ValueError, match="one per frozen net"):
        EnsembleAttributor([net, net], checkpoints=[(recorded[0][2], 0.1)], **params).fit(X_train, y_train)
    with pytest.raises(ValueError, match="checkpoints are the training checkpoints"):
        EnsembleAttributor(make_classifier_net(), checkpoints=[(state, 0.1)]).fit(X_train, y_train)


def test_frozen_detector(digits):
    X, _, y, _ = digits
    for n_checkpoints in (None, 3):
        trained = OutlierGradientDetector(make_classifier_net(), n_checkpoints=n_checkpoints, random_state=0)
        trained.fit(X, y)
        given = None
        if n_checkpoints:
            given = [(s, lr) for _, lr, s in trained.ensemble_.models[0].checkpoints]
        frozen = OutlierGradientDetector(
            FrozenEstimator(trained.estimators_[0]), checkpoints=given, random_state=0
        ).fit(X, y)
        np.testing.assert_allclose(frozen.train_scores_, trained.train_scores_, rtol=1e-6)
        np.testing.assert_array_equal(frozen.labels_, trained.labels_)


def test_retraining_uses_the_frozen_nets_recipe(digits, user_net):
    X_train, X_test, y_train, y_test = digits
    recipe = clone(user_net)
    kwargs = dict(n_subsets=3, random_state=0)
    expected = subset_retraining(recipe, X_train, y_train, X_test, y_test, **kwargs).outputs
    given = subset_retraining(FrozenEstimator(user_net), X_train, y_train, X_test, y_test, **kwargs).outputs
    np.testing.assert_array_equal(given, expected)
    attr = EnsembleAttributor(FrozenEstimator(user_net), proj_dim=64, score_n_subsets=3, random_state=0)
    assert np.isfinite(attr.fit(X_train, y_train).score(X_test, y_test))

    # trained in place: no recipe unless one is given
    module = MLP(n_features=64, n_outputs=10, hidden=(16,), dropout=0.2)
    frozen = frozen_net(module, torch.nn.CrossEntropyLoss, lr=0.05, max_epochs=4)
    attr = EnsembleAttributor(frozen, ensemble="dropout", proj_dim=64, score_n_subsets=3, random_state=0)
    attr.fit(X_train, y_train)
    with pytest.raises(ValueError, match="retrain_estimator=net"):
        attr.score(X_test, y_test)
    with pytest.raises(ValueError, match="trained instance itself"):
        subset_retraining(frozen, X_train, y_train, X_test, y_test, **kwargs)
    with pytest.raises(ValueError, match="trained instance itself"):
        removal_effect(attr, X_test[:3], y_test[:3], k=2, n_retrains=1, flip_sizes=None)
    attr.set_params(retrain_estimator=recipe)
    truth = subset_retraining(recipe, X_train, y_train, X_test, y_test, **kwargs)
    lds = linear_datamodeling_score(attr.fit(X_train, y_train).attribute(X_test, y_test), *truth)
    assert attr.score(X_test, y_test) == pytest.approx(lds)
    effect = removal_effect(attr, X_test[:3], y_test[:3], k=2, n_retrains=1, flip_sizes=None)
    assert np.isfinite(effect.attributed).all() and np.isfinite(effect.random).all()
    with pytest.raises(ValueError, match="max_epochs=0: retraining it on subsets trains nothing"):
        subset_retraining(clone(recipe).set_params(max_epochs=0), X_train, y_train, X_test, y_test, **kwargs)
    with pytest.raises(ValueError, match="Leave retrain_estimator=None"):
        EnsembleAttributor(make_classifier_net(), retrain_estimator=recipe).fit(X_train, y_train)


def test_frozen_net_wraps_a_module_trained_by_a_plain_loop(digits):
    X, X_test, y, y_test = digits
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 10)
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(torch.as_tensor(X)), torch.as_tensor(y)).backward()
        optimizer.step()
    before = _state(module)
    frozen = frozen_net(module, torch.nn.CrossEntropyLoss, lr=0.05)
    assert isinstance(frozen, FrozenEstimator) and frozen.estimator.module_ is module
    attr = EnsembleAttributor(frozen, ensemble="dropout", n_masks=3, proj_dim=64, random_state=0).fit(X, y)
    assert attr.attribute(X_test, y_test).shape == (len(y_test), len(y))
    det = OutlierGradientDetector(frozen, random_state=0).fit(X, y)
    assert det.labels_.shape == (len(y),)
    assert _same(before, _state(module))
    assert isinstance(
        frozen_net(torch.nn.Linear(3, 1), torch.nn.BCEWithLogitsLoss).estimator, NeuralNetBinaryClassifier
    )
    assert isinstance(frozen_net(torch.nn.Linear(3, 1), torch.nn.MSELoss).estimator, NeuralNetRegressor)
    assert isinstance(frozen_net(torch.nn.Linear(3, 2)).estimator, NeuralNetClassifier)
    assert type(frozen_net(torch.nn.Linear(3, 2), TokenCrossEntropy).estimator) is NeuralNet
    with pytest.raises(ValueError, match="module__"):
        frozen_net(module, module__hidden=3)
    with pytest.raises(TypeError, match="nn.Module instance"):
        frozen_net(MLP)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_modules_are_featurized(digits, user_net, dtype):
    X, X_test, y, y_test = digits
    half = clone(user_net).initialize()
    half.module_.load_state_dict(user_net.module_.state_dict())
    half.module_.to(dtype)
    before = _state(half.module_)
    params = dict(method="grad_dot", proj_dim=256, normalize=None, random_state=0)
    low = EnsembleAttributor(FrozenEstimator(half), **params).fit(X, y)
    # computed in float32 on the rounded weights: nothing is lost beyond the rounding
    rounded = clone(user_net).initialize()
    rounded.module_.load_state_dict(
        {k: v.to(dtype).float() for k, v in user_net.module_.state_dict().items()}
    )
    same = EnsembleAttributor(FrozenEstimator(rounded), **params).fit(X, y)
    np.testing.assert_allclose(low.train_features_, same.train_features_, rtol=1e-5, atol=1e-7)
    full = EnsembleAttributor(FrozenEstimator(user_net), **params).fit(X, y)
    assert np.median(_cosines(low.train_features_[0], full.train_features_[0])) >= 0.999
    assert low.train_features_.dtype == np.float32 and np.isfinite(low.attribute(X_test, y_test)).all()
    lora = EnsembleAttributor(
        FrozenEstimator(half), ensemble="lora", n_adapters=2, lora_epochs=1, proj_dim=64
    )
    assert np.isfinite(lora.fit(X, y).attribute(X_test, y_test)).all()
    assert _same(before, _state(half.module_))


def test_pretrained_labels_map_to_the_module_outputs(digits, user_net):
    """pretrained=True fine-tunes weights that already map outputs to classes: a
    class missing from the fine-tuning data must not shift the others."""
    X, _, y, _ = digits
    keep = y != 0
    net = NeuralNetClassifier(
        clone(user_net).initialize().module_,
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=1,
        lr=0.0,
        train_split=None,
        verbose=0,
    )
    net.module.load_state_dict(user_net.module_.state_dict())
    attr = EnsembleAttributor(net, pretrained=True, method="grad_dot", proj_dim=None, normalize=None)
    attr.fit(X[keep], y[keep])
    np.testing.assert_array_equal(attr.classes_, np.arange(10))
    reference = _margin_gradients(user_net.module_, X[keep], y[keep])
    assert _cosines(attr.train_features_[0], reference).min() >= 0.9999


def test_a_saved_transformers_model_reaches_a_frozen_net(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(bert_config(num_hidden_layers=1)).save_pretrained(tmp_path)
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    X = {"input_ids": rng.integers(1, 40, (24, 8)), "attention_mask": np.ones((24, 8), dtype=np.int64)}
    X["attention_mask"][::2, 6:] = 0
    y = rng.integers(0, 2, 24)  # class 2 never appears
    before = _state(model)
    frozen = frozen_net(model, torch.nn.CrossEntropyLoss, lr=0.01)
    attr = EnsembleAttributor(frozen, method="grad_dot", proj_dim=128, random_state=0).fit(X, y)
    test = {k: v[:4] for k, v in X.items()}
    assert attr.attribute(test, y[:4]).shape == (4, 24) and list(attr.classes_) == [0, 1, 2]
    assert _same(before, _state(model))


def test_a_peft_model_is_attributed_through_its_adapters(digits, user_net):
    from peft import LoraConfig, get_peft_model

    X, X_test, y, y_test = digits
    base = clone(user_net).initialize().module_
    base.load_state_dict(user_net.module_.state_dict())
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["layers.0"]))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    before = _state(model)
    attr = EnsembleAttributor(frozen_net(model), method="grad_dot", proj_dim=None).fit(X[y < 8], y[y < 8])
    assert attr.train_features_.shape == (1, int((y < 8).sum()), adapters)
    np.testing.assert_array_equal(attr.classes_, np.arange(10))
    assert np.isfinite(attr.attribute(X_test, y_test)).all() and _same(before, _state(model))
