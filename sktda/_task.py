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

# The forms a classifier's output can take, and how each becomes logits: scores per
# class, or one score per sample for two classes (BCEWithLogitsLoss, BCELoss).
LOGITS, PROBABILITIES, LOG_PROBABILITIES = "logits", "probabilities", "log_probabilities"
BINARY_LOGITS, BINARY_PROBABILITIES = "binary_logits", "binary_probabilities"
BINARY = (BINARY_LOGITS, BINARY_PROBABILITIES)

# How a training sample's side is taken under target="auto" (``NetTask.train_side``).
CLOSED, CRITERION, LOSS = "closed", "criterion", "loss"


TARGETS = ("auto", "log_prob", "loss", "sequence_log_likelihood")


@dataclass(frozen=True)
class NetTask:
    """How a net's output maps to the attributed target and the training loss.

    ``output`` says what a classifier's module returns: ``"logits"``
    (``CrossEntropyLoss``), ``"probabilities"`` (``NLLLoss`` in a skorch
    ``NeuralNetClassifier``, which takes their log, as skorch's default does),
    ``"log_probabilities"`` (``NLLLoss`` in a plain ``NeuralNet``), or one score
    per sample of a two-class net: ``"binary_logits"`` (``BCEWithLogitsLoss``,
    skorch's ``NeuralNetBinaryClassifier``) or ``"binary_probabilities"``
    (``BCELoss``), read as the logits ``(0, z)`` of the classes 0 and 1.
    ``is_sequence``: the module returns ``(n, T, vocab)`` scores for ``y`` of
    ``(n, T)`` token ids (a language model), tokens equal to ``ignore_index``
    left out. ``target`` is the attributed scalar (see :meth:`target_and_residual`)
    and ``role`` says whether features are taken of training samples (``"train"``)
    or of the samples whose prediction is attributed (``"test"``). ``criterion``:
    the net's own criterion, whose per-sample losses are taken from the criterion
    itself (None: the closed forms of plain cross-entropy, NLL, binary
    cross-entropy and squared error). ``train_side`` says how ``target="auto"``
    takes a training sample's side: ``"closed"``, by the closed forms;
    ``"criterion"``, the residual ``-dL/df`` of the criterion's own per-sample
    loss, differentiated (its loss depends on the output only through the target:
    class weights, ``pos_weight``, L1, Huber); ``"loss"``, the gradient of minus
    the criterion's loss (it does not: label smoothing). ``auto_is_loss``: the
    criterion is one sktda does not know, and ``target="auto"`` attributes minus
    its loss on both sides.
    """

    is_classifier: bool
    output: str = LOGITS
    target: object = "auto"
    is_sequence: bool = False
    ignore_index: int = -100
    role: str = "train"
    criterion: torch.nn.Module | None = None
    train_side: str = CLOSED
    auto_is_loss: bool = False

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.output == PROBABILITIES:
            return torch.log(out + torch.finfo(out.dtype).eps)
        if self.output in BINARY:
            z = out.reshape(out.shape[0])
            if self.output == BINARY_PROBABILITIES:
                z = torch.logit(z, eps=torch.finfo(z.dtype).eps)
            return torch.stack([torch.zeros_like(z), z], -1)
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
        if self.target == "auto" and not self.is_sequence and not self.auto_is_loss:
            f, residual = self._auto(out, y)
            if self.role == "test" or self.train_side == CLOSED:
                return f, residual
            if self.train_side == CRITERION:
                return f, self._criterion_residual(out, y)
            f = -self.per_sample_loss(out, y)  # LOSS: the training side is the loss gradient
        elif self.role == "test" and callable(self.target):
            f = self.target(out, y)
            if not isinstance(f, torch.Tensor) or f.shape != (out.shape[0],):
                raise ValueError(
                    "A callable target must return a tensor of shape (n_samples,) = "
                    f"({out.shape[0]},), got {getattr(f, 'shape', type(f).__name__)}."
                )
        else:  # training samples; "loss", "log_prob", "sequence_log_likelihood": minus the loss
            f = -self.per_sample_loss(out, y)
        return f, torch.ones_like(f)

    def _criterion_residual(self, out, y) -> torch.Tensor:
        """``-dL/df`` of the criterion's own per-sample loss ``L``, which depends on
        the logits only through the target ``f``: ``-(dL/dz . df/dz) / |df/dz|^2``
        per sample, ``z`` the logits (the output, for a regressor), by
        ``torch.func`` (so that it nests in the gradient engine's transforms)."""
        z = (self.logits(out) if self.is_classifier else out).detach()
        shape = out.shape

        def loss(z):
            return self._criterion_of_logits(z, y, shape).sum()

        def target(z):
            return self._auto(z, y, logits=True)[0].sum()

        losses = torch.func.grad(loss)(z).reshape(len(z), -1)
        targets = torch.func.grad(target)(z).reshape(len(z), -1)
        tiny = torch.finfo(z.dtype).tiny
        return -(losses * targets).sum(1) / (targets * targets).sum(1).clamp_min(tiny)

    def _criterion_of_logits(self, z, y, shape) -> torch.Tensor:
        """The criterion's per-sample loss as a function of the logits ``z``, given
        what the module would output for them: probabilities and log-probabilities
        (NLL) as ``log_softmax(z)``, on the simplex where the module's outputs lie,
        so that the loss is a function of the margin in every direction of ``z``."""
        if not self.is_classifier:
            return self.per_sample_loss(z, y)
        if self.output in BINARY:
            logit = z[:, 1] - z[:, 0]
            return self.per_sample_loss(
                logit if self.output == BINARY_LOGITS else torch.sigmoid(logit), y, shape
            )
        if self.output in (PROBABILITIES, LOG_PROBABILITIES):
            return criterion_losses(self.criterion, torch.log_softmax(z, -1), y)
        return criterion_losses(self.criterion, z, y)

    def _auto(self, out, y, logits=False):
        if self.is_classifier:
            z = out if logits else self.logits(out)
            y = y.reshape(z.shape[:-1]).long() if self.output in BINARY else y
            is_y = torch.arange(z.shape[-1], device=z.device) == y[..., None]
            z_y = (z * is_y).sum(-1)
            z_other = torch.logsumexp(z.masked_fill(is_y, -torch.inf), dim=-1)
            margin = z_y - z_other
            return margin, torch.sigmoid(-margin)
        f = out.reshape(out.shape[0], -1)
        if f.shape[1] != 1:
            raise ValueError(_MULTI_OUTPUT.format(f.shape[1]))
        f = f[:, 0]
        return f, 2.0 * (y.reshape(-1).to(f.dtype) - f)

    def per_sample_loss(self, out: torch.Tensor, y: torch.Tensor, shape=None) -> torch.Tensor:
        """Each sample's training loss (summed over its tokens or outputs), as the
        net computes it: skorch's ``NeuralNetClassifier`` gives ``NLLLoss`` the log
        of the module's probabilities. ``shape``: the module's output shape, which
        a two-class output is given in."""
        if self.criterion is not None:
            if self.output == PROBABILITIES:
                out = torch.log(out + torch.finfo(out.dtype).eps)
            elif self.output in BINARY:
                out = out.reshape(shape or out.shape)
                y = y.reshape(out.shape).to(out.dtype)
            return criterion_losses(self.criterion, out, y)
        if not self.is_classifier:
            return (out.reshape(out.shape[0], -1) - y.reshape(out.shape[0], -1).to(out.dtype)).pow(2).sum(1)
        if self.output in BINARY:
            y = y.reshape(out.shape[0]).long()
        log_p = torch.log_softmax(self.logits(out), dim=-1)
        keep = y != self.ignore_index
        picked = log_p.gather(-1, torch.where(keep, y, 0)[..., None])[..., 0] * keep
        return -(picked.reshape(out.shape[0], -1).sum(1))

    def _criterion_name(self) -> str:
        return "BCELoss" if self.output == BINARY_PROBABILITIES else "BCEWithLogitsLoss"

    def check_output(self, out: torch.Tensor, n_classes: int, y=None) -> None:
        """Refuse a module output that the loss would silently mistreat, and a
        criterion that cannot be evaluated per sample (checked on ``y``)."""
        if self.criterion is not None and y is not None:
            given = (
                torch.log(out.detach() + torch.finfo(out.dtype).eps) if self.output == PROBABILITIES else out
            )
            check_per_sample(
                self.criterion, given, y.reshape(out.shape).to(out.dtype) if self.output in BINARY else y
            )
        if not self.is_classifier:
            width = out[0].numel() if out.ndim else 1
            if width > 1 and self.target == "auto" and not self.auto_is_loss:
                raise ValueError(_MULTI_OUTPUT.format(width))
            return
        if self.output in BINARY:
            if out.reshape(out.shape[0], -1).shape[1] != 1:
                raise ValueError(
                    f"A two-class net trained with {self._criterion_name()} needs one score per sample, "
                    f"shape (n_samples,) or (n_samples, 1); the module returns {tuple(out.shape)}. For "
                    "scores per class, use CrossEntropyLoss."
                )
            if self.output == BINARY_PROBABILITIES and not bool(((out >= 0) & (out <= 1)).all()):
                raise ValueError(
                    "criterion=BCELoss needs probabilities from the module, but its outputs are not in "
                    "[0, 1]. End the module in torch.sigmoid, or use BCEWithLogitsLoss on the logits."
                )
            return
        if self.is_sequence:
            if out.ndim != 3:
                raise ValueError(
                    f"A sequence target needs module outputs of shape (n_samples, T, vocab); the "
                    f"module returns {tuple(out.shape)}."
                )
            n_classes = 0
        elif not self.auto_is_loss and (out.ndim != 2 or out.shape[1] < n_classes):
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


_MULTI_OUTPUT = (
    "The regressor's module returns {} outputs per sample, and target='auto' attributes one "
    "output. Pass target='loss' (minus the loss, summed over the outputs) or a callable that "
    "picks the output to attribute, for example target=lambda out, y: out[:, 0] (for score and "
    "subset_retraining to cache their retraining, a module-level function)."
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
    # each sample's pair scaled to its largest entry, in float64: the cosine of the
    # smallest gradients (a Huber loss of a tiny delta) is as well defined as of any
    own, joint = own.reshape(len(own), -1).double(), joint.reshape(len(joint), -1).double()
    largest = torch.maximum(own.abs().amax(1), joint.abs().amax(1))
    moving = largest > 0
    own, joint = own / largest.where(moving, 1.0)[:, None], joint / largest.where(moving, 1.0)[:, None]
    cosine = (own * joint).sum(1) / (own.norm(dim=1) * joint.norm(dim=1)).clamp_min(1e-300)
    if bool((moving & (cosine < 0.999)).any()):
        raise ValueError(
            f"The criterion {name} couples the samples of a batch: its gradient with "
            "respect to one sample's output is not that of the sample's own loss, so the loss does not "
            "split into per-sample losses, and per-sample gradients are not defined for it."
        )
