"""skorch glue: validate the user's net, train seeded clones, read their modules.

Everything that knows about skorch lives here. Below this module the library only
sees ``torch.nn.Module`` objects and a :class:`NetTask` that says how to turn the
module's output into the attributed target (the correct-class margin for
classifiers, the prediction for regressors) and into the training loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone
from skorch import NeuralNet
from skorch.callbacks import Callback

_CLASSIFICATION_LOSSES = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)
_REGRESSION_LOSSES = (torch.nn.MSELoss,)


@dataclass(frozen=True)
class NetTask:
    """How a net's output maps to the attributed target and the training loss.

    ``log_output`` is true for nets trained with ``NLLLoss`` on probabilities (the
    skorch default), whose logits are ``log(p + eps)``, as skorch computes them.
    """

    is_classifier: bool
    log_output: bool = False

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        if self.log_output:
            return torch.log(out + torch.finfo(out.dtype).eps)
        return out

    def target_and_weight(self, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target ``f`` and ``-dL/df`` for a batch of outputs.

        Classification: ``f`` is the margin ``z_y - logsumexp(z_others)``; the
        cross-entropy loss is ``log(1 + exp(-f))``, so ``-dL/df = 1 - p_y``, TRAK's
        reweighting. Regression: ``f`` is the prediction and the squared error
        gives ``-dL/df = 2 (y - f)``. Since the loss depends on the parameters only
        through ``f``, ``grad L = -(-dL/df) grad f``: one per-sample gradient
        serves both the target and the loss.
        """
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


def check_net(estimator) -> NetTask:
    """Validate a user's skorch net and return its :class:`NetTask`."""
    if not isinstance(estimator, NeuralNet):
        raise TypeError(
            "estimator must be a skorch NeuralNetClassifier or NeuralNetRegressor "
            f"(a skorch.NeuralNet), got {type(estimator).__name__}. Wrap your torch "
            "module: NeuralNetClassifier(MyModule, criterion=nn.CrossEntropyLoss)."
        )
    criterion = estimator.criterion
    crit_cls = criterion if isinstance(criterion, type) else type(criterion)
    if issubclass(crit_cls, _CLASSIFICATION_LOSSES):
        return NetTask(is_classifier=True, log_output=issubclass(crit_cls, torch.nn.NLLLoss))
    if issubclass(crit_cls, _REGRESSION_LOSSES):
        return NetTask(is_classifier=False)
    raise TypeError(
        f"sktda does not know the loss {crit_cls.__name__}. Use criterion="
        "torch.nn.CrossEntropyLoss (logits) or torch.nn.NLLLoss (probabilities) for "
        "classifiers, torch.nn.MSELoss for regressors."
    )


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} asks for CUDA but torch sees no CUDA device; use "
            "device='auto' to fall back to the CPU."
        )
    return resolved


class LearningRateCheckpoints(Callback):
    """Record the module's weights and the learning rate after chosen epochs.

    TracIn sums gradient dot products over such checkpoints, each weighted by the
    learning rate in force when it was taken.
    """

    def __init__(self, epochs=()):
        self.epochs = epochs

    def initialize(self):
        self.checkpoints_ = []
        return self

    def on_epoch_end(self, net, **kwargs):
        epoch = len(net.history)
        if epoch in set(self.epochs):
            lr = float(net.optimizer_.param_groups[0]["lr"])
            state = {k: v.detach().cpu().clone() for k, v in net.module_.state_dict().items()}
            self.checkpoints_.append((epoch, lr, state))


def checkpoint_epochs(max_epochs: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` epochs evenly spread over training, the last included."""
    n = min(n_checkpoints, max_epochs)
    return sorted({int(round(e)) for e in np.linspace(max_epochs / n, max_epochs, n)})


def fit_net(estimator, X, y, seed: int, device: torch.device, callbacks=()):
    """Train a fresh clone of ``estimator`` with every random draw seeded.

    Module initialisation, dropout during training and the data order all draw on
    torch's global generator; forking it keeps the caller's state untouched and
    makes the result a function of ``seed`` alone, in any process.
    """
    net = clone(estimator)
    net.set_params(device=str(device))
    if callbacks:
        net.set_params(callbacks=list(net.callbacks or []) + list(callbacks))
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            net.fit(X, y)
        except IndexError as exc:
            raise ValueError(
                f"Training the net failed ({exc}). A classifier's module must return one "
                f"score per class; y has {int(np.max(y)) + 1} classes here."
            ) from exc
    net.module_.eval()  # skorch leaves train mode on; outputs must not be random
    return net


def fine_tune(net, module: torch.nn.Module, X, y, epochs: int, seed: int, device: torch.device):
    """Train ``module`` (its trainable parameters) for ``epochs`` with the net's own
    criterion, optimizer, learning rate and batch size, in a seeded shuffled order.

    The user's callbacks and module arguments are left out: they belong to training
    from scratch (a callback may re-initialise the module).
    """
    skip = {"module", "callbacks", "max_epochs", "warm_start", "train_split", "verbose", "device"}
    params = {
        k: v
        for k, v in net.get_params(deep=False).items()
        if k not in skip and not k.startswith(("module__", "callbacks__"))
    }
    params["iterator_train__shuffle"] = True
    tuner = type(net)(
        module=module,
        max_epochs=epochs,
        callbacks=None,
        train_split=None,
        verbose=0,
        warm_start=False,
        device=str(device),
        **params,
    )
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        tuner.fit(X, y)
    module.eval()
    return module


def initialized_module(estimator) -> torch.nn.Module:
    """The module an unfitted net would train, built without touching the caller's
    random state (to check it before any training)."""
    net = clone(estimator)
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    return net.module_


def trained_module(net) -> torch.nn.Module:
    """A frozen, eval-mode copy of the net's module (the net itself is untouched)."""
    module = copy.deepcopy(net.module_)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def module_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return int(sum(t.numel() * t.element_size() for t in tensors))


def parameter_names(module: torch.nn.Module, layers) -> list[str]:
    """Names of the parameters to differentiate for ``layers``.

    ``None`` or ``"all"``: every parameter; ``"last"``: the parameters of the last
    module that owns any (the output layer); a list of module names: their
    parameters.
    """
    all_names = [n for n, _ in module.named_parameters()]
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return all_names
    if isinstance(layers, str) and layers == "last":
        owners = [
            (name, sub)
            for name, sub in module.named_modules()
            if any(True for _ in sub.parameters(recurse=False))
        ]
        if not owners:
            raise ValueError("The module has no parameters to differentiate.")
        prefix, sub = owners[-1]
        return [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False)]
    if isinstance(layers, str):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise TypeError(
            f"layers must be None, 'all', 'last' or a list of module names, got {layers!r}."
        ) from None
    modules = dict(module.named_modules())
    unknown = [name for name in layers if name not in modules]
    if unknown:
        known = [n for n, m in modules.items() if n and any(True for _ in m.parameters())]
        raise ValueError(f"layers {unknown} are not modules of the net; choose from {known}.")
    chosen = [n for n in all_names if any(not name or n.startswith(f"{name}.") for name in layers)]
    if not chosen:
        raise ValueError(f"layers {layers} hold no parameters.")
    return chosen
