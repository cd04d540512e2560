"""Language models at the sizes people train: a GPT-2-small-size and a Llama-style
model of about 125M parameters, built from their configs (random weights: cost, not
quality), 64 sequences of 128 tokens.

    python benchmarks/llm_scale.py

Each measurement runs in a fresh process, so that its peak is its own: one
training epoch (skorch, AdamW, batch 64: the sequences in one batch), and the
default attribution of the same model as a frozen net (``frozen_net``,
``method="auto"``: EK-FAC, the default ``batch_size``) with ``plan_memory`` asked
first, then a query (``most_influential``, k=10) for 8 test sequences. Peaks are the
process's peak resident memory beyond what it held with the model and the data
loaded (what ``plan_memory`` sizes). The half-precision rows featurize the model in
bfloat16 and float16 on 8 sequences and compare each sequence's features with those
of the float32 model (cosine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
from _common import emit, markdown_table, parser

N_TRAIN, N_TEST, T = 64, 8, 128


def build(kind: str):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=T)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=32000,
            max_position_embeddings=T,
        )
        model = transformers.LlamaForCausalLM(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (N_TRAIN + N_TEST, T + 1))
    return _language_model(model.eval()), tokens[:, :-1], tokens[:, 1:]


def _language_model(model):
    """The transformers model as a module from token ids to logits."""
    import torch

    class LanguageModel(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, X):
            return self.model(input_ids=X).logits

    return LanguageModel(model)


def _reset_peak() -> int:
    """Reset the process's peak resident memory; return the resident memory now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(kind: str, stage: str) -> dict:
    import copy

    import torch
    from skorch import NeuralNet

    from sktda import EnsembleAttributor, frozen_net
    from sktda.models import TokenCrossEntropy

    module, X, y = build(kind)
    X_train, y_train, X_test, y_test = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    out = {"params": sum(p.numel() for p in module.parameters())}
    if stage == "epoch":
        net = NeuralNet(
            module,
            criterion=TokenCrossEntropy,
            optimizer=torch.optim.AdamW,
            lr=1e-4,
            max_epochs=1,
            batch_size=N_TRAIN,
            train_split=None,
            verbose=0,
        )
        base = _reset_peak()
        start = time.perf_counter()
        net.fit(X_train, y_train)
        out.update(seconds=time.perf_counter() - start, peak=_status("VmHWM") - base)
    elif stage == "fit":
        attr = EnsembleAttributor(frozen_net(module, TokenCrossEntropy), random_state=0)
        base = _reset_peak()
        plan = attr.plan_memory(X_train, y_train)
        start = time.perf_counter()
        attr.fit(X_train, y_train)
        out.update(seconds=time.perf_counter() - start, peak=_status("VmHWM") - base, planned=plan.fit_peak)
        out["feature_bytes"] = attr.costs_["feature_bytes"] / N_TRAIN
        start = time.perf_counter()
        attr.most_influential(X_test, y_test, k=10)
        out["query_seconds"] = time.perf_counter() - start
    else:  # half precision against float32, on 8 sequences
        features = {}
        for dtype in ("float32", stage):
            cast = _language_model(copy.deepcopy(module.model).to(getattr(torch, dtype)))
            attr = EnsembleAttributor(frozen_net(cast, TokenCrossEntropy), random_state=0)
            features[dtype] = attr.fit(X_train[:8], y_train[:8]).train_features_[0]
        a, b = features["float32"], features[stage]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        out.update(cos_min=float(cos.min()), cos_median=float(np.median(cos)))
    return out


def measure(kind: str, stage: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--worker", kind, stage], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"{kind} {stage} failed:\n{result.stderr[-3000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    print(kind, stage, out, flush=True)
    return out


def main():
    p = parser(__doc__)
    p.add_argument("--worker", nargs=2, help=argparse_hidden())
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows, half = [], []
    for kind, name in (("gpt2", "GPT-2 small size"), ("llama", "Llama-style")):
        epoch, fit = measure(kind, "epoch"), measure(kind, "fit")
        rows.append(
            [
                name,
                f"{fit['params'] / 1e6:.0f}M",
                epoch["seconds"],
                fit["seconds"],
                f"{fit['seconds'] / epoch['seconds']:.2f}x",
                f"{epoch['peak'] / 2**30:.2f}",
                f"{fit['peak'] / 2**30:.2f}",
                f"{fit['planned'] / 2**30:.2f}",
                f"{fit['planned'] / fit['peak'] - 1:+.0%}",
                f"{fit['feature_bytes'] / 2**20:.2f}",
                fit["query_seconds"],
            ]
        )
        for dtype in ("bfloat16", "float16"):
            out = measure(kind, dtype)
            half.append([name, dtype, f"{out['cos_min']:.4f}", f"{out['cos_median']:.5f}"])
    header = [
        "model",
        "parameters",
        "epoch s",
        "featurize s",
        "featurize / epoch",
        "training peak GiB",
        "featurization peak GiB",
        "planned GiB",
        "plan vs measured",
        "feature MiB per sequence",
        f"query s ({N_TEST} sequences)",
    ]
    table = markdown_table(header, rows)
    table += "\n\n" + markdown_table(["model", "dtype", "cosine to float32, min", "median"], half)
    table += (
        f"\n\n{N_TRAIN} training sequences of {T} tokens; the featurization is the whole fit of the frozen model "
        "(EK-FAC, proj_dim 2048, the route check included); 'featurization peak' includes the member's working "
        "copy of the model; 'planned' is plan_memory's fit peak, asked before the fit."
    )
    emit("llm_scale", "Language models of 125M parameters: time and memory against one epoch", table)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
