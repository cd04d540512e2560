"""The gradient engine shared by both estimators.

For every sample it computes the gradient of the member's target ``f`` (the
correct-class margin, or the regression output) with respect to the member's
differentiated parameters, projects it to ``proj_dim`` features, and records the residual
``-dL/df`` (the training loss's sensitivity to the target), so that the projected
loss gradient is ``-residual * phi`` without a second backward pass.

Two engines, chosen by :func:`make_engine`, meet the rest of the library only
through :class:`Features`:

- :class:`LayerEngine` (the default): one ordinary forward and backward pass per
  chunk, and each differentiated layer's share taken by its own route from its
  inputs and output gradients (``_layers``), projected without forming the
  per-sample gradient, or exact: near the cost of a training step. Parameters
  without a route are differentiated from the operations that use them
  (``_uses``), and row by row where those do not act sample by sample.
- :class:`VmapEngine` (``gradient_path="vmap"`` only): ``torch.func.vmap(grad(...))``
  over the whole model per chunk of samples, then a dense (or identity)
  projection of the full gradients.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import torch
from torch.func import grad, vmap
from torch.utils._pytree import tree_flatten

from ._data import map_tensors, materialize, n_samples, take, to_torch
from ._layers import assign_routes, own_forward, registered_routes, routes_for
from ._projection import (
    IdentityProjector,
    KroneckerBlock,
    LayerProjector,
    accumulate,
    layer_widths,
    make_projector,
)
from ._resources import feature_width
from ._task import NetTask
from ._uses import NotPerSample, UseTracer, is_batched, mark_batched, release, use_gradients

GRADIENT_PATHS = ("auto", "layers", "vmap")
# samples on which every route is checked against plain autograd before featurizing
_PROBE_ROWS = 3
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class GradientConfig:
    """How per-sample gradients are computed and stored: the task (target and
    residual), the projection, the engine path, the chunk size, the device, the
    storage type of ``phi``, the gradient routes registered when it was made, and
    whether each layer keeps its own block of features (``per_layer``, for the
    per-layer curvature methods) or all share one projection."""

    task: NetTask
    proj_dim: int | None
    projection: str = "gaussian"
    path: str = "auto"
    batch_size: int = 256
    device: torch.device = _CPU
    dtype: type = np.float32
    routes: tuple = field(default_factory=registered_routes)
    per_layer: bool = False


@dataclass
class Features:
    """Per-sample gradient features of one member.

    ``phi`` (n, k): projected gradient of the target (None from a job that wrote
    its rows into the features file, which :func:`~sktda._featurize.featurize_members` maps); ``residual`` (n,):
    ``-dL/df`` at the given label (``1 - p_y`` for classifiers, twice ``y - f`` for
    regressors); ``layout``: the blocks of ``phi``'s columns, ``((start, stop,
    shape), ...)``, ``shape`` a Kronecker block's ``(k_out, k_in)`` or None for a
    dense one; ``factors`` (per-layer
    features of training samples): for each Kronecker block in layout order, the
    sums over samples and positions ``(sum p_left p_left^T, sum p_right
    p_right^T)`` of its projected factors (float64), or None where its gradients
    were not taken by its route (:func:`~sktda._featurize.featurize` gives them as a
    :class:`~sktda._featurize.FactorSums` of its row range, :func:`~sktda._featurize.featurize_members` added up).
    """

    phi: np.ndarray
    residual: np.ndarray
    layout: tuple = ()
    factors: tuple | None = None


class GradientEngine:
    """Interface: ``chunk(x, y)`` -> ``(phi, f, residual)`` tensors for one batch."""

    out_dim: int

    def __init__(self, member, task: NetTask, device: torch.device):
        self.member = member.to(device)
        self.task = task
        self.device = device

    @property
    def layout(self) -> tuple:
        """The blocks of the features' columns (see :class:`Features`)."""
        return getattr(self.projector, "layout", ((0, self.out_dim, None),))

    def chunk(self, x: torch.Tensor, y: torch.Tensor):
        phi, f, r = self._chunk(x, y)
        if self.member.residual_variants:
            r = self._variant_residuals(x, y)
        return phi, f, r

    def _chunk(self, x, y):
        raise NotImplementedError

    def _variant_residuals(self, x, y) -> torch.Tensor:
        """``-dL/df`` averaged over the member's residual variants (dropout masks
        that enter only TRAK's ``1 - p`` term); forward passes only."""
        m = self.member
        with torch.no_grad():
            residuals = [
                self.task.target_and_residual(m.forward(m.params, x, frozen), y)[1]
                for frozen in m.residual_variants
            ]
        return torch.stack(residuals).mean(0)


class VmapEngine(GradientEngine):
    """Per-sample gradients of any module with ``vmap(grad)``, then projected."""

    def __init__(self, member, task, device, projector):
        super().__init__(member, task, device)
        self.projector = projector
        self.out_dim = projector.out_dim

        def target(params, x, y):
            out = self.member.forward(params, map_tensors(lambda t: t.unsqueeze(0), x))
            f, r = task.target_and_residual(out, y.unsqueeze(0))
            return f[0], (f[0], r[0])

        self._grad = vmap(grad(target, has_aux=True), in_dims=(None, 0, 0))

    def gradients(self, x, y):
        """``{name: (batch, ...)}`` per-sample gradients, targets and residuals."""
        with torch.no_grad(), warnings.catch_warnings():
            # torch's fallback for ops without a batching rule (attention) is exact, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            grads, (f, r) = self._grad(self.member.params, x, y)
        return grads, f, r

    def _chunk(self, x, y):
        grads, f, r = self.gradients(x, y)
        return self.projector(grads), f, r


class LayerEngine(GradientEngine):
    """Per-sample gradients from one ordinary forward and backward pass per chunk.

    ``routes`` (see ``_layers``) take their modules' shares from hooked inputs
    and output gradients; the ``traced`` parameters are differentiated from the
    operations that use them (``_uses``); the ``rowwise`` ones, which neither
    could take, row by row. ``projector`` is a :class:`LayerProjector` (projected
    features) or an :class:`IdentityProjector` (the gradients themselves)."""

    def __init__(self, member, task, device, projector, routes, traced=frozenset(), rowwise=frozenset()):
        super().__init__(member, task, device)
        self.projector = projector
        self.out_dim = projector.out_dim
        self.routes = list(routes)
        self.traced = sorted(traced)
        self.rowwise = sorted(rowwise)
        self._exact = isinstance(projector, IdentityProjector)
        # per-layer curvature of training samples: the last chunk's sums of the routes'
        # projected factors over positions, {weight: (S, A)}
        self.factor_sums = {} if getattr(projector, "per_layer", False) and task.role == "train" else None
        modules = dict(self.member.module.named_modules())
        self._hooked = [(route, modules[route.name]) for route in self.routes]

    def _pass(self, x, y, process=None):
        """One forward and backward pass over the chunk: the targets, the
        residuals, the routes' calls ``(route, context, gradient)``, the traced
        uses ``(use, gradients)`` and the leaves the uses differentiate.

        With ``process``, a routed call whose tensor is its module's output is
        handed to ``process(route, context, gradient)`` as the backward pass
        reaches it, and released: no call's context or output gradient outlives
        its layer's step of the backward pass, so the pass holds about what a
        training step holds. (Its output is tapped, ``out + sink`` with a zero
        scalar leaf ``sink``: the gradient of ``sink`` is what is asked for, which
        makes the backward pass go through every tapped output, and no
        parameter's gradient is formed.) Other calls are returned as without it."""
        n = n_samples(x)
        calls = []
        sink = torch.zeros((), device=self.device, requires_grad=True) if process is not None else None
        tap = None if sink is None else partial(_tap, sink, process)
        hooks = [
            module.register_forward_hook(partial(_record, route, calls, n, tap), with_kwargs=True)
            for route, module in self._hooked
        ]
        params = {k: v.detach().requires_grad_() for k, v in self.member.params.items()}
        tracer = UseTracer({k: params[k] for k in self.traced}, x, n) if self.traced else None
        try:
            with torch.enable_grad():
                with tracer or nullcontext():
                    out = self.member.forward(params, x)
                f, r = self.task.target_and_residual(out, y)
                uses = tracer.uses if tracer is not None else []
                outputs = [t for _, _, t in calls] + [t for use in uses for t in use.outputs]
                asked = ([] if sink is None else [sink]) + outputs
                # samples are independent in eval mode, so d(sum f)/d out_i = df_i/d out_i
                if f.requires_grad and asked:
                    deltas = list(torch.autograd.grad(f.sum(), asked, allow_unused=True))[
                        len(asked) - len(outputs) :
                    ]
                else:  # no differentiated parameter reaches the target
                    deltas = [None] * len(outputs)
        finally:
            for hook in hooks:
                hook.remove()
            if tracer is not None:
                release(tracer.params, x)
        routed = [(route, context, d) for (route, context, _), d in zip(calls, deltas)]
        rest = iter(deltas[len(calls) :])
        traced = [(use, [next(rest) for _ in use.outputs]) for use in uses]
        return f.detach(), r.detach(), routed, traced, params

    def _route_part(self, route, context, d):
        """A call's Kronecker products (projecting) or exact gradients."""
        if route.kronecker and not self._exact:
            return route.project(context, d)
        return route.gradients(context, d)

    def _traced_gradients(self, traced, params, n) -> dict[str, torch.Tensor]:
        grads = {}
        for use, ds in traced:
            if any(d is not None for d in ds):
                accumulate(grads, use_gradients(use, params, ds, n))
        return grads

    def _chunk(self, x, y):
        n = n_samples(x)
        products, grads, left_sums, right_sums = {}, {}, {}, {}
        shared = self.factor_sums is None and not getattr(self.projector, "per_layer", True)

        def process(route, context, d):
            if d is None:
                return
            with torch.no_grad():
                if not route.kronecker or self._exact:
                    accumulate(grads, route.gradients(context, d))
                    return
                p_left, p_right = route.pair(context, d)
                block = route.block_of(context)
                if shared:  # one factorisation for every block: their products summed as they come
                    block = _SHARED
                if block in products:
                    KroneckerBlock.combine(p_left, p_right, into=products[block])
                else:
                    products[block] = KroneckerBlock.combine(p_left, p_right, into=None)
                    if products[block].shape[0] != n:  # a product of batch 1 is each sample's
                        products[block] = products[block].expand(n, -1, -1).clone()
                if self.factor_sums is not None:
                    accumulate(left_sums, {block: _second_moment(p_left, n)})
                    accumulate(right_sums, {block: _second_moment(p_right, n)})

        f, r, routed, traced, params = self._pass(x, y, process)
        for route, context, d in routed:  # the calls not taken as the backward pass went
            process(route, context, d)
        if self.factor_sums is not None:
            self.factor_sums = {block: (left_sums[block], right_sums[block]) for block in left_sums}
        try:
            accumulate(grads, self._traced_gradients(traced, params, n))
        except NotPerSample:  # this chunk's shapes do not split by sample: row by row
            accumulate(grads, self._row_gradients(x, y, self.traced))
        if self.rowwise:
            accumulate(grads, self._row_gradients(x, y, self.rowwise))
        with torch.no_grad():
            phi = self.projector.finish(products, grads, n, self.device)
        return phi, f, r

    def _targets(self, x, y, names):
        """The targets of ``(x, y)`` with the parameters ``names`` as fresh leaves:
        ``(f, {name: leaf})``, ``f`` differentiable."""
        params = {k: v.detach().requires_grad_(k in names) for k, v in self.member.params.items()}
        with torch.enable_grad():
            f, _ = self.task.target_and_residual(self.member.forward(params, x), y)
        return f, {k: params[k] for k in names}

    def _row_gradients(self, x, y, names) -> dict[str, torch.Tensor]:
        """``{name: (n, *shape)}``: the gradients of ``names``, one forward and one
        backward pass per sample, by plain autograd (for parameters whose operations
        do not act sample by sample)."""
        rows = []
        for i in range(n_samples(x)):
            f, leaves = self._targets(take(x, slice(i, i + 1)), y[i : i + 1], names)
            rows.append(_gradients_of(f[0], leaves))
        return _stack(rows)

    def _reference_gradients(self, x, y, kept: set, projected: list):
        """Every parameter's gradient of each sample's target, by plain autograd,
        one backward pass per sample through one forward pass of the chunk (so that
        a kink, a tie in a max-pool, is resolved as in the engine's own pass), each
        sample's gradient projected (``projected``: the parameter sets whose
        projection is compared) and dropped at once, so that the check holds one
        sample's full gradient at a time. Returns ``({name: (n, *shape)}`` of the
        ``kept`` parameters, ``[projection (n rows)]`` of each projected set, the
        norm of the whole gradients, the targets)."""
        f, leaves = self._targets(x, y, set(self.member.params))
        rows, projections, squares = [], [[] for _ in projected], 0.0
        for i in range(len(f)):
            grads = _gradients_of(f[i], leaves, retain_graph=i < len(f) - 1)
            squares += float(sum(g.norm() ** 2 for g in grads.values()))
            rows.append({k: grads[k] for k in kept})
            for names, out in zip(projected, projections):
                out.append(self.projector.project_full({k: grads[k][None] for k in names})[0])
            del grads
        stacked = [
            {w: torch.cat([row[w] for row in parts]) for w in parts[0]} if parts else {}
            for parts in projections
        ]
        return _stack(rows) if kept else {}, stacked, squares**0.5, f.detach()

    def _row_targets(self, x, y) -> torch.Tensor:
        """Each sample's target from a forward pass of that sample alone."""
        with torch.no_grad():
            return torch.cat(
                [
                    self.task.target_and_residual(
                        self.member.forward(self.member.params, take(x, slice(i, i + 1))), y[i : i + 1]
                    )[0]
                    for i in range(n_samples(x))
                ]
            )

    def _failing(self, exc: Exception) -> list:
        """The routes to demote when the engine's pass fails with ``exc``: those
        on subclasses with a ``forward`` of their own (see :func:`own_forward`),
        else every route; ``exc`` itself when the pass has no routes to blame."""
        if not self.routes:
            raise exc
        return [r for r in self.routes if own_forward(r.module)] or list(self.routes)

    def check(self, x, y):
        """Compare every route and traced parameter, on the samples ``(x, y)``, with
        plain autograd under the same projection. Returns the routes that disagree
        (their parameters are used outside their own forward: read directly, or by
        a module without a route) and the traced parameters whose uses cannot be
        split per sample. Raises ``ValueError`` when a sample's target depends on
        the other samples of its chunk."""
        components = _components(self.routes)
        projected = [c[0].kronecker and not self._exact for c in components]
        owns = [set().union(*(r.parameter_names for r in c)) for c in components]
        kept = set(self.traced).union(*(own for own, p in zip(owns, projected) if not p))
        reference, projections, scale, f_batch = self._reference_gradients(
            x, y, kept, [own for own, p in zip(owns, projected) if p]
        )
        projections = iter(projections)
        _check_finite(f_batch)
        _check_independent(f_batch, self._row_targets(x, y))
        try:
            f, _, routed, traced, params = self._pass(x, y)
        except Exception as exc:  # a route that cannot read its module's calls: demoted
            return self._failing(exc), set()
        if not torch.allclose(f, f_batch, rtol=1e-4, atol=1e-6 * (1 + float(f_batch.abs().max()))):
            raise RuntimeError(
                "sktda's gradient hooks changed the module's outputs; please report this with the "
                "module. gradient_path='vmap' avoids the hooks."
            )

        differs = partial(_differs, scale=scale)
        failed_routes = []
        with torch.no_grad():
            for component, own, is_projected in zip(components, owns, projected):
                calls = [(rt, c, d) for rt, c, d in routed if rt in component and d is not None]
                expected = next(projections) if is_projected else reference
                if self._route_differs(calls, own, is_projected, expected, len(f_batch), differs):
                    failed_routes.extend(component)
        failed_traced, grads = set(), {}
        for use, ds in traced:
            try:
                accumulate(grads, self._traced_gradients([(use, ds)], params, n_samples(x)))
            except NotPerSample:
                failed_traced |= use.names
        for k in set(self.traced) - failed_traced:
            if differs(grads.get(k, torch.zeros_like(reference[k])), reference[k]):
                failed_traced.add(k)
        return failed_routes, failed_traced

    def _route_differs(self, calls, own, is_projected, expected, n, differs) -> bool:
        """Whether a component's routes, from their ``calls``, fail or disagree with
        autograd's ``expected`` gradients (projected products when
        ``is_projected``, else exact gradients of the parameters ``own``)."""
        try:
            parts = [self._route_part(rt, c, d) for rt, c, d in calls]
        except Exception:  # any failure of a route demotes it
            return True
        got = {}
        if is_projected:
            for (rt, c, _), part in zip(calls, parts):
                accumulate(got, {rt.block_of(c): part})
            # a call whose output has no sample dimension gives a product of another batch
            return any(t.shape[0] not in (1, n) for t in got.values()) or differs(
                self.projector.flatten(got, n, self.device), self.projector.flatten(expected, n, self.device)
            )
        for part in parts:
            accumulate(got, part)
        return any(differs(got.get(k, torch.zeros_like(expected[k])), expected[k]) for k in own)


def _differs(got: torch.Tensor, expected: torch.Tensor, scale: float) -> bool:
    """Whether a route's gradients disagree with autograd's: a broken route is off
    by its whole size, float32 cancellation (a target summed over many tokens) by
    far less than 1%."""
    tolerance = 1e-2 * float(max(expected.norm(), got.norm())) + 1e-6 * scale
    return got.shape != expected.shape or float((got - expected).norm()) > tolerance


def _record(route, calls, n, tap, module, args, kwargs, output):
    """Forward hook: the route's record of one call. A call made once for a whole
    chunk (every input and the output of batch 1, as a positional embedding of
    ``arange(T)[None]`` broadcast over the samples) has its output expanded to one
    row per sample, so that each sample's output gradient is its own. With
    ``tap`` (see :meth:`LayerEngine._pass`), the contexts of the module's output
    are handed over by its gradient's hook, not kept in ``calls``."""
    recorded, out = route.record(module, args, kwargs, output)
    if n > 1 and _called_once(args, kwargs, out):
        expanded = mark_batched(out.expand(n, *out.shape[1:]).contiguous())
        recorded = [(c, expanded if t is out else t) for c, t in recorded]
        out = expanded
    if tap is not None and isinstance(out, torch.Tensor) and any(t is out for _, t in recorded):
        contexts = [c for c, t in recorded if t is out]
        recorded = [(c, t) for c, t in recorded if t is not out]
        out = tap(route, contexts, out)
    calls.extend((route, c, t) for c, t in recorded)
    return None if out is output else out


def _tap(sink, process, route, contexts, out):
    """``out + sink``, equal to ``out``, whose gradient hook hands every context of
    the call to ``process`` with that gradient, then lets go of them."""
    tapped = out + sink.to(out.dtype)
    if is_batched(out):
        mark_batched(tapped)

    def hand_over(d):
        while contexts:
            process(route, contexts.pop(0), d)

    tapped.register_hook(hand_over)
    return tapped


def _called_once(args, kwargs, out) -> bool:
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 1:
        return False
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    return all(t.dim() > 0 and t.shape[0] == 1 for t in tensors)


def _check_finite(f: torch.Tensor) -> None:
    """Refuse targets that are not finite: no gradient of them means anything."""
    bad = torch.nonzero(~torch.isfinite(f.reshape(-1))).reshape(-1)
    if len(bad):
        raise ValueError(
            f"The module's outputs are not finite (NaN or inf) in eval mode for {len(bad)} of the "
            f"{len(f)} samples checked (the first: row {int(bad[0])}), so their gradients are not "
            "defined. Check the module on these inputs in eval mode (a division by zero, an overflow, "
            "a layer whose eval-mode statistics were never set), scale X, or lower lr."
        )


def _check_independent(f_batch, f_rows) -> None:
    """Refuse a module whose output for a sample depends on the rest of its chunk:
    per-sample gradients, and every result, would then depend on batch_size."""
    if not torch.allclose(f_batch, f_rows, rtol=1e-3, atol=1e-5 * (1 + float(f_rows.abs().max()))):
        raise ValueError(
            "The module's output for a sample changes with the other samples of its batch (batch "
            "statistics, or a computation across the batch dimension), so per-sample gradients are "
            "not defined. Evaluate the module sample by sample in eval mode (for example BatchNorm "
            "with track_running_stats=True)."
        )


def _second_moment(factors: torch.Tensor, n: int) -> torch.Tensor:
    """``sum_t f_t f_t^T`` over the samples' positions of projected factors ``(batch,
    ..., k)``, a factor of batch 1 counted once per sample (float64)."""
    f = factors.reshape(factors.shape[0], -1, factors.shape[-1]).float()
    moment = torch.einsum("bti,btj->ij", f, f).double()
    return moment * n if factors.shape[0] == 1 and n > 1 else moment


def _components(routes):
    """Routes grouped by shared parameters (tied weights)."""
    groups: list[list] = []
    for route in routes:
        linked = [g for g in groups if any(r.parameter_names & route.parameter_names for r in g)]
        merged = [route] + [r for g in linked for r in g]
        groups = [g for g in groups if g not in linked] + [merged]
    return groups


def _gradients_of(f: torch.Tensor, leaves: dict, retain_graph: bool = False) -> dict[str, torch.Tensor]:
    """``{name: d f / d leaf}`` by autograd, zeros for leaves ``f`` does not use."""
    with torch.enable_grad():
        gs = (
            torch.autograd.grad(f, list(leaves.values()), retain_graph=retain_graph, allow_unused=True)
            if f.requires_grad and leaves
            else [None] * len(leaves)
        )
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), gs)}


def _stack(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Per-sample dicts of gradients stacked along a first, sample dimension."""
    return {k: torch.stack([row[k] for row in rows]) for k in rows[0]}


_SHARED = "(every block)"  # the key of the blocks' summed products, sharing one factorisation


@dataclass(frozen=True)
class RouteAssignment:
    """How a member's parameters are differentiated, as its route check decided:
    the routes ``demoted`` (by module name) because they disagreed with autograd,
    the ``traced`` parameters (taken from the operations that use them) and the
    ``rowwise`` ones (one sample at a time). Checked once (:func:`assign_members`),
    it is reused by every engine of the member, in every job and every later
    featurization (the test samples of a query), which then skip the check."""

    demoted: frozenset = frozenset()
    traced: frozenset = frozenset()
    rowwise: frozenset = frozenset()


def make_engine(member, config: GradientConfig, probe=None, assignment=None) -> GradientEngine:
    """The engine for ``member``.

    ``"auto"`` and ``"layers"``: the per-layer engine, projected when the member
    has more than ``proj_dim`` differentiated parameters, exact otherwise.
    ``probe``: a few ``(x, y)`` samples on which every route and traced
    parameter is compared with plain autograd; a route that disagrees leaves
    its parameters to the operations that use them, and a parameter whose uses
    cannot be split per sample is differentiated row by row, with a warning.
    ``assignment``: the outcome of such a check (:class:`RouteAssignment`),
    applied without checking again. ``"vmap"``: ``torch.func.vmap(grad)`` over
    the whole model, with a dense (or identity) projection."""
    path, proj_dim = config.path, config.proj_dim
    if path not in GRADIENT_PATHS:
        raise ValueError(f"gradient_path={path!r} is not one of {GRADIENT_PATHS}.")
    numels = {k: v.numel() for k, v in member.params.items()}
    if path == "vmap" and not config.per_layer:
        projector = make_projector(numels, proj_dim, member.seed, config.projection, config.device)
        return VmapEngine(member, config.task, config.device, projector)
    member = member.to(config.device)
    routes, traced = assign_routes(member.module, member.params, registry=config.routes)
    if proj_dim is None or sum(numels.values()) <= proj_dim:
        projector = IdentityProjector(
            numels, _routed_matrices(routes, member.params) if config.per_layer else {}
        )
    else:
        projector = LayerProjector(
            routes, numels, proj_dim, member.seed, config.projection, config.device, config.per_layer
        )
    if path == "vmap":
        return VmapEngine(member, config.task, config.device, projector)
    if assignment is not None:
        kept = [r for r in routes if r.name not in assignment.demoted]
        return LayerEngine(
            member, config.task, config.device, projector, kept, assignment.traced, assignment.rowwise
        )
    engine = LayerEngine(member, config.task, config.device, projector, routes, traced)
    while probe is not None:
        failed_routes, failed_traced = engine.check(*probe)
        if not failed_routes and not failed_traced:
            break
        demoted = set().union(*(r.parameter_names for r in failed_routes)) if failed_routes else set()
        engine = LayerEngine(
            member,
            config.task,
            config.device,
            projector,
            [r for r in engine.routes if r not in failed_routes],
            (set(engine.traced) | demoted) - failed_traced,
            set(engine.rowwise) | failed_traced,
        )
    _warn_slow(member.module, engine)
    engine.assignment = RouteAssignment(
        frozenset(r.name for r in routes if r not in engine.routes),
        frozenset(engine.traced),
        frozenset(engine.rowwise),
    )
    return engine


def _structure(member) -> tuple:
    """What a route check depends on: the module's layers and the member's tensors
    by name and shape (members of one model, its masks, adapters and checkpoints,
    share it)."""
    return (
        tuple((name, type(m)) for name, m in member.module.named_modules()),
        tuple((k, tuple(v.shape)) for k, v in member.params.items()),
        tuple((k, tuple(v.shape)) for k, v in member.frozen.items()),
    )


def assign_members(members, X, y, config: GradientConfig) -> list[RouteAssignment | None]:
    """Each member's :class:`RouteAssignment`, from one route check on the first
    training samples per distinct structure (an ensemble of one architecture is
    checked once); None on the vmap path, which has no routes."""
    if config.path == "vmap":
        return [None] * len(members)
    probe = (materialize(take(X, slice(0, _PROBE_ROWS))), y[:_PROBE_ROWS])
    probe = (to_torch(probe[0], config.device), to_torch(probe[1], config.device))
    config = featurizing_setup(members, config)
    checked: dict[tuple, RouteAssignment] = {}
    assignments = []
    for member in members:
        key = _structure(member)
        if key not in checked:
            checked[key] = make_engine(member, config, probe).assignment
        assignments.append(checked[key])
    return assignments


# traced parameters of one layer above this many entries are named in a warning: their
# full per-sample gradients (batch x entries) then cost more than a route's projection
_TRACED_WARN_ENTRIES = 1 << 16


def _warn_slow(module, engine) -> None:
    """Name the layers whose parameters are large and have no route (their per-sample
    gradients are formed in full) and those differentiated row by row (much slower)."""
    owners = _owners(module)
    sizes = dict.fromkeys(owners.values(), 0)
    for name in engine.traced:
        sizes[owners[name]] += engine.member.params[name].numel()
    for layer, size in sizes.items():
        if size > _TRACED_WARN_ENTRIES:
            warnings.warn(
                f"Layer {layer or '(the root module)'!r} ({type(module.get_submodule(layer)).__name__}): "
                f"{size} parameters without a gradient route, so their per-sample gradients are formed "
                "in full from the operations that use them (exact, but slower and larger than a route). "
                "sktda.routes shows how to add a route for a layer type.",
                UserWarning,
                stacklevel=4,
            )
    for layer in sorted({owners[n] for n in engine.rowwise}):
        warnings.warn(
            f"Layer {layer or '(the root module)'!r}: its parameters are used by operations that do not "
            "act sample by sample, so their per-sample gradients are taken one sample at a time, which "
            "is much slower. A gradient route for the layer (sktda.routes) would avoid this.",
            UserWarning,
            stacklevel=4,
        )


def _owners(module) -> dict[str, str]:
    """``{parameter name: name of the module that owns it}``."""
    return {name: name.rpartition(".")[0] for name, _ in module.named_parameters()}


def feature_blocks(member, config: GradientConfig) -> tuple[list[tuple[int, int]], int]:
    """The blocks of a member's features, without building its projector:
    ``([(k_out, k_in) of each Kronecker block], width of the dense block)``; all
    dense unless ``config.per_layer``."""
    numels = {k: v.numel() for k, v in member.params.items()}
    p, proj_dim = sum(numels.values()), config.proj_dim
    exact = proj_dim is None or p <= proj_dim
    if not config.per_layer:
        return [], p if exact else int(proj_dim)
    routes, _ = assign_routes(member.module, member.params, registry=config.routes)
    if exact:  # each routed weight's gradient is its own block, as stored
        matrices = _routed_matrices(routes, member.params)
        return list(matrices.values()), p - sum(numels[w] for w in matrices)
    blocks, dense = layer_widths(routes, numels, int(proj_dim))
    return list(blocks.values()), dense


def _routed_matrices(routes, params: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{weight: (rows, columns)}`` of the weights that Kronecker routes cover, their
    gradients viewed as matrices as stored, in the parameters' order."""
    weights = {w for r in routes if r.kronecker for w in r.blocks()}
    return {w: (p.shape[0], p[0].numel()) for w, p in params.items() if w in weights}


def feature_dim(member, config: GradientConfig) -> int:
    """Width of a member's features, without building its projector."""
    return feature_width(*feature_blocks(member, config))


def featurizing_setup(members, config: GradientConfig) -> GradientConfig:
    """``config`` with the gradient routes of every module the members use."""
    modules = [m for member in members for m in member.module.modules()]
    return replace(config, routes=routes_for(modules, config.routes))
