"""Every per-layer route against the dense vmap path under the same projection."""

import sys
import warnings

import cloudpickle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sktda._ensembles import DropoutEnsemble, LoraEnsemble, TrainedModel
from sktda._featurize import featurize
from sktda._gradients import GradientConfig, make_engine
from sktda._nets import fit_net
from sktda._task import NetTask
from sktda.models import ConvNet, TokenTransformer
from sktda.routes import WeightRoute

from .conftest import make_language_model_net
from .test_gradients import STRATEGY_PARAMS, TASK, _member, _same_features

CPU = torch.device("cpu")


def _classes(n, k, seed=1):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


class Head(nn.Module):
    """``layer`` followed by a pooled linear read-out to 3 classes."""

    def __init__(self, layer, width, pool=(2, 3)):
        super().__init__()
        self.layer, self.pool = layer, pool
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.layer(x)).mean(self.pool))


@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=2),
        dict(kernel_size=(2, 3), padding="same", dilation=2, bias=False),
        dict(kernel_size=3, padding="valid", stride=(1, 2)),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=3, padding=1, padding_mode="circular", dilation=(2, 1)),
        dict(kernel_size=3, groups=2),
        dict(kernel_size=3, groups=4, padding=1),  # depthwise
    ],
)
def test_conv2d_route(conv):
    torch.manual_seed(0)
    member = _member(Head(nn.Conv2d(4, 8, **conv), 8))
    X = torch.randn(11, 4, 9, 8)
    _same_features(member, X, _classes(11, 3), 40)


def test_embedding_route_with_repeated_indices_and_padding():
    torch.manual_seed(0)
    emb = nn.Embedding(12, 6, padding_idx=0)
    member = _member(Head(emb, 6, pool=1))
    X = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [3, 5, 3, 11], [2, 0, 2, 7]] * 3)
    fast = _same_features(member, X, _classes(12, 3), 30)
    # only padding: the embedding gets no gradient, only the read-out does
    only_padding = _member(Head(emb, 6, pool=1), layers=["layer"])
    phi = _same_features(only_padding, X, _classes(12, 3), 30).phi
    np.testing.assert_array_equal(phi[[1, 5, 9]], 0)
    assert np.abs(phi[[0, 2, 3]]).min(1).max() > 0 and fast.phi.shape == (12, 30)


@pytest.mark.parametrize(
    "layer, shape, pool",
    [
        (nn.LayerNorm(5), (10, 4, 5), 1),
        (nn.LayerNorm((4, 5)), (10, 4, 5), 1),
        (nn.LayerNorm(5, bias=False), (10, 4, 5), 1),
        (nn.RMSNorm(5), (10, 4, 5), 1),
        (nn.GroupNorm(2, 4), (10, 4, 3, 3), (2, 3)),
        (nn.BatchNorm2d(4), (10, 4, 3, 3), (2, 3)),
        (nn.BatchNorm1d(4), (10, 4, 6), 2),
    ],
)
def test_normalisation_routes(layer, shape, pool):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()  # not the identity initialisation
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    width = shape[1] if pool != 1 else shape[-1]

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(shape[-1], shape[-1])
            self.layer = layer
            self.out = nn.Linear(width, 3)

        def forward(self, x):
            h = self.layer(self.inp(x))
            return self.out(
                torch.tanh(h).mean(pool)
                if pool != 1
                else torch.tanh(h).mean(1).reshape(len(x), -1)[:, :width]
            )

    member = _member(Norm())
    _same_features(member, torch.randn(*shape), _classes(shape[0], 3), 24)


class Attention(nn.Module):
    def __init__(self, batch_first=True, cross=False, masks=False, need_weights=False):
        super().__init__()
        self.batch_first, self.cross, self.masks, self.need_weights = batch_first, cross, masks, need_weights
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        q = x if self.batch_first else x.transpose(0, 1)
        kv = torch.flip(q, (1 if self.batch_first else 0,)) * 0.5 if self.cross else q
        kwargs = {}
        if self.masks:
            T = x.shape[1]
            kwargs["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
            kwargs["key_padding_mask"] = (x[..., 0] > 1.0) & (torch.arange(T) > 0)
        h, w = self.attn(q, kv, kv, need_weights=self.need_weights, **kwargs)
        h = h if self.batch_first else h.transpose(0, 1)
        out = self.out(h.mean(1))
        return out + w.sum((1, 2))[:, None] if self.need_weights else out


@pytest.mark.parametrize(
    "params",
    [
        dict(),
        dict(batch_first=False),
        dict(cross=True),
        dict(masks=True),
        dict(masks=True, need_weights=True, batch_first=False),
    ],
)
def test_multihead_attention_route(params):
    torch.manual_seed(0)
    member = _member(Attention(**params))
    _same_features(member, torch.randn(10, 5, 8), _classes(10, 3), 36)


@pytest.mark.parametrize("norm_first", [False, True])
def test_token_transformer_classifier_with_attention_mask(norm_first):
    torch.manual_seed(0)
    module = TokenTransformer(vocab_size=13, n_outputs=3, d_model=8, n_heads=2, n_layers=2, max_len=6)
    if norm_first:
        for layer in module.encoder.layers:
            layer.norm_first = True
    ids = torch.randint(0, 13, (10, 6))
    mask = torch.ones(10, 6, dtype=torch.long)
    mask[::2, 4:] = 0
    _same_features(_member(module), {"input_ids": ids, "attention_mask": mask}, _classes(10, 3), 48)


def test_token_transformer_language_model():
    torch.manual_seed(0)
    module = TokenTransformer(vocab_size=11, d_model=8, n_heads=2, n_layers=1, max_len=7)
    tokens = torch.randint(0, 11, (9, 8))
    task = NetTask(is_classifier=True, target="sequence_log_likelihood", is_sequence=True)
    _same_features(_member(module), tokens[:, :-1], tokens[:, 1:], 40, task=task)


class Tied(nn.Module):
    """A token model with the position idioms of real code and a tied output layer."""

    def __init__(self, positions="broadcast", head="linear"):
        super().__init__()
        self.positions = positions
        self.emb = nn.Embedding(10, 8)
        self.position = nn.Embedding(6, 8)
        self.table = nn.Parameter(torch.randn(6, 8))
        self.head = nn.Linear(8, 10, bias=False) if head == "linear" else Bilinear(8, 10)
        self.head.weight = self.emb.weight  # tied, as language models often are
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        T = x.shape[1]
        if self.positions == "broadcast":  # one call for the whole batch (GPT-2, BERT)
            pos = self.position(torch.arange(T, device=x.device)[None])
        elif self.positions == "arange":  # (T, d), broadcast over the batch
            pos = self.position(torch.arange(T, device=x.device))
        elif self.positions == "weight":  # the table read directly
            pos = self.position.weight[None, :T]
        elif self.positions == "parameter":  # a bare parameter, transposed twice
            pos = self.table.t().t()[:T] * 0.5
        else:  # sequence-first, where rows are positions and not samples
            h = self.emb(x).transpose(0, 1) + self.table[:T, None]
            return self.head(self.norm(h.transpose(0, 1)).mean(1))
        h = self.emb(x) + pos
        return self.head(self.norm(h).mean(1))


class Bilinear(nn.Module):
    """A layer type without a route that holds the tied weight."""

    def __init__(self, d, v):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(v, d))

    def forward(self, h):
        return torch.tanh(h @ self.weight.T) * (h @ self.weight.T)


@pytest.mark.parametrize(
    "positions, head, traced, rowwise",
    [
        # a bare parameter (the table) is always traced, whether used or not
        ("broadcast", "linear", {"table"}, ()),  # every layer on its route
        ("arange", "linear", {"table", "position.weight"}, ()),
        ("weight", "linear", {"table", "position.weight"}, ()),
        ("parameter", "linear", {"table"}, ()),
        ("broadcast", "bilinear", {"table", "emb.weight"}, ()),  # tied to a layer without a route
        ("sequence_first", "linear", (), {"table"}),
    ],
)
def test_tied_broadcast_and_directly_read_parameters(positions, head, traced, rowwise):
    torch.manual_seed(0)
    X = torch.randint(0, 10, (8, 5))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _same_features(_member(Tied(positions, head)), X, _classes(8, 10), 32, traced=traced, rowwise=rowwise)
    messages = [str(w.message) for w in record]
    if rowwise:
        assert any("one sample at a time" in m for m in messages)
    else:
        assert not messages


def test_dropout_members_and_lora_adapters_on_conv_and_transformer(digits):
    from skorch import NeuralNetClassifier

    X_train, _, y_train, _ = digits
    images = X_train.reshape(-1, 1, 8, 8)
    params = STRATEGY_PARAMS
    cnn = NeuralNetClassifier(
        ConvNet,
        module__channels=(4, 8),
        module__dropout=0.2,
        criterion=nn.CrossEntropyLoss,
        max_epochs=1,
        train_split=None,
        verbose=0,
    )
    X, y = torch.from_numpy(images[:12]), torch.from_numpy(y_train[:12])
    net = fit_net(cnn, images, y_train, seed=0, device=CPU, task=TASK)
    (masked, _) = DropoutEnsemble.from_params(params).members(TrainedModel(net, 0), X[:1])
    _same_features(masked, X, y, 64)
    lora = LoraEnsemble.from_params({**params, "lora_target_modules": ["layers.0", "layers.3"]})
    (adapter,) = lora.members(lora.fit(cnn, images, y_train, seed=0, device=CPU, task=TASK), X[:1])
    assert all("lora" in name for name in adapter.params)
    _same_features(adapter, X, y, 32)

    tokens = np.random.default_rng(0).integers(0, 11, (40, 7))
    task = NetTask(is_classifier=True, target="sequence_log_likelihood", is_sequence=True, role="test")
    lm = make_language_model_net(11, module__n_layers=1, module__max_len=6)
    X, y = torch.from_numpy(tokens[:10, :-1]), torch.from_numpy(tokens[:10, 1:])
    net = fit_net(lm, tokens[:, :-1], tokens[:, 1:], seed=0, device=CPU, task=task)
    (masked, _) = DropoutEnsemble.from_params(params).members(TrainedModel(net, 0), X[:1])
    _same_features(masked, X, y, 64, task=task)
    lora = LoraEnsemble.from_params({**params, "lora_target_modules": ["encoder.layers.0.linear1", "head"]})
    lm_model = lora.fit(lm, tokens[:, :-1], tokens[:, 1:], seed=0, device=CPU, task=task)
    (adapter,) = lora.members(lm_model, X[:1])
    _same_features(adapter, X, y, 32, task=task)


def test_max_pool_ties_keep_the_routes():
    """Near-ties in a max-pool resolve differently when a sample is computed alone
    than within its batch (float rounding depends on the batch): the reference
    gradients come from the batch's own forward pass, so no route is demoted."""

    class BatchRounding(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 1, 1, bias=False)
            nn.init.ones_(self.conv.weight)  # h = x_0 + x_1, equal across each image
            self.out = nn.Linear(1, 3)
            self.register_buffer("jitter", torch.tensor([[-1.0, 1.0], [1.0, -1.0]]).repeat(2, 2))

        def forward(self, x):
            h = self.conv(x)
            if len(x) > 1:  # rounding that differs in a batch, far below any tolerance
                h = h + 1e-6 * self.jitter
            return self.out(F.max_pool2d(h, 2).mean((2, 3)))

    torch.manual_seed(0)
    t = torch.rand(6, 1, 4, 4)
    X, y = torch.cat([t, 1 - t], 1), _classes(6, 3)  # every window ties in h, with different inputs
    engine = make_engine(_member(BatchRounding()), GradientConfig(task=TASK, proj_dim=16), (X[:3], y[:3]))
    assert [r.name for r in engine.routes] == ["conv", "out"] and not engine.traced and not engine.rowwise
    reference, *_ = engine._reference_gradients(X, y, set(engine.member.params), [])
    np.testing.assert_allclose(
        featurize(engine, X, y, batch_size=6).phi, engine.projector(reference), rtol=1e-5
    )


class ScaledLinear(nn.Module):
    """A layer type of the user's, with a route of the user's."""

    def __init__(self, n_in, n_out, scale=2.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.scale = scale

    def forward(self, x):
        return self.scale * x @ self.weight.T


class ScaledLinearRoute(WeightRoute, module_type=ScaledLinear):
    def factors(self, x, d):
        return self.module.scale * d, x


def test_a_user_route_is_used_and_travels_to_parallel_jobs():
    from sktda._featurize import featurize_members

    torch.manual_seed(0)
    member = _member(nn.Sequential(ScaledLinear(6, 8), nn.Tanh(), nn.Linear(8, 4)))
    X, y = torch.randn(12, 6), _classes(12, 4)
    _same_features(member, X, y, 20)  # every parameter on a route, the user's included
    config = GradientConfig(task=TASK, proj_dim=20, batch_size=4)
    assert ScaledLinearRoute in {route for _, route in config.routes}
    (one,) = featurize_members([member], X.numpy(), y, config=config, n_jobs=None)
    # other processes, where the classes arrive by value as from a user's script
    # (__main__), and so are not registered there
    this = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(this)
    try:
        (two,) = featurize_members([member], X.numpy(), y, config=config, n_jobs=2)
    finally:
        cloudpickle.unregister_pickle_by_value(this)
    np.testing.assert_array_equal(two.phi, one.phi)
