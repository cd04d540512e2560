"""Ensemble strategies: how trained nets become attribution members.

A *member* is one function whose per-sample gradients are taken: a frozen module, the
parameters to differentiate, and every other tensor its forward needs (frozen
parameters, buffers, fixed dropout masks), all explicit inputs of
``torch.func.functional_call``. A strategy is one small class: it says how many
members a trained model yields and builds them. The gradient engine and the
attribution methods never learn which strategy made a member.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.func import functional_call

from ._nets import module_bytes, parameter_names, trained_module


def derive_seed(*entropy: int) -> int:
    """A 31-bit seed that depends on every integer in ``entropy``."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0] >> 1)


@dataclass
class Member:
    """One ensemble member: ``forward(params, x)`` is pure given its tensors."""

    module: torch.nn.Module
    params: dict[str, torch.Tensor]
    frozen: dict[str, torch.Tensor]
    seed: int
    weight: float = 1.0
    extras: dict = field(default_factory=dict)

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, (params, self.frozen), (x,))

    def to(self, device: torch.device) -> Member:
        return replace(
            self,
            module=self.module.to(device),
            params={k: v.to(device) for k, v in self.params.items()},
            frozen={k: v.to(device) for k, v in self.frozen.items()},
        )

    def at_state(self, state: dict[str, torch.Tensor], weight: float) -> Member:
        """The same member with weights taken from ``state`` (a TracIn checkpoint)."""
        return replace(
            self,
            params={k: state.get(k, v).to(v.device) for k, v in self.params.items()},
            frozen={k: state.get(k, v).to(v.device) for k, v in self.frozen.items()},
            weight=self.weight * weight,
        )


def member_from_module(module: torch.nn.Module, layers, seed: int) -> Member:
    """Split a frozen module's tensors into the differentiated and the frozen."""
    names = set(parameter_names(module, layers))
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    params = {k: v for k, v in tensors.items() if k in names}
    frozen = {k: v for k, v in tensors.items() if k not in names}
    return Member(module=module, params=params, frozen=frozen, seed=seed)


class EnsembleStrategy:
    """Interface of an ensemble strategy.

    ``check`` rejects a module the strategy cannot use, before any training;
    ``members`` turns one trained net into its members; ``serving_bytes`` is what
    must be stored to serve them.
    """

    name: str

    def __init__(self, params: dict):
        self.params = params

    @property
    def members_per_model(self) -> int:
        return 1

    def check(self, module: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the strategy cannot work with ``module``."""

    def members(self, net, model_seed: int, X_sample: torch.Tensor) -> list[Member]:
        raise NotImplementedError

    def serving_bytes(self, nets) -> int:
        return sum(module_bytes(net.module_) for net in nets)


class IndependentEnsemble(EnsembleStrategy):
    """Each independently trained model is one member (the naive ensemble)."""

    name = "independent"

    def members(self, net, model_seed, X_sample):
        module = trained_module(net)
        return [member_from_module(module, self.params["layers"], derive_seed(model_seed, 0))]


ENSEMBLES: dict[str, type[EnsembleStrategy]] = {cls.name: cls for cls in (IndependentEnsemble,)}
