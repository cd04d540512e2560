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

import itertools

import torch

_EPS = 1e-12
SCORE_DTYPE = torch.float64


def _column_blocks(k: int) -> list[slice]:
    """Column blocks of at least 256 columns, at most 8 of them: wide enough for
    efficient matrix products, many enough to skip most of a triangle's zeros."""
    n_blocks = max(1, min(8, k // 256))
    edges = [k * i // n_blocks for i in range(n_blocks + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(edges)]


def _symmetric_gram(g: torch.Tensor) -> torch.Tensor:
    """``g^T g``, its blocks above the diagonal computed and mirrored: about
    ``(b + 1) / 2b`` of the full product's work for ``b`` column blocks."""
    k = g.shape[1]
    out = torch.empty(k, k, dtype=g.dtype, device=g.device)
    blocks = _column_blocks(k)
    for i, rows in enumerate(blocks):
        for cols in blocks[i:]:
            out[rows, cols] = g[:, rows].T @ g[:, cols]
            if cols != rows:
                out[cols, rows] = out[rows, cols].T
    return out


def _block_gram(scale_by_residual: bool, g: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``G^T G`` of one row block in float64, with ``G = residual * g`` or ``g``."""
    if scale_by_residual:
        g = g * residual[:, None]
    return _symmetric_gram(g).double()


def _damping_of(trace: float, damping: float, n_rows: int, k: int) -> float:
    """``lambda = damping *`` the mean of the nonzero eigenvalues of a Gram of
    ``n_rows`` gradients of width ``k``, ``trace / min(n_rows, k)``: blind both to
    the gradients' scale and to how far ``k`` exceeds the training set."""
    lam = damping * trace / min(n_rows, k)
    return lam if lam > 0 else _EPS


def block_damping(damping: float, eigenvalues: torch.Tensor) -> float:
    """``lambda = damping *`` the mean of all of a per-layer block's eigenvalues
    (K-FAC's or EK-FAC's, which fill the whole block whatever the number of
    training rows), so that a damping means the same for a block narrower or
    wider than the training set."""
    width = eigenvalues.numel()
    return _damping_of(float(eigenvalues.sum()), damping, width, width)


class DampedInverse:
    """``(G^T G + lambda I)^-1`` of a member's ``n x k`` (weighted) gradients
    ``G``, applied without forming it: ``phi -> phi H^-1`` (:meth:`apply`) and
    ``phi -> phi H^-1 phi`` (:meth:`quadratic`), in float64.

    - ``k <= n``: the Cholesky factor ``C`` of ``G^T G + lambda I``, applied by
      triangular solves (``|C^-1 phi|^2`` for the quadratic form).
    - ``n < k`` (a training set narrower than the features): the kernel form
      (Woodbury), ``H^-1 = (I - W^T W) / lambda`` with ``W = L^-1 G`` and ``L`` the
      Cholesky factor of the ``n x n`` kernel ``G G^T + lambda I``; nothing ``k x
      k`` is formed, and applying it costs ``2 n k`` a row instead of ``k^2``.
    - A factorization that fails numerically: the pseudo-inverse, as a matrix.
    """

    def __init__(self, lower=None, low_rank=None, lam: float = 0.0, matrix=None):
        self.lower, self.low_rank, self.lam, self.matrix = lower, low_rank, lam, matrix

    @classmethod
    def from_gram(cls, gram: torch.Tensor, lam: float) -> DampedInverse:
        gram = gram.double()
        damped = gram + lam * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return cls(lower=lower)
        return cls(matrix=torch.linalg.pinv(damped, hermitian=True))

    @classmethod
    def from_rows(cls, g: torch.Tensor, lam: float) -> DampedInverse:
        g = g.double()
        kernel = g @ g.T
        kernel.diagonal().add_(lam)
        lower, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            return cls.from_gram(g.T @ g, lam)
        return cls(low_rank=torch.linalg.solve_triangular(lower, g, upper=False), lam=lam)

    def to(self, device, dtype) -> DampedInverse:
        def moved(t):
            return None if t is None else t.to(device, dtype)

        return DampedInverse(moved(self.lower), moved(self.low_rank), self.lam, moved(self.matrix))

    def apply(self, phi: torch.Tensor) -> torch.Tensor:
        if self.lower is not None:
            return torch.cholesky_solve(phi.T, self.lower).T
        if self.low_rank is not None:
            w = self.low_rank
            return (phi - (phi @ w.T) @ w) / self.lam
        return phi @ self.matrix

    def quadratic(self, phi: torch.Tensor) -> torch.Tensor:
        if self.lower is not None:
            return torch.linalg.solve_triangular(self.lower, phi.T, upper=False).square_().sum(0)
        if self.low_rank is not None:
            return (phi.square().sum(1) - (phi @ self.low_rank.T).square_().sum(1)) / self.lam
        return ((phi @ self.matrix) * phi).sum(1)


def _rows_of(scale_by_residual: bool, g: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """One row block of ``G`` in float64: ``residual * g`` or ``g``."""
    g = g.double()
    return g * residual.double()[:, None] if scale_by_residual else g


def _damped_inverse(rows, damping: float, scale_by_residual: bool, scale: float = 1.0) -> DampedInverse:
    """The :class:`DampedInverse` of a member's Gauss-Newton matrix ``scale * G^T
    G``, ``G`` its training features (times their residuals when
    ``scale_by_residual``), damped by :func:`_damping_of`; in the kernel form when
    the member has fewer training rows than feature columns."""
    if rows.n < rows.k:
        g = rows.gather(_rows_of, scale_by_residual).to(rows.device) * scale**0.5
        trace = float(g.square().sum())
        return DampedInverse.from_rows(g, _damping_of(trace, damping, rows.n, rows.k))
    gram = rows.sum(_block_gram, scale_by_residual).to(rows.device) * scale
    trace = float(torch.diagonal(gram).sum())
    return DampedInverse.from_gram(gram, _damping_of(trace, damping, rows.n, rows.k))


class AttributionMethod:
    """Interface of an attribution method (see the module docstring)."""

    name: str
    needs_checkpoints = False
    inverts = False
    scales_by_residual = False
    per_layer = False  # features kept per layer, as blocks side by side
    default_damping = 1.0  # damping="auto"

    def fit(self, rows, damping: float, layout=None, factors=None):
        """Per-member state from the member's training features, e.g. an inverse
        Gram matrix. ``rows`` (:class:`~sktda._features.MemberRows`): the features'
        size, ``n`` by ``k``, the ``device`` of the state, and ``rows.sum(fn,
        *args)``, the sum over row blocks of ``fn(*args, phi, residual)`` (float32
        tensors), wherever the blocks live. ``layout`` and ``factors``: the blocks of
        the features' columns and their Kronecker factors (see
        ``_gradients.Features``)."""
        return None

    def train_side(self, state, phi: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return residual[:, None] * phi

    def test_side(self, state, phi: torch.Tensor) -> torch.Tensor:
        return phi

    def self_factor(self, state):
        """What :meth:`self_scores` needs of ``state``, computed once per member."""
        return state

    def self_scores(self, factor, phi: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Each training sample's attribution to itself (before TRAK's residual
        scale), ``factor`` from :meth:`self_factor`."""
        return (self.test_side(factor, phi) * self.train_side(factor, phi, residual)).sum(1)


class GradDot(AttributionMethod):
    """Inner product of the test target's gradient and the negative training-loss
    gradient (the direction a gradient step on the training sample moves)."""

    name = "grad_dot"

    def self_scores(self, factor, phi, residual):
        return residual * phi.square().sum(1)  # <phi, r phi>, without a second copy of phi


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


class _DenseInverse(AttributionMethod):
    """A method whose state is one :class:`DampedInverse` ``H^-1``: the test side is
    ``phi H^-1``, a training sample's self-attribution the quadratic form ``phi
    H^-1 phi``."""

    inverts = True

    def test_side(self, state, phi):
        return state.apply(phi)

    def self_factor(self, state):
        return state.quadratic


class InfluenceFunction(_DenseInverse):
    """Influence function with a damped Gauss-Newton Hessian: the empirical Fisher
    ``F = G^T G / n`` of the projected training-loss gradients."""

    name = "if"

    def fit(self, rows, damping, layout=None, factors=None):
        return _damped_inverse(rows, damping, True, 1.0 / rows.n)

    def self_scores(self, factor, phi, residual):
        return residual * factor(phi)


class TRAK(_DenseInverse):
    """TRAK (Park et al., 2023): ``phi(x) (Phi^T Phi + lambda I)^-1 Phi^T Q``, with the
    projected gradients of the target, ``Q = diag(1 - p)`` averaged over the
    ensemble (the residual for regressors), and the kernel term averaged over
    members."""

    name = "trak"
    scales_by_residual = True

    def fit(self, rows, damping, layout=None, factors=None):
        return _damped_inverse(rows, damping, False)

    def train_side(self, state, phi, residual):
        return phi

    def self_scores(self, factor, phi, residual):
        return factor(phi)


def _rotated(g: torch.Tensor, q_out: torch.Tensor, q_in: torch.Tensor) -> torch.Tensor:
    """``Q_out^T G_j Q_in`` for every ``G_j`` of ``g`` (``rows x k_out x k_in``):
    the input side as one matrix product over all rows and positions."""
    n, k_out, k_in = g.shape
    return torch.matmul(q_out.T, (g.reshape(n * k_out, k_in) @ q_in).reshape(n, k_out, k_in))


class LayerInverse:
    """``phi -> phi H^-1`` for a block-diagonal ``H``, one block per layer of the
    features' layout: a Kronecker block is inverted in its eigenbasis, ``Q_out (
    (Q_out^T G Q_in) / (Lambda + lambda)) Q_in^T``; the dense blocks together are
    one damped Gauss-Newton matrix, inverted. :meth:`quadratic` is ``phi H^-1
    phi``, which needs only the rotation into each eigenbasis."""

    def __init__(self, kron, dense_columns, dense_inverse):
        self.kron = kron  # [(start, stop, q_out, q_in, 1 / (Lambda + lambda))]
        self.dense_columns, self.dense_inverse = dense_columns, dense_inverse

    def to(self, device, dtype):
        return LayerInverse(
            [(a, b, *(t.to(device, dtype) for t in ts)) for a, b, *ts in self.kron],
            self.dense_columns,
            None if self.dense_inverse is None else self.dense_inverse.to(device, dtype),
        )

    def _blocks(self, phi):
        for start, stop, q_out, q_in, inverse in self.kron:
            g = phi[:, start:stop].reshape(len(phi), q_out.shape[0], q_in.shape[0])
            yield slice(start, stop), _rotated(g, q_out, q_in), q_out, q_in, inverse

    def __call__(self, phi: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(phi)
        for columns, r, q_out, q_in, inverse in self._blocks(phi):
            out[:, columns] = _rotated(r.mul_(inverse), q_out.T, q_in.T).reshape(len(phi), -1)
        if self.dense_inverse is not None:
            out[:, self.dense_columns] = self.dense_inverse.apply(phi[:, self.dense_columns])
        return out

    def quadratic(self, phi: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(phi), dtype=phi.dtype, device=phi.device)
        for _, r, _, _, inverse in self._blocks(phi):
            total += (r.square_() * inverse).sum((1, 2))
        if self.dense_inverse is not None:
            total += self.dense_inverse.quadratic(phi[:, self.dense_columns])
        return total


def _layer_blocks(kron, g: torch.Tensor) -> list[torch.Tensor]:
    """A row block's Kronecker blocks, each ``(rows, k_out, k_in)``."""
    return [g[:, a:b].reshape(len(g), *shape) for a, b, shape in kron]


def _layer_moments(kron, missing, dense, g: torch.Tensor, residual) -> tuple:
    """One row block's share of each Kronecker block's trace ``sum_j ||G_j||^2``, of
    the factors ``(S, A)`` of the blocks in ``missing``, and of the dense columns'
    Gram (all float64)."""
    gs = _layer_blocks(kron, g)
    traces = [torch.linalg.vector_norm(G, dtype=torch.float64) ** 2 for G in gs]
    moments = [
        (
            torch.einsum("noi,npi->op", gs[i], gs[i]).double(),
            torch.einsum("noi,noj->ij", gs[i], gs[i]).double(),
        )
        for i in missing
    ]
    gram = None if dense is None else (g[:, dense].T @ g[:, dense]).double()
    return traces, moments, gram


def _corrected_eigenvalues(kron, bases, g: torch.Tensor, residual) -> list[torch.Tensor]:
    """One row block's share of EK-FAC's eigenvalues, ``sum_j (Q_S^T G_j Q_A)^2``."""
    return [
        _rotated(G, q_out.to(g), q_in.to(g)).square_().sum(0).double()
        for G, (q_out, q_in) in zip(_layer_blocks(kron, g), bases)
    ]


def _layer_inverse(rows, layout, damping: float, corrected: bool, factors=None) -> LayerInverse:
    """The damped inverse of the features' Gauss-Newton matrix ``Phi^T Phi``,
    block-diagonal over the layers of ``layout``.

    A Kronecker block, with ``G_j`` training sample ``j``'s projected gradient as a
    ``k_out x k_in`` matrix, has the factors ``S`` and ``A`` of ``factors`` (K-FAC's:
    the second moments of the projected output gradients and inputs over every
    sample's positions) or, where its route gave none, ``S = sum_j G_j G_j^T`` and
    ``A = sum_j G_j^T G_j``. K-FAC's eigenvalues are ``lambda_S (x) lambda_A``,
    scaled to the block's trace ``sum_j ||G_j||^2``; EK-FAC's (``corrected``) are
    the exact second moments of the projected gradients in the Kronecker
    eigenbasis, ``sum_j (Q_S^T G_j Q_A)^2`` (George et al., 2018), whose sum is
    the trace. Each block is damped on its own, relative to the mean of its
    eigenvalues (:func:`block_damping`). The dense blocks together get one damped
    Gauss-Newton matrix, damped as a Gram is (:func:`_damping_of`). EK-FAC on
    blocks whose factors the routes gave reads the features once; otherwise a
    first read sums the traces and the missing factors."""
    n, device = rows.n, rows.device
    kron = [(a, b, shape) for a, b, shape in layout if shape is not None]
    factors = factors or (None,) * len(kron)
    dense = [torch.arange(a, b) for a, b, shape in layout if shape is None and b > a]
    dense = torch.cat(dense) if dense else None
    missing = [i for i, given in enumerate(factors) if given is None]
    traces, found, gram = (
        ([None] * len(kron), [], None)
        if corrected and not missing and dense is None
        else rows.sum(_layer_moments, kron, missing, dense)
    )
    found = dict(zip(missing, found))
    moments = [
        tuple(torch.as_tensor(t, dtype=torch.float64) for t in given) if given is not None else found[i]
        for i, given in enumerate(factors)
    ]
    moments = [tuple(t.to(device) for t in pair) for pair in moments]
    bases = []
    for s, a in moments:
        (l_out, q_out), (l_in, q_in) = torch.linalg.eigh(s), torch.linalg.eigh(a)
        eig = torch.outer(l_out.clamp(min=0), l_in.clamp(min=0))
        bases.append((q_out, q_in, eig, float(torch.diagonal(s).sum()) * float(torch.diagonal(a).sum())))
    if corrected and bases:
        shipped = [(q_out.float().cpu(), q_in.float().cpu()) for q_out, q_in, *_ in bases]
        eigs = [eig.to(device) for eig in rows.sum(_corrected_eigenvalues, kron, shipped)]
    else:  # K-FAC's, scaled to the block's trace
        eigs = []
        for trace, (_, _, eig, scale) in zip(traces, bases):
            eigs.append(eig * (float(trace) / scale) if scale > 0 else eig * 0)
    layers = []
    for (a, b, _), (q_out, q_in, *_), eig in zip(kron, bases, eigs):
        layers.append((a, b, q_out, q_in, 1.0 / (eig + block_damping(damping, eig))))
    dense_columns = None if dense is None else dense.to(device)
    dense_inverse = None
    if gram is not None:
        trace = float(torch.diagonal(gram).sum())
        dense_inverse = DampedInverse.from_gram(gram.to(device), _damping_of(trace, damping, n, len(gram)))
    return LayerInverse(layers, dense_columns, dense_inverse)


class KFAC(TRAK):
    """TRAK's attribution with per-layer curvature: ``Phi^T Phi`` replaced by its
    block-diagonal K-FAC approximation in the projected space of each layer, every
    layer damped on its own (see :func:`_layer_inverse`)."""

    name = "kfac"
    per_layer = True
    corrected = False
    default_damping = 0.01
    self_factor = AttributionMethod.self_factor

    def self_scores(self, factor, phi, residual):
        return factor.quadratic(phi)

    def fit(self, rows, damping, layout=None, factors=None):
        layout = ((0, rows.k, None),) if layout is None else layout
        return _layer_inverse(rows, layout, damping, self.corrected, factors)

    def test_side(self, state, phi):
        return state(phi)


class EKFAC(KFAC):
    """K-FAC with eigenvalue correction (George et al., 2018): the exact second
    moments of the projected gradients in each layer's Kronecker eigenbasis."""

    name = "ekfac"
    corrected = True


METHODS: dict[str, type[AttributionMethod]] = {
    cls.name: cls for cls in (TRAK, InfluenceFunction, TracIn, GradDot, GradCos, KFAC, EKFAC)
}
