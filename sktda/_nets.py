"""skorch glue: validate the user's net, train seeded clones, read their modules.

Everything that knows about skorch lives here. Below this module the library only
sees ``torch.nn.Module`` objects and the :class:`~sktda._task.NetTask` that
:func:`check_net` builds from the net.
"""

from __future__ import annotations

import copy
import numbers
import os
import signal
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace
from itertools import chain

import numpy as np
import torch
from sklearn.base import clone
from sklearn.frozen import FrozenEstimator
from skorch import NeuralNet, NeuralNetBinaryClassifier, NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback
from skorch.utils import multi_indexing

from ._data import is_dataset, materialize, take, to_torch
from ._task import (
    BINARY_LOGITS,
    BINARY_PROBABILITIES,
    CLOSED,
    CRITERION,
    LOG_PROBABILITIES,
    LOSS,
    PROBABILITIES,
    TARGETS,
    NetTask,
)

_REGRESSION_LOSSES = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.HuberLoss, torch.nn.SmoothL1Loss)


def _known_task(estimator, crit_cls) -> NetTask | None:
    """The task of a criterion sktda knows (its output's form), or None."""
    if issubclass(crit_cls, torch.nn.NLLLoss):
        output = PROBABILITIES if isinstance(estimator, NeuralNetClassifier) else LOG_PROBABILITIES
        return NetTask(is_classifier=True, output=output)
    if issubclass(crit_cls, torch.nn.CrossEntropyLoss):
        return NetTask(is_classifier=True)
    if issubclass(crit_cls, torch.nn.BCEWithLogitsLoss):
        return NetTask(is_classifier=True, output=BINARY_LOGITS)
    if issubclass(crit_cls, torch.nn.BCELoss):
        return NetTask(is_classifier=True, output=BINARY_PROBABILITIES)
    if issubclass(crit_cls, _REGRESSION_LOSSES):
        return NetTask(is_classifier=False)
    return None


_CLOSED_FORMS = (
    torch.nn.CrossEntropyLoss,
    torch.nn.NLLLoss,
    torch.nn.MSELoss,
    torch.nn.BCEWithLogitsLoss,
    torch.nn.BCELoss,
)


def _train_side(criterion: torch.nn.Module) -> str:
    """How ``target="auto"`` takes a training sample's side under ``criterion`` (see
    :class:`~sktda._task.NetTask`): the closed forms for cross-entropy, NLL, squared
    error and binary cross-entropy without weights (the tests check them against
    the criterion's own per-sample gradients); the criterion's residual where its
    loss depends on the output only through the target; its loss gradient
    otherwise (label smoothing)."""
    if getattr(criterion, "label_smoothing", 0.0):
        return LOSS
    weighted = any(getattr(criterion, name, None) is not None for name in ("weight", "pos_weight"))
    return CLOSED if isinstance(criterion, _CLOSED_FORMS) and not weighted else CRITERION


def check_net(estimator, target="auto", y=None) -> NetTask:
    """Validate a user's skorch net and return its :class:`NetTask` for ``target``.

    ``y`` (the training targets) tells a language model apart: a plain
    ``NeuralNet`` with a classification loss and 2-D integer ``y`` is attributed
    by ``"sequence_log_likelihood"`` under ``target="auto"``. A criterion sktda
    has no closed form of is used as it is: its per-sample losses are taken with
    ``reduction="none"``, or one sample at a time, and ``target="auto"`` then
    attributes the loss.
    """
    if not isinstance(estimator, NeuralNet):
        raise TypeError(
            "estimator must be a skorch NeuralNetClassifier or NeuralNetRegressor "
            f"(a skorch.NeuralNet), got {type(estimator).__name__}. Wrap your torch "
            "module: NeuralNetClassifier(MyModule, criterion=nn.CrossEntropyLoss)."
        )
    if not (callable(target) or target in TARGETS):
        raise ValueError(
            f"target must be one of {TARGETS} or a callable (output, y) -> (n,), got {target!r}."
        )
    criterion = estimator.criterion
    crit_cls = criterion if isinstance(criterion, type) else type(criterion)
    if not issubclass(crit_cls, torch.nn.Module):
        raise TypeError(f"criterion must be a torch.nn.Module class or instance (a loss), got {criterion!r}.")
    task = _known_task(estimator, crit_cls)
    if task is not None and task.is_classifier != isinstance(
        estimator, NeuralNetClassifier | NeuralNetBinaryClassifier
    ):
        if isinstance(estimator, NeuralNetClassifier | NeuralNetBinaryClassifier | NeuralNetRegressor):
            kind = "classification" if task.is_classifier else "regression"
            raise ValueError(
                f"The {type(estimator).__name__} is trained with {crit_cls.__name__}, a {kind} loss. Use a "
                f"{'NeuralNetClassifier' if task.is_classifier else 'NeuralNetRegressor'} with it, or a "
                f"{'regression' if task.is_classifier else 'classification'} loss."
            )
    if task is not None:
        instance = _criterion_instance(estimator)
        side = _train_side(instance)
        task = replace(task, criterion=None if side == CLOSED else instance, train_side=side)
    else:  # the user's own loss, evaluated per sample by itself
        is_classifier = isinstance(estimator, NeuralNetClassifier) or (
            not isinstance(estimator, NeuralNetRegressor)
            and (target in ("log_prob", "sequence_log_likelihood") or np.asarray(y).dtype.kind in "iu")
        )
        task = NetTask(
            is_classifier=is_classifier, criterion=_criterion_instance(estimator), auto_is_loss=True
        )
    params = estimator.get_params()
    ignore_index = params.get("criterion__ignore_index", getattr(criterion, "ignore_index", -100))
    is_sequence = target == "sequence_log_likelihood" or (
        target == "auto"
        and task.is_classifier
        and not isinstance(estimator, NeuralNetClassifier)
        and y is not None
        and np.ndim(y) == 2
        and np.shape(y)[1] > 1
    )
    if (is_sequence or target == "log_prob") and not task.is_classifier:
        raise ValueError(
            f"target={target!r} needs a classification loss (token or class log-probabilities); "
            "the net is a regressor. Use target='auto' or 'loss'."
        )
    if target == "sequence_log_likelihood" and isinstance(estimator, NeuralNetClassifier):
        raise ValueError(
            "target='sequence_log_likelihood' is for a skorch NeuralNet language model with "
            "y = next tokens (n_samples, T); a NeuralNetClassifier takes one label per sample."
        )
    return replace(task, target=target, is_sequence=is_sequence, ignore_index=int(ignore_index))


def _criterion_instance(estimator) -> torch.nn.Module:
    """The net's criterion as skorch builds it (with its ``criterion__`` arguments)."""
    try:
        return estimator.initialized_instance(estimator.criterion, estimator.get_params_for("criterion"))
    except Exception as exc:
        raise TypeError(
            f"The criterion {estimator.criterion!r} cannot be built with the net's criterion__ "
            f"arguments: {type(exc).__name__}: {exc}."
        ) from exc


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``device`` ("auto": CUDA when available), checked to
    run a computation, so that a device that cannot fails here and not mid-fit."""
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
    try:
        torch.ones(1, device=resolved).add(1).cpu()
    except (RuntimeError, NotImplementedError, AssertionError) as exc:
        raise ValueError(
            f"device={device!r} cannot run computations here ({exc}); use 'auto', 'cpu' or 'cuda'."
        ) from exc
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


class TrainingGuard(Callback):
    """Fail early and clearly: one forward pass on the first training samples
    before the first step (after the user's callbacks have sized the module), and
    a finite loss after every epoch. A module that returns a transformers
    ``ModelOutput``, a dict or a tuple is trained and attributed on its logits
    (see :func:`logits_output`)."""

    def __init__(self, task: NetTask | None = None, n_classes: int = 0):
        self.task = task
        self.n_classes = n_classes

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        use_logits(net.module_)
        head = to_torch(take(X, slice(0, 2))) if is_dataset(X) else multi_indexing(X, slice(0, 2))
        try:
            out = net.forward(head, training=False)
        except NoLogitsError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"The module cannot take the training inputs: its forward pass on {_describe(head)} "
                f"failed with {type(exc).__name__}: {exc}. Check that forward accepts them (a dict X is "
                "passed as keyword arguments of those names) and that the module's sizes match the "
                "data (for example module__n_features)."
            ) from exc
        if self.task is not None and y is not None:
            y_head = torch.as_tensor(np.asarray(multi_indexing(y, slice(0, 2)))).to(out.device)
            self.task.check_output(out, self.n_classes, y_head)
        elif self.task is not None:
            self.task.check_output(out, self.n_classes)

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        for key in ("train_loss", "valid_loss"):
            if key in row and not np.isfinite(row[key]):
                raise ValueError(
                    f"training diverged: the {key.replace('_', ' ')} became {row[key]} at epoch "
                    f"{row['epoch']}; lower lr, scale X, or clip gradients."
                )

    def on_train_end(self, net, **kwargs):
        if not all(bool(torch.isfinite(p).all()) for p in net.module_.parameters()):
            raise ValueError(
                "training diverged: the module's parameters are not finite after training; "
                "lower lr, scale X, or clip gradients."
            )


class NoLogitsError(TypeError):
    """The module returns no tensor of scores that sktda could train and attribute."""


_WRAPPER = """class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__(); self.model = model
    def forward(self, **inputs):
        return self.model(**inputs).logits"""


def logits_output(module, args, kwargs, output):
    """Forward hook: the logits of a module that returns a transformers
    ``ModelOutput`` or a dict (``output["logits"]``) or a tuple (its first
    element), so that skorch trains on them and sktda attributes them."""
    if isinstance(output, torch.Tensor):
        return None
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        keys = list(output.keys())
    elif isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    else:
        keys = None
    what = f"a {type(output).__name__}" + (f" with keys {keys} but no 'logits'" if keys is not None else "")
    raise NoLogitsError(
        f"The module returns {what}; sktda trains and attributes a tensor of scores (logits). "
        f"Return one, for example with a wrapper (or a head on the hidden states):\n{_WRAPPER}"
    )


def use_logits(module: torch.nn.Module) -> torch.nn.Module:
    """Register :func:`logits_output` on ``module`` (once)."""
    if not any(hook is logits_output for hook in module._forward_hooks.values()):
        module.register_forward_hook(logits_output, with_kwargs=True)
    return module


def _describe(X) -> str:
    if isinstance(X, Mapping):
        return "inputs " + ", ".join(f"{k}={_describe(v)[len('an input of ') :]}" for k, v in X.items())
    shape = getattr(X, "shape", None)
    return f"an input of shape {tuple(shape)}" if shape is not None else f"a {type(X).__name__} input"


def checkpoint_epochs(max_epochs: int, n_checkpoints: int) -> list[int]:
    """``n_checkpoints`` epochs evenly spread over training, the last included."""
    if max_epochs < 1:
        raise ValueError(
            f"Checkpoints along training need at least one epoch, and the net has max_epochs="
            f"{max_epochs}. Set max_epochs >= 1, or (for the detector) n_checkpoints=None."
        )
    n = min(n_checkpoints, max_epochs)
    return sorted({int(round(e)) for e in np.linspace(max_epochs / n, max_epochs, n)})


_GUARD = "sktda_guard"


@contextmanager
def _interrupts_propagate():
    """Let Ctrl+C stop a fit. skorch's ``fit`` swallows ``KeyboardInterrupt``
    (``EarlyStopping`` ends training by raising one), so an interrupted model would
    come back half-trained and the fit go on. A SIGINT that arrives meanwhile is
    noted, handed to the handler that was installed (Python's, or one of the
    caller's, a cluster's or a framework's), and raised again once skorch returns;
    the handler is restored afterwards. Only the main thread receives signals, and
    a SIGINT the caller ignores stays ignored."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # another thread, or SIG_IGN / SIG_DFL / a handler installed outside Python
        return
    received = []

    def note(signum, frame):
        received.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt(
            "training was interrupted; the fit is abandoned (a previous fit stays intact)"
        )


def _seeded_fit(net, X, y, seed: int, device: torch.device):
    """``net.fit(X, y)`` with every random draw seeded. Module initialisation,
    dropout during training and the data order all draw on torch's global
    generator; forking it keeps the caller's state untouched and makes the result
    a function of ``seed`` alone, in any process. A dask array ``X`` is computed
    here, in the process (the worker) that trains; a ``Dataset`` is read by skorch,
    its own targets with it."""
    devices = [device.index or 0] if device.type == "cuda" else []
    X = materialize(X)
    with torch.random.fork_rng(devices=devices), _interrupts_propagate():
        torch.manual_seed(seed)
        net.fit(X, None if is_dataset(X) else y)  # a Dataset holds its targets
    net.module_.eval()  # skorch leaves train mode on; outputs must not be random
    return net


def fit_net(estimator, X, y, *, seed: int, device: torch.device, task: NetTask, callbacks=()):
    """Train a fresh clone of ``estimator`` with every random draw seeded, guarded
    by :class:`TrainingGuard` (checked inputs and outputs, no silent divergence)."""
    net = clone(estimator)
    n_classes = int(np.max(y)) + 1 if task.is_classifier and len(y) else 0
    guard = [(_GUARD, TrainingGuard(task, n_classes))]
    ours = {_GUARD, *(name for name, _ in callbacks)}  # a net sktda trained before carries them
    own = [c for c in net.callbacks or [] if not (isinstance(c, tuple) and c[0] in ours)]
    net.set_params(device=str(device), callbacks=own + list(callbacks) + guard)
    return _seeded_fit(net, X, y, seed, device)


def untrained_net(estimator, device: torch.device):
    """A clone of ``estimator`` initialised on ``device`` without training: the
    pretrained module as given (LoRA adapters then do the fine-tuning)."""
    net = clone(estimator)
    net.set_params(device=str(device))
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    use_logits(net.module_)
    return net


def fine_tune(net, module: torch.nn.Module, X, y, *, epochs: int, seed: int, device: torch.device):
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
        callbacks=[(_GUARD, TrainingGuard())],
        train_split=None,
        verbose=0,
        warm_start=False,
        device=str(device),
        **params,
    )
    return _seeded_fit(tuner, X, y, seed, device).module_


def check_pretrained(estimator, pretrained: bool) -> None:
    """With ``pretrained=True`` the net's module must be an instance holding the
    pretrained weights: a class would be trained from scratch."""
    module = getattr(estimator, "module", None)
    if pretrained and not isinstance(module, torch.nn.Module):
        raise ValueError(
            "pretrained=True fine-tunes the weights of the net's module, so module must be an "
            f"nn.Module instance holding them; got {module!r}. Pass the pretrained module itself "
            "(NeuralNet(module=pretrained_module, ...)), or use pretrained=False to train from scratch."
        )


def frozen_nets(estimator) -> list | None:
    """The fitted skorch nets of a scikit-learn ``FrozenEstimator`` (or of a list of
    them: the user's own ensemble), or None for an unfitted net that sktda trains.

    A frozen net is used as it is: attributed or scored with its own weights,
    never trained, never changed."""
    items = list(estimator) if isinstance(estimator, (list, tuple)) else [estimator]
    if not any(isinstance(e, FrozenEstimator) for e in items):
        if isinstance(estimator, (list, tuple)):
            raise TypeError(
                "A list of estimators is the user's own ensemble of trained models: each must be a "
                "sklearn.frozen.FrozenEstimator around a fitted skorch net; got "
                f"{[type(e).__name__ for e in items]}. Pass one unfitted net to have sktda train the ensemble."
            )
        return None
    if not all(isinstance(e, FrozenEstimator) for e in items):
        raise TypeError(
            "Every model of your own ensemble must be a FrozenEstimator around a fitted skorch net; got "
            f"{[type(e).__name__ for e in items]}."
        )
    nets = [e.estimator for e in items]
    for i, net in enumerate(nets):
        if not isinstance(net, NeuralNet):
            raise TypeError(
                f"FrozenEstimator {i} wraps a {type(net).__name__}; sktda attributes skorch nets. Wrap your "
                "trained torch module with sktda.frozen_net(module, criterion)."
            )
        if not getattr(net, "initialized_", False) or not isinstance(
            getattr(net, "module_", None), torch.nn.Module
        ):
            raise ValueError(
                f"FrozenEstimator {i} wraps a skorch net that is not fitted (no module_), so it has no "
                "weights to attribute. Fit it first, or pass the unfitted net itself (without "
                "FrozenEstimator) to have sktda train the ensemble."
            )
    first = nets[0]
    for i, net in enumerate(nets[1:], 1):
        same = (type(net), type(net.module_), _criterion_class(net)) == (
            type(first),
            type(first.module_),
            _criterion_class(first),
        )
        if not same:
            raise ValueError(
                f"The frozen nets of one ensemble must be the same kind of net with the same module "
                f"class and criterion; net {i} is a {type(net).__name__} of {type(net.module_).__name__} "
                f"with {_criterion_class(net).__name__}, net 0 a {type(first).__name__} of "
                f"{type(first.module_).__name__} with {_criterion_class(first).__name__}."
            )
    return nets


def _token_loss(crit_cls: type) -> bool:
    from .models import TokenCrossEntropy

    return issubclass(crit_cls, TokenCrossEntropy)


def _criterion_class(net) -> type:
    return net.criterion if isinstance(net.criterion, type) else type(net.criterion)


def retraining_net(estimator):
    """The unfitted net that retrains ``estimator``'s recipe (``score``,
    ``subset_retraining``, ``removal_effect``): the net itself, or a frozen net's
    unfitted clone (its module class and parameters, or a module instance that
    still holds the weights training started from). A frozen net whose module
    instance was trained in place has no such recipe: refused."""
    nets = frozen_nets(estimator)
    if nets is None:
        return estimator
    net = nets[0]
    if isinstance(net.module, torch.nn.Module) and net.module is net.module_:
        raise ValueError(
            "This needs models retrained on subsets of the training data, and the frozen net's module "
            "is the trained instance itself: the weights its training started from are gone, so sktda "
            "cannot retrain it as it was trained. Give that recipe as an unfitted net, with the module "
            "class (NeuralNetClassifier(MyModule, module__...=...)) or an instance holding the starting "
            "(pretrained) weights: EnsembleAttributor(..., retrain_estimator=net), or "
            "subset_retraining(net, ...)."
        )
    return clone(net)


def _load_state(item, where: str) -> dict:
    if isinstance(item, (str, os.PathLike)):
        try:
            item = torch.load(item, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ValueError(f"{where}: cannot load a state dict from {str(item)!r} ({exc}).") from exc
    if not isinstance(item, Mapping) or not all(isinstance(v, torch.Tensor) for v in item.values()):
        raise TypeError(
            f"{where} must be a state dict (names to tensors, module.state_dict()) or the path of one saved "
            f"by torch.save (skorch's Checkpoint writes f_params so); got {type(item).__name__}."
        )
    return dict(item)


def given_checkpoints(checkpoints, nets: list) -> list[list[tuple]]:
    """The user's checkpoints of each frozen net, ``(epoch, learning rate,
    state)`` as sktda records its own: ``checkpoints`` is a list of ``(state dict or
    path, learning rate)`` pairs (one frozen net), or a list of such lists, one per
    net. Each state holds every trained parameter of the net, with its shape."""
    if checkpoints is None:
        return [[] for _ in nets]
    per_net = checkpoints_per_net(checkpoints, len(nets))
    out = []
    for i, (net, pairs) in enumerate(zip(nets, per_net)):
        if not pairs:
            raise ValueError(f"checkpoints of frozen net {i} is empty; give at least one (state, lr) pair.")
        reference = net.module_.state_dict()
        trained = trainable_names(net.module_)
        recorded = []
        for j, (state, lr) in enumerate(pairs):
            where = f"checkpoint {j} of frozen net {i}"
            state = _load_state(state, where)
            if not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr < 0:
                raise ValueError(f"{where}: the learning rate must be a finite number >= 0, got {lr!r}.")
            missing = sorted(trained - set(state))
            unknown = sorted(set(state) - set(reference))
            wrong = sorted(k for k in set(state) & set(reference) if state[k].shape != reference[k].shape)
            if missing or unknown or wrong:
                raise ValueError(
                    f"{where} does not fit the net's module: "
                    + "; ".join(
                        f"{what} {names[:5]}"
                        for what, names in (
                            ("missing", missing),
                            ("unknown", unknown),
                            ("wrong shape", wrong),
                        )
                        if names
                    )
                    + ". Give module.state_dict() of the same module at that point of training."
                )
            recorded.append((j + 1, float(lr), state))
        out.append(recorded)
    return out


def checkpoints_per_net(checkpoints, n_nets: int) -> list:
    """``checkpoints`` as one list of ``(state, learning rate)`` pairs per frozen net,
    its form checked, nothing loaded."""
    one = n_nets == 1 and not (checkpoints and _is_pair_list(checkpoints[0]))
    per_net = [checkpoints] if one else checkpoints
    if len(per_net) != n_nets or not all(_is_pair_list(c) for c in per_net):
        raise ValueError(
            "checkpoints must be a list of (state dict or path, learning rate) pairs for one frozen net, "
            f"or a list of {n_nets} such lists, one per frozen net; got {_shape(checkpoints)}."
        )
    return per_net


def _is_pair_list(value) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and not isinstance(p[1], (list, tuple)) for p in value
    )


def _shape(value) -> str:
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {[type(v).__name__ for v in value][:5]}"
    return type(value).__name__


def frozen_net(module: torch.nn.Module, criterion=torch.nn.CrossEntropyLoss, *, net_class=None, **params):
    """A trained torch module, wrapped for sktda as it is: a ``FrozenEstimator``
    around an initialised (never fitted) skorch net whose ``module_`` is ``module``
    itself.

    The path from a model trained elsewhere (a plain torch loop, a transformers
    model loaded with ``from_pretrained``, a peft ``PeftModel``) to both
    estimators. Nothing is copied or trained: the estimators work on copies, and
    ``module`` is left bitwise unchanged.

    Parameters
    ----------
    module : torch.nn.Module
        The trained module. A module returning a transformers ``ModelOutput`` (or a
        dict or tuple) is attributed on its logits.
    criterion : torch.nn.Module class or instance, default=torch.nn.CrossEntropyLoss
        The loss it was trained with (per-sample losses are taken from it).
    net_class : skorch net class or None, default=None
        None chooses from the criterion: ``NeuralNetBinaryClassifier`` for binary
        cross-entropy, ``NeuralNetRegressor`` for the regression losses,
        ``NeuralNetClassifier`` for cross-entropy and NLL, ``NeuralNet`` for any
        other loss, :class:`~sktda.models.TokenCrossEntropy` included (a language
        model's; pass ``net_class=skorch.NeuralNet`` for a language model trained
        with another token loss).
    **params
        Further skorch parameters: the learning rate, optimizer and batch size
        that LoRA adapters are trained with (``ensemble="lora"``), and the
        ``criterion__`` arguments. ``train_split=None``, ``verbose=0`` and the
        module's device unless given.

    Returns
    -------
    sklearn.frozen.FrozenEstimator
        Pass it as ``estimator`` to :class:`~sktda.EnsembleAttributor` or
        :class:`~sktda.OutlierGradientDetector`. Class labels are the module's
        output indices.

    Examples
    --------
    >>> import torch
    >>> from sktda import frozen_net
    >>> module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> frozen = frozen_net(module, torch.nn.CrossEntropyLoss, lr=0.01)
    >>> frozen.estimator.module_ is module
    True
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a trained torch.nn.Module instance, got {type(module).__name__}.")
    if any(k.startswith("module__") for k in params):
        raise ValueError(
            "module__ arguments would build a new module; frozen_net wraps the trained module as it is."
        )
    if net_class is None:
        crit_cls = criterion if isinstance(criterion, type) else type(criterion)
        if issubclass(crit_cls, torch.nn.BCEWithLogitsLoss | torch.nn.BCELoss):
            net_class = NeuralNetBinaryClassifier
        elif issubclass(crit_cls, _REGRESSION_LOSSES):
            net_class = NeuralNetRegressor
        elif issubclass(crit_cls, torch.nn.CrossEntropyLoss | torch.nn.NLLLoss) and not _token_loss(crit_cls):
            net_class = NeuralNetClassifier
        else:
            net_class = NeuralNet
    tensor = next(chain(module.parameters(), module.buffers()), None)
    defaults = {
        "train_split": None,
        "verbose": 0,
        "device": str(tensor.device) if tensor is not None else "cpu",
    }
    net = net_class(module, criterion=criterion, **{**defaults, **params})
    with torch.random.fork_rng(devices=[]):
        net.initialize()
    return FrozenEstimator(net)


def is_peft_model(module: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in module.modules())


def trainable_names(module: torch.nn.Module) -> set[str]:
    """The parameters training updates (a ``peft.PeftModel`` trains only its adapters)."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def initialized_module(estimator) -> torch.nn.Module:
    """The module an unfitted net would train, built without touching the caller's
    random state (to check it before any training)."""
    net = clone(estimator)
    with torch.random.fork_rng(devices=[]):
        try:
            net.initialize()
        except ValueError as exc:
            module = getattr(net, "module_", None)
            if module is not None and not any(True for _ in module.parameters()):
                raise ValueError(
                    f"The module {type(module).__name__} has no parameters: there is nothing to "
                    "train or to differentiate. Give it at least one trainable layer."
                ) from exc
            raise
    if not any(p.requires_grad for p in net.module_.parameters()):
        raise ValueError(
            f"The module {type(net.module_).__name__} has no trainable parameters: there is "
            "nothing to train or to differentiate."
        )
    return use_logits(net.module_)


def takes_token_ids(module: torch.nn.Module) -> bool:
    """Whether integer inputs are token ids for the module (it has an embedding),
    rather than numeric features to be cast to float."""
    return any(isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) for m in module.modules())


_HALF = (torch.float16, torch.bfloat16)


def working_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` that sktda may change (the user's module is never
    touched): its logits read (:func:`use_logits`), and a half-precision module
    (bfloat16, float16) in float32, so that per-sample gradients, their
    projections and their sums are accumulated safely and meet float32 inputs."""
    module = copy.deepcopy(module)
    if any(t.dtype in _HALF for t in chain(module.parameters(), module.buffers())):
        module.float()
    return use_logits(module)


def trained_module(net) -> torch.nn.Module:
    """A frozen, eval-mode working copy of the net's module (the net itself is
    untouched)."""
    module = working_copy(net.module_)
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
