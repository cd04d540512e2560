"""Peers run on sktda's trained models, their scores turned to sktda's convention
(positive = up-weighting the training sample raises the test target, the
correct-class margin). Benchmark extras, never library dependencies:

    pip install dattri==0.3.0
    pip install --no-deps kronfluence==1.0.1 && pip install einconv einops opt-einsum accelerate safetensors
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def _margin(logits, labels):
    z_y = logits.gather(-1, labels[:, None])[:, 0]
    others = logits.scatter(-1, labels[:, None], -torch.inf)
    return z_y - others.logsumexp(-1)


def _sequence_log_likelihood(logits, labels):
    """Per sample: the summed log-probabilities of the next tokens (-100 ignored)."""
    keep = labels != -100
    log_p = torch.log_softmax(logits, -1).gather(-1, torch.where(keep, labels, 0)[..., None])[..., 0]
    return (log_p * keep).reshape(len(labels), -1).sum(1)


# What each peer attributes: the target f (sktda's), and the probability p whose
# 1 - p is TRAK's Q (p = 0, Q = 1, for the sequence target, as sktda does).
TARGETS = {
    "margin": (_margin, lambda logits, labels: torch.softmax(logits, -1).gather(-1, labels[:, None])[:, 0]),
    "sequence": (_sequence_log_likelihood, lambda logits, labels: torch.zeros(len(labels))),
}


def dattri_trak(modules, X_train, y_train, X_test, y_test, proj_dim, regularization, kind="margin"):
    """dattri's TRAK on the given trained modules; (n_test, n_train) scores, seconds."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    model = modules[0]
    target, probability = TARGETS[kind]

    def margin(params, data):
        x, label = data
        return target(torch.func.functional_call(model, params, x.unsqueeze(0)), label.unsqueeze(0))[0]

    def correct_probability(params, data):
        x, label = data
        logits = torch.func.functional_call(model, params, x.unsqueeze(0))
        return probability(logits, label.unsqueeze(0))[0]

    task = AttributionTask(loss_func=margin, model=model, checkpoints=[m.state_dict() for m in modules])
    attributor = TRAKAttributor(
        task=task,
        correct_probability_func=correct_probability,
        projector_kwargs={"proj_dim": proj_dim, "device": "cpu", "proj_seed": 0},
        device="cpu",
        regularization=regularization,
    )
    train = DataLoader(TensorDataset(torch.from_numpy(X_train), torch.from_numpy(y_train)), batch_size=64)
    test = DataLoader(TensorDataset(torch.from_numpy(X_test), torch.from_numpy(y_test)), batch_size=64)
    start = time.perf_counter()
    with torch.no_grad():
        attributor.cache(train)
        scores = attributor.attribute(test)
    return scores.T.numpy(), time.perf_counter() - start


def kronfluence_ekfac(modules, X_train, y_train, X_test, y_test, kind="margin", damping=1e-8):
    """kronfluence's EK-FAC influence of the training loss on the test target, averaged
    over the modules, on the layers it supports (``nn.Linear``, ``nn.Conv2d``);
    (n_test, n_train) scores in sktda's sign convention, seconds. ``damping``: its
    ``damping_factor``, 1e-8 by default; None is its heuristic, 0.1 x the mean
    eigenvalue.

    kronfluence scores ``grad f(test)^T H^-1 grad L(train)``; up-weighting a
    training sample moves the parameters by ``-H^-1 grad L(train)``, so its effect
    on ``f`` is minus that score: sktda's convention is kronfluence's negated
    (checked on a known case by :func:`check_kronfluence_sign`).
    """
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    target = TARGETS[kind][0]

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, labels = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    flat = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1)
                    labels = torch.multinomial(flat, 1).reshape(labels.shape)
            flat_logits = logits.reshape(-1, logits.shape[-1])
            return torch.nn.functional.cross_entropy(flat_logits, labels.reshape(-1), reduction="sum")

        def compute_measurement(self, batch, model):
            x, labels = batch
            return target(model(x), labels).sum()

        def get_influence_tracked_modules(self):
            return tracked

    # kronfluence supports nn.Linear and nn.Conv2d only: GPT-2's Conv1D layers are
    # rewritten as nn.Linear, as its documentation asks of users
    modules = [_conv1d_as_linear(copy.deepcopy(m)) for m in modules]
    tracked = kronfluence_layers(modules[0])

    train = TensorDataset(torch.from_numpy(X_train), torch.from_numpy(y_train))
    test = TensorDataset(torch.from_numpy(X_test), torch.from_numpy(y_test))
    start = time.perf_counter()
    total = 0
    with tempfile.TemporaryDirectory() as out:
        for i, module in enumerate(modules):
            task = Classification()
            model = prepare_model(copy.deepcopy(module).eval(), task)
            analyzer = Analyzer(f"m{i}", model, task, cpu=True, disable_tqdm=True, output_dir=out)
            analyzer.fit_all_factors(
                "ekfac", train, per_device_batch_size=256, factor_args=FactorArguments(strategy="ekfac")
            )
            analyzer.compute_pairwise_scores(
                "scores",
                "ekfac",
                query_dataset=test,
                train_dataset=train,
                per_device_query_batch_size=len(test),
                per_device_train_batch_size=256,
                score_args=ScoreArguments(damping_factor=damping),
            )
            total = total + analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return -total / len(modules), time.perf_counter() - start


def kronfluence_layers(module: torch.nn.Module) -> list[str]:
    """The modules kronfluence tracks by default: its supported layer types
    (``nn.Linear``, ``nn.Conv2d``; transformers' ``Conv1D``, which users rewrite as
    ``nn.Linear``), not MultiheadAttention's ``out_proj`` subclass, which its
    default wrapping fails on."""
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    return [
        name
        for name, m in module.named_modules()
        if type(m) in kinds or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))
    ]


def _conv1d_as_linear(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every transformers ``Conv1D`` replaced by the equivalent
    ``nn.Linear`` (its weight transposed)."""
    for name, child in list(module.named_modules()):
        if type(child).__name__ == "Conv1D" and hasattr(child, "nf"):
            linear = torch.nn.Linear(child.weight.shape[0], child.nf)
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                linear.bias.copy_(child.bias)
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, linear)
    return module


def check_kronfluence_sign(module, X_train, y_train, kind="margin") -> None:
    """A known case: a training sample, queried on itself, must be its own proponent
    (up-weighting it raises its own target) in sktda's convention."""
    scores, _ = kronfluence_ekfac([module], X_train, y_train, X_train[:8], y_train[:8], kind)
    self_scores = np.diag(scores[:, :8])
    if not np.all(self_scores > 0):
        raise SystemExit(f"kronfluence's sign convention is not the one assumed: self-scores {self_scores}")
