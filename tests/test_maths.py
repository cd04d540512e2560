"""Pieces of the maths that nothing else pins: each test here fails when its piece
is broken (the damping's unit with k < n is pinned in test_attribution, the target
in test mode in test_model_selection)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNetClassifier
from torch import nn
from torch.func import functional_call, grad, vmap

from sktda import EnsembleAttributor, OutlierGradientDetector
from sktda._ensembles import IndependentEnsemble, TrainedEnsemble, TrainedModel
from sktda._layers import assign_routes
from sktda._nets import check_net
from sktda._projection import DenseProjector, LayerProjector

from .conftest import make_classifier_net, make_language_model_net
from .test_gradients import TASK, _member, _same_features


def _route_projector(module, proj_dim, seed):
    params = dict(module.named_parameters())
    routes, _ = assign_routes(module, params)
    return LayerProjector(routes, {k: v.numel() for k, v in params.items()}, proj_dim, seed)


def test_the_truncated_kronecker_projection_is_unbiased():
    """proj_dim 7: 3 x 3 factors, the first 7 of the 9 products kept and rescaled, so
    the projected squared norm is the exact one in expectation (7/9 of it without
    the rescaling)."""
    layer = nn.Linear(8, 6)
    gen = torch.Generator().manual_seed(0)
    grads = {"weight": torch.randn(1, 6, 8, generator=gen), "bias": torch.randn(1, 6, generator=gen)}
    exact = sum(float((g**2).sum()) for g in grads.values())
    norms = []
    for seed in range(3000):
        projector = _route_projector(layer, 7, seed)
        assert projector.out_dim == 7 and projector.factors == (3, 3)
        norms.append(float((projector(grads) ** 2).sum()))
    mean, error = np.mean(norms), np.std(norms) / np.sqrt(len(norms))
    # the error is small enough to tell a 7/9 bias (22%) apart
    assert abs(mean - exact) < 4 * error and 4 * error < 0.1 * exact


def test_every_layer_and_parameter_has_its_own_projection():
    """Two same-shape parameters whose gradients cancel (g and -g): a projection
    shared between them would give zero features."""
    g = torch.randn(1, 4, 4)
    module = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    routed = _route_projector(module, 9, 0)({"0.weight": g, "1.weight": -g})
    dense = DenseProjector({"a": 16, "b": 16}, 9, 0)({"a": g.reshape(1, -1), "b": -g.reshape(1, -1)})
    for features in (routed, dense):
        # the sum of two independent projections: about sqrt(2) |g| on average, not 0
        assert float(features.norm()) > 0.2 * float(g.norm())


class _PerSampleMaskAttention(nn.Module):
    """Attention with a float mask of shape (batch * heads, T, T) that differs per
    sample and per head."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        B, T, _ = x.shape
        scores = torch.tanh(x[..., :1] @ x[..., 1:2].transpose(1, 2))  # (B, T, T), from each sample
        mask = torch.stack([scores, -2.0 * scores], 1).reshape(B * 2, T, T)  # head 2 differs
        h, _ = self.attn(x, x, x, attn_mask=mask, need_weights=False)
        return self.out(h.mean(1))


def test_attention_with_a_float_mask_per_sample_and_head_matches_vmap():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    _same_features(
        _member(_PerSampleMaskAttention()),
        torch.randn(10, 5, 8, generator=gen),
        torch.randint(0, 3, (10,), generator=gen),
        36,
    )


def test_the_criterions_ignore_index_is_left_out_of_the_language_model_target():
    torch.manual_seed(0)
    y = torch.randint(0, 6, (4, 7))
    y[:, 2] = 3  # a padding token, ignored by the criterion
    logits = torch.randn(4, 7, 6)
    log_p = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]
    ignored = check_net(make_language_model_net(6, criterion__ignore_index=3), "auto", y.numpy())
    assert ignored.is_sequence and ignored.ignore_index == 3
    target, _ = ignored.target_and_residual(logits, y)
    torch.testing.assert_close(target, (log_p * (y != 3)).sum(1))
    kept, _ = check_net(make_language_model_net(6), "auto", y.numpy()).target_and_residual(logits, y)
    torch.testing.assert_close(kept, log_p.sum(1))


def test_the_detector_averages_every_checkpoint_and_member(digits):
    X_train, _, y_train, _ = digits
    det = OutlierGradientDetector(
        make_classifier_net(max_epochs=4),
        detector="l2",
        layers="last",
        proj_dim=None,
        n_models=2,
        n_checkpoints=2,
        random_state=0,
    ).fit(X_train, y_train)
    X, y = torch.from_numpy(X_train), torch.from_numpy(y_train)
    members = det.ensemble_.members(checkpoints=True)
    assert len(members) == 4  # 2 models x 2 checkpoints
    scores = []
    for member in members:

        def loss(params, x, target, member=member):
            out = functional_call(member.module, {**member.frozen, **params}, (x[None],))
            return F.cross_entropy(out, target[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(member.params, X, y)
        scores.append(-torch.sqrt(sum((t.reshape(len(X), -1) ** 2).sum(1) for t in g.values())).numpy())
    np.testing.assert_allclose(det.train_scores_, np.mean(scores, 0), rtol=1e-4)
    assert not np.allclose(scores[0], scores[-1], rtol=1e-2)  # the checkpoints differ


class _FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1) + 0 * x[:, :1]


def test_ensemble_predictions_average_probabilities_not_logits():
    """Logits (10, 0, 0) and (-10, 1, 0): the mean logits pick class 1, the mean
    probabilities (0.5, 0.37, 0.13) class 0."""
    nets = [
        NeuralNetClassifier(_FixedLogits, module__logits=logits, max_epochs=0, train_split=None).initialize()
        for logits in ([10.0, 0.0, 0.0], [-10.0, 1.0, 0.0])
    ]
    models = [TrainedModel(net, seed) for seed, net in enumerate(nets)]
    ensemble = TrainedEnsemble(IndependentEnsemble(), models, torch.zeros(1, 2))
    X = np.zeros((3, 2), dtype=np.float32)
    np.testing.assert_array_equal(ensemble.predict_labels(X, TASK, 2, torch.device("cpu")), 0)
    np.testing.assert_array_equal(ensemble.predict_labels(X, TASK, 2, torch.device("cpu"), n_classes=3), 0)


def test_float16_features_are_stored_as_float16_on_disk(digits, tmp_path):
    X_train, _, y_train, _ = digits
    attr = EnsembleAttributor(
        make_classifier_net(max_epochs=1),
        n_models=2,
        proj_dim=32,
        feature_dtype="float16",
        features_dir=tmp_path,
    ).fit(X_train, y_train)
    (stored,) = tmp_path.glob("*.npy")
    on_disk = np.load(stored, mmap_mode="r")
    assert on_disk.dtype == np.float16 and on_disk.shape == (2, len(X_train), 32)
    data = 2 * len(X_train) * 32 * 2  # float16: 2 bytes a feature
    assert data <= stored.stat().st_size < data + 4096  # and the .npy header
    assert attr.train_features_.dtype == np.float16


def test_float16_features_that_would_overflow_or_underflow_are_refused(digits):
    from sktda._featurize import stored_as

    X_train, _, y_train, _ = digits
    rows = slice(0, 2)
    fine = torch.tensor([[1.0, -2.5, 3e-3], [0.0, 0.0, 0.0]])
    assert stored_as(fine, np.dtype(np.float16), rows).dtype == torch.float16
    assert stored_as(fine, np.dtype(np.float32), rows) is fine
    for bad in ([[7e4, 1.0, 0.0]], [[3e-7, -2e-7, 1e-7]]):  # past float16's range, under its normal range
        with pytest.raises(ValueError, match="feature_dtype='float32'"):
            stored_as(torch.tensor(bad), np.dtype(np.float16), rows)
    # a trained model on inputs 1e5 times its own: gradients far past 65504
    net = FrozenEstimator(make_classifier_net(max_epochs=1).fit(X_train, y_train))
    huge = EnsembleAttributor(net, proj_dim=32, feature_dtype="float16")
    with pytest.raises(ValueError, match="do not fit float16"):
        huge.fit(X_train * 1e5, y_train)
    assert not hasattr(huge, "train_features_")
    assert huge.set_params(feature_dtype="float32").fit(X_train * 1e5, y_train).train_features_.max() > 7e4


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_same_parameter_gets_the_same_projection_on_every_path(per_layer):
    """What the independence above must not break: one parameter's projection is
    the same whichever member (seed) and path, a function of the seed alone."""
    module = nn.Linear(6, 5)
    grads = {"weight": torch.randn(2, 5, 6), "bias": torch.randn(2, 5)}
    params = dict(module.named_parameters())
    routes, _ = assign_routes(module, params)
    numels = {k: v.numel() for k, v in params.items()}
    first = LayerProjector(routes, numels, 8, 3, per_layer=per_layer)(grads)
    again = LayerProjector(routes, numels, 8, 3, per_layer=per_layer)(grads)
    other = LayerProjector(routes, numels, 8, 4, per_layer=per_layer)(grads)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_the_blocked_gram_equals_the_plain_one():
    """The Gram skips the blocks that symmetry makes redundant (4 uneven blocks of
    1100 columns here)."""
    from sktda._methods import _column_blocks, _symmetric_gram

    g = torch.randn(300, 1100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert len(_column_blocks(1100)) == 4
    torch.testing.assert_close(_symmetric_gram(g), g.T @ g)


@pytest.mark.parametrize("n", [300, 1500])  # fewer rows than columns (the kernel form), and more
def test_the_damped_inverse_equals_the_explicit_inverse(n):
    """TRAK's and IF's ``(G^T G + lambda I)^-1``, applied by triangular solves or in
    the kernel form, equals the explicit inverse that they used to form, on the
    test side and in the self-attribution's quadratic form; so does the
    pseudo-inverse taken where the factorization fails."""
    from sktda._methods import DampedInverse

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, 1100, generator=gen, dtype=torch.float64)
    phi = torch.randn(7, 1100, generator=gen, dtype=torch.float64)
    lam = 0.1 * float(g.square().sum()) / min(n, 1100)
    inverse = torch.linalg.inv(g.T @ g + lam * torch.eye(1100, dtype=torch.float64))
    fitted = {
        "rows": DampedInverse.from_rows(g, lam),
        "gram": DampedInverse.from_gram(g.T @ g, lam),
        "matrix": DampedInverse(matrix=inverse),
    }
    assert (fitted["rows"].low_rank is not None) and fitted["gram"].lower is not None
    for state in fitted.values():
        torch.testing.assert_close(state.apply(phi), phi @ inverse)
        torch.testing.assert_close(state.quadratic(g[:9]), ((g[:9] @ inverse) * g[:9]).sum(1))
        torch.testing.assert_close(state.quadratic(phi), ((phi @ inverse) * phi).sum(1))
    # a damped Gram that is not numerically positive definite takes the pseudo-inverse
    singular = DampedInverse.from_gram(-torch.eye(4, dtype=torch.float64), 0.5)
    assert singular.matrix is not None
    torch.testing.assert_close(
        singular.apply(torch.ones(1, 4, dtype=torch.float64)), -2 * torch.ones(1, 4, dtype=torch.float64)
    )


def test_the_streamed_tree_sum_adds_in_the_cluster_s_pairwise_order():
    """Shards in this process are summed as they come (a binary counter, at most one
    partial per level held); the cluster adds them level by level. The trees must be
    the same, or a Gram would round differently in the two."""
    from sktda._features import tree_sum

    class Node:
        alive = 0

        def __init__(self, tree):
            self.tree = tree
            Node.alive += 1
            Node.most = max(getattr(Node, "most", 0), Node.alive)

        def __del__(self):
            Node.alive -= 1

        def __add__(self, other):
            return Node((self.tree, other.tree))

    def levels(parts):
        while len(parts) > 1:
            parts = [
                (parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)
            ]
        return parts[0]

    for n in range(1, 70):
        Node.most = 0
        assert tree_sum(Node(i) for i in range(n)).tree == levels(list(range(n)))
        assert Node.most <= 2 * n.bit_length() + 2  # streamed: never all n parts at once
