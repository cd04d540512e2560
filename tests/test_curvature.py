"""Per-layer curvature (K-FAC / EK-FAC in projected space): the per-layer feature
layout, the Kronecker factors against a dense reference, and the scores against
numpy.linalg on one Linear, one Conv2d and one Embedding layer."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from torch import nn

from sktda import EnsembleAttributor
from sktda._features import FeatureStore, LocalShards
from sktda._featurize import FactorSums, featurize, featurize_members
from sktda._gradients import GradientConfig, make_engine
from sktda._layers import assign_routes
from sktda._methods import EKFAC, KFAC
from sktda._projection import layer_widths
from sktda.models import MLP, TokenTransformer

from .conftest import make_classifier_net, make_language_model_net
from .test_gradients import CPU, TASK, _member

DAMPING = 0.3


class OneLayer(nn.Module):
    """A classifier whose only parameters are one layer: ``nn.Linear`` applied at 3
    positions, ``nn.Conv2d`` or ``nn.Embedding`` over 3 tokens, averaged to logits."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = {
            "linear": lambda: nn.Linear(5, 4),
            "conv2d": lambda: nn.Conv2d(2, 4, 3, padding=1),
            "embedding": lambda: nn.Embedding(7, 4),
        }[kind]()

    def forward(self, x):
        out = self.layer(x)
        return out.mean((2, 3)) if self.kind == "conv2d" else out.mean(1)


def _inputs(kind, n=10):
    gen = torch.Generator().manual_seed(0)
    X = {
        "linear": lambda: torch.randn(n, 3, 5, generator=gen),
        "conv2d": lambda: torch.randn(n, 2, 4, 4, generator=gen),
        "embedding": lambda: torch.randint(0, 7, (n, 3), generator=gen),
    }[kind]()
    return X, torch.randint(0, 4, (n,), generator=gen)


def _raw_factors(module, X, y):
    """Per-position ``(left, right)`` factors of the layer's weight, ``(n, T, n_left)``
    and ``(n, T, n_right)``, from plain autograd: the output gradients of the
    targets (the correct-class margins) and the inputs, patches or one-hot tokens."""
    layer = module.layer
    out = layer(X).detach().requires_grad_()
    logits = out.mean((2, 3)) if module.kind == "conv2d" else out.mean(1)
    f, _ = TASK.target_and_residual(logits, y)
    (d,) = torch.autograd.grad(f.sum(), out)
    if module.kind == "linear":
        return d, X
    if module.kind == "conv2d":
        patches = F.unfold(X, 3, padding=1)  # (n, C k k, L)
        return d.flatten(2).transpose(1, 2), patches.transpose(1, 2)
    return F.one_hot(X, 7).float(), d


def _store(features, n_shards=1):
    """A one-member store of ``features``, in ``n_shards`` row ranges."""
    phi, residual = features.phi[None], features.residual[None]
    n = phi.shape[1]
    ranges = [(n * i // n_shards, n * (i + 1) // n_shards) for i in range(n_shards)]
    return FeatureStore(LocalShards(phi, residual, ranges), [1.0], n, phi.shape[2])


def _features(kind, proj_dim):
    torch.manual_seed(0)
    module = OneLayer(kind)
    member = _member(module)
    X, y = _inputs(kind)
    config = GradientConfig(task=TASK, proj_dim=proj_dim, path="layers", per_layer=True)
    (features,) = featurize_members([member], X, y, config=config)
    return module, member, config, X, y, features


def _reference_scores(G, residual, S, A, corrected):
    """``r_j g_i^T H^-1 g_j`` by numpy.linalg, with ``H`` the damped K-FAC or EK-FAC
    matrix of the per-sample projected gradients ``G`` (n, k_out, k_in)."""
    n = len(G)
    l_s, q_s = np.linalg.eigh(S)
    l_a, q_a = np.linalg.eigh(A)
    Q = np.kron(q_s, q_a)  # vec(Q_S^T G Q_A) = Q^T vec(G), vec row-major
    flat = G.reshape(n, -1)
    trace = (flat**2).sum()
    if corrected:
        eig = ((flat @ Q) ** 2).sum(0)
    else:
        eig = np.kron(np.clip(l_s, 0, None), np.clip(l_a, 0, None)) * trace / (np.trace(S) * np.trace(A))
    lam = DAMPING * trace / flat.shape[1]  # the mean of all the block's eigenvalues, which sum to the trace
    H = Q @ np.diag(eig + lam) @ Q.T
    return flat @ np.linalg.solve(H, flat.T) * residual[None, :]


def test_layer_widths_cap_each_layer_at_its_own_sizes():
    module = MLP(n_features=64, n_outputs=10, hidden=(128,))
    params = dict(module.named_parameters())
    routes, _ = assign_routes(module, params)
    numels = {k: v.numel() for k, v in params.items()}
    blocks, dense = layer_widths(routes, numels, 2048)
    # TRAK's 32 x 64 factorisation of 2048 per layer; the output layer has 10 outputs
    assert sorted(blocks.values()) == [(10, 64), (32, 64)] and dense == 0
    blocks, _ = layer_widths(routes, numels, 1 << 16)
    assert sorted(blocks.values()) == [(10, 129), (128, 65)]  # the bias is one more column
    norm = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    params = dict(norm.named_parameters())
    routes, _ = assign_routes(norm, params)
    assert layer_widths(routes, {k: v.numel() for k, v in params.items()}, 4) == ({"0.weight": (2, 2)}, 4)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_factors_and_features_are_the_projected_ones(kind):
    module, member, config, X, y, features = _features(kind, proj_dim=6)
    engine = make_engine(member, config)
    (block,) = engine.projector.blocks.values()
    assert features.layout == ((0, 6, (2, 3)),) and features.phi.shape == (10, 6)
    left, right = _raw_factors(module, X, y)
    p_left, p_right = left @ block.p_left, right @ block.p_right
    for row in block.bias_rows.values():
        p_right = p_right + row
    G = torch.einsum("nto,nti->noi", p_left, p_right).numpy()
    np.testing.assert_allclose(features.phi, G.reshape(10, -1), rtol=1e-4, atol=1e-6)
    (factors,) = features.factors
    S = torch.einsum("nto,ntp->op", p_left, p_left).double().numpy()
    A = torch.einsum("nti,ntj->ij", p_right, p_right).double().numpy()
    np.testing.assert_allclose(factors[0], S, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(factors[1], A, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
@pytest.mark.parametrize("method", [KFAC, EKFAC])
@pytest.mark.parametrize("proj_dim", [6, 12])
def test_scores_match_numpy(kind, method, proj_dim):
    """On a block narrower (6 columns) and wider (12) than the 10 training rows:
    the damping is relative to the mean of all the block's eigenvalues, whatever
    the number of rows."""
    _, _, _, _, _, features = _features(kind, proj_dim=proj_dim)
    ((_, width, shape),) = features.layout
    assert width == proj_dim
    store = _store(features)
    state = method().fit(store.member_rows(0, CPU), DAMPING, features.layout, features.factors)
    store.states = [state]
    phi = torch.as_tensor(features.phi, dtype=torch.float64)
    A = store.columns(method(), [phi], CPU).numpy()
    S, Af = features.factors[0]
    expected = _reference_scores(
        features.phi.reshape(10, *shape).astype(np.float64),
        features.residual.astype(np.float64),
        S,
        Af,
        method.corrected,
    )
    # EK-FAC's eigenvalues are summed in float32: rounding at float32's epsilon of the largest score
    np.testing.assert_allclose(A, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    # the self-influence is the same quadratic form, without the rotation back
    self_influence = store.self_attribution(method(), CPU, torch.float64).numpy()
    np.testing.assert_allclose(
        self_influence, np.diag(expected), rtol=1e-5, atol=1e-7 * np.abs(expected).max()
    )


def test_exact_gradients_use_the_per_sample_factors_and_a_dense_block_for_biases():
    """Without projection the weight's gradient is its block, its factors those of
    the per-sample gradients (``sum G G^T``, ``sum G^T G``); the bias is dense."""
    torch.manual_seed(0)
    module = OneLayer("linear")
    X, y = _inputs("linear")
    config = GradientConfig(task=TASK, proj_dim=None, path="layers", per_layer=True)
    (features,) = featurize_members([_member(module)], X, y, config=config)
    assert features.layout == ((0, 20, (4, 5)), (20, 24, None))
    assert features.factors is None
    store = _store(features)
    store.states[0] = EKFAC().fit(store.member_rows(0, CPU), DAMPING, features.layout)
    G = features.phi[:, :20].reshape(10, 4, 5).astype(np.float64)
    S, A = np.einsum("noi,npi->op", G, G), np.einsum("noi,noj->ij", G, G)
    bias = features.phi[:, 20:].astype(np.float64)
    gram = bias.T @ bias
    lam = DAMPING * np.trace(gram) / 4
    r = features.residual.astype(np.float64)
    expected = (
        _reference_scores(G, r, S, A, True) + bias @ np.linalg.solve(gram + lam * np.eye(4), bias.T) * r
    )
    phi = torch.as_tensor(features.phi, dtype=torch.float64)
    got = store.columns(EKFAC(), [phi], CPU).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9 * np.abs(expected).max())


def test_per_layer_features_of_a_transformer_match_vmap():
    """The per-layer blocks of every route (embeddings, attention, linear layers,
    norms in the dense block) equal the same projection of vmap's full gradients."""
    torch.manual_seed(0)
    module = TokenTransformer(vocab_size=11, n_outputs=3, d_model=8, n_heads=2, n_layers=1, max_len=6)
    member = _member(module)
    X, y = torch.randint(0, 11, (9, 6)), torch.randint(0, 3, (9,))
    config = GradientConfig(task=TASK, proj_dim=12, path="layers", per_layer=True)
    engine = make_engine(member, config, (X[:3], y[:3]))
    fast = featurize(engine, X, y, batch_size=4)
    slow = featurize(make_engine(member, GradientConfig(**{**config.__dict__, "path": "vmap"})), X, y, 4)
    assert fast.layout == slow.layout and fast.layout[-1][2] is None  # the norms' dense block
    # token and position embeddings, attention in and out, two linear layers, the head
    factors = FactorSums.total([fast.factors])
    assert len(factors) == 7 and all(f is not None for f in factors)
    np.testing.assert_allclose(fast.phi, slow.phi, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_estimator_kfac_ekfac_deterministic_and_with_every_ensemble(digits, method):
    X_train, X_test, y_train, y_test = digits
    X_train, y_train = X_train[:120], y_train[:120]
    base = EnsembleAttributor(
        make_classifier_net(), method=method, n_models=2, proj_dim=64, normalize=None, random_state=0
    )
    attr = clone(base).fit(X_train, y_train)
    assert attr.method_ == method
    # the hidden layer's 8 x 8 block and the output layer's 8 x 8 block, side by side
    assert attr.train_features_.shape == (2, 120, 128)
    X_test, y_test = X_test[:16], y_test[:16]
    A = attr.attribute(X_test, y_test)
    parallel = clone(base).set_params(n_jobs=2).fit(X_train, y_train)
    np.testing.assert_array_equal(A, parallel.attribute(X_test, y_test))
    A7 = clone(base).set_params(batch_size=7).fit(X_train, y_train).attribute(X_test, y_test)
    np.testing.assert_allclose(A, A7, rtol=1e-4, atol=1e-5 * np.abs(A).max())
    np.testing.assert_allclose(attr.self_attribute(), np.diag(attr.attribute(X_train, y_train)), rtol=1e-4)
    top = attr.most_influential(X_test, y_test, k=3)
    np.testing.assert_array_equal(top.proponents, np.argsort(-A, 1)[:, :3])
    for params in (
        {"ensemble": "dropout", "n_masks": 2},
        {"ensemble": "lora", "n_adapters": 2, "lora_rank": 2},
    ):
        other = clone(base).set_params(n_models=1, **params).fit(X_train, y_train)
        assert np.all(np.isfinite(other.attribute(X_test[:3], y_test[:3])))


def test_auto_method_and_damping():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 8, size=(40, 7)).astype(np.int64)
    lm = make_language_model_net(8)
    attr = EnsembleAttributor(lm, proj_dim=32, random_state=0).fit(tokens[:30, :-1], tokens[:30, 1:])
    assert attr.method_ == "ekfac"
    X = np.random.default_rng(1).normal(size=(40, 20)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    clf = EnsembleAttributor(
        make_classifier_net(module__n_features=20, module__n_outputs=2), proj_dim=32, random_state=0
    )
    assert clf.fit(X, y).method_ == "trak"
    # damping="auto" is each method's own: 0.01 for EK-FAC, as an explicit 0.01 gives
    explicit = clone(attr).set_params(method="ekfac", damping=0.01).fit(tokens[:30, :-1], tokens[:30, 1:])
    np.testing.assert_array_equal(
        attr.attribute(tokens[30:, :-1], tokens[30:, 1:]),
        explicit.attribute(tokens[30:, :-1], tokens[30:, 1:]),
    )
    other = clone(attr).set_params(damping=1.0).fit(tokens[:30, :-1], tokens[:30, 1:])
    A = attr.attribute(tokens[30:, :-1], tokens[30:, 1:])
    assert not np.allclose(A, other.attribute(tokens[30:, :-1], tokens[30:, 1:]))
    # normalize="auto": raw scores on a language model, RelatIF on a classifier
    np.testing.assert_array_equal(
        A,
        explicit.set_params(normalize=None)
        .fit(tokens[:30, :-1], tokens[:30, 1:])
        .attribute(tokens[30:, :-1], tokens[30:, 1:]),
    )
    relatif = clone(clf).set_params(normalize="relatif").fit(X, y)
    np.testing.assert_array_equal(clf.attribute(X[:5], y[:5]), relatif.attribute(X[:5], y[:5]))


def test_factor_sums_are_the_same_whatever_the_row_ranges(monkeypatch):
    """Chunk sums of very different scales (so that the order of the additions
    shows in the last bits) give one total whichever ranges the chunks come in."""
    monkeypatch.setattr(FactorSums, "GROUP", 3)
    rng = np.random.default_rng(0)
    chunks = [
        {"w": (torch.tensor(rng.normal(size=(2, 2)) * 10.0 ** rng.integers(-8, 8)), torch.ones(1, 1))}
        for _ in range(10)
    ]

    def total(bounds):
        ranges = []
        for a, b in itertools.pairwise(bounds):
            sums = FactorSums(["w"], a, b - a)
            for i in range(a, b):
                sums.add(i, chunks[i])
            ranges.append(sums)
        return FactorSums.total(ranges)[0][0]

    whole = total([0, 10])
    for bounds in ([0, 4, 10], [0, 1, 5, 7, 10], [0, 8, 10]):
        np.testing.assert_array_equal(total(bounds), whole)
    naive = sum(c["w"][0].numpy() for c in chunks[::-1])
    np.testing.assert_allclose(whole, naive, rtol=1e-12)
