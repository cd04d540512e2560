"""The gradient engine shared by both estimators.

For every sample it computes the gradient of the member's target ``f`` (the
correct-class margin, or the regression output) with respect to the member's
differentiated parameters, projects it to ``proj_dim`` features, and records the residual
``-dL/df`` (the training loss's sensitivity to the target), so that the projected
loss gradient is ``-residual * phi`` without a second backward pass.

Two engines, chosen by :func:`make_engine`, meet the rest of the library only
through :class:`Features`:

- :class:`VmapEngine`: any module. ``torch.func.vmap(grad(...))`` per chunk of
  samples, then a dense (or identity) projection of the full gradients.
- :class:`LinearEngine`: every differentiated parameter belongs to an
  ``nn.Linear`` (MLPs, LoRA adapters, transformer projections). One ordinary
  forward and backward pass per chunk records each layer's input and output
  gradient, and a Kronecker-structured projection maps them to features without
  forming the per-sample gradient: near the cost of a training step.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from joblib import effective_n_jobs
from sklearn.utils import gen_batches
from sklearn.utils.parallel import delayed
from torch import nn
from torch.func import grad, vmap

from ._data import map_tensors, n_samples, take, to_torch
from ._nets import NetTask
from ._parallel import run, torch_threads
from ._projection import KroneckerProjector, make_projector

GRADIENT_PATHS = ("auto", "linear", "vmap")
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

    def _chunk(self, x, y):
        with torch.no_grad(), warnings.catch_warnings():
            # torch's fallback for ops without a batching rule (attention) is exact, only slower
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            grads, (f, r) = self._grad(self.member.params, x, y)
            return self.projector(grads), f, r


class LinearEngine(GradientEngine):
    """Per-sample gradients of ``nn.Linear`` layers from one forward and backward
    pass, projected from their factors by a :class:`KroneckerProjector`."""

    def __init__(self, member, task, device, projector: KroneckerProjector):
        super().__init__(member, task, device)
        self.projector = projector
        self.out_dim = projector.out_dim
        modules = dict(self.member.module.named_modules())
        self._modules = {name: modules[name] for name in projector.layers}

    def _chunk(self, x, y):
        records = {name: [] for name in self._modules}
        hooks = [
            module.register_forward_hook(
                lambda mod, args, out, name=name: records[name].append((args[0], out))
            )
            for name, module in self._modules.items()
        ]
        try:
            params = {k: v.detach().requires_grad_() for k, v in self.member.params.items()}
            with torch.enable_grad():
                out = self.member.forward(params, x)
                f, r = self.task.target_and_residual(out, y)
                outputs = [o for calls in records.values() for _, o in calls]
                # samples are independent in eval mode, so d(sum f)/d out_i = df_i/d out_i
                if f.requires_grad:
                    deltas = iter(torch.autograd.grad(f.sum(), outputs, allow_unused=True))
                else:  # no differentiated parameter reaches the target
                    deltas = iter([None] * len(outputs))
        finally:
            for hook in hooks:
                hook.remove()
        phi = 0
        with torch.no_grad():
            for name, calls in records.items():
                for a, _ in calls:
                    delta = next(deltas)
                    if delta is not None:  # None: this output does not reach the target
                        phi = phi + self.projector.project_factors(name, a.detach(), delta)
        if isinstance(phi, int):
            phi = torch.zeros(n_samples(x), self.out_dim, device=self.device)
        return phi, f.detach(), r.detach()


def linear_layers(member) -> dict | None:
    """``{module: (weight, bias, out, in)}`` when every differentiated parameter is
    the weight or bias of an ``nn.Linear``; None otherwise."""
    modules = dict(member.module.named_modules())
    layers = {}
    for name in member.params:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            return None
        layers.setdefault(owner, {})[attr] = name
    out = {}
    for owner, names in layers.items():
        if "weight" not in names:
            return None
        module = modules[owner]
        out[owner] = (names["weight"], names.get("bias"), module.out_features, module.in_features)
    return out


def make_engine(member, config: GradientConfig) -> GradientEngine:
    """The engine for ``member``: the ``nn.Linear`` fast path when every
    differentiated parameter allows it and a projection is needed, ``vmap``
    otherwise; ``config.path`` forces either."""
    path, proj_dim = config.path, config.proj_dim
    if path not in GRADIENT_PATHS:
        raise ValueError(f"gradient_path={path!r} is not one of {GRADIENT_PATHS}.")
    numels = {k: v.numel() for k, v in member.params.items()}
    layers = linear_layers(member)
    if path == "linear" and layers is None:
        raise ValueError(
            "gradient_path='linear' needs every differentiated parameter to be the weight or "
            "bias of an nn.Linear; restrict `layers` to linear modules or use 'auto'."
        )
    projects = proj_dim is not None and sum(numels.values()) > proj_dim
    if layers is not None and (path == "linear" or (path == "auto" and projects)):
        k = proj_dim if proj_dim is not None else sum(numels.values())
        projector = KroneckerProjector(layers, k, member.seed, config.projection, config.device)
        return LinearEngine(member, config.task, config.device, projector)
    projector = make_projector(numels, proj_dim, member.seed, config.projection, config.device)
    return VmapEngine(member, config.task, config.device, projector)


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
    jobs = [
        delayed(_featurize_rows)(
            m,
            take(X, slice(a, b)),
            y[a:b],
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


def _featurize_rows(member, X, y, *, config, n_jobs, out_file, member_index, start) -> Features:
    with torch_threads(n_jobs):
        engine = make_engine(member, config)
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
