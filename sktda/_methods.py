"""Attribution methods: scoring rules on projected gradient features.

Every method is written in one form. For each member ``b`` (a *block* of features,
with weight ``w_b``; the weights sum to one over an ensemble, and TracIn's
checkpoints also carry their learning rates) it maps training features to a matrix
``U_b`` and test features to ``V_b``; the attribution of training sample ``j`` to
test sample ``i`` is

    A[i, j] = s_j * sum_b w_b <V_b[i], U_b[j]>

with ``s_j`` the ensemble-mean ``-dL/df`` for TRAK and one otherwise. A positive score
means that up-weighting the training sample raises the test target (the
correct-class margin, or the regression output): a proponent.

Because ``U`` is computed from stored features on the fly, attributions against any
slice of the training set cost only that slice, which is what lets
``most_influential`` stream over huge training sets.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


_GRAM_ROWS = 1 << 15


def _gram(phi, weight, device, scale_by_weight: bool) -> torch.Tensor:
    """``G^T G`` in float64 over row chunks of ``phi`` (numpy, float16 or float32,
    possibly memory-mapped), with ``G = weight * phi`` or ``phi``."""
    k = phi.shape[1]
    gram = torch.zeros(k, k, dtype=torch.float64, device=device)
    for start in range(0, phi.shape[0], _GRAM_ROWS):
        g = torch.as_tensor(phi[start : start + _GRAM_ROWS], device=device, dtype=torch.float32)
        if scale_by_weight:
            g = (
                g
                * torch.as_tensor(weight[start : start + _GRAM_ROWS], device=device, dtype=torch.float32)[
                    :, None
                ]
            )
        gram += (g.T @ g).double()
    return gram


def _damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``(gram + lambda I)^-1`` with ``lambda = damping * mean eigenvalue``, in
    float64 for stability; a relative damping is blind to the gradients' scale."""
    gram = gram.double()
    k = gram.shape[0]
    lam = damping * float(torch.diagonal(gram).sum()) / k
    if lam <= 0:
        lam = _EPS
    gram = gram + lam * torch.eye(k, dtype=gram.dtype, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_inverse(chol).float()
    return torch.linalg.pinv(gram, hermitian=True).float()


class AttributionMethod:
    """Interface of an attribution method (see the module docstring)."""

    name: str
    needs_checkpoints = False
    scales_by_weight = False

    def fit(self, phi, weight, damping: float, device):
        """Per-member state from the training features (numpy arrays of any float
        dtype, possibly memory-mapped), e.g. an inverse Gram matrix."""
        return None

    def train_side(self, state, phi: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight[:, None] * phi

    def test_side(self, state, phi: torch.Tensor) -> torch.Tensor:
        return phi


class GradDot(AttributionMethod):
    """Inner product of the test target's gradient and the negative training-loss
    gradient (the direction a gradient step on the training sample moves)."""

    name = "grad_dot"


class GradCos(AttributionMethod):
    """Cosine similarity of the same two gradients: Grad-Dot without the norms."""

    name = "grad_cos"

    def train_side(self, state, phi, weight):
        return torch.sign(weight)[:, None] * phi / (phi.norm(dim=1, keepdim=True) + _EPS)

    def test_side(self, state, phi):
        return phi / (phi.norm(dim=1, keepdim=True) + _EPS)


class TracIn(GradDot):
    """TracIn (Pruthi et al., 2020): Grad-Dot summed over checkpoints taken along
    training, each weighted by its learning rate (the weights live on the blocks)."""

    name = "tracin"
    needs_checkpoints = True


class InfluenceFunction(AttributionMethod):
    """Influence function with a damped Gauss-Newton Hessian: the empirical Fisher
    ``F = G^T G / n`` of the projected training-loss gradients."""

    name = "if"

    def fit(self, phi, weight, damping, device):
        return _damped_inverse(_gram(phi, weight, device, True) / phi.shape[0], damping)

    def test_side(self, state, phi):
        return phi @ state


class TRAK(AttributionMethod):
    """TRAK (Park et al., 2023): ``phi(x) (Phi^T Phi + lambda I)^-1 Phi^T Q``, with the
    projected gradients of the target, ``Q = diag(1 - p)`` averaged over the
    ensemble (the residual for regressors), and the kernel term averaged over
    members."""

    name = "trak"
    scales_by_weight = True

    def fit(self, phi, weight, damping, device):
        return _damped_inverse(_gram(phi, weight, device, False), damping)

    def train_side(self, state, phi, weight):
        return phi

    def test_side(self, state, phi):
        return phi @ state


METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (TRAK, InfluenceFunction, TracIn, GradDot, GradCos)
}


def _reduce_blocks(method, blocks, rows, device, score) -> torch.Tensor:
    """``s * sum_b w_b score(b, state_b, phi_b[rows], U_b[rows])`` over the blocks
    ``(w_b, state_b, phi_b, weight_b)`` of training features (numpy or torch)."""
    out = scale = None
    for b, (w, state, phi, weight) in enumerate(blocks):
        phi_r = torch.as_tensor(phi[rows], device=device, dtype=torch.float32)
        weight_r = torch.as_tensor(weight[rows], device=device, dtype=torch.float32)
        part = score(b, state, phi_r, method.train_side(state, phi_r, weight_r)).mul_(w)
        out = part if out is None else out.add_(part)
        if method.scales_by_weight:
            scale = w * weight_r if scale is None else scale.add_(w * weight_r)
    if scale is not None:
        out.mul_(scale / sum(b[0] for b in blocks))
    return out


def attribution_block(method, blocks, test_phis, rows: slice, device) -> torch.Tensor:
    """``A[:, rows]`` for test features ``test_phis`` (one tensor per block)."""
    return _reduce_blocks(
        method, blocks, rows, device, lambda b, state, phi, u: method.test_side(state, test_phis[b]) @ u.T
    )


def self_attribution(method, blocks, device) -> torch.Tensor:
    """The diagonal of the training set's attribution to itself, in row chunks."""
    return torch.cat(
        [
            _reduce_blocks(
                method,
                blocks,
                slice(start, start + _GRAM_ROWS),
                device,
                lambda b, state, phi, u: (method.test_side(state, phi) * u).sum(1),
            )
            for start in range(0, blocks[0][2].shape[0], _GRAM_ROWS)
        ]
    )
