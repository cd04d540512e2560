import warnings

import numpy as np
import pytest
import torch
from torch import nn

from sktda._data import take
from sktda._ensembles import DropoutEnsemble, LoraEnsemble, Member, TrainedModel, member_from_module
from sktda._featurize import featurize
from sktda._gradients import GradientConfig, LayerEngine, VmapEngine, make_engine
from sktda._layers import assign_routes
from sktda._nets import fit_net
from sktda._projection import IdentityProjector, KroneckerBlock, LayerProjector, kronecker_factors
from sktda._task import NetTask
from sktda.models import MLP

from .conftest import make_classifier_net

CPU = torch.device("cpu")
TASK = NetTask(is_classifier=True)


# dropout and LoRA strategies' parameters for the engine tests
STRATEGY_PARAMS = dict(
    layers=None,
    n_masks=2,
    dropout_rate=0.5,
    mask_gradients=True,
    n_adapters=1,
    lora_rank=2,
    lora_target_modules=None,
    lora_epochs=1,
    pretrained=False,
)


def _config(proj_dim, path="auto", batch_size=256):
    return GradientConfig(task=TASK, proj_dim=proj_dim, path=path, batch_size=batch_size)


def _member(module, layers=None, seed=0):
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return member_from_module(module, layers, seed)


def _data(n=12, d=6, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def _projector(module, proj_dim, seed=0):
    params = dict(module.named_parameters())
    routes, leftover = assign_routes(module, params)
    assert not leftover
    return LayerProjector(routes, {k: v.numel() for k, v in params.items()}, proj_dim, seed)


def _same_features(member, X, y, proj_dim, task=TASK, traced=(), rowwise=()):
    """The per-layer engine's features equal vmap's under the same projection, with
    the routes checked on a probe, only the parameters ``traced`` left to the
    operations that use them and ``rowwise`` to row-by-row autograd."""
    config = GradientConfig(task=task, proj_dim=proj_dim, path="layers")
    engine = make_engine(member, config, (take(X, slice(0, 3)), y[:3]))
    assert isinstance(engine, LayerEngine)
    assert set(engine.traced) == set(traced) and set(engine.rowwise) == set(rowwise)
    fast = featurize(engine, X, y, batch_size=5)
    slow = featurize(VmapEngine(member, task, CPU, engine.projector), X, y, batch_size=5)
    assert np.abs(slow.phi).max() > 0
    np.testing.assert_allclose(fast.phi, slow.phi, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast.residual, slow.residual, rtol=1e-5)
    return fast


def test_kronecker_factors():
    assert kronecker_factors(2048) == (32, 64)
    assert kronecker_factors(1024) == (32, 32)
    assert kronecker_factors(30) == (5, 6)
    assert kronecker_factors(7) == (3, 3)  # prime: near-square, 7 of the 9 products kept
    assert kronecker_factors(257) == (17, 16)
    assert kronecker_factors(2 * 127) == (16, 16)  # 2 x 127 is too lopsided


def _projected(block, full):
    return sum(block.project(name, g) for name, g in full.items())


def test_factor_projection_equals_projection_of_the_full_gradient():
    block = KroneckerBlock("fc.weight", 3, 5, (3, 4), seed=0)
    block.add_bias("fc.bias")
    a, d = torch.randn(4, 5), torch.randn(4, 3)
    full = {"fc.weight": torch.einsum("bo,bi->boi", d, a), "fc.bias": d}
    torch.testing.assert_close(
        block.combine(d @ block.p_left, block.right(a, "fc.bias")), _projected(block, full)
    )
    # positions in the middle dimensions are summed, as in the gradient
    a3, d3 = torch.randn(4, 7, 5), torch.randn(4, 7, 3)
    full3 = {"fc.weight": torch.einsum("bto,bti->boi", d3, a3), "fc.bias": d3.sum(1)}
    torch.testing.assert_close(
        block.combine(d3 @ block.p_left, block.right(a3, "fc.bias")),
        _projected(block, full3),
        rtol=1e-4,
        atol=1e-5,
    )
    # a factor of batch 1 (a call made once for the whole batch) is broadcast
    torch.testing.assert_close(
        block.combine(d3 @ block.p_left, block.right(a3[:1])),
        block.combine(d3 @ block.p_left, block.right(a3[:1].expand(4, -1, -1))),
    )


@pytest.mark.parametrize("proj_dim", [4096, 4099])  # exact factors, and a prime kept in part
def test_kronecker_projection_preserves_inner_products(proj_dim):
    fc = nn.Linear(64, 64, bias=False)
    g = torch.randn(10, 64, 64, generator=torch.Generator().manual_seed(0))
    exact = torch.einsum("aoi,boi->ab", g, g)
    # unbiased: the mean over projections of the projected squared norms is the exact one
    norms = torch.stack([_projector(fc, proj_dim, seed=s)({"weight": g}).pow(2).sum(1) for s in range(20)])
    np.testing.assert_allclose(norms.mean(0), torch.diagonal(exact), rtol=0.06)


@pytest.mark.parametrize("proj_dim", [7, 29, 257])
def test_prime_proj_dim_projects_like_its_neighbours(proj_dim):
    module = MLP(n_features=6, n_outputs=4, hidden=(16, 12), dropout=0.0)  # 368 parameters
    member = _member(module)
    X, y = _data(n=40)
    fast = _same_features(member, X, y, proj_dim)
    assert fast.phi.shape == (40, proj_dim)


def test_linear_engine_equals_vmap_on_an_mlp():
    module = MLP(n_features=6, n_outputs=4, hidden=(8, 7), dropout=0.0)
    member = _member(module)
    X, y = _data()
    _same_features(member, X, y, 30)


def test_linear_engine_equals_vmap_with_shared_layers_and_sequences():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.out = nn.Linear(6, 4)

        def forward(self, x):  # (batch, 6) -> 3 positions, fc applied twice
            h = torch.stack([x, x.flip(-1), 2 * x], 1)
            h = torch.tanh(self.fc(torch.tanh(self.fc(h))))
            return self.out(h.mean(1))

    member = _member(Shared())
    X, y = _data()
    _same_features(member, X, y, 20)


def test_linear_engine_on_dropout_and_lora_members(digits):
    X_train, _, y_train, _ = digits
    X, y = torch.from_numpy(X_train[:20]), torch.from_numpy(y_train[:20])
    params = STRATEGY_PARAMS
    net = fit_net(make_classifier_net(max_epochs=2), X_train, y_train, seed=0, device=CPU, task=TASK)
    (masked, _) = DropoutEnsemble.from_params(params).members(TrainedModel(net, 0), X[:1])
    _same_features(masked, X, y, 64)
    lora = LoraEnsemble.from_params(params)
    lora_model = lora.fit(make_classifier_net(max_epochs=2), X_train, y_train, seed=0, device=CPU, task=TASK)
    (adapter,) = lora.members(lora_model, X[:1])
    routes, _ = assign_routes(adapter.module, adapter.params)
    assert {r.name for r in routes} == {"layers.0.lora_A.default", "layers.0.lora_B.default"}
    _same_features(adapter, X, y, 16)


def test_make_engine_picks_the_path():
    mlp = _member(MLP(n_features=6, n_outputs=4, hidden=(8,), dropout=0.0))
    assert isinstance(make_engine(mlp, _config(16)).projector, LayerProjector)
    exact = make_engine(mlp, _config(None))  # exact gradients, on the same per-layer engine
    assert isinstance(exact, LayerEngine) and isinstance(exact.projector, IdentityProjector)
    assert isinstance(make_engine(mlp, _config(16, path="vmap")), VmapEngine)
    with pytest.raises(ValueError, match="gradient_path"):
        make_engine(mlp, _config(16, path="fast"))
    # a layer without a route is differentiated from the operations that use it
    conv = _member(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4)))
    X, y = torch.randn(7, 1, 6), torch.randint(0, 4, (7,))
    for proj_dim in (16, None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # small: no warning
            engine = make_engine(conv, _config(proj_dim), (X[:3], y[:3]))
        assert [r.name for r in engine.routes] == ["2"] and engine.traced == ["0.bias", "0.weight"]
        fast = featurize(engine, X, y, batch_size=3)
        slow = featurize(VmapEngine(conv, TASK, CPU, engine.projector), X, y, batch_size=3)
        np.testing.assert_allclose(fast.phi, slow.phi, rtol=1e-4, atol=1e-5)


def test_large_layers_without_a_route_are_named():
    big = _member(nn.Sequential(nn.Conv1d(64, 128, 9), nn.Flatten(), nn.Linear(256, 4)))
    X, y = torch.randn(4, 64, 10), torch.randint(0, 4, (4,))
    with pytest.warns(UserWarning, match=r"Layer '0' \(Conv1d\): 73856 parameters without a gradient route"):
        make_engine(big, _config(16), (X[:3], y[:3]))


def test_unused_linear_layers_give_zero_features():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(6, 4)
            self.unused = nn.Linear(6, 4)

        def forward(self, x):
            self.unused(x)  # computed, but does not reach the output
            return self.used(x)

    member = _member(Branch(), layers=["unused"])
    X, y = _data()
    features = featurize(make_engine(member, _config(4, path="layers")), X, y, batch_size=12)
    np.testing.assert_array_equal(features.phi, 0)


def test_member_is_a_dataclass_with_explicit_tensors():
    member = _member(MLP(n_features=6, n_outputs=4, hidden=(8,), dropout=0.0))
    assert isinstance(member, Member)
    X, _ = _data()
    torch.testing.assert_close(member.forward(member.params, X), member.module(X))


def test_parallel_row_ranges_give_the_same_features(digits):
    from sktda._featurize import featurize_members

    X_train, _, y_train, _ = digits
    member = _member(MLP(n_features=64, n_outputs=10, hidden=(16,), dropout=0.0))
    config = _config(32, batch_size=32)
    (one,) = featurize_members([member], X_train, y_train, config=config, n_jobs=None)
    # three row ranges of whole batches
    (split,) = featurize_members([member], X_train, y_train, config=config, n_jobs=3)
    np.testing.assert_array_equal(split.phi, one.phi)
    np.testing.assert_array_equal(split.residual, one.residual)


def test_non_finite_features_are_refused():
    class Overflow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            return self.fc(x) * 1e39  # overflows float32

    member = _member(Overflow())
    X, y = _data()
    with pytest.raises(ValueError, match=r"samples 0\.\.4 are not finite"):
        featurize(make_engine(member, _config(None)), X, y, batch_size=5)


def test_routes_are_checked_once_per_structure_and_never_by_a_query(digits, monkeypatch):
    from sktda import EnsembleAttributor

    from .conftest import make_classifier_net

    X_train, X_test, y_train, y_test = digits
    checks = []
    original = LayerEngine.check
    monkeypatch.setattr(LayerEngine, "check", lambda self, *a: checks.append(1) or original(self, *a))
    attr = EnsembleAttributor(
        make_classifier_net(), ensemble="dropout", n_models=2, n_masks=3, proj_dim=32, n_jobs=2
    ).fit(X_train, y_train)
    assert len(checks) == 1  # six members of one architecture, over two jobs
    attr.most_influential(X_test, y_test, k=3)
    attr.attribute(X_test, y_test)
    assert len(checks) == 1


class SoftPrompt(nn.Module):
    """Prompt tuning written by hand: a learned prompt of 3 vectors, expanded to
    the batch (from a new leading dimension, or from a leading 1) and prepended
    to the embedded inputs."""

    def __init__(self, leading_one=False):
        super().__init__()
        self.leading_one = leading_one
        self.embed = nn.Embedding(10, 4)
        self.prompt = nn.Parameter(torch.randn(1, 3, 4) if leading_one else torch.randn(3, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        tokens = self.embed(x)
        if self.leading_one:
            prompt = self.prompt.expand(len(x), -1, -1)
        else:
            prompt = torch.broadcast_to(self.prompt, (len(x), 3, 4))
        return self.head(torch.tanh(torch.cat([prompt, tokens], 1)).mean(1))


@pytest.mark.parametrize("leading_one", [False, True])
def test_a_soft_prompt_expanded_to_the_batch_is_a_use_not_a_row_by_row_parameter(leading_one):
    torch.manual_seed(0)
    X, y = torch.randint(0, 10, (11, 5)), torch.randint(0, 3, (11,))
    fast = _same_features(_member(SoftPrompt(leading_one)), X, y, proj_dim=16, traced=("prompt",))
    assert np.abs(fast.phi).max() > 0
