"""Seeded random projections of per-sample gradients.

A projector maps a batch of per-sample gradients, given as one tensor per parameter
(``{name: (batch, *shape)}``), to ``(batch, proj_dim)`` features. The Kronecker
projector also projects ``nn.Linear`` gradients from their factors (layer input and
output gradient) without ever forming them. The matrix is
generated on the CPU in fixed tiles of rows, each from its own seed, so it is the same
on every device, whatever the batch size, and whether it is cached or regenerated:
a ``p x k`` matrix too large to keep is never held whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_TILE_ROWS = 4096
_KINDS = ("gaussian", "rademacher")


def _tile_seed(seed: int, param_index: int, tile_index: int) -> int:
    return int(np.random.SeedSequence([seed, param_index, tile_index]).generate_state(1)[0])


def _random_tile(kind: str, rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        tile = torch.randn(rows, k, generator=gen)
    else:
        tile = torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8).float() * 2 - 1
    return tile.div_(math.sqrt(k))


class IdentityProjector:
    """No projection: the flattened gradient itself (used when ``p <= proj_dim``)."""

    def __init__(self, numels: dict[str, int]):
        self.numels = dict(numels)
        self.out_dim = sum(self.numels.values())

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in self.numels], 1)


class DenseProjector:
    """``G @ R`` with ``R`` a ``p x k`` Gaussian or Rademacher matrix scaled by
    ``1/sqrt(k)``, so inner products are preserved in expectation.

    ``R`` is kept on ``device`` when it takes at most ``cache_bytes``; otherwise each
    tile of rows is regenerated per call, bounding memory by one tile.
    """

    def __init__(
        self,
        numels: dict[str, int],
        proj_dim: int,
        seed: int,
        kind: str = "gaussian",
        device: torch.device | str = "cpu",
        cache_bytes: int = 1 << 30,
    ):
        if kind not in _KINDS:
            raise ValueError(f"projection={kind!r} is not one of {_KINDS}.")
        self.numels = dict(numels)
        self.out_dim = int(proj_dim)
        self.seed = int(seed)
        self.kind = kind
        self.device = torch.device(device)
        total = sum(self.numels.values()) * self.out_dim * 4
        self._cache = None
        if total <= cache_bytes:
            self._cache = {
                name: torch.cat(list(self._tiles(i, n)), 0).to(self.device)
                for i, (name, n) in enumerate(self.numels.items())
            }

    def _tiles(self, param_index: int, numel: int):
        for b, start in enumerate(range(0, numel, _TILE_ROWS)):
            rows = min(_TILE_ROWS, numel - start)
            yield _random_tile(self.kind, rows, self.out_dim, _tile_seed(self.seed, param_index, b))

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.out_dim, device=first.device, dtype=first.dtype)
        for i, (name, numel) in enumerate(self.numels.items()):
            g = grads[name].reshape(first.shape[0], -1)
            if self._cache is not None:
                out.addmm_(g, self._cache[name])
                continue
            for t, tile in enumerate(self._tiles(i, numel)):
                start = t * _TILE_ROWS
                out.addmm_(g[:, start : start + tile.shape[0]], tile.to(g.device))
        return out


def kronecker_factors(proj_dim: int) -> tuple[int, int]:
    """``(k_out, k_in)``, balanced, with ``k_out * k_in >= proj_dim``.

    An exact factorisation is used when one is balanced (``k_in <= 2 k_out``);
    otherwise (a prime ``proj_dim``, say) the near-square ``k_out = ceil(sqrt(k))``
    and the projector keeps the first ``proj_dim`` of the ``k_out * k_in``
    products. A lopsided split such as ``(1, 257)`` would project each layer's
    output gradient to a single number and lose most of the signal.
    """
    k_out = max(d for d in range(1, math.isqrt(proj_dim) + 1) if proj_dim % d == 0)
    if proj_dim // k_out <= 2 * k_out:
        return k_out, proj_dim // k_out
    k_out = math.isqrt(proj_dim - 1) + 1
    return k_out, -(-proj_dim // k_out)


class KroneckerProjector:
    """``P = P_out (x) P_in`` per ``nn.Linear`` layer, summed over layers.

    For a layer with input ``a`` (a one appended for the bias) and output gradient
    ``d``, the weight gradient is ``d a^T`` and its projection is
    ``(P_out^T d) (x) (P_in^T a)``: ``O(out k_out + in k_in + k)`` per sample instead
    of ``O(out in k)``, and the gradient is never formed. Entries are Gaussian or
    Rademacher scaled so inner products are preserved in expectation. When
    ``k_out * k_in`` exceeds ``proj_dim`` (see :func:`kronecker_factors`), the
    first ``proj_dim`` products are kept, rescaled to stay unbiased.

    ``layers`` maps a module name to ``(weight_name, bias_name or None, out, in)``.
    """

    def __init__(self, layers: dict, proj_dim: int, seed: int, kind: str = "gaussian", device="cpu"):
        if kind not in _KINDS:
            raise ValueError(f"projection={kind!r} is not one of {_KINDS}.")
        self.layers = dict(layers)
        self.out_dim = int(proj_dim)
        self.k_out, self.k_in = kronecker_factors(self.out_dim)
        # unbiased inner products when only proj_dim of the k_out * k_in products are kept
        self._scale = math.sqrt(self.k_out * self.k_in / self.out_dim)
        device = torch.device(device)
        self._p_out, self._p_in = {}, {}
        for i, (name, (_, bias, n_out, n_in)) in enumerate(self.layers.items()):
            rows_in = n_in + (bias is not None)
            self._p_out[name] = _random_tile(kind, n_out, self.k_out, _tile_seed(seed, i, 0)).to(device)
            self._p_in[name] = _random_tile(kind, rows_in, self.k_in, _tile_seed(seed, i, 1)).to(device)

    def project_factors(self, name: str, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Projected weight (and bias) gradient of layer ``name`` from its input
        ``a`` (batch, ..., in) and output gradient ``d`` (batch, ..., out); the
        middle dimensions (e.g. sequence positions) are summed over."""
        if self.layers[name][1] is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
        pa = (a @ self._p_in[name]).reshape(a.shape[0], -1, self.k_in)
        pd = (d @ self._p_out[name]).reshape(d.shape[0], -1, self.k_out)
        return self._keep(torch.einsum("bto,bti->boi", pd, pa))

    def _keep(self, products: torch.Tensor) -> torch.Tensor:
        """The first ``proj_dim`` of the ``(batch, k_out, k_in)`` products."""
        flat = products.reshape(products.shape[0], -1)
        if flat.shape[1] == self.out_dim:
            return flat
        return flat[:, : self.out_dim] * self._scale

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection of full per-sample gradients ``{name: (batch, ...)}``."""
        out = 0
        for name, (weight, bias, _, _) in self.layers.items():
            g = grads[weight]
            if bias is not None:
                g = torch.cat([g, grads[bias][..., None]], -1)
            out = out + self._keep(torch.einsum("boi,ok,ij->bkj", g, self._p_out[name], self._p_in[name]))
        return out


def make_projector(
    numels: dict[str, int],
    proj_dim: int | None,
    seed: int,
    kind: str = "gaussian",
    device: torch.device | str = "cpu",
):
    """The projector for gradients of ``numels`` parameters: identity when the
    gradient already has at most ``proj_dim`` entries (projecting could only add
    noise), a dense random projection otherwise."""
    if proj_dim is None or sum(numels.values()) <= proj_dim:
        return IdentityProjector(numels)
    return DenseProjector(numels, proj_dim, seed, kind=kind, device=device)
