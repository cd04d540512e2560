"""The gradient engine shared by both estimators.

For every sample it computes the gradient of the member's target ``f`` (the
correct-class margin, or the regression output) with respect to the member's
differentiated parameters, projects it to ``proj_dim`` features, and records
``-dL/df`` (the training loss's sensitivity to the target), so that the projected
loss gradient is ``-weight * phi`` without a second backward pass. The work runs in
chunks of ``batch_size`` samples with ``torch.func.vmap(grad(...))``, so memory stays
bounded by one chunk of full-size gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils.parallel import delayed
from torch.func import functional_call, grad, vmap

from ._nets import NetTask
from ._parallel import run
from ._projection import make_projector


@dataclass
class Features:
    """Per-sample gradient features of one member.

    ``phi`` (n, k): projected gradient of the target; ``weight`` (n,): ``-dL/df`` at
    the given label (``1 - p_y`` for classifiers, the doubled residual for
    regressors); ``output`` (n,): the target itself.
    """

    phi: np.ndarray
    weight: np.ndarray
    output: np.ndarray

    @property
    def loss_gradients(self) -> np.ndarray:
        """Projected per-sample gradients of the training loss."""
        return -self.weight[:, None] * self.phi


def _per_sample_grad_fn(member, task: NetTask):
    def target(params, x, y):
        out = member.forward(params, x.unsqueeze(0))
        f, w = task.target_and_weight(out, y.unsqueeze(0))
        return f[0], (f[0], w[0])

    return vmap(grad(target, has_aux=True), in_dims=(None, 0, 0))


def _variant_weights(member, task: NetTask, x, y) -> torch.Tensor:
    """``-dL/df`` averaged over the member's weight variants (e.g. dropout masks
    that enter only TRAK's ``1 - p`` term); forward passes only."""
    weights = [
        task.target_and_weight(functional_call(member.module, (member.params, frozen), (x,)), y)[1]
        for frozen in member.weight_variants
    ]
    return torch.stack(weights).mean(0)


def featurize(
    member,
    task: NetTask,
    projector,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    progress=None,
) -> Features:
    """Projected per-sample gradient features of ``member`` on ``(X, y)``."""
    member = member.to(device)
    fn = _per_sample_grad_fn(member, task)
    phis, weights, outputs = [], [], []
    with torch.no_grad():
        for start in range(0, X.shape[0], batch_size):
            xb = X[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            grads, (f, w) = fn(member.params, xb, yb)
            if member.weight_variants:
                w = _variant_weights(member, task, xb, yb)
            phis.append(projector(grads).cpu())
            weights.append(w.cpu())
            outputs.append(f.cpu())
            if progress is not None:
                progress.update(xb.shape[0])
    return Features(
        phi=torch.cat(phis).numpy(),
        weight=torch.cat(weights).numpy(),
        output=torch.cat(outputs).numpy(),
    )


def featurize_members(
    members, task: NetTask, proj_dim, projection: str, X, y, batch_size: int, device, n_jobs=None, verbose=0
) -> list[Features]:
    """Features of every member on ``(X, y)`` (numpy), members in parallel, each
    with its own seeded projection."""
    jobs = (
        delayed(_featurize_member)(m, task, proj_dim, projection, X, y, batch_size, device) for m in members
    )
    return run(jobs, n_jobs, len(members), "featurizing", verbose)


def _featurize_member(member, task, proj_dim, projection, X, y, batch_size, device) -> Features:
    numels = {k: v.numel() for k, v in member.params.items()}
    projector = make_projector(numels, proj_dim, member.seed, projection, device)
    X = torch.from_numpy(np.ascontiguousarray(X))
    y = torch.from_numpy(np.ascontiguousarray(y))
    return featurize(member, task, projector, X, y, batch_size, device)
