"""Seeded random projections of per-sample gradients.

A projector maps a batch of per-sample gradients, given as one tensor per parameter
(``{name: (batch, *shape)}``), to ``(batch, proj_dim)`` features. The matrix is
generated on the CPU in fixed row blocks, each from its own seed, so it is the same
on every device, whatever the batch size, and whether it is cached or regenerated:
a ``p x k`` matrix too large to keep is never held whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_BLOCK_ROWS = 4096
_KINDS = ("gaussian", "rademacher")


def _block_seed(seed: int, param_index: int, block_index: int) -> int:
    return int(np.random.SeedSequence([seed, param_index, block_index]).generate_state(1)[0])


def _random_block(kind: str, rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        block = torch.randn(rows, k, generator=gen)
    else:
        block = torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8).float() * 2 - 1
    return block.div_(math.sqrt(k))


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
    row block is regenerated per call, bounding memory by one block.
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
                name: torch.cat(list(self._blocks(i, n)), 0).to(self.device)
                for i, (name, n) in enumerate(self.numels.items())
            }

    def _blocks(self, param_index: int, numel: int):
        for b, start in enumerate(range(0, numel, _BLOCK_ROWS)):
            rows = min(_BLOCK_ROWS, numel - start)
            yield _random_block(self.kind, rows, self.out_dim, _block_seed(self.seed, param_index, b))

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(grads.values()))
        out = torch.zeros(first.shape[0], self.out_dim, device=first.device, dtype=first.dtype)
        for i, (name, numel) in enumerate(self.numels.items()):
            g = grads[name].reshape(first.shape[0], -1)
            if self._cache is not None:
                out.addmm_(g, self._cache[name])
                continue
            for b, block in enumerate(self._blocks(i, numel)):
                start = b * _BLOCK_ROWS
                out.addmm_(g[:, start : start + block.shape[0]], block.to(g.device))
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
