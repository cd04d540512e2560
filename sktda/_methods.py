"""Attribution methods: scoring rules on projected gradient features.

Every method is written in one form. For each member ``m`` (coefficient ``c_m``;
the coefficients sum to one over an ensemble, and TracIn's checkpoints also carry
their learning rates) it maps training features to a matrix ``U_m`` and test
features to ``V_m``; the attribution of training sample ``j`` to test sample ``i``
is

    A[i, j] = s_j * sum_m c_m <V_m[i], U_m[j]>

with ``s_j`` the ensemble-mean residual ``-dL/df`` for TRAK (its ``Q``) and one
otherwise. A positive score means that up-weighting the training sample raises the
test target (the correct-class margin, or the regression output): a proponent.

Because ``U`` is computed from stored features on the fly, attributions against any
slice of the training set's columns cost only that slice, which is what lets
``most_influential`` stream over huge training sets. Row chunks follow
``sklearn.set_config(working_memory=...)``. Scores are computed in float64, so that a
test sample's scores do not depend on which other test samples share its batch
(float32 products round differently for different batch shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.utils import gen_batches
from sklearn.utils._chunking import get_chunk_n_rows

_EPS = 1e-12
SCORE_DTYPE = torch.float64


@dataclass
class FittedMember:
    """What a method keeps of one member: its coefficient ``coef``, the method's
    ``state`` (an inverse Gram matrix, say), and the training features ``phi``
    (n_train, k) and residuals (n_train,), numpy arrays of any float dtype,
    possibly memory-mapped."""

    coef: float
    state: object
    phi: np.ndarray
    residual: np.ndarray


def _row_batches(n_rows: int, row_bytes: int):
    """Slices of rows that each fit in scikit-learn's ``working_memory``."""
    return gen_batches(n_rows, max(1, get_chunk_n_rows(row_bytes=row_bytes, max_n_rows=n_rows)))


def _gram(phi, residual, device, scale_by_residual: bool) -> torch.Tensor:
    """``G^T G`` in float64 over row chunks of ``phi`` (numpy, float16 or float32,
    possibly memory-mapped), with ``G = residual * phi`` or ``phi``."""
    k = phi.shape[1]
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for rows in _row_batches(phi.shape[0], 8 * k):
        g = torch.as_tensor(phi[rows], device=device, dtype=torch.float32)
        if scale_by_residual:
            g = g * torch.as_tensor(residual[rows], device=device, dtype=torch.float32)[:, None]
        gram += (g.T @ g).double()
    return gram


def _damped_inverse(gram: torch.Tensor, damping: float, n_rows: int) -> torch.Tensor:
    """``(gram + lambda I)^-1`` in float64 for stability, with ``lambda = damping *``
    the mean of the nonzero eigenvalues, ``trace / min(n_rows, k)``: a gram of
    ``n_rows`` gradients has at most that many, so lambda is blind both to the
    gradients' scale and to how far ``k`` exceeds the training set."""
    gram = gram.double()
    k = gram.shape[0]
    lam = damping * float(torch.diagonal(gram).sum()) / min(n_rows, k)
    if lam <= 0:
        lam = _EPS
    gram = gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(gram, hermitian=True)


class AttributionMethod:
    """Interface of an attribution method (see the module docstring)."""

    name: str
    needs_checkpoints = False
    inverts = False
    scales_by_residual = False

    def fit(self, phi, residual, damping: float, device):
        """Per-member state from the training features (numpy arrays of any float
        dtype, possibly memory-mapped), e.g. an inverse Gram matrix."""
        return None

    def train_side(self, state, phi: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual[:, None] * phi

    def test_side(self, state, phi: torch.Tensor) -> torch.Tensor:
        return phi


class GradDot(AttributionMethod):
    """Inner product of the test target's gradient and the negative training-loss
    gradient (the direction a gradient step on the training sample moves)."""

    name = "grad_dot"


class GradCos(AttributionMethod):
    """Cosine similarity of the same two gradients: Grad-Dot without the norms."""

    name = "grad_cos"

    def train_side(self, state, phi, residual):
        return torch.sign(residual)[:, None] * phi / (phi.norm(dim=1, keepdim=True) + _EPS)

    def test_side(self, state, phi):
        return phi / (phi.norm(dim=1, keepdim=True) + _EPS)


class TracIn(GradDot):
    """TracIn (Pruthi et al., 2020): Grad-Dot summed over checkpoints taken along
    training, each weighted by its learning rate (folded into the coefficients)."""

    name = "tracin"
    needs_checkpoints = True


class InfluenceFunction(AttributionMethod):
    """Influence function with a damped Gauss-Newton Hessian: the empirical Fisher
    ``F = G^T G / n`` of the projected training-loss gradients."""

    name = "if"
    inverts = True

    def fit(self, phi, residual, damping, device):
        return _damped_inverse(_gram(phi, residual, device, True) / phi.shape[0], damping, phi.shape[0])

    def test_side(self, state, phi):
        return phi @ state


class TRAK(AttributionMethod):
    """TRAK (Park et al., 2023): ``phi(x) (Phi^T Phi + lambda I)^-1 Phi^T Q``, with the
    projected gradients of the target, ``Q = diag(1 - p)`` averaged over the
    ensemble (the residual for regressors), and the kernel term averaged over
    members."""

    name = "trak"
    inverts = True
    scales_by_residual = True

    def fit(self, phi, residual, damping, device):
        return _damped_inverse(_gram(phi, residual, device, False), damping, phi.shape[0])

    def train_side(self, state, phi, residual):
        return phi

    def test_side(self, state, phi):
        return phi @ state


METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (TRAK, InfluenceFunction, TracIn, GradDot, GradCos)
}


def _reduce_members(
    method, members: list[FittedMember], rows, device, score, dtype=SCORE_DTYPE
) -> torch.Tensor:
    """``s * sum_m c_m score(m, state_m, phi_m[rows], U_m[rows])`` over the members'
    training features; ``s`` is TRAK's coefficient-weighted mean residual."""
    out = scale = None
    for m, member in enumerate(members):
        phi = torch.as_tensor(member.phi[rows], device=device, dtype=dtype)
        residual = torch.as_tensor(member.residual[rows], device=device, dtype=dtype)
        state = member.state.to(dtype) if isinstance(member.state, torch.Tensor) else member.state
        part = score(m, state, phi, method.train_side(state, phi, residual)).mul_(member.coef)
        out = part if out is None else out.add_(part)
        if method.scales_by_residual:
            scale = member.coef * residual if scale is None else scale.add_(member.coef * residual)
    if scale is not None:
        out.mul_(scale / sum(member.coef for member in members))
    return out


def attribution_columns(method, members, test_phis, columns: slice, device) -> torch.Tensor:
    """``A[:, columns]`` for test features ``test_phis`` (one tensor per member)."""
    return _reduce_members(
        method, members, columns, device, lambda m, state, phi, u: method.test_side(state, test_phis[m]) @ u.T
    )


def self_attribution(method, members, device, dtype=SCORE_DTYPE) -> torch.Tensor:
    """The diagonal of the training set's attribution to itself, in row chunks
    (``dtype`` float32 where speed matters more than the last digits)."""
    n, k = members[0].phi.shape
    return torch.cat(
        [
            _reduce_members(
                method,
                members,
                rows,
                device,
                lambda m, state, phi, u: (method.test_side(state, phi) * u).sum(1),
                dtype,
            )
            for rows in _row_batches(n, torch.finfo(dtype).bits // 8 * 3 * k * len(members))
        ]
    )
