"""Per-layer routes of the gradient engine.

A route projects one differentiated module's per-sample gradient from what an
ordinary forward and backward pass over a chunk already computes: the module's
inputs (a forward hook) and the gradient of the target with respect to its
outputs (one ``autograd.grad`` for the whole chunk). The per-sample gradient is
never formed.

The projection of a member's gradient is a sum over its layers,
``phi = sum_l P_l^T g_l``, with an independent random block ``P_l`` per layer.
Stacked, the blocks are one ``(p, k)`` projection of the whole gradient that
preserves inner products in expectation, as a dense one does. Every layer is
projected onto all ``k`` dimensions: there is no budget to split between layers,
so none is starved, whatever its size.

- Kronecker routes (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``,
  ``nn.MultiheadAttention``): the weight gradient is a sum of outer products
  (output gradient x input, output gradient x image patch, one-hot token x
  output gradient), projected with a :class:`KroneckerBlock` at
  ``O(positions x k)`` per sample.
- Dense routes (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, and
  ``nn.BatchNorm*`` with running statistics): the closed-form per-sample
  gradient of the affine parameters, from the normalised input and the output
  gradient, projected densely; these parameters are few.
- Any other parameter is differentiated with ``vmap(grad)``, alone, with a
  warning that names its layer.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from ._projection import DenseProjector, KroneckerBlock, _tile_seed, kronecker_factors


class Route:
    """One module's share of the projection. ``params`` maps the module's
    attribute path (``"weight"``, ``"out_proj.bias"``) to the member's parameter
    name. A forward hook calls :meth:`record` with a list that collects ``(context,
    output)`` pairs; :meth:`project` turns one pair and the gradient of the
    target with respect to ``output`` into ``(batch, k_out, k_in)`` Kronecker
    products (``kronecker = True``) or ``(batch, k)`` features."""

    kronecker = True

    def __init__(self, name: str, params: dict[str, str]):
        self.name, self.params = name, params

    @classmethod
    def accepts(cls, module: nn.Module, params: dict[str, str]) -> bool:
        return True

    def build(self, module, factors, proj_dim, seed, kind, device):
        """Draw the route's random matrices."""

    def record(self, records, module, args, kwargs, output):
        records.append((args[0], output))

    def project(self, context, grad):
        raise NotImplementedError

    def project_full(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The same projection of full per-sample gradients ``{name: (batch, ...)}``."""
        raise NotImplementedError

    @property
    def parameter_names(self) -> list[str]:
        return list(self.params.values())


class _WeightRoute(Route):
    """A module whose weight (and optional bias) is one Kronecker block."""

    @classmethod
    def accepts(cls, module, params):
        return "weight" in params and set(params) <= {"weight", "bias"}

    def _shape(self, module) -> tuple[int, int]:
        return module.weight.shape[0], module.weight[0].numel()

    def build(self, module, factors, proj_dim, seed, kind, device):
        self.block = KroneckerBlock(
            self.params["weight"], self.params.get("bias"), *self._shape(module), factors, seed, kind, device
        )
        self._module = module

    def project_full(self, grads):
        return self.block.full(grads)


class LinearRoute(_WeightRoute):
    """``nn.Linear`` with any leading dimensions: gradient ``sum_t d_t a_t^T``."""

    def project(self, a, d):
        return self.block.combine(d @ self.block.p_left, self.block.right(a))


class Conv2dRoute(_WeightRoute):
    """``nn.Conv2d`` (any stride, padding, dilation and groups): the gradient of
    group ``j`` is ``sum_positions d_j (x) patch_j``. The patches' projections are
    themselves a convolution of the (padded) input, with the columns of
    ``P_right`` as kernels, so the patches are never unfolded."""

    def build(self, module, factors, proj_dim, seed, kind, device):
        super().build(module, factors, proj_dim, seed, kind, device)
        k_in, g = factors[1], module.groups
        kernels = self.block.p_right[: self.block.n_right].T.reshape(k_in, -1, *module.kernel_size)
        self._kernels = kernels.repeat(g, 1, 1, 1)  # (g k_in, C / g, kh, kw): one set per group

    def project(self, x, d):
        m = self._module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
        p_right = F.conv2d(x, self._kernels, None, m.stride, 0, m.dilation, m.groups)
        b, g, L = x.shape[0], m.groups, d.shape[-2] * d.shape[-1]
        p_right = p_right.reshape(b, g, -1, L).transpose(2, 3)  # (b, g, L, k_in)
        if self.block.bias is not None:
            p_right = p_right + self.block.p_right[self.block.n_right]
        p_left = torch.einsum(
            "bgol,gok->bglk",
            d.reshape(b, g, -1, L),
            self.block.p_left.reshape(g, -1, self.block.p_left.shape[-1]),
        )
        return self.block.combine(p_left, p_right)


class EmbeddingRoute(_WeightRoute):
    """``nn.Embedding``: the gradient is ``sum_t onehot(i_t) d_t^T``, so the left
    factor of a token is its row of ``P_left``, and the ``vocab x dim`` gradient is
    never formed. The padding index gets no gradient, as in torch."""

    @classmethod
    def accepts(cls, module, params):
        return set(params) == {"weight"} and module.max_norm is None and not module.scale_grad_by_freq

    def project(self, idx, d):
        p_left = self.block.p_left[idx]
        if self._module.padding_idx is not None:
            p_left = p_left * (idx != self._module.padding_idx)[..., None]
        return self.block.combine(p_left, self.block.right(d))


class MultiheadAttentionRoute(Route):
    """``nn.MultiheadAttention`` (the self-attention of ``nn.Transformer*`` layers).
    torch computes it in one fused function that never calls ``out_proj`` as a
    module, so the route's forward hook recomputes the module's output with its
    in- and out-projections as explicit linear maps, and records them: each is
    then an ``nn.Linear`` gradient over the sequence. Supported: packed
    ``in_proj_weight`` (``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v``, no
    ``add_zero_attn``; the module is evaluated without dropout, as members are."""

    _PARTS = {"in": ("in_proj_weight", "in_proj_bias"), "out": ("out_proj.weight", "out_proj.bias")}

    @classmethod
    def accepts(cls, module, params):
        known = {name for pair in cls._PARTS.values() for name in pair}
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return False
        if not set(params) <= known:  # e.g. adapters wrapped around out_proj
            return False
        return all(weight in params or bias not in params for weight, bias in cls._PARTS.values())

    def build(self, module, factors, proj_dim, seed, kind, device):
        E = module.embed_dim
        shapes = {"in": (3 * E, E), "out": (E, E)}
        self.blocks = {
            part: KroneckerBlock(
                self.params[w],
                self.params.get(b),
                *shapes[part],
                factors,
                _tile_seed(seed, i, 2),
                kind,
                device,
            )
            for i, (part, (w, b)) in enumerate(self._PARTS.items())
            if w in self.params
        }
        self._signature = inspect.signature(module.forward)

    def record(self, records, module, args, kwargs, output):
        a = self._signature.bind(*args, **kwargs)
        a.apply_defaults()
        q, k, v = a.arguments["query"], a.arguments["key"], a.arguments["value"]
        batched = q.dim() == 3
        self_attention = q is k and k is v

        def batch_first(t):
            return t.unsqueeze(0) if not batched else (t if module.batch_first else t.transpose(0, 1))

        q, k, v = batch_first(q), batch_first(k), batch_first(v)
        E, H = module.embed_dim, module.num_heads
        W, bias = module.in_proj_weight, module.in_proj_bias
        if self_attention:
            qkv = F.linear(q, W, bias)
            self._keep(records, "in", (q, slice(None)), qkv)
            q, k, v = qkv.chunk(3, -1)
        else:
            parts = []
            for j, x in enumerate((q, k, v)):
                rows = slice(j * E, (j + 1) * E)
                parts.append(F.linear(x, W[rows], None if bias is None else bias[rows]))
                self._keep(records, "in", (x, rows), parts[-1])
            q, k, v = parts
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // H) + self._mask(a.arguments, N, H, L, S, q)
        weights = torch.softmax(scores, -1)
        context = (weights @ v).transpose(1, 2).reshape(N, L, E)
        out = F.linear(context, module.out_proj.weight, module.out_proj.bias)
        self._keep(records, "out", (context, slice(None)), out)
        if not batched:
            out = out[0]
        elif not module.batch_first:
            out = out.transpose(0, 1)
        attn = None
        if a.arguments["need_weights"]:
            attn = weights.mean(1) if a.arguments["average_attn_weights"] else weights
            attn = attn if batched else attn[0]
        return out, attn

    def _keep(self, records, part, context, output):
        if part in self.blocks:
            records.append(((part, *context), output))

    @staticmethod
    def _mask(arguments, N, H, L, S, like):
        """The additive mask of torch's attention: ``attn_mask`` (boolean True =
        masked, or float), a causal one when ``is_causal`` is given without it,
        and ``key_padding_mask``."""

        def additive(m):
            m = m.to(like.device)
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, -torch.inf)
            return m.to(like.dtype)

        mask = torch.zeros((), dtype=like.dtype, device=like.device)
        attn_mask = arguments["attn_mask"]
        if attn_mask is None and arguments["is_causal"]:
            attn_mask = torch.ones(L, S, dtype=torch.bool, device=like.device).triu(1)
        if attn_mask is not None:
            attn_mask = additive(attn_mask)
            mask = mask + (attn_mask.reshape(N, H, L, S) if attn_mask.dim() == 3 else attn_mask)
        padding = arguments["key_padding_mask"]
        if padding is not None:
            padding = additive(padding)
            mask = mask + padding.reshape(-1, 1, 1, S)
        return mask

    def project(self, context, d):
        part, x, rows = context
        block = self.blocks[part]
        return block.combine(d @ block.p_left[rows], block.right(x))

    def project_full(self, grads):
        return sum(block.full(grads) for block in self.blocks.values())


class NormRoute(Route):
    """Affine normalisation layers: ``y = norm(x) * weight + bias``, so the
    per-sample gradients are ``sum d * norm(x)`` and ``sum d`` over everything but
    the parameters' own dimensions, projected densely."""

    kronecker = False
    TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)

    @classmethod
    def accepts(cls, module, params):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # batch statistics would couple the samples of a chunk
            return module.running_mean is not None and not module.training
        return set(params) <= {"weight", "bias"}

    def build(self, module, factors, proj_dim, seed, kind, device):
        self._module = module
        numels = {n: getattr(module, attr).numel() for attr, n in self.params.items()}
        self.projector = DenseProjector(numels, proj_dim, seed, kind, device)

    def _normalized(self, x):
        m = self._module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def _per_sample(self, t):
        """Sum of ``t`` over everything but the batch and the parameters' dimensions."""
        m = self._module
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):  # parameters over the trailing normalized_shape
            return t.reshape(t.shape[0], -1, *m.normalized_shape).sum(1)
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)  # parameters per channel (dimension 1)

    def project(self, x, d):
        grads = {
            name: self._per_sample(d * self._normalized(x) if attr == "weight" else d)
            for attr, name in self.params.items()
        }
        return self.projector(grads)

    def project_full(self, grads):
        return self.projector({n: grads[n] for n in self.params.values()})


ROUTES: list[tuple[type, type[Route]]] = [
    (nn.Linear, LinearRoute),
    (nn.Conv2d, Conv2dRoute),
    (nn.Embedding, EmbeddingRoute),
    (nn.MultiheadAttention, MultiheadAttentionRoute),
    (NormRoute.TYPES, NormRoute),
]


def _route_class(module) -> type[Route] | None:
    return next((route for types, route in ROUTES if isinstance(module, types)), None)


def assign_routes(module: nn.Module, names, vmap_layers=frozenset()) -> tuple[list[Route], dict[str, str]]:
    """Routes for the parameters ``names`` of ``module``, grouped by the module that
    owns them (the parameters of an attention's ``out_proj`` belong to the
    attention), and ``{parameter: layer}`` for those without a route or in
    ``vmap_layers``."""
    modules = dict(module.named_modules())
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        owner, _, attr = name.rpartition(".")
        parent = owner
        while parent and not isinstance(modules[parent], nn.MultiheadAttention):
            parent = parent.rpartition(".")[0]
        if parent and parent != owner:
            owner, attr = parent, f"{owner[len(parent) + 1 :]}.{attr}"
        groups.setdefault(owner, {})[attr] = name
    routes, leftover = [], {}
    for owner, params in groups.items():
        cls = _route_class(modules[owner])
        if cls is not None and owner not in vmap_layers and cls.accepts(modules[owner], params):
            routes.append(cls(owner, params))
        else:
            leftover.update({name: owner for name in params.values()})
    return routes, leftover


class LayerProjector:
    """The projection of a member's gradient as a sum of per-layer blocks (see the
    module docstring): the routes' Kronecker blocks share one ``k_out x k_in``
    factorisation of ``proj_dim`` (the first ``proj_dim`` products are kept, rescaled
    to stay unbiased, when it is not exact), and ``leftover`` parameters (``{name:
    numel}``, differentiated with vmap) have a dense block."""

    def __init__(self, module, routes, leftover, proj_dim, seed, kind="gaussian", device="cpu"):
        self.routes = routes
        self.out_dim = int(proj_dim)
        factors = kronecker_factors(self.out_dim)
        self._scale = math.sqrt(factors[0] * factors[1] / self.out_dim)
        modules = dict(module.named_modules())
        for i, route in enumerate(routes):
            route.build(modules[route.name], factors, self.out_dim, _tile_seed(seed, i, 0), kind, device)
        self.leftover = (
            DenseProjector(leftover, self.out_dim, _tile_seed(seed, len(routes), 1), kind, device)
            if leftover
            else None
        )

    def finish(self, products, dense) -> torch.Tensor:
        """Features from summed Kronecker products ``(batch, k_out, k_in)`` and dense
        parts ``(batch, k)`` (either may be 0)."""
        if isinstance(products, torch.Tensor):
            flat = products.reshape(products.shape[0], -1)
            if flat.shape[1] != self.out_dim:
                flat = flat[:, : self.out_dim] * self._scale
            dense = dense + flat
        return dense

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projection of full per-sample gradients ``{name: (batch, ...)}``: the
        reference the routes are tested against."""
        products = sum(r.project_full(grads) for r in self.routes if r.kronecker)
        dense = sum(r.project_full(grads) for r in self.routes if not r.kronecker)
        if self.leftover is not None:
            dense = dense + self.leftover(grads)
        return self.finish(products, dense)
