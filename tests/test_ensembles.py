import numpy as np
import pytest
import torch

from sktda import EnsembleAttributor
from sktda._ensembles import DropoutEnsemble, FixedMaskDropout, LoraEnsemble, TrainedModel
from sktda._featurize import featurize
from sktda._gradients import VmapEngine
from sktda._nets import fit_net
from sktda._projection import IdentityProjector
from sktda._task import NetTask

from .conftest import make_classifier_net


def _strategy(cls, **params):
    defaults = dict(
        layers=None,
        n_masks=3,
        n_adapters=2,
        dropout_rate=None,
        mask_gradients=True,
        lora_rank=2,
        lora_target_modules=None,
        lora_epochs=2,
        pretrained=False,
    )
    return cls.from_params({**defaults, **params})


@pytest.fixture(scope="module")
def trained(digits):
    X_train, _, y_train, _ = digits
    return fit_net(
        make_classifier_net(module__dropout=0.5),
        X_train,
        y_train,
        seed=0,
        device=torch.device("cpu"),
        task=NetTask(True),
    )


def _features(member, X, y):
    projector = IdentityProjector({k: v.numel() for k, v in member.params.items()})
    engine = VmapEngine(member, NetTask(True), torch.device("cpu"), projector)
    return featurize(engine, torch.from_numpy(X), torch.from_numpy(y), 64)


def test_dropout_members_have_fixed_distinct_masks(trained, digits):
    X_train, _, y_train, _ = digits
    strategy = _strategy(DropoutEnsemble)
    sample = torch.from_numpy(X_train[:1])
    members = strategy.members(TrainedModel(trained, 5), sample)
    again = strategy.members(TrainedModel(trained, 5), sample)
    assert len(members) == 3
    masks = [m.frozen["layers.2.mask"] for m in members]
    assert masks[0].shape == (16,)
    for mask in masks:
        assert set(torch.unique(mask).tolist()) <= {0.0, 2.0}  # rate 0.5: kept units scaled by 2
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    for a, b in zip(members, again):
        torch.testing.assert_close(a.frozen["layers.2.mask"], b.frozen["layers.2.mask"], rtol=0, atol=0)
    # the same member gives the same gradients for the same samples in two calls
    f1 = _features(members[0], X_train[:10], y_train[:10])
    f2 = _features(again[0], X_train[:10], y_train[:10])
    np.testing.assert_array_equal(f1.phi, f2.phi)
    assert not np.allclose(f1.phi, _features(members[1], X_train[:10], y_train[:10]).phi)
    # one mask for every sample: the member's output is the network with that mask applied
    module = trained.module_
    x = torch.from_numpy(X_train[:4])
    expected = module.layers[3](torch.relu(module.layers[0](x)) * masks[0])
    torch.testing.assert_close(members[0].forward(members[0].params, x), expected)
    assert isinstance(members[0].module.layers[2], FixedMaskDropout)
    assert isinstance(trained.module_.layers[2], torch.nn.Dropout)  # the trained net is untouched


def test_dropout_rate_override_and_unmasked_variant(trained, digits):
    X_train, _, y_train, _ = digits
    sample = torch.from_numpy(X_train[:1])
    members = _strategy(DropoutEnsemble, n_masks=200, dropout_rate=0.2).members(
        TrainedModel(trained, 0), sample
    )
    dropped = np.mean([float((m.frozen["layers.2.mask"] == 0).float().mean()) for m in members])
    assert dropped == pytest.approx(0.2, abs=0.02)
    masked = _strategy(DropoutEnsemble).members(TrainedModel(trained, 1), sample)
    (unmasked,) = _strategy(DropoutEnsemble, mask_gradients=False).members(TrainedModel(trained, 1), sample)
    assert torch.equal(unmasked.frozen["layers.2.mask"], torch.ones(16))
    f = _features(unmasked, X_train[:20], y_train[:20])
    mean_weight = np.mean([_features(m, X_train[:20], y_train[:20]).residual for m in masked], axis=0)
    np.testing.assert_allclose(f.residual, mean_weight, rtol=1e-5)
    plain = trained.module_
    with torch.no_grad():
        p = torch.softmax(plain(torch.from_numpy(X_train[:20])), 1)[
            torch.arange(20), torch.from_numpy(y_train[:20])
        ]
    assert not np.allclose(f.residual, 1 - p.numpy())


def test_dropout_ensemble_in_the_attributor(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(), ensemble="dropout", n_models=2, n_masks=3, proj_dim=64, random_state=0
    ).fit(X_train, y_train)
    assert attr.n_members_ == 6 and attr.train_features_.shape == (6, len(X_train), 64)
    assert attr.costs_["n_members"] == 6 and len(attr.estimators_) == 2
    A = attr.attribute(X_test, y_test)
    assert A.shape == (len(X_test), len(X_train)) and np.all(np.isfinite(A))
    fast = EnsembleAttributor(
        make_classifier_net(),
        ensemble="dropout",
        n_masks=3,
        mask_gradients=False,
        proj_dim=64,
        random_state=0,
    ).fit(X_train, y_train)
    assert fast.train_features_.shape[0] == 1


def test_dropout_needs_dropout_layers(digits):
    X_train, _, y_train, _ = digits
    net = make_classifier_net(module__dropout=0.0)
    with pytest.raises(ValueError, match="needs dropout layers"):
        EnsembleAttributor(net, ensemble="dropout").fit(X_train, y_train)


def test_lora_members_differentiate_adapters_only(digits):
    X_train, X_test, y_train, y_test = digits
    attr = EnsembleAttributor(
        make_classifier_net(),
        ensemble="lora",
        n_adapters=2,
        lora_rank=2,
        lora_epochs=2,
        proj_dim=None,
        random_state=0,
    ).fit(X_train, y_train)
    # rank 2 on the hidden layer (64 -> 16): A is 2 x 64, B is 16 x 2
    assert attr.train_features_.shape == (2, len(X_train), 2 * 64 + 16 * 2)
    assert attr.n_members_ == 2
    net, model = attr.estimators_[0], attr.ensemble_.models[0]
    assert len(model.adapters) == 2
    a, b = model.adapters
    assert set(a) == {"layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight"}
    assert not torch.equal(a["layers.0.lora_B.default.weight"], b["layers.0.lora_B.default.weight"])
    assert torch.any(a["layers.0.lora_B.default.weight"] != 0)  # B moved away from peft's zero init
    base = sum(p.numel() * 4 for p in net.module_.parameters())
    adapters = 2 * (2 * 64 + 16 * 2) * 4
    assert attr.costs_["model_bytes"] == base + adapters
    assert not any("lora" in n for n, _ in net.module_.named_parameters())  # base stays plain


def test_lora_member_is_the_fine_tuned_adapted_module(digits):
    """A member's forward and features equal those of the module that fine-tuning
    produced, with gradients on the adapters only."""
    from sktda._ensembles import derive_seed
    from sktda._nets import fine_tune

    X_train, _, y_train, _ = digits
    X, y = torch.from_numpy(X_train[:30]), torch.from_numpy(y_train[:30])
    strategy = _strategy(LoraEnsemble, n_adapters=2)
    model = strategy.fit(
        make_classifier_net(max_epochs=2),
        X_train,
        y_train,
        seed=7,
        device=torch.device("cpu"),
        task=NetTask(True),
    )
    members = strategy.members(model, X[:1])
    net = model.net
    for j, member in enumerate(members):
        seed = derive_seed(7, 2, j)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tuned = strategy._with_adapter(net.module_)
        tuned = fine_tune(net, tuned, X_train, y_train, epochs=2, seed=seed, device=torch.device("cpu"))
        with torch.no_grad():
            torch.testing.assert_close(member.forward(member.params, X), tuned(X))
        # the adapters moved: the member is not the base model
        with torch.no_grad():
            assert not torch.allclose(tuned(X), net.module_(X))
        # features: the exact gradient of the margin with respect to the adapters only
        adapters = [p for p in tuned.parameters() if p.requires_grad]
        assert len(adapters) == 2 and {n for n, p in tuned.named_parameters() if p.requires_grad} == set(
            member.params
        )
        expected = []
        for x, label in zip(X, y):
            margin, _ = NetTask(True).target_and_residual(tuned(x[None]), label[None])
            expected.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin[0], adapters)]))
        np.testing.assert_allclose(
            _features(member, X.numpy(), y.numpy()).phi, torch.stack(expected), rtol=1e-4, atol=1e-6
        )


def test_lora_refuses_layers_and_oversized_ranks(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="layers=.*lora_target_modules"):
        EnsembleAttributor(make_classifier_net(), ensemble="lora", layers="last").fit(X_train, y_train)
    with pytest.raises(ValueError, match=r"lora_rank=17 exceeds the smallest dimension \(16\)"):
        EnsembleAttributor(make_classifier_net(), ensemble="lora", lora_rank=17).fit(X_train, y_train)


def test_lora_seeded(digits):
    X_train, X_test, y_train, y_test = digits
    kwargs = dict(ensemble="lora", n_adapters=2, lora_epochs=1, proj_dim=32, random_state=4)
    A1 = EnsembleAttributor(make_classifier_net(), **kwargs).fit(X_train, y_train).attribute(X_test, y_test)
    torch.manual_seed(0)
    A2 = EnsembleAttributor(make_classifier_net(), **kwargs).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_array_equal(A1, A2)


def test_lora_bad_configurations(digits):
    X_train, _, y_train, _ = digits
    with pytest.raises(ValueError, match="nn.Linear but the output layer"):
        EnsembleAttributor(make_classifier_net(module__hidden=()), ensemble="lora").fit(X_train, y_train)
    with pytest.raises(ValueError, match="not modules"):
        EnsembleAttributor(make_classifier_net(), ensemble="lora", lora_target_modules=["x"]).fit(
            X_train, y_train
        )
    with pytest.raises(ValueError, match="tracin"):
        EnsembleAttributor(make_classifier_net(), ensemble="lora", method="tracin").fit(X_train, y_train)


def test_lora_target_modules(digits):
    X_train, _, y_train, _ = digits
    strategy = _strategy(LoraEnsemble, lora_target_modules=["layers.3"])
    model = strategy.fit(
        make_classifier_net(max_epochs=1),
        X_train,
        y_train,
        seed=0,
        device=torch.device("cpu"),
        task=NetTask(True),
    )
    (member, _) = strategy.members(model, torch.from_numpy(X_train[:1]))
    assert set(member.params) == {"layers.3.lora_A.default.weight", "layers.3.lora_B.default.weight"}
