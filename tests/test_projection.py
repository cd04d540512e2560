import numpy as np
import pytest
import torch

import sktda._projection as projection
from sktda._projection import DenseProjector, IdentityProjector, make_projector


def _grads(numels, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, numel, generator=gen) for name, numel in numels.items()}


def test_identity_when_the_gradient_is_small():
    numels = {"w": 6, "b": 2}
    proj = make_projector(numels, 16, seed=0)
    assert isinstance(proj, IdentityProjector) and proj.out_dim == 8
    grads = _grads(numels)
    np.testing.assert_array_equal(proj(grads), torch.cat([grads["w"], grads["b"]], 1))
    assert isinstance(make_projector(numels, None, seed=0), IdentityProjector)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_streamed_equals_cached_and_seeded(kind, monkeypatch):
    monkeypatch.setattr(projection, "_TILE_ROWS", 100)
    numels = {"w": 450, "b": 30}
    grads = _grads(numels)
    cached = DenseProjector(numels, 32, seed=7, kind=kind)
    streamed = DenseProjector(numels, 32, seed=7, kind=kind, cache_bytes=0)
    assert cached._cache is not None and streamed._cache is None
    np.testing.assert_allclose(cached(grads), streamed(grads), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cached(grads), DenseProjector(numels, 32, seed=7, kind=kind)(grads))
    assert not torch.allclose(cached(grads), DenseProjector(numels, 32, seed=8, kind=kind)(grads))


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_inner_products_are_preserved(kind):
    numels = {"w": 3000}
    grads = _grads(numels, n=20, seed=1)
    g = grads["w"]
    proj = DenseProjector(numels, 2048, seed=0, kind=kind)(grads)
    exact = g @ g.T
    approx = proj @ proj.T
    # Johnson-Lindenstrauss: relative error of norms ~ sqrt(2/k)
    np.testing.assert_allclose(torch.diagonal(approx), torch.diagonal(exact), rtol=0.12)
    cos_exact = exact / exact.diagonal().sqrt()[:, None] / exact.diagonal().sqrt()[None, :]
    cos_approx = approx / approx.diagonal().sqrt()[:, None] / approx.diagonal().sqrt()[None, :]
    assert torch.max(torch.abs(cos_exact - cos_approx)) < 0.1


def test_unknown_kind():
    with pytest.raises(ValueError, match="projection"):
        DenseProjector({"w": 100}, 8, seed=0, kind="sparse")
