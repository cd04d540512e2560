"""Seeded random projections of per-sample gradients.

A projector maps a batch of per-sample gradients, given as one tensor per parameter
(``{name: (batch, *shape)}``), to ``(batch, proj_dim)`` features. A Kronecker block
also projects a layer's gradient from its factors (see ``_layers``) without ever
forming it. The matrix is
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
            if name not in grads:  # a projection of some of the parameters' gradients
                continue
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


class KroneckerBlock:
    """``P_left (x) P_right``: the projection of one weight viewed as an
    ``(n_left, n_right)`` matrix whose per-sample gradient is a sum of outer
    products ``left_t right_t^T`` (over sequence positions, image patches or
    calls). A bias paired with the weight (its gradient is ``sum_t left_t``) is one
    more column, with its own random row ``r_b`` in place of ``P_right^T right_t``;
    several biases may pair with one (tied) weight, each with its own row.

    The projection of such a gradient is ``sum_t (P_left^T left_t) (x) (P_right^T
    right_t)``: ``O(n_left k_out + n_right k_in + k)`` per term instead of ``O(n_left
    n_right k)``, and the gradient is never formed. Entries are Gaussian or
    Rademacher scaled so that inner products are preserved in expectation.
    ``transposed``: the parameter is stored as ``(n_right, n_left)`` (GPT-2's
    ``Conv1D``).
    """

    def __init__(
        self, weight, n_left, n_right, factors, seed, kind="gaussian", device="cpu", transposed=False
    ):
        self.weight, self.n_left, self.n_right, self.transposed = weight, n_left, n_right, transposed
        self.factors, self._seed, self._kind, self._device = tuple(factors), seed, kind, device
        k_out, k_in = factors
        self.p_left = _random_tile(kind, n_left, k_out, _tile_seed(seed, 0, 0)).to(device)
        self.p_right = _random_tile(kind, n_right, k_in, _tile_seed(seed, 0, 1)).to(device)
        self.bias_rows: dict[str, torch.Tensor] = {}

    def add_bias(self, name: str) -> None:
        if name not in self.bias_rows:
            seed = _tile_seed(self._seed, 1 + len(self.bias_rows), 1)
            self.bias_rows[name] = _random_tile(self._kind, 1, self.factors[1], seed)[0].to(self._device)

    def right(self, a: torch.Tensor, bias: str | None = None) -> torch.Tensor:
        """``P_right^T a (+ r_b)`` for right factors ``a`` (..., n_right)."""
        out = a @ self.p_right
        return out + self.bias_rows[bias] if bias is not None else out

    @staticmethod
    def combine(
        p_left: torch.Tensor, p_right: torch.Tensor, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_t p_left_t (x) p_right_t`` of ``(batch, ..., k_out)`` and
        ``(batch, ..., k_in)`` projected factors: ``(batch, k_out, k_in)``, added
        to ``into`` when given (in place). A factor with batch 1 (a call made once
        for the whole batch) is broadcast. One batched matrix product (an einsum
        of the same takes up to 20 times longer for the one position of an MLP)."""
        b = max(p_left.shape[0], p_right.shape[0], 0 if into is None else into.shape[0])
        p_left = p_left.reshape(p_left.shape[0], -1, p_left.shape[-1]).expand(b, -1, -1)
        p_right = p_right.reshape(p_right.shape[0], -1, p_right.shape[-1]).expand(b, -1, -1)
        if into is None:
            return torch.bmm(p_left.transpose(1, 2), p_right)
        return into.baddbmm_(p_left.transpose(1, 2), p_right)

    def view(self, g: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients ``(batch, *weight.shape)`` as ``(batch, n_left, n_right)``."""
        return g.transpose(1, 2) if self.transposed else g.reshape(g.shape[0], self.n_left, self.n_right)

    def full(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection of full per-sample gradients ``{name: (batch, ...)}``."""
        out = torch.einsum("blr,lo,ri->boi", self.view(grads[self.weight]), self.p_left, self.p_right)
        for bias, row in self.bias_rows.items():
            out = out + torch.einsum("bl,lo,i->boi", grads[bias], self.p_left, row)
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
