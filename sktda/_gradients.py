"""The gradient engine shared by both estimators.

For every sample it computes the gradient of the member's target ``f`` (the
correct-class margin, or the regression output) with respect to the member's
differentiated parameters, projects it to ``proj_dim`` features, and records the residual
``-dL/df`` (the training loss's sensitivity to the target), so that the projected
loss gradient is ``-residual * phi`` without a second backward pass.

Two engines, chosen by :func:`make_engine`, meet the rest of the library only
through :class:`Features`:

- :class:`LayerEngine` (whenever a projection is needed): one ordinary forward
  and backward pass per chunk, and each differentiated layer projected by its own
  route from its inputs and output gradients (``_layers``: Linear, Conv2d,
  Embedding, attention, normalisation layers), without forming the per-sample
  gradient: near the cost of a training step. Layers without a route are
  differentiated with ``vmap``, alone.
- :class:`VmapEngine`: any module. ``torch.func.vmap(grad(...))`` per chunk of
  samples, then a dense (or identity) projection of the full gradients: exact
  gradients of small models, and the reference the routes are tested against.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn.utils import gen_batches
from sklearn.utils.parallel import delayed
from torch.func import grad, vmap

from ._data import map_tensors, n_samples, take, to_torch
from ._layers import LayerProjector, assign_routes
from ._nets import NetTask
from ._parallel import run, torch_threads
from ._projection import make_projector

GRADIENT_PATHS = ("auto", "layers", "vmap")
# samples on which every layer route is checked against vmap before featurizing
_PROBE_ROWS = 3
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class GradientConfig:
    """How per-sample gradients are computed and stored: the task (target and
    residual), the projection, the engine path, the chunk size, the device and
    the storage type of ``phi``."""

    task: NetTask
    proj_dim: int | None
    projection: str = "gaussian"
    path: str = "auto"
    batch_size: int = 256
    device: torch.device = _CPU
    dtype: type = np.float32


@dataclass
class Features:
    """Per-sample gradient features of one member.

    ``phi`` (n, k): projected gradient of the target; ``residual`` (n,):
    ``-dL/df`` at the given label (``1 - p_y`` for classifiers, twice ``y - f`` for
    regressors); ``output`` (n,): the target itself.
    """

    phi: np.ndarray
    residual: np.ndarray
    output: np.ndarray

    @property
    def loss_gradients(self) -> np.ndarray:
        """Projected per-sample gradients of the training loss."""
        return -self.residual[:, None] * self.phi


class GradientEngine:
    """Interface: ``chunk(x, y)`` -> ``(phi, f, residual)`` tensors for one batch."""

    out_dim: int

    def __init__(self, member, task: NetTask, device: torch.device):
        self.member = member.to(device)
        self.task = task
        self.device = device

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
    """Per-sample gradients from one ordinary forward and backward pass per chunk,
    projected layer by layer by a :class:`LayerProjector` (see ``_layers``).
    Parameters without a route, and those of ``vmap_layers``, are differentiated
    with ``vmap``, alone."""

    def __init__(self, member, task, device, proj_dim: int, kind: str, vmap_layers=frozenset()):
        super().__init__(member, task, device)
        self.out_dim = int(proj_dim)
        m = self.member
        routes, leftover = assign_routes(m.module, m.params, vmap_layers)
        modules = dict(m.module.named_modules())
        for layer in dict.fromkeys(leftover.values()):
            if layer not in vmap_layers:
                _warn_vmap(layer, f"{type(modules[layer]).__name__} has no fast gradient route")
        numels = {name: m.params[name].numel() for name in leftover}
        self.vmap_layers = set(leftover.values())
        self.projector = LayerProjector(m.module, routes, numels, self.out_dim, m.seed, kind, self.device)
        self._hooked = [(route, modules[route.name]) for route in routes]
        self._vmap = None
        if leftover:
            others = {k: v for k, v in m.params.items() if k not in leftover}
            alone = replace(m, params={k: m.params[k] for k in leftover}, frozen={**m.frozen, **others})
            self._vmap = VmapEngine(alone, task, self.device, self.projector.leftover)

    def _parts(self, x, y):
        """Each route's features of the chunk (None when it has none), the targets
        and the residuals."""
        records = [[] for _ in self._hooked]
        hooks = [
            module.register_forward_hook(partial(route.record, rec), with_kwargs=True)
            for (route, module), rec in zip(self._hooked, records)
        ]
        try:
            params = {k: v.detach().requires_grad_() for k, v in self.member.params.items()}
            with torch.enable_grad():
                f, r = self.task.target_and_residual(self.member.forward(params, x), y)
                outputs = [o for rec in records for _, o in rec]
                # samples are independent in eval mode, so d(sum f)/d out_i = df_i/d out_i
                if f.requires_grad and outputs:
                    deltas = iter(torch.autograd.grad(f.sum(), outputs, allow_unused=True))
                else:  # no differentiated parameter reaches the target
                    deltas = iter([None] * len(outputs))
        finally:
            for hook in hooks:
                hook.remove()
        parts = []
        with torch.no_grad():
            for (route, _), rec in zip(self._hooked, records):
                # None: this output does not reach the target
                pieces = [route.project(context, d) for (context, _), d in zip(rec, deltas) if d is not None]
                parts.append(sum(pieces) if pieces else None)
        return parts, f.detach(), r.detach()

    def _chunk(self, x, y):
        parts, f, r = self._parts(x, y)
        routes = self.projector.routes
        products = sum(p for route, p in zip(routes, parts) if route.kronecker and p is not None)
        dense = sum(p for route, p in zip(routes, parts) if not route.kronecker and p is not None)
        phi = self.projector.finish(products, dense)
        if self._vmap is not None:
            phi = phi + self._vmap._chunk(x, y)[0]
        if isinstance(phi, int):
            phi = torch.zeros(n_samples(x), self.out_dim, device=self.device)
        return phi, f, r

    def failing_layers(self, x, y) -> set[str]:
        """The layers whose route disagrees, on the samples ``(x, y)``, with the same
        projection of their ``vmap`` gradients: those whose parameters are also
        used outside their own forward (tied, or read by another module), or that
        are called once for a whole batch (a positional embedding of
        ``arange(T)``, broadcast)."""
        parts = self._parts(x, y)[0]
        grads = VmapEngine(self.member, self.task, self.device, self.projector).gradients(x, y)[0]
        expected = [route.project_full(grads) for route in self.projector.routes]
        scale = float(sum(e.norm() ** 2 for e in expected)) ** 0.5
        failed = set()
        for route, part, e in zip(self.projector.routes, parts, expected):
            got = torch.zeros_like(e) if part is None else part
            # a broken route is off by its whole size; float32 cancellation (a target
            # summed over many tokens) by far less than 1%
            tolerance = 1e-2 * float(max(e.norm(), got.norm())) + 1e-6 * scale
            if got.shape != e.shape or float((got - e).norm()) > tolerance:
                failed.add(route.name)
        return failed


def make_engine(member, config: GradientConfig, probe=None) -> GradientEngine:
    """The engine for ``member``: the per-layer routes when a projection is needed
    (``"auto"``) or asked for (``"layers"``, which projects to the gradient's own
    size when ``proj_dim`` is None); ``vmap`` with a dense projection, or exact
    gradients, otherwise. ``probe``: a few ``(x, y)`` samples on which every route
    is checked against ``vmap``; a layer that fails is differentiated with
    ``vmap``, with a warning. The same probe gives every engine of a member
    (row ranges in parallel) the same routes."""
    path, proj_dim = config.path, config.proj_dim
    if path not in GRADIENT_PATHS:
        raise ValueError(f"gradient_path={path!r} is not one of {GRADIENT_PATHS}.")
    numels = {k: v.numel() for k, v in member.params.items()}
    projects = proj_dim is not None and sum(numels.values()) > proj_dim
    if path == "layers" or (path == "auto" and projects):
        k = proj_dim if proj_dim is not None else sum(numels.values())
        engine = LayerEngine(member, config.task, config.device, k, config.projection)
        failed = engine.failing_layers(*probe) if probe is not None else ()
        if not failed:
            return engine
        for layer in sorted(failed):
            _warn_vmap(
                layer,
                "its parameters are used outside its own forward (tied, or read by another "
                "module), or it is called once for a whole batch",
            )
        return LayerEngine(member, config.task, config.device, k, config.projection, frozenset(failed))
    projector = make_projector(numels, proj_dim, member.seed, config.projection, config.device)
    return VmapEngine(member, config.task, config.device, projector)


def _warn_vmap(layer: str, reason: str) -> None:
    warnings.warn(
        f"Layer {layer or '(the root module)'!r}: {reason}, so its per-sample gradients are taken with "
        "torch.func.vmap, which is much slower than the fast routes (nn.Linear, "
        "nn.Conv2d, nn.Embedding, nn.MultiheadAttention, normalisation layers).",
        UserWarning,
        stacklevel=3,
    )


def featurize(engine: GradientEngine, X, y: torch.Tensor, batch_size: int, out=None) -> Features:
    """Features of ``(X, y)`` in chunks of ``batch_size`` (memory bounded by one
    chunk of gradients, or of layer factors on the fast path). ``phi`` is written
    into ``out`` when given (any float dtype, possibly a memory-mapped file).
    Non-finite gradients, residuals or targets are refused, naming the rows."""
    n = n_samples(X)
    phi = np.empty((n, engine.out_dim), dtype=np.float32) if out is None else out
    residual = np.empty(n, dtype=np.float32)
    output = np.empty(n, dtype=np.float32)
    for rows in gen_batches(n, batch_size):
        p, f, r = engine.chunk(to_torch(take(X, rows), engine.device), y[rows].to(engine.device))
        for name, t in (("per-sample gradients", p), ("targets", f), ("residuals -dL/df", r)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"The {name} of samples {rows.start}..{rows.stop - 1} are not finite: the "
                    "trained model overflows on them. Scale X, lower lr, or train fewer epochs."
                )
        phi[rows] = p.cpu().numpy()
        residual[rows] = r.cpu().numpy()
        output[rows] = f.cpu().numpy()
    return Features(phi=phi, residual=residual, output=output)


def feature_dim(member, proj_dim) -> int:
    """Width of a member's features, without building its projector."""
    p = sum(v.numel() for v in member.params.values())
    return p if proj_dim is None or p <= proj_dim else int(proj_dim)


def featurize_members(
    members, X, y, *, config: GradientConfig, n_jobs=None, verbose=0, out_file=None
) -> list[Features]:
    """Features of every member on ``(X, y)``, each with its own seeded projection,
    in parallel over members and, when there are more jobs than members, over row
    ranges of whole batches (so every batch, and every result, is the same
    whatever ``n_jobs``). ``phi`` is stored as ``config.dtype``; with ``out_file``
    the jobs write their rows of one ``(n_members, n, k)`` ``.npy`` file,
    memory-mapped, so the features never need to fit in memory."""
    n = n_samples(X)
    shape = (len(members), n, feature_dim(members[0], config.proj_dim))
    if out_file is not None:
        np.lib.format.open_memmap(out_file, mode="w+", dtype=config.dtype, shape=shape).flush()
    parts = math.ceil(effective_n_jobs(n_jobs) / len(members))
    step = max(1, math.ceil(n / parts / config.batch_size)) * config.batch_size  # whole batches
    ranges = [(start, min(start + step, n)) for start in range(0, n, step)]
    probe = (take(X, slice(0, _PROBE_ROWS)), y[:_PROBE_ROWS])
    jobs = [
        delayed(_featurize_rows)(
            m,
            take(X, slice(a, b)),
            y[a:b],
            probe=probe,
            config=config,
            n_jobs=n_jobs,
            out_file=out_file,
            member_index=i,
            start=a,
        )
        for i, m in enumerate(members)
        for a, b in ranges
    ]
    pieces = run(jobs, n_jobs, len(jobs), "featurizing", verbose)
    stored = np.load(out_file, mmap_mode="r+") if out_file is not None else None
    features = []
    for i in range(len(members)):
        own = pieces[i * len(ranges) : (i + 1) * len(ranges)]
        if stored is not None:
            phi = stored[i]
        else:
            phi = own[0].phi if len(own) == 1 else np.concatenate([f.phi for f in own])
        features.append(
            Features(
                phi=phi,
                residual=np.concatenate([f.residual for f in own]),
                output=np.concatenate([f.output for f in own]),
            )
        )
    return features


def _featurize_rows(member, X, y, *, probe, config, n_jobs, out_file, member_index, start) -> Features:
    with torch_threads(n_jobs):
        probe = (to_torch(probe[0], config.device), to_torch(probe[1], config.device))
        engine = make_engine(member, config, probe)
        X, y = to_torch(X), to_torch(y)
        n = n_samples(X)
        if out_file is None:
            out = np.empty((n, engine.out_dim), dtype=config.dtype)
            return featurize(engine, X, y, config.batch_size, out)
        stored = np.load(out_file, mmap_mode="r+")
        features = featurize(engine, X, y, config.batch_size, stored[member_index, start : start + n])
        stored.flush()
        features.phi = None  # the rows live in the file; the caller maps them
        return features
