"""The projectors: how a member's per-sample gradients become its features.

A projector maps a batch of per-sample gradients, given as one tensor per parameter
(``{name: (batch, *shape)}``), to ``(batch, out_dim)`` *features*:

- :class:`IdentityProjector`: no projection, the gradients themselves;
- :class:`DenseProjector`: one seeded random ``p x k`` matrix;
- :class:`LayerProjector`: a :class:`KroneckerBlock` per routed weight (which
  also projects a layer's gradient from its factors, as the routes of ``_layers``
  give them, without ever forming it) and a dense block for the other
  parameters, summed, or side by side for the per-layer curvature methods
  (:func:`layer_widths`).

Every random matrix is generated on the CPU in fixed tiles of rows, each from its
own seed, so it is the same on every device, whatever the batch size, and whether
it is cached or regenerated: a ``p x k`` matrix too large to keep is never held
whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_TILE_ROWS = 4096
_KINDS = ("gaussian", "rademacher")


def tile_seed(seed: int, param_index: int, tile_index: int) -> int:
    return int(np.random.SeedSequence([seed, param_index, tile_index]).generate_state(1)[0])


def _random_tile(kind: str, rows: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        tile = torch.randn(rows, k, generator=gen)
    else:
        tile = torch.randint(0, 2, (rows, k), generator=gen, dtype=torch.int8).float() * 2 - 1
    return tile.div_(math.sqrt(k))


class IdentityProjector:
    """No projection: the flattened per-sample gradients of ``numels``' parameters,
    in order (zeros for those without a gradient). ``matrices``: ``{name: (rows,
    cols)}`` of the parameters whose gradients ``layout`` marks as Kronecker blocks
    (the routed weights, as stored), the others being dense."""

    def __init__(self, numels: dict[str, int], matrices=None):
        self.numels = dict(numels)
        self.out_dim = sum(self.numels.values())
        matrices = matrices or {}
        self.layout = _layout([(k, matrices.get(n)) for n, k in self.numels.items()])

    def flatten(self, products, batch, device):
        return torch.zeros(batch, 0, device=device)

    def finish(self, products, grads, batch: int, device) -> torch.Tensor:
        parts = [
            grads[n].reshape(batch, -1) if n in grads else torch.zeros(batch, k, device=device)
            for n, k in self.numels.items()
        ]
        return torch.cat(parts, 1)

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        first = next(iter(grads.values()))
        return self.finish({}, grads, first.shape[0], first.device)


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
            yield _random_tile(self.kind, rows, self.out_dim, tile_seed(self.seed, param_index, b))

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
        self.p_left = _random_tile(kind, n_left, k_out, tile_seed(seed, 0, 0)).to(device)
        self.p_right = _random_tile(kind, n_right, k_in, tile_seed(seed, 0, 1)).to(device)
        self.bias_rows: dict[str, torch.Tensor] = {}

    def add_bias(self, name: str) -> None:
        if name not in self.bias_rows:
            seed = tile_seed(self._seed, 1 + len(self.bias_rows), 1)
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

    def project(self, name: str, g: torch.Tensor) -> torch.Tensor:
        """The projection ``(batch, k_out, k_in)`` of the full per-sample gradients
        ``g`` of ``name``, the block's weight or one of its biases."""
        if name == self.weight:
            return torch.einsum("blr,lo,ri->boi", self.view(g), self.p_left, self.p_right)
        return torch.einsum("bl,lo,i->boi", g, self.p_left, self.bias_rows[name])


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


def layer_widths(routes, numels: dict[str, int], proj_dim: int) -> tuple[dict[str, tuple[int, int]], int]:
    """Per-layer features: ``({weight: (k_out, k_in)}, k_dense)``, one Kronecker
    block per routed weight and one dense block for every other parameter.

    Every weight's block has the ``k_out x k_in`` shape that the single projection
    of ``proj_dim`` gives each weight (:func:`~sktda._projection.kronecker_factors`),
    capped by the layer's own sizes so that no layer is projected onto more dimensions than it has (a
    ``10``-output layer gets at most ``10 x k_in``), and the dense block gets
    ``min(proj_dim, its parameters)``. The features are these blocks side by side,
    so they are about ``n_layers x proj_dim`` wide."""
    k_out, k_in = kronecker_factors(proj_dim)
    shapes = {}
    for route in routes:
        if route.kronecker:
            biased = len(route.parameter_names) > len(route.blocks())  # a bias adds a column
            for weight, (n_left, n_right, _) in route.blocks().items():
                cols = max(shapes.get(weight, (0, 0))[1], n_right + biased)
                shapes[weight] = (n_left, cols)
    kron = set().union(*(r.parameter_names for r in routes if r.kronecker)) if routes else set()
    n_dense = sum(k for name, k in numels.items() if name not in kron)
    blocks = {w: (min(n_left, k_out), min(n_right, k_in)) for w, (n_left, n_right) in shapes.items()}
    return blocks, min(n_dense, proj_dim)


class LayerProjector:
    """The projection of a member's gradient from per-parameter blocks (see the
    module docstring): a Kronecker block per routed weight (and its biases), and a
    dense block for every other parameter of ``numels``.

    ``per_layer=False``: the blocks share one ``k_out x k_in`` factorisation of
    ``proj_dim`` and are summed (the first ``proj_dim`` products are kept,
    rescaled to stay unbiased, when it is not exact). ``per_layer=True``: each
    block has its own size (:func:`layer_widths`) and the features are the blocks
    side by side, ``layout`` says where, so that a method can treat each layer's
    curvature on its own. The projection of a parameter is the same whichever way
    its gradient is computed."""

    def __init__(
        self, routes, numels: dict[str, int], proj_dim, seed, kind="gaussian", device="cpu", per_layer=False
    ):
        proj_dim = int(proj_dim)
        self.per_layer = per_layer
        self.factors = kronecker_factors(proj_dim)
        self._scale = math.sqrt(self.factors[0] * self.factors[1] / proj_dim)
        self._widths, dense_dim = layer_widths(routes, numels, proj_dim) if per_layer else ({}, proj_dim)
        self._seed, self._kind, self._device = seed, kind, device
        self.blocks: dict[str, KroneckerBlock] = {}
        for route in routes:
            route.build(self)
        self._bias_blocks = {b: block for block in self.blocks.values() for b in block.bias_rows}
        dense = {n: k for n, k in numels.items() if n not in self.blocks and n not in self._bias_blocks}
        self.dense = (
            DenseProjector(dense, dense_dim, tile_seed(seed, len(self.blocks), 1), kind, device)
            if dense and dense_dim
            else None
        )
        if per_layer:
            sizes = [(math.prod(b.factors), b.factors) for b in self.blocks.values()]
            sizes += [(self.dense.out_dim, None)] if self.dense is not None else []
            self.layout = _layout(sizes)
            self.out_dim = self.layout[-1][1] if self.layout else 0
        else:
            self.out_dim = proj_dim
            self.layout = ((0, self.out_dim, None),)

    def block(self, weight: str, n_left: int, n_right: int, transposed: bool = False) -> KroneckerBlock:
        """The Kronecker block of the weight ``weight`` (one per parameter, shared by
        the routes of every module that holds it)."""
        if weight not in self.blocks:
            seed = tile_seed(self._seed, len(self.blocks), 0)
            factors = self._widths[weight] if self.per_layer else self.factors
            self.blocks[weight] = KroneckerBlock(
                weight, n_left, n_right, factors, seed, self._kind, self._device, transposed
            )
        return self.blocks[weight]

    def project_full(self, grads: dict[str, torch.Tensor]):
        """``(products, dense)``: the projection of full per-sample gradients of any of
        the parameters, as Kronecker products ``{weight: (batch, k_out, k_in)}`` and
        dense features ``(batch, k)`` (0 when there are none)."""
        products = {}
        for name, g in grads.items():
            block = self.blocks.get(name) or self._bias_blocks.get(name)
            if block is not None:
                accumulate(products, {block.weight: block.project(name, g)})
        rest = {n: g for n, g in grads.items() if n not in self.blocks and n not in self._bias_blocks}
        dense = self.dense(rest) if rest and self.dense is not None else 0
        return products, dense

    def flatten(self, products: dict, batch: int, device) -> torch.Tensor:
        """The Kronecker part of the features, ``(batch, width)``, from the products
        ``{weight: (batch, k_out, k_in)}`` (absent blocks are zero)."""
        if self.per_layer:
            parts = [
                products[w].expand(batch, -1, -1).reshape(batch, -1)  # a product of batch 1 is shared
                if w in products
                else torch.zeros(batch, math.prod(b.factors), device=device)
                for w, b in self.blocks.items()
            ]
            return torch.cat(parts, 1) if parts else torch.zeros(batch, 0, device=device)
        if not products:
            return torch.zeros(batch, self.out_dim, device=device)
        flat = sum(products.values()).expand(batch, -1, -1).reshape(batch, -1)
        return flat[:, : self.out_dim] * self._scale if flat.shape[1] != self.out_dim else flat

    def finish(self, products: dict, grads: dict[str, torch.Tensor], batch: int, device) -> torch.Tensor:
        """Features ``(batch, out_dim)`` from the routes' Kronecker products
        ``{weight: (batch, k_out, k_in)}`` and the full per-sample gradients of the
        other parameters."""
        more, dense = self.project_full(grads)
        accumulate(products, more)
        kron = self.flatten(products, batch, device)
        if not self.per_layer:
            return kron + dense
        if self.dense is None:
            return kron
        if not isinstance(dense, torch.Tensor):
            dense = torch.zeros(batch, self.dense.out_dim, device=device)
        return torch.cat([kron, dense], 1)

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projection of full per-sample gradients ``{name: (batch, ...)}``."""
        first = next(iter(grads.values()))
        return self.finish({}, grads, first.shape[0], first.device)


def _layout(sizes) -> tuple:
    """``((start, stop, shape), ...)`` of blocks of ``(width, shape)``, consecutive;
    ``shape`` is ``(k_out, k_in)`` for a Kronecker block, None for a dense one."""
    layout, start = [], 0
    for width, shape in sizes:
        layout.append((start, start + width, shape))
        start += width
    return tuple(layout)


def accumulate(total: dict, part: dict) -> None:
    """Add the tensors of ``part`` into ``total``, key by key (a new key is taken as
    it is)."""
    for k, v in part.items():
        total[k] = total[k] + v if k in total else v
