"""Per-layer routes of the gradient engine.

A route computes one module's share of the per-sample gradients from what an
ordinary forward and backward pass over a chunk already computes: the module's
inputs (a forward hook) and the gradient of the target with respect to its
outputs (one ``autograd.grad`` for the whole chunk). It either projects that
share without forming it (the Kronecker routes) or returns it exactly.

Routes are keyed by *parameter*: every module that holds a differentiated
parameter gets a route, and a parameter held by several modules (a language
model's embedding tied to its output layer) sums the contributions of all of
them into one projection block. The projection of a member's gradient is a sum
over its parameters, ``phi = sum_p P_p^T g_p``, with an independent random block
per parameter; stacked, the blocks are one ``(p, k)`` projection of the whole
gradient that preserves inner products in expectation, as a dense one does, and
every parameter is projected onto all ``k`` dimensions. For the per-layer curvature
methods (K-FAC, EK-FAC) the blocks are kept side by side instead, each layer with
its own ``k_out x k_in`` block (:func:`~sktda._projection.layer_widths`).

- Kronecker routes (``nn.Linear``, transformers' ``Conv1D``, ``nn.Conv2d``,
  ``nn.Embedding``, ``nn.MultiheadAttention``): the weight gradient is a sum of
  outer products (output gradient x input, output gradient x image patch, one-hot
  token x output gradient), projected with a :class:`KroneckerBlock` at
  ``O(positions x k)`` per sample. A call made once for a whole batch (a
  positional embedding of ``arange(T)``, broadcast over the samples) has its
  output expanded to one row per sample, so each sample gets its own share.
- Dense routes (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``, and
  ``nn.BatchNorm*`` with running statistics): the closed-form per-sample gradient
  of the affine parameters, projected densely; these parameters are few.
- Parameters that no route covers are differentiated from the operations that use
  them (``_uses``), and, when that fails too, row by row.

A user adds a route for their own layer type by subclassing :class:`WeightRoute`
(or :class:`Route`) with ``module_type=`` (see :mod:`sktda.routes`).
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ._projection import KroneckerBlock

# (module type or "package.module.Class", route class), most recent first
_REGISTRY: list[tuple[type | str, type]] = []


def register_route(module_type: type | str, route: type) -> None:
    """Use ``route`` for modules of ``module_type`` (a class, or its qualified name
    ``"package.module.Class"``, matched without importing the package). A route
    registered later takes precedence, so a user's route replaces a built-in one."""
    if not (isinstance(route, type) and issubclass(route, Route)):
        raise TypeError(f"route must be a subclass of sktda.routes.Route, got {route!r}.")
    if not isinstance(module_type, type | str):
        raise TypeError(f"module_type must be a class or a qualified class name, got {module_type!r}.")
    _REGISTRY.insert(0, (module_type, route))


def registered_routes() -> tuple:
    """The routes registered now, most recent first: handed to every featurization
    job, so that a process of a parallel backend uses the routes a user registered
    in the driver."""
    return tuple(_REGISTRY)


def routes_for(modules, registry) -> tuple:
    """The entries of ``registry`` that some of ``modules`` would use: what a job
    needs to carry (other registered routes may not even be importable there)."""
    used = {route_class(m, registry) for m in modules}
    return tuple(entry for entry in registry if entry[1] in used)


def route_class(module: nn.Module, registry=None) -> type | None:
    """The route registered for ``module``'s type (or one of its bases), if any."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__}
    for module_type, route in _REGISTRY if registry is None else registry:
        if (module_type in names) if isinstance(module_type, str) else isinstance(module, module_type):
            return route
    return None


def own_forward(module: nn.Module, registry=None) -> bool:
    """Whether ``module`` is a subclass, with a ``forward`` of its own, of the type
    its route is registered for (transformers' ``BartLearnedPositionalEmbedding``,
    an ``nn.Embedding`` that embeds positions computed from its input): the
    route's reading of the call may not hold, so only the route check trusts it."""
    for module_type, _ in _REGISTRY if registry is None else registry:
        for base in type(module).__mro__:
            name = f"{base.__module__}.{base.__qualname__}"
            if (name == module_type) if isinstance(module_type, str) else (base is module_type):
                return type(module).forward is not base.forward
    return False


class Route:
    """One module's share of the per-sample gradients.

    ``name`` is the module's name in the member and ``params`` maps the module's
    attribute path (``"weight"``, ``"out_proj.bias"``) to the member's parameter
    name (tied parameters have one name). Subclasses are registered for a module
    type with ``class MyRoute(Route, module_type=MyLayer)``.

    The engine calls :meth:`build` once, :meth:`record` from a forward hook on every
    call of the module, and then, for every recorded ``(context, tensor)`` with the
    gradient ``d`` of the per-sample targets with respect to ``tensor``, either
    :meth:`pair` (Kronecker routes, when projecting: the projected factors of
    every position, from which the engine forms the projected gradient and, for
    K-FAC and EK-FAC, the factors' second moments) or :meth:`gradients`.
    """

    kronecker = False

    def __init_subclass__(cls, module_type=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if module_type is not None:
            for t in module_type if isinstance(module_type, tuple) else (module_type,):
                register_route(t, cls)

    def __init__(self, name: str, params: dict[str, str], module: nn.Module):
        self.name, self.params, self.module = name, params, module

    @classmethod
    def accepts(cls, module: nn.Module, params: dict[str, str]) -> bool:
        """Whether the route can take the per-sample gradients of these parameters
        of the module (``{attribute: name}``)."""
        return True

    def build(self, projection) -> None:
        """Claim projection blocks (``projection.block``) for the weights whose
        gradients :meth:`project` projects."""

    def record(self, module, args, kwargs, output):
        """``(calls, output)``: the ``(context, tensor)`` pairs of one call, whose
        tensors' gradients the engine takes, and the module's output (which may be
        replaced by an equal tensor computed in the hook)."""
        return [(args[0], output)], output

    def gradients(self, context, d: torch.Tensor) -> dict[str, torch.Tensor]:
        """Exact per-sample gradients ``{parameter name: (batch, *shape)}``."""
        raise NotImplementedError

    def pair(self, context, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Kronecker routes: the projected factors of every position, ``(P_left^T
        left, P_right^T right (+ bias row))``, ``(batch, ..., k_out)`` and
        ``(batch, ..., k_in)``, of the block :meth:`block_of` names."""
        raise NotImplementedError

    def project(self, context, d: torch.Tensor) -> torch.Tensor:
        """Kronecker routes: the projected gradients, ``(batch, k_out, k_in)``."""
        return KroneckerBlock.combine(*self.pair(context, d))

    def block_of(self, context) -> str:
        """Kronecker routes: the weight whose block a call's :meth:`project` fills."""
        raise NotImplementedError

    @property
    def parameter_names(self) -> set[str]:
        return set(self.params.values())

    def blocks(self) -> dict[str, tuple[int, int, bool]]:
        """``{weight name: (n_left, n_right, transposed)}`` of the blocks it projects
        into (known before building, so that tied weights can be checked)."""
        return {}


class WeightRoute(Route):
    """A layer whose weight, viewed as an ``(n_left, n_right)`` matrix, has the
    per-sample gradient ``sum_t left_t right_t^T`` over the calls' positions
    ``t``, and whose optional bias has ``sum_t left_t``. A subclass provides
    :meth:`factors`; :meth:`projected_factors` may compute the projected factors
    without forming the raw ones.
    """

    kronecker = True
    transposed = False  # the weight is stored as (n_right, n_left)

    @classmethod
    def accepts(cls, module, params):
        return "weight" in params and set(params) <= {"weight", "bias"}

    def shape(self) -> tuple[int, int]:
        """``(n_left, n_right)``: output-side and input-side sizes of the weight."""
        w = self.module.weight
        return (w.shape[1], w.shape[0]) if self.transposed else (w.shape[0], w[0].numel())

    def blocks(self):
        return {self.params["weight"]: (*self.shape(), self.transposed)}

    @property
    def bias(self) -> str | None:
        return self.params.get("bias")

    def build(self, projection):
        self.block = projection.block(self.params["weight"], *self.shape(), self.transposed)
        if self.bias is not None:
            self.block.add_bias(self.bias)

    def block_of(self, context) -> str:
        return self.block.weight

    def factors(self, context, d) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(left, right)`` factors, ``(batch, ..., n_left)`` and ``(batch, ...,
        n_right)`` (a factor of batch 1 is broadcast over the batch)."""
        raise NotImplementedError

    def projected_factors(self, context, d) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_left^T left, P_right^T right)`` of every position."""
        left, right = self.factors(context, d)
        return left @ self.block.p_left, right @ self.block.p_right

    def pair(self, context, d):
        p_left, p_right = self.projected_factors(context, d)
        if self.bias is not None:
            p_right = p_right + self.block.bias_rows[self.bias]
        return p_left, p_right

    def gradients(self, context, d):
        left, right = self.factors(context, d)
        b = max(left.shape[0], right.shape[0])
        left = left.reshape(left.shape[0], -1, left.shape[-1]).expand(b, -1, -1)
        right = right.reshape(right.shape[0], -1, right.shape[-1]).expand(b, -1, -1)
        g = torch.einsum("btl,btr->blr", left, right)
        weight = self.module.weight
        g = g.transpose(1, 2) if self.transposed else g.reshape(b, *weight.shape)
        out = {self.params["weight"]: g}
        if self.bias is not None:
            out[self.bias] = left.sum(1)
        return out


class LinearRoute(WeightRoute, module_type=nn.Linear):
    """``nn.Linear`` with any leading dimensions: gradient ``sum_t d_t a_t^T``."""

    def factors(self, a, d):
        return d, a


class Conv1DRoute(WeightRoute, module_type="transformers.pytorch_utils.Conv1D"):
    """transformers' ``Conv1D`` (GPT-2's attention and MLP layers): a linear layer
    whose weight is stored transposed, ``(in, out)``."""

    transposed = True

    def factors(self, a, d):
        return d, a


class Conv2dRoute(WeightRoute, module_type=nn.Conv2d):
    """``nn.Conv2d`` (any stride, padding, dilation and groups): the gradient of
    group ``j`` is ``sum_positions d_j (x) patch_j``. The patches' projections are
    themselves a convolution of the (padded) input, with the columns of
    ``P_right`` as kernels, so the patches are never unfolded to project."""

    def build(self, projection):
        super().build(projection)
        module = self.module
        k_in, g = self.block.p_right.shape[1], module.groups
        kernels = self.block.p_right.T.reshape(k_in, -1, *module.kernel_size)
        self._kernels = kernels.repeat(g, 1, 1, 1)  # (g k_in, C / g, kh, kw): one set per group

    def _padded(self, x):
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return F.pad(x, m._reversed_padding_repeated_twice, mode=mode)

    def pair(self, x, d):
        m = self.module
        p_right = F.conv2d(self._padded(x), self._kernels, None, m.stride, 0, m.dilation, m.groups)
        b, g, L = x.shape[0], m.groups, d.shape[-2] * d.shape[-1]
        p_right = p_right.reshape(b, g, -1, L).transpose(2, 3)  # (b, g, L, k_in)
        if self.bias is not None:
            p_right = p_right + self.block.bias_rows[self.bias]
        p_left = torch.einsum(
            "bgol,gok->bglk",
            d.reshape(b, g, -1, L),
            self.block.p_left.reshape(g, -1, self.block.p_left.shape[-1]),
        )
        return p_left, p_right

    def gradients(self, x, d):
        m = self.module
        patches = F.unfold(self._padded(x), m.kernel_size, m.dilation, 0, m.stride)  # (b, C kh kw, L)
        b, g, L = x.shape[0], m.groups, d.shape[-2] * d.shape[-1]
        g_w = torch.einsum("bgol,bgcl->bgoc", d.reshape(b, g, -1, L), patches.reshape(b, g, -1, L))
        out = {self.params["weight"]: g_w.reshape(b, *m.weight.shape)}
        if self.bias is not None:
            out[self.bias] = d.reshape(b, d.shape[1], -1).sum(-1)
        return out


class EmbeddingRoute(WeightRoute, module_type=nn.Embedding):
    """``nn.Embedding``: the gradient is ``sum_t onehot(i_t) d_t^T``, so the left
    factor of a token is its row of ``P_left``, and the ``vocab x dim`` gradient is
    never formed. The padding index gets no gradient, as in torch."""

    @classmethod
    def accepts(cls, module, params):
        return set(params) == {"weight"} and module.max_norm is None and not module.scale_grad_by_freq

    def _kept(self, idx):
        padding = self.module.padding_idx
        return None if padding is None else (idx != padding)[..., None]

    def projected_factors(self, idx, d):
        p_left = self.block.p_left[idx]
        kept = self._kept(idx)
        return (p_left if kept is None else p_left * kept), d @ self.block.p_right

    def gradients(self, idx, d):
        b = max(idx.shape[0], d.shape[0])
        idx = idx.expand(b, *idx.shape[1:]).reshape(b, -1)
        d = d.reshape(b, idx.shape[1], -1)
        kept = self._kept(idx)
        if kept is not None:
            d = d * kept
        g = torch.zeros(b, *self.module.weight.shape, dtype=d.dtype, device=d.device)
        g.scatter_add_(1, idx[..., None].expand(-1, -1, d.shape[-1]), d)
        return {self.params["weight"]: g}


class MultiheadAttentionRoute(Route, module_type=nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (the self-attention of ``nn.Transformer*`` layers).
    torch computes it in one fused function that never calls ``out_proj`` as a
    module, so the route's forward hook recomputes the module's output with its
    in- and out-projections as explicit linear maps, and records them: each is
    then an ``nn.Linear`` gradient over the sequence. Supported: packed
    ``in_proj_weight`` (``kdim = vdim = embed_dim``), no ``bias_k``/``bias_v``, no
    ``add_zero_attn``; the module is evaluated without dropout, as members are."""

    kronecker = True
    _PARTS = {"in": ("in_proj_weight", "in_proj_bias"), "out": ("out_proj.weight", "out_proj.bias")}

    @classmethod
    def accepts(cls, module, params):
        known = {name for pair in cls._PARTS.values() for name in pair}
        if not module._qkv_same_embed_dim or module.bias_k is not None or module.add_zero_attn:
            return False
        if not set(params) <= known:  # e.g. adapters wrapped around out_proj
            return False
        return all(weight in params or bias not in params for weight, bias in cls._PARTS.values())

    def __init__(self, name, params, module):
        super().__init__(name, params, module)
        E = module.embed_dim
        shapes = {"in": (3 * E, E), "out": (E, E)}
        # part: (weight name, bias name or None, (n_left, n_right))
        self.parts = {
            part: (params[w], params.get(b), shapes[part])
            for part, (w, b) in self._PARTS.items()
            if w in params
        }
        self._signature = inspect.signature(module.forward)

    def blocks(self):
        return {weight: (*shape, False) for weight, _, shape in self.parts.values()}

    def build(self, projection):
        self._blocks = {}
        for part, (weight, bias, shape) in self.parts.items():
            self._blocks[part] = projection.block(weight, *shape)
            if bias is not None:
                self._blocks[part].add_bias(bias)

    def record(self, module, args, kwargs, output):
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
        calls = []
        if self_attention:
            qkv = F.linear(q, W, bias)
            calls.append((("in", q, slice(None)), qkv))
            q, k, v = qkv.chunk(3, -1)
        else:
            parts = []
            for j, x in enumerate((q, k, v)):
                rows = slice(j * E, (j + 1) * E)
                parts.append(F.linear(x, W[rows], None if bias is None else bias[rows]))
                calls.append((("in", x, rows), parts[-1]))
            q, k, v = parts
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(N, -1, H, E // H).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-2, -1) / math.sqrt(E // H) + self._mask(a.arguments, N, H, L, S, q)
        weights = torch.softmax(scores, -1)
        context = (weights @ v).transpose(1, 2).reshape(N, L, E)
        out = F.linear(context, module.out_proj.weight, module.out_proj.bias)
        calls.append((("out", context, slice(None)), out))
        if not batched:
            out = out[0]
        elif not module.batch_first:
            out = out.transpose(0, 1)
        attn = None
        if a.arguments["need_weights"]:
            attn = weights.mean(1) if a.arguments["average_attn_weights"] else weights
            attn = attn if batched else attn[0]
        return [c for c in calls if c[0][0] in self.parts], (out, attn)

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

    def block_of(self, context):
        return self._blocks[context[0]].weight

    def pair(self, context, d):
        part, x, rows = context
        block, bias = self._blocks[part], self.parts[part][1]
        return d @ block.p_left[rows], block.right(x, bias)

    def gradients(self, context, d):
        part, x, rows = context
        weight, bias, (n_left, n_right) = self.parts[part]
        b = d.shape[0]
        d, x = d.reshape(b, -1, d.shape[-1]), x.reshape(b, -1, x.shape[-1])
        g = torch.zeros(b, n_left, n_right, dtype=d.dtype, device=d.device)
        g[:, rows] = torch.einsum("btl,btr->blr", d, x)
        out = {weight: g}
        if bias is not None:
            g_b = torch.zeros(b, n_left, dtype=d.dtype, device=d.device)
            g_b[:, rows] = d.sum(1)
            out[bias] = g_b
        return out


class NormRoute(Route, module_type=(nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)):
    """Affine normalisation layers: ``y = norm(x) * weight + bias``, so the
    per-sample gradients are ``sum d * norm(x)`` and ``sum d`` over everything but
    the parameters' own dimensions, projected densely."""

    @classmethod
    def accepts(cls, module, params):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # batch statistics would couple the samples of a chunk
            return module.running_mean is not None and not module.training
        return set(params) <= {"weight", "bias"}

    def _normalized(self, x):
        m = self.module
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)

    def _per_sample(self, t):
        """Sum of ``t`` over everything but the batch and the parameters' dimensions."""
        m = self.module
        if isinstance(m, nn.LayerNorm | nn.RMSNorm):  # parameters over the trailing normalized_shape
            return t.reshape(t.shape[0], -1, *m.normalized_shape).sum(1)
        return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)  # parameters per channel (dimension 1)

    def gradients(self, x, d):
        return {
            name: self._per_sample(d * self._normalized(x) if attr == "weight" else d)
            for attr, name in self.params.items()
        }


# transformers' own RMS normalisations (and T5's), ``weight * x / rms(x)`` computed in
# float32; Gemma's ``(1 + weight)`` has the same gradient
_TRANSFORMERS_RMS_NORMS = tuple(
    f"transformers.models.{package}.modeling_{package}.{name}"
    for package, name in (
        ("llama", "LlamaRMSNorm"),
        ("mistral", "MistralRMSNorm"),
        ("mixtral", "MixtralRMSNorm"),
        ("qwen2", "Qwen2RMSNorm"),
        ("qwen3", "Qwen3RMSNorm"),
        ("gemma", "GemmaRMSNorm"),
        ("gemma2", "Gemma2RMSNorm"),
        ("phi3", "Phi3RMSNorm"),
        ("t5", "T5LayerNorm"),
    )
)


class RMSNormRoute(NormRoute, module_type=_TRANSFORMERS_RMS_NORMS):
    """The RMS normalisations that transformers models define for themselves (they
    are not ``nn.RMSNorm``): ``y = x / sqrt(mean(x^2) + eps) * weight``, over the last
    dimension. The route check against autograd demotes a variant that differs."""

    @classmethod
    def accepts(cls, module, params):
        return set(params) == {"weight"} and module.weight.dim() == 1

    def _normalized(self, x):
        eps = getattr(self.module, "variance_epsilon", getattr(self.module, "eps", 1e-6))
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def _per_sample(self, t):
        return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)


def assign_routes(
    module: nn.Module, names, exclude=frozenset(), registry=None
) -> tuple[list[Route], set[str]]:
    """Routes for the differentiated parameters ``names`` of ``module`` (but those in
    ``exclude``), and the parameters no route covers.

    Every module holding one of them is considered, tied parameters included (one
    name, several holders); the parameters of an attention's ``out_proj`` belong
    to the attention. A parameter is covered only if every module holding it has a
    route that accepts it, and a weight shared by several routes only if they
    agree on its block's shape."""
    names = set(names) - set(exclude)
    canonical = {id(p): n for n, p in module.named_parameters()}
    holders: dict[str, dict[str, str]] = defaultdict(dict)
    modules = dict(module.named_modules())
    for mname, m in modules.items():
        for attr, p in m.named_parameters(recurse=False, remove_duplicate=False):
            name = canonical.get(id(p))
            if name not in names:
                continue
            owner, path = mname, attr
            parent = mname
            while parent and not isinstance(modules[parent], nn.MultiheadAttention):
                parent = parent.rpartition(".")[0]
            if parent and parent != mname:
                owner, path = parent, f"{mname[len(parent) + 1 :]}.{attr}"
            holders[owner][path] = name
    candidates = {}
    for owner, params in holders.items():
        cls = route_class(modules[owner], registry)
        if cls is not None and cls.accepts(modules[owner], params):
            candidates[owner] = cls(owner, params, modules[owner])
    while True:
        held_by = defaultdict(set)
        for owner, params in holders.items():
            for name in params.values():
                held_by[name].add(owner)
        covered = {n for n, owners in held_by.items() if owners <= set(candidates)}
        shapes: dict[str, set] = defaultdict(set)
        for route in candidates.values():
            for weight, shape in route.blocks().items():
                shapes[weight].add(shape)
        covered -= {w for w, s in shapes.items() if len(s) > 1}
        dropped = [o for o, r in candidates.items() if not r.parameter_names <= covered]
        if not dropped:
            break
        for owner in dropped:
            del candidates[owner]
    routes = list(candidates.values())
    return routes, names - covered
