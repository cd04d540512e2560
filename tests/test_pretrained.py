"""pretrained=True: the ensemble fine-tunes a module instance's weights."""

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._nets import module_bytes
from sktda.model_selection import subset_retraining
from sktda.models import MLP


@pytest.fixture(scope="module")
def pretrained(digits):
    """An MLP trained on the first half of the digits: the "pretrained" weights."""
    X_train, _, y_train, _ = digits
    net = NeuralNetClassifier(
        MLP,
        module__n_features=64,
        module__n_outputs=10,
        module__hidden=(16,),
        module__dropout=0.2,
        criterion=torch.nn.CrossEntropyLoss,
        max_epochs=10,
        lr=0.1,
        train_split=None,
        verbose=0,
    )
    torch.manual_seed(0)
    return net.fit(X_train[:75], y_train[:75]).module_


def _fine_tuning_net(module, **kwargs):
    params = dict(criterion=torch.nn.CrossEntropyLoss, max_epochs=3, lr=0.05, train_split=None, verbose=0)
    return NeuralNetClassifier(module, **{**params, **kwargs})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_pretrained_needs_a_module_instance(digits):
    X, _, y, _ = digits
    net = _fine_tuning_net(MLP, module__n_features=64, module__n_outputs=10)
    for estimator in (
        EnsembleAttributor(net, pretrained=True),
        OutlierGradientDetector(net, pretrained=True),
    ):
        with pytest.raises(ValueError, match="pretrained=True .* nn.Module instance"):
            estimator.fit(X, y)
    with pytest.raises(ValueError, match="pretrained=True"):
        subset_retraining(net, X, y, X[:5], y[:5], n_subsets=3, pretrained=True)


def test_independent_members_fine_tune_the_pretrained_weights(digits, pretrained):
    X_train, X_test, y_train, y_test = digits
    before = _state(pretrained)
    # lr=0: every member is exactly the pretrained module
    frozen = EnsembleAttributor(
        _fine_tuning_net(pretrained, lr=0.0), n_models=2, pretrained=True, proj_dim=32, random_state=0
    ).fit(X_train[75:], y_train[75:])
    assert all(_equal(before, _state(e.module_)) for e in frozen.estimators_)
    attr = EnsembleAttributor(
        _fine_tuning_net(pretrained), n_models=2, pretrained=True, proj_dim=32, random_state=0
    ).fit(X_train[75:], y_train[75:])
    a, b = (_state(e.module_) for e in attr.estimators_)
    assert not _equal(a, before) and not _equal(a, b)  # fine-tuned, each with its own seed
    assert _equal(before, _state(pretrained))  # the user's module is untouched
    assert np.isfinite(attr.attribute(X_test, y_test)).all()


def test_lora_members_adapt_the_frozen_pretrained_module(digits, pretrained):
    from peft import get_peft_model_state_dict

    X_train, X_test, y_train, y_test = digits
    before = _state(pretrained)
    attr = EnsembleAttributor(
        _fine_tuning_net(pretrained),
        ensemble="lora",
        n_models=2,
        n_adapters=2,
        lora_rank=2,
        lora_epochs=2,
        pretrained=True,
        proj_dim=16,
        random_state=0,
    ).fit(X_train[75:], y_train[75:])
    # no base training: every base is the pretrained module itself
    assert all(_equal(before, _state(e.module_)) for e in attr.estimators_)
    members = attr.ensemble_.members()
    head = [n for n, m in pretrained.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    head_params = {f"{head}.weight", f"{head}.bias"}
    assert len(members) == 4
    for member in members:  # the adapters, and the output layer trained in full (a new head must learn)
        adapter = set(member.params) - head_params
        assert head_params <= set(member.params) and all("lora_" in name for name in adapter)
        assert len(adapter) == len(get_peft_model_state_dict(member.module))
        assert not torch.equal(member.params[f"{head}.weight"], pretrained.get_submodule(head).weight)
    adapters = [a for model in attr.ensemble_.models for a in model.adapters]
    assert not torch.equal(*(next(iter(a.values())) for a in adapters[:2]))
    # model bytes: the adapters and output layers, plus the pretrained base once
    adapter_bytes = sum(t.numel() * t.element_size() for a in adapters for t in a.values())
    assert attr.costs_["model_bytes"] == module_bytes(pretrained) + adapter_bytes
    assert adapter_bytes == 4 * sum(t.numel() * t.element_size() for t in members[0].params.values())
    assert np.isfinite(attr.attribute(X_test, y_test)).all()


def test_dropout_members_come_from_one_fine_tune(digits, pretrained):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        _fine_tuning_net(pretrained),
        ensemble="dropout",
        n_masks=3,
        pretrained=True,
        proj_dim=32,
        random_state=0,
    ).fit(X_train[75:], y_train[75:])
    assert len(attr.estimators_) == 1 and attr.costs_["n_members"] == 3
    assert not _equal(_state(pretrained), _state(attr.estimators_[0].module_))
    assert attr.attribute(X_test, y_test).shape == (len(X_test), 75)


def test_a_users_peft_model_is_attributed_through_its_adapters(digits, pretrained):
    import copy

    from peft import LoraConfig, get_peft_model

    X_train, X_test, y_train, y_test = digits
    model = get_peft_model(
        copy.deepcopy(pretrained), LoraConfig(r=2, lora_alpha=2, target_modules=["layers.0"])
    )
    net = _fine_tuning_net(model)
    attr = EnsembleAttributor(net, n_models=2, pretrained=True, proj_dim=16, random_state=0)
    attr.fit(X_train[75:], y_train[75:])
    (member, _) = attr.ensemble_.members()
    assert member.params and all("lora_" in name for name in member.params)
    assert np.isfinite(attr.attribute(X_test, y_test)).all()
    with pytest.raises(ValueError, match="already a peft.PeftModel"):
        EnsembleAttributor(net, ensemble="lora", pretrained=True).fit(X_train, y_train)
    with pytest.raises(ValueError, match="only parameters that the net does not train"):
        EnsembleAttributor(net, layers=["base_model.model.layers.3"], pretrained=True).fit(X_train, y_train)
    detector = OutlierGradientDetector(net, layers=None, n_checkpoints=None, pretrained=True, random_state=0)
    assert detector.fit(X_train[75:], y_train[75:]).train_scores_.shape == (75,)


def test_subset_retraining_fine_tunes_the_pretrained_weights(digits, pretrained):
    X_train, X_test, y_train, y_test = digits
    before = _state(pretrained)
    truth = subset_retraining(
        _fine_tuning_net(pretrained, lr=0.0),
        X_train[75:],
        y_train[75:],
        X_test,
        y_test,
        n_subsets=3,
        pretrained=True,
    )
    # with lr=0 every subset's model is the pretrained one: identical outputs
    np.testing.assert_allclose(truth.outputs, np.repeat(truth.outputs[:1], 3, 0), rtol=1e-6)
    assert _equal(before, _state(pretrained))


def test_a_causal_classifier_starts_from_a_language_models_weights():
    from sktda.models import TokenTransformer

    torch.manual_seed(0)
    shape = dict(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_len=6, dropout=0.0)
    language_model = TokenTransformer(**shape).eval()
    x = torch.randint(0, 11, (4, 6))
    for causal in (True, False):
        # with the language model's head, a causal classifier is its mean next-token logits
        classifier = TokenTransformer(**shape, n_outputs=11, causal=causal).eval()
        classifier.load_state_dict(language_model.state_dict())
        same = torch.allclose(classifier(x), language_model(x).mean(1), atol=1e-6)
        assert same == causal


def test_the_detector_takes_a_peft_models_new_head(digits, pretrained):
    """A user's peft fine-tune of a classifier trains a copy of its head
    (modules_to_save): layers="last" differentiates that copy, not the frozen original."""
    import copy

    from peft import LoraConfig, get_peft_model

    X_train, _, y_train, _ = digits
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["layers.0"], modules_to_save=["layers.3"])
    net = _fine_tuning_net(get_peft_model(copy.deepcopy(pretrained), config))
    detector = OutlierGradientDetector(net, layers="last", n_checkpoints=2, pretrained=True, random_state=0)
    detector.fit(X_train[75:], y_train[75:])
    members = detector.ensemble_.members()
    assert all(
        set(m.params)
        == {f"base_model.model.layers.3.modules_to_save.default.{p}" for p in ("weight", "bias")}
        for m in members
    )
    assert np.isfinite(detector.train_scores_).all()


@pytest.mark.parametrize("ensemble", ["independent", "lora"])
def test_per_layer_curvature_on_a_pretrained_module(digits, pretrained, ensemble):
    """EK-FAC on fine-tuned members and on LoRA members: each adapter's ``lora_A``
    and ``lora_B`` is a layer with its own Kronecker block."""
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        _fine_tuning_net(pretrained),
        method="ekfac",
        ensemble=ensemble,
        n_adapters=2,
        lora_rank=2,
        lora_epochs=1,
        pretrained=True,
        proj_dim=16,
        random_state=0,
    ).fit(X_train[75:], y_train[75:])
    # fine-tunes: the hidden layer and the head; LoRA: the adapter's A and B, and the head
    assert [len(state.kron) for state in attr._store.states] == [
        3 if ensemble == "lora" else 2
    ] * attr.n_members_
    assert np.isfinite(attr.attribute(X_test, y_test)).all()
