"""What a net is trained and attributed on, in torch terms alone.

:class:`NetTask` says how a module's output becomes the attributed target (the
correct-class margin for classifiers, the prediction for regressors, a sequence's
log-likelihood, or the user's own) and the per-sample training loss. The gradient
engine and the data layer see only this and ``torch.nn.Module`` objects; building
a task from a skorch net is the skorch glue's job (:func:`sktda._nets.check_net`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch.func import vmap

# The three forms a classifier's output can take, and how each becomes logits.
LOGITS, PROBABILITIES, LOG_PROBABILITIES = "logits", "probabilities", "log_probabilities"


TARGETS = ("auto", "log_prob", "loss", "sequence_log_likelihood")


@dataclass(frozen=True)
class NetTask:
    """How a net's output maps to the attributed target and the training loss.

    ``output`` says what a classifier's module returns: ``"logits"``
    (``CrossEntropyLoss``), ``"probabilities"`` (``NLLLoss`` in a skorch
    ``NeuralNetClassifier``, which takes their log, as skorch's default does) or
    ``"log_probabilities"`` (``NLLLoss`` in a plain ``NeuralNet``).
    ``is_sequence``: the module returns ``(n, T, vocab)`` scores for ``y`` of
    ``(n, T)`` token ids (a language model), tokens equal to ``ignore_index``
    left out. ``target`` is the attributed scalar (see :meth:`target_and_residual`)
    and ``role`` says whether features are taken of training samples (``"train"``)
    or of the samples whose prediction is attributed (``"test"``). ``criterion``:
    the net's own criterion, for a loss sktda has no closed form of (None: the
    closed forms of cross-entropy, NLL and squared error), whose per-sample losses
    are then taken from the criterion itself.
    """

    is_classifier: bool
    output: str = LOGITS
    target: object = "auto"
    is_sequence: bool = False
    ignore_index: int = -100
    role: str = "train"
    criterion: torch.nn.Module | None = None

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.output == PROBABILITIES:
            return torch.log(out + torch.finfo(out.dtype).eps)
        return out

    def as_test(self) -> NetTask:
        return replace(self, role="test")

    def target_and_residual(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ``f`` and the residual ``-dL/df`` for a batch of outputs.

        ``target="auto"``, classification: ``f`` is the margin ``z_y -
        logsumexp(z_others)``; the cross-entropy loss is ``log(1 + exp(-f))``, so
        ``-dL/df = 1 - p_y`` (TRAK's ``Q``). Regression: ``f`` is the prediction
        and the squared error gives ``-dL/df = 2 (y - f)``. Since the loss depends
        on the parameters only through ``f``, ``grad L = -(-dL/df) grad f``: one
        per-sample gradient serves both the target and the loss.

        Any other target (``"log_prob"``, ``"loss"``, ``"sequence_log_likelihood"``
        or a callable) is what test samples are featurized by; training samples are
        featurized by minus their loss, with residual one (``Q = I``), so that the
        training side is always the training-loss gradient, as TRAK does for
        language models. For ``"log_prob"`` and ``"sequence_log_likelihood"`` under
        cross-entropy the two coincide.
        """
        if self.target == "auto" and not self.is_sequence and self.criterion is None:
            return self._auto(out, y)
        if self.role == "test" and callable(self.target):
            f = self.target(out, y)
            if not isinstance(f, torch.Tensor) or f.shape != (out.shape[0],):
                raise ValueError(
                    "A callable target must return a tensor of shape (n_samples,) = "
                    f"({out.shape[0]},), got {getattr(f, 'shape', type(f).__name__)}."
                )
        else:  # training samples; "loss", "log_prob", "sequence_log_likelihood": minus the loss
            f = -self.per_sample_loss(out, y)
        return f, torch.ones_like(f)

    def _auto(self, out, y):
        if self.is_classifier:
            z = self.logits(out)
            is_y = torch.arange(z.shape[-1], device=z.device) == y[..., None]
            z_y = (z * is_y).sum(-1)
            z_other = torch.logsumexp(z.masked_fill(is_y, -torch.inf), dim=-1)
            margin = z_y - z_other
            return margin, torch.sigmoid(-margin)
        f = out.reshape(out.shape[0], -1)
        if f.shape[1] != 1:
            raise ValueError(
                "sktda attributes single-output regressors; the module returns "
                f"{f.shape[1]} outputs per sample. Wrap it so it returns one."
            )
        f = f[:, 0]
        return f, 2.0 * (y.reshape(-1).to(f.dtype) - f)

    def per_sample_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each sample's training loss (summed over its tokens or outputs)."""
        if self.criterion is not None:
            return criterion_losses(self.criterion, out, y)
        if not self.is_classifier:
            return (out.reshape(out.shape[0], -1) - y.reshape(out.shape[0], -1).to(out.dtype)).pow(2).sum(1)
        log_p = torch.log_softmax(self.logits(out), dim=-1)
        keep = y != self.ignore_index
        picked = log_p.gather(-1, torch.where(keep, y, 0)[..., None])[..., 0] * keep
        return -(picked.reshape(out.shape[0], -1).sum(1))

    def check_output(self, out: torch.Tensor, n_classes: int, y=None) -> None:
        """Refuse a module output that the loss would silently mistreat, and a
        criterion that cannot be evaluated per sample (checked on ``y``)."""
        if self.criterion is not None and y is not None:
            check_per_sample(self.criterion, out, y)
        if not self.is_classifier:
            return
        if self.is_sequence:
            if out.ndim != 3:
                raise ValueError(
                    f"A sequence target needs module outputs of shape (n_samples, T, vocab); the "
                    f"module returns {tuple(out.shape)}."
                )
            n_classes = 0
        elif self.criterion is None and (out.ndim != 2 or out.shape[1] < n_classes):
            raise ValueError(
                f"The module returns outputs of shape {tuple(out.shape)} but y has {n_classes} "
                "classes; a classifier's module must return one score per class, shape "
                "(n_samples, n_classes)."
            )
        out = out.detach().double()
        if self.output == PROBABILITIES:
            is_probability = bool(((out >= 0) & (out <= 1)).all()) and bool(
                torch.allclose(out.sum(-1), torch.ones(1, dtype=out.dtype), atol=1e-3)
            )
            if not is_probability:
                raise ValueError(
                    "criterion=NLLLoss in a NeuralNetClassifier (skorch's default) takes the log "
                    "of the module's output, so the module must return probabilities, but its "
                    "outputs are not (they look like logits). Use criterion="
                    "torch.nn.CrossEntropyLoss, or end the module in torch.softmax."
                )
        elif self.output == LOG_PROBABILITIES:
            if not bool(torch.allclose(out.logsumexp(-1), torch.zeros(1, dtype=out.dtype), atol=1e-3)):
                raise ValueError(
                    "criterion=NLLLoss needs log-probabilities from the module, but its outputs "
                    "are not (they look like logits or probabilities). Use criterion="
                    "torch.nn.CrossEntropyLoss, or end the module in torch.log_softmax."
                )


def criterion_losses(criterion: torch.nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's loss under ``criterion``: its elements' losses with
    ``reduction="none"``, summed, when the criterion has a ``reduction``; otherwise
    the criterion on each sample alone (vectorised with ``vmap`` where it allows)."""
    criterion = criterion.to(out.device)
    n = out.shape[0]
    if isinstance(getattr(criterion, "reduction", None), str):
        elementwise = copy.copy(criterion)
        elementwise.reduction = "none"
        loss = elementwise(out, y)
        if loss.dim() > 0 and loss.numel() >= n and loss.numel() % n == 0:
            return loss.reshape(n, -1).sum(1)
    try:
        loss = vmap(lambda o, t: criterion(o[None], t[None]))(out, y)
    except Exception:  # data-dependent control flow: one call per sample
        loss = torch.stack([criterion(out[i : i + 1], y[i : i + 1]) for i in range(n)])
    return loss.reshape(n)


def check_per_sample(criterion, out, y) -> None:
    """Refuse, before training, a criterion whose loss cannot be split per sample:
    one that fails on a single sample, or whose batch loss couples the samples (its
    gradient with respect to a sample's output is not along that sample's own)."""
    out = out.detach().to(torch.float32).requires_grad_()
    name = type(criterion).__name__
    try:
        with torch.enable_grad():
            batch_loss = criterion(out, y)
    except Exception as exc:
        raise ValueError(
            f"The criterion {name} fails on the module's outputs, shape {tuple(out.shape)}, and the "
            f"targets, shape {tuple(y.shape)}: {type(exc).__name__}: {exc}. Use a criterion that "
            "takes them (for a classifier, CrossEntropyLoss on logits)."
        ) from exc
    try:
        with torch.enable_grad():
            loss = criterion_losses(criterion, out, y)
            (own,) = torch.autograd.grad(loss.sum(), out, allow_unused=True, materialize_grads=True)
            (joint,) = torch.autograd.grad(batch_loss, out, allow_unused=True, materialize_grads=True)
    except Exception as exc:
        raise ValueError(
            f"The criterion {name} cannot be evaluated on one sample at a time "
            f"({type(exc).__name__}: {exc}), and per-sample gradients need each sample's loss. Give it "
            "a reduction attribute that accepts 'none', or make it accept a batch of one."
        ) from exc
    if loss.shape != (out.shape[0],) or not bool(torch.isfinite(loss).all()):
        raise ValueError(
            f"The criterion {name} gives per-sample losses of shape "
            f"{tuple(loss.shape)} for {out.shape[0]} samples (or non-finite ones); it must return one "
            "scalar per sample when called on one sample."
        )
    own, joint = own.reshape(len(own), -1), joint.reshape(len(joint), -1)
    cosine = (own * joint).sum(1) / (own.norm(dim=1) * joint.norm(dim=1)).clamp_min(1e-30)
    moving = (own.norm(dim=1) > 0) | (joint.norm(dim=1) > 0)
    if bool((moving & (cosine < 0.999)).any()):
        raise ValueError(
            f"The criterion {name} couples the samples of a batch: its gradient with "
            "respect to one sample's output is not that of the sample's own loss, so the loss does not "
            "split into per-sample losses, and per-sample gradients are not defined for it."
        )
