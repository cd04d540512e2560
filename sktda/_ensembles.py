"""Ensemble strategies: how trained nets become attribution members.

A *member* is one function whose per-sample gradients are taken: a frozen module, the
parameters to differentiate, and every other tensor its forward needs (frozen
parameters, buffers, fixed dropout masks), all explicit inputs of
``torch.func.functional_call``. A strategy is one small class: it says how many
members a trained model yields and builds them. The gradient engine and the
attribution methods never learn which strategy made a member.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils import check_random_state, gen_batches
from torch import nn
from torch.func import functional_call

from ._data import call, copy_inputs, n_samples, take, to_torch
from ._nets import (
    LearningRateCheckpoints,
    checkpoint_epochs,
    fine_tune,
    fit_net,
    is_peft_model,
    module_bytes,
    parameter_names,
    trainable_names,
    trained_module,
    untrained_net,
    working_copy,
)
from ._parallel import delayed_tasks, run
from ._task import NetTask


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed that depends on every integer in ``entropy``."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0] >> 1)


@dataclass
class Member:
    """One ensemble member: ``forward(params, x)`` is pure given its tensors.

    ``coef`` is the member's coefficient in the ensemble average (TracIn also
    folds a checkpoint's learning rate into it); ``residual_variants`` are other
    sets of frozen tensors (dropout masks) under which only the residual
    ``-dL/df`` is computed and averaged.
    """

    module: torch.nn.Module
    params: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    seed: int
    coef: float = 1.0
    residual_variants: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def forward(self, params: dict[str, torch.Tensor], x, frozen=None) -> torch.Tensor:
        """The module's output on ``x`` (a tensor, or a dict of keyword tensors)
        with ``params`` and the member's frozen tensors (or ``frozen``)."""
        frozen = self.frozen if frozen is None else frozen
        args, kwargs = ((), x) if isinstance(x, Mapping) else ((x,), {})
        with _transformer_fastpath_off():
            return functional_call(self.module, (params, frozen), args, kwargs)

    def to(self, device: torch.device) -> Member:
        def move(tensors):
            return {k: v.to(device) for k, v in tensors.items()}

        return replace(
            self,
            module=self.module.to(device),
            params=move(self.params),
            frozen=move(self.frozen),
            residual_variants=[move(v) for v in self.residual_variants],
        )

    def at_state(self, state: dict[str, torch.Tensor], lr: float) -> Member:
        """The same member with tensors taken from ``state`` (a TracIn checkpoint),
        its coefficient scaled by the learning rate in force there."""
        return replace(
            self,
            params={k: state.get(k, v).to(v.device, v.dtype) for k, v in self.params.items()},
            frozen={k: state.get(k, v).to(v.device, v.dtype) for k, v in self.frozen.items()},
            coef=self.coef * lr,
        )


@contextmanager
def _transformer_fastpath_off():
    """Without torch's fused inference path for ``nn.TransformerEncoderLayer`` and
    ``nn.MultiheadAttention``: it reads the layers' weights directly, so it would
    skip LoRA adapters wrapped around them, and hide the layers from the gradient
    engine's hooks."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def member_from_module(module: torch.nn.Module, layers, seed: int, names=None, trainable=None) -> Member:
    """Split a frozen module's tensors into the differentiated (those of ``layers``
    that are among ``trainable``, or the parameters ``names``) and the frozen."""
    if names is None:
        names = parameter_names(module, layers)
        if trainable is not None:
            names = [n for n in names if n in trainable]
            if not names:
                raise ValueError(
                    f"layers={layers!r} selects only parameters that the net does not train (frozen, "
                    "as a peft.PeftModel's base weights are), so there is nothing to differentiate. "
                    "Select trained layers, or leave layers=None to take every trained parameter."
                )
    names = set(names)
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    params = {k: v for k, v in tensors.items() if k in names}
    frozen = {k: v for k, v in tensors.items() if k not in names}
    return Member(module=module, params=params, frozen=frozen, seed=seed)


@dataclass
class TrainedModel:
    """One trained model of an ensemble, and what its members need beside the net:
    LoRA's trained ``adapters`` (their tensors by parameter name) and the
    ``checkpoints`` recorded along training, ``(epoch, learning rate, state)``."""

    net: object
    seed: int
    adapters: list[dict[str, torch.Tensor]] = field(default_factory=list)
    checkpoints: list[tuple] = field(default_factory=list)


@dataclass
class EnsembleStrategy:
    """Interface of an ensemble strategy, and its parameters (the fields).

    ``check`` rejects a module the strategy cannot use, before any training;
    ``fit`` trains one model (and whatever its members need); ``members`` turns
    it into its members; ``serving_bytes`` is what must be stored to serve them.
    ``layers`` selects the differentiated parameters; ``pretrained`` says that the
    net's module holds pretrained weights.
    """

    name: ClassVar[str]
    layers: object = None
    pretrained: bool = False

    @classmethod
    def from_params(cls, params: dict) -> EnsembleStrategy:
        """The strategy with the fields that ``params`` (an estimator's) sets."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})

    @property
    def members_per_model(self) -> int:
        return 1

    def check(self, module: torch.nn.Module, X_sample) -> None:
        """Raise ``ValueError`` if the strategy cannot work with ``module`` (whose
        input ``X_sample`` is one training sample)."""

    def fit(self, estimator, X, y, *, seed: int, device: torch.device, task: NetTask, callbacks=()):
        net = fit_net(estimator, X, y, seed=seed, device=device, task=task, callbacks=callbacks)
        return TrainedModel(net, seed)

    def adopt(self, net, X, y, *, seed: int, device: torch.device) -> TrainedModel:
        """One of the user's fitted nets as a trained model, never trained nor
        changed (a strategy that trains something of its own on top, as LoRA's
        adapters, does it here)."""
        return TrainedModel(net, seed)

    def members(self, model: TrainedModel, X_sample: torch.Tensor) -> list[Member]:
        raise NotImplementedError

    def sizing_member(self, module: torch.nn.Module) -> Member:
        """A member differentiating the parameters that ``members`` will, built from
        the untrained ``module``: it sizes the features before any training."""
        return member_from_module(module, self.layers, 0, trainable=trainable_names(module))

    def serving_bytes(self, models: list[TrainedModel]) -> int:
        return sum(module_bytes(model.net.module_) for model in models)


@dataclass
class IndependentEnsemble(EnsembleStrategy):
    """Each independently trained model is one member (the naive ensemble)."""

    name = "independent"

    def members(self, model, X_sample):
        trainable = trainable_names(model.net.module_)
        module = trained_module(model.net)
        return [member_from_module(module, self.layers, derive_seed(model.seed, 0), trainable=trainable)]


_MASKABLE = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class FixedMaskDropout(nn.Module):
    """Dropout whose mask is a buffer: the same for every sample, and supplied per
    member as an explicit input of ``functional_call`` (ones: no dropout). ``p`` is
    0 for code that reads a dropout module's rate (the mask is the dropout)."""

    p = 0.0

    def __init__(self, mask_shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mask", torch.ones(mask_shape))

    def forward(self, x):
        return x * self.mask


def _dropout_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in module.named_modules() if isinstance(m, _MASKABLE)}


def _called_dropout_shapes(module: nn.Module, X_sample) -> dict[str, torch.Size]:
    """The per-sample input shape of every dropout module that a forward pass in
    eval mode calls (transformers' attention keeps an ``nn.Dropout`` but passes
    only its rate to a fused kernel: that module is never called)."""
    shapes = {}
    hooks = [
        layer.register_forward_pre_hook(
            lambda m, args, name=name: shapes.__setitem__(name, args[0].shape[1:])
        )
        for name, layer in _dropout_layers(module).items()
    ]
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            call(module, to_torch(X_sample, next(module.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(training)
    return shapes


@dataclass
class DropoutEnsemble(EnsembleStrategy):
    """DROPOUT ENSEMBLE (Deng et al., 2024): every trained model yields ``n_masks``
    members, each one fixed dropout mask, drawn once from its seed and shared by all
    samples, on the module's own dropout layers (element-wise for ``nn.Dropout``,
    channel-wise for ``nn.Dropout1d/2d/3d``).

    With ``mask_gradients=False`` the gradients come from the unmasked model and
    the masks enter only through ``-dL/df`` (TRAK's ``1 - p``), averaged over them:
    one backward pass per model instead of one per mask.
    """

    name = "dropout"
    n_masks: int = 5
    dropout_rate: float | None = None
    mask_gradients: bool = True

    @property
    def members_per_model(self):
        return self.n_masks if self.mask_gradients else 1

    def _rate(self, layer) -> float:
        return float(layer.p if self.dropout_rate is None else self.dropout_rate)

    def check(self, module, X_sample):
        layers = _dropout_layers(module)
        if not layers:
            raise ValueError(
                "ensemble='dropout' needs dropout layers (nn.Dropout, nn.Dropout1d/2d/3d) "
                f"in the module, and {type(module).__name__} has none. Add one, or use "
                "ensemble='independent' or 'lora'."
            )
        called = _called_dropout_shapes(module, X_sample)
        if not called:
            raise ValueError(
                f"ensemble='dropout' masks the dropout modules that the forward pass calls, and "
                f"{type(module).__name__} calls none of its {len(layers)} (its dropout is functional, "
                "as in transformers' attention, which passes only the rate to a fused kernel). Use "
                "ensemble='independent' or 'lora'."
            )
        uncalled = [name for name in layers if name not in called]
        if uncalled:
            shown = ", ".join(repr(n) for n in uncalled[:5]) + (", ..." if len(uncalled) > 5 else "")
            warnings.warn(
                f"ensemble='dropout': {len(uncalled)} dropout module(s) of {type(module).__name__} are never "
                f"called by its forward pass ({shown}; transformers' attention passes only their rate to "
                "a fused kernel), so they get no mask; the other "
                f"{len(called)} do.",
                UserWarning,
                stacklevel=4,
            )
        if all(self._rate(layers[name]) == 0 for name in called):
            raise ValueError("Every dropout layer the module calls has rate 0; set dropout_rate in (0, 1).")

    def members(self, model, X_sample):
        net, model_seed = model.net, model.seed
        module = trained_module(net)
        layers = _dropout_layers(module)
        shapes = _called_dropout_shapes(module, X_sample)
        masks = {}
        for i, (name, layer) in enumerate((n, layer) for n, layer in layers.items() if n in shapes):
            shape = tuple(shapes[name])
            if not isinstance(layer, nn.Dropout):  # channel-wise
                shape = shape[:1] + (1,) * (len(shape) - 1)
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, FixedMaskDropout(shape))
            masks[f"{name}.mask"] = (shape, self._rate(layer), i)
        base = member_from_module(
            module, self.layers, derive_seed(model_seed, 0), trainable=trainable_names(net.module_)
        )
        variants = [
            {
                **base.frozen,
                **{
                    key: _draw_mask(shape, rate, derive_seed(model_seed, 1, j, i))
                    for key, (shape, rate, i) in masks.items()
                },
            }
            for j in range(self.n_masks)
        ]
        if not self.mask_gradients:
            return [replace(base, residual_variants=variants)]
        return [replace(base, frozen=v, seed=derive_seed(model_seed, 0, j)) for j, v in enumerate(variants)]


def _draw_mask(shape, rate: float, seed: int) -> torch.Tensor:
    if rate == 0:
        return torch.ones(shape)
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full(shape, 1 - rate), generator=gen) / (1 - rate)


@dataclass
class LoraEnsemble(EnsembleStrategy):
    """LORA ENSEMBLE (Deng et al., 2024): every trained model is a base for
    ``n_adapters`` LoRA adapters (peft), each fine-tuned from it for ``lora_epochs``
    with its own seed and data order. Gradients are taken with respect to the
    adapter parameters only, which is where serving time and space are saved.

    With ``pretrained=True`` the adapters sit on the frozen pretrained module, and
    each member also trains its own copy of the output layer in full (peft's
    ``modules_to_save``): a classifier started from pretrained weights has a new
    head, which must learn. The output layer is stored and differentiated with the
    adapters.
    """

    name = "lora"
    n_adapters: int = 5
    lora_rank: int = 8
    lora_target_modules: list[str] | None = None
    lora_epochs: int = 5

    @property
    def members_per_model(self):
        return self.n_adapters

    def _adapted_modules(self, module) -> list[str]:
        """The names of the modules that get adapters."""
        if self.lora_target_modules is not None:
            modules = dict(module.named_modules())
            unknown = [t for t in self.lora_target_modules if t not in modules]
            if unknown:
                raise ValueError(f"lora_target_modules {unknown} are not modules of the net.")
            return list(self.lora_target_modules)
        linear = _plain_linears(module)
        if len(linear) < 2:
            raise ValueError(
                "ensemble='lora' adapts every nn.Linear but the output layer, and the module "
                f"has {len(linear)} nn.Linear layer(s). Pass lora_target_modules, or use "
                "ensemble='independent' or 'dropout'."
            )
        return linear[:-1]

    def _with_adapter(self, module, seed: int | None = None) -> nn.Module:
        """A copy of ``module`` with fresh adapters, which peft leaves trainable alone;
        pretrained, the output layer is trained too. The adapters are drawn on the
        CPU from ``seed`` (the same on every device, and the caller's random state,
        CUDA's included, untouched), then moved to the module's device."""
        from peft import LoraConfig, inject_adapter_in_model

        rank = self.lora_rank
        config = LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=self._adapted_modules(module)
        )
        linear = _plain_linears(module)
        device = next(module.parameters()).device
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.random.default_generator.manual_seed(seed)
            module = inject_adapter_in_model(config, working_copy(module).cpu()).to(device)
        head = module.get_submodule(linear[-1]) if linear else None
        if self.pretrained and isinstance(head, nn.Linear):  # not adapted itself
            head.requires_grad_(True)
        return module

    def check(self, module, X_sample):
        if is_peft_model(module):
            raise ValueError(
                "ensemble='lora' adds LoRA adapters of its own, and the net's module is already a "
                "peft.PeftModel. Use ensemble='independent' (each member trains your adapters with "
                "its own seed, and attribution differentiates them) or 'dropout'."
            )
        if self.layers is not None:
            raise ValueError(
                "layers selects parameters of the base model, but LoRA members differentiate "
                f"their adapters only, so layers={self.layers!r} cannot apply. Choose "
                "the adapted modules with lora_target_modules and leave layers=None."
            )
        modules = dict(module.named_modules())
        rank = self.lora_rank
        for name in self._adapted_modules(module):
            size = _adapted_size(modules[name])
            if size is not None and rank > size:
                raise ValueError(
                    f"lora_rank={rank} exceeds the smallest dimension ({size}) of the adapted "
                    f"layer {name!r}; a LoRA adapter's rank must be at most that. Lower lora_rank."
                )

    def fit(self, estimator, X, y, *, seed, device, task, callbacks=()):
        if self.pretrained:  # the adapters fine-tune the pretrained weights themselves
            net = untrained_net(estimator, device)
        else:
            net = fit_net(estimator, X, y, seed=seed, device=device, task=task, callbacks=callbacks)
        return self.adopt(net, X, y, seed=seed, device=device)

    def adopt(self, net, X, y, *, seed, device):
        """Adapters trained on the net's weights, which stay as they are."""
        adapters = []
        for j in range(self.n_adapters):
            adapter_seed = derive_seed(seed, 2, j)
            module = self._with_adapter(net.module_, adapter_seed)
            module = fine_tune(net, module, X, y, epochs=self.lora_epochs, seed=adapter_seed, device=device)
            adapters.append(
                {k: p.detach().cpu().clone() for k, p in module.named_parameters() if p.requires_grad}
            )
        return TrainedModel(net, seed, adapters=adapters)

    def members(self, model, X_sample):
        members = []
        for j, state in enumerate(model.adapters):
            module = self._with_adapter(model.net.module_)
            module.load_state_dict(state, strict=False)
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
            members.append(member_from_module(module, None, derive_seed(model.seed, 0, j), names=set(state)))
        return members

    def sizing_member(self, module):
        module = self._with_adapter(module)
        return member_from_module(
            module, None, 0, names={k for k, p in module.named_parameters() if p.requires_grad}
        )

    def serving_bytes(self, models):
        adapters = sum(t.numel() * t.element_size() for m in models for a in m.adapters for t in a.values())
        # pretrained: every adapter sits on the same base, stored once
        bases = models[:1] if self.pretrained else models
        return super().serving_bytes(bases) + adapters


def _plain_linears(module: nn.Module) -> list[str]:
    """The nn.Linear layers, in order, but the projections inside nn.MultiheadAttention
    (its fused forward bypasses them, and so any adapter on them)."""
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, m in module.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_modules()
        if child
    }
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and name not in inside_attention
    ]


def _adapted_size(module: nn.Module) -> int | None:
    """The smallest dimension of a layer that LoRA adapts (None when unknown)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        return None
    return int(min(weight.shape[0], weight[0].numel()))


ENSEMBLES: dict[str, type[EnsembleStrategy]] = {
    cls.name: cls for cls in (IndependentEnsemble, DropoutEnsemble, LoraEnsemble)
}


_CHECKPOINT_CALLBACK = "sktda_checkpoints"


@dataclass
class TrainedEnsemble:
    """The trained models of an ensemble and how to turn them into members.

    Both estimators hold one: it is the layer between them and the gradient engine.
    """

    strategy: EnsembleStrategy
    models: list[TrainedModel]
    X_sample: torch.Tensor

    @property
    def nets(self) -> list:
        """The trained skorch nets."""
        return [model.net for model in self.models]

    @classmethod
    def fit(
        cls,
        strategy: EnsembleStrategy,
        estimator,
        X,
        y,
        *,
        task: NetTask,
        n_models: int,
        random_state,
        device: torch.device,
        n_jobs=None,
        verbose=0,
        n_checkpoints: int | None = None,
    ) -> TrainedEnsemble:
        """Train ``n_models`` models (seeded from ``random_state``) in parallel,
        recording ``n_checkpoints`` checkpoints along training when asked. Every
        model's training is guarded (see :class:`~sktda._nets.TrainingGuard`). The
        caller has checked that the strategy can use the net's module."""
        seeds = [int(s) for s in check_random_state(random_state).randint(0, 2**31 - 1, size=n_models)]

        def callbacks():  # each model's own: skorch keeps a callback instance, not a copy
            if not n_checkpoints:
                return ()
            return [
                (
                    _CHECKPOINT_CALLBACK,
                    LearningRateCheckpoints(checkpoint_epochs(estimator.max_epochs, n_checkpoints)),
                )
            ]

        jobs = delayed_tasks(
            strategy.fit,
            [
                ((estimator, X, y), dict(seed=s, device=device, task=task, callbacks=callbacks()))
                for s in seeds
            ],
        )
        models = run(jobs, n_jobs, n_models, "training", verbose)
        for model in models if n_checkpoints else ():
            model.checkpoints = dict(model.net.callbacks_)[_CHECKPOINT_CALLBACK].checkpoints_
        return cls(strategy, models, to_torch(copy_inputs(take(X, slice(0, 1)))))

    @classmethod
    def adopt(
        cls,
        strategy: EnsembleStrategy,
        nets: list,
        X,
        y,
        *,
        random_state,
        device: torch.device,
        checkpoints: list[list[tuple]] | None = None,
    ) -> TrainedEnsemble:
        """The user's fitted ``nets`` as the ensemble's models, each with its seed
        (for masks and adapters, as :meth:`fit` draws them) and its ``checkpoints``
        (``(epoch, learning rate, state)``, given by the user). Nothing is trained
        but what the strategy adds on top (LoRA's adapters); the nets are left as
        they are, and kept here, in this process: the estimator's ``estimators_``
        are the user's own objects."""
        seeds = [int(s) for s in check_random_state(random_state).randint(0, 2**31 - 1, size=len(nets))]
        models = [strategy.adopt(net, X, y, seed=s, device=device) for net, s in zip(nets, seeds)]
        for model, given in zip(models, checkpoints or [[] for _ in nets]):
            model.checkpoints = given
        return cls(strategy, models, to_torch(copy_inputs(take(X, slice(0, 1)))))

    @property
    def has_checkpoints(self) -> bool:
        """Whether every model has checkpoints along its training."""
        return all(model.checkpoints for model in self.models)

    def members(self, checkpoints: bool = False) -> list[Member]:
        """Every member, with coefficient ``1 / n_members``; with ``checkpoints``,
        every member at every recorded checkpoint, its coefficient times the
        learning rate in force there."""
        n_members = len(self.models) * self.strategy.members_per_model
        members = []
        for model in self.models:
            for member in self.strategy.members(model, self.X_sample):
                member.coef = 1.0 / n_members
                if checkpoints:
                    members.extend(member.at_state(state, lr) for _, lr, state in model.checkpoints)
                else:
                    members.append(member)
        return members

    def predict_labels(
        self, X: np.ndarray, task: NetTask, batch_size: int, device, n_classes: int | None = None
    ) -> np.ndarray:
        """The ensemble's predictions: the argmax of the members' mean class (or
        token) probabilities over the ``n_classes`` classes seen in fit (a module
        may have more outputs than that), or zeros for regressors (whose target
        does not use y)."""
        n = n_samples(X)
        if not task.is_classifier:
            return np.zeros((n, 1), dtype=np.float32)
        probs = 0
        with torch.no_grad():
            for member in self.members():
                member = member.to(device)
                logits = torch.cat(
                    [
                        task.logits(member.forward(member.params, to_torch(take(X, rows), device))).cpu()
                        for rows in gen_batches(n, batch_size)
                    ]
                )
                probs = probs + torch.softmax(logits, dim=-1)
        if n_classes is not None:
            probs = probs[..., :n_classes]
        return probs.argmax(-1).numpy().astype(np.int64)

    def serving_bytes(self) -> int:
        return int(self.strategy.serving_bytes(self.models))
