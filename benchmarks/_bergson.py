"""EleutherAI's bergson 2.5.1 as a benchmark peer, in an environment of its own.

bergson is never imported by sktda or by the benchmarks' own process: it declares
torchvision, torchaudio and bitsandbytes, and pins versions that need not match
sktda's. Install it beside the CPU torch (``torch==2.13.0+cpu`` as a constraint),
remove what it declares but never imports, and point ``SKTDA_BERGSON_PYTHON`` at
that environment's interpreter::

    python -m venv /path/bergson-env && . /path/bergson-env/bin/activate
    pip install torch==2.13.0 && pip install -c <(echo torch==2.13.0+cpu) bergson==2.5.1
    pip uninstall -y torchvision torchaudio
    export SKTDA_BERGSON_PYTHON=/path/bergson-env/bin/python

Each trained model is handed over as bergson reads one: a ``save_pretrained``
directory (with a word-level tokenizer over the model's ids, which bergson loads
but does not use on pre-tokenized data) and a ``datasets`` directory of
``input_ids``. bergson predicts every position but the last, so a passage ``x``
with next tokens ``y`` becomes ``x`` followed by ``y``'s last token, and the model
is exported with one more position (never attended to by the scored ones). Its
loss is the passage's summed token cross-entropy, minus the log-likelihood that
sktda attributes; its scores are oriented so that a positive score is a proponent
(checked against sktda's sign in ``huggingface.py``).

Run as a script (by :func:`bergson_scores`, in the bergson environment), it runs
one of bergson's pipelines and writes the ``(n_test, n_train)`` scores.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = {"ekfac": "EK-FAC", "trackstar": "TrackStar", "cosine": "gradient cosine"}


def bergson_python() -> str | None:
    """The interpreter of bergson's environment, or None (its rows are skipped)."""
    python = os.environ.get("SKTDA_BERGSON_PYTHON")
    return python if python and Path(python).exists() else None


def _export(hf_model, directory: Path, vocab_size: int) -> None:
    """``hf_model`` (a transformers causal LM) saved with one more position, and a
    word-level tokenizer over its ids."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models

    config = hf_model.config.__class__.from_dict(hf_model.config.to_dict())
    config.n_positions = hf_model.config.n_positions + 1
    config.bos_token_id = config.eos_token_id = None  # GPT-2's defaults lie outside a small vocabulary
    wider = type(hf_model)(config)
    state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    wpe = [k for k in state if k.endswith("wpe.weight")]
    for key in wpe:
        state[key] = torch.cat([state[key], state[key][-1:]])
    wider.load_state_dict(state)
    wider.save_pretrained(directory)
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=config.n_positions
    )
    fast.save_pretrained(directory)


def bergson_scores(hf_models, vocab_size: int, X_train, y_train, X_test, y_test, method: str):
    """bergson's ``method`` scores ``(n_test, n_train)`` of each model, and the wall
    and CPU seconds of bergson's process for each (model export excluded)."""
    scores, seconds, cpu = [], [], []
    with tempfile.TemporaryDirectory(prefix="sktda-bergson-") as tmp:
        tmp = Path(tmp)
        np.savez(
            tmp / "data.npz",
            train=np.concatenate([X_train, y_train[:, -1:]], 1),
            test=np.concatenate([X_test, y_test[:, -1:]], 1),
        )
        for i, model in enumerate(hf_models):
            _export(model, tmp / f"model{i}", vocab_size)
            before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
            done = subprocess.run(
                [bergson_python(), __file__, str(tmp / f"model{i}"), str(tmp), method, str(i)],
                capture_output=True,
                text=True,
            )
            if done.returncode:
                raise RuntimeError(f"bergson {method} failed:\n{done.stderr[-4000:]}")
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            seconds.append(time.perf_counter() - start)
            cpu.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
            scores.append(np.load(tmp / f"scores{i}.npy"))
    return scores, seconds, cpu


# ---------------------------------------------------------------- bergson's side
def _dataset(tokens: np.ndarray, directory: Path) -> str:
    from datasets import Dataset

    Dataset.from_dict({"input_ids": tokens.tolist()}).save_to_disk(str(directory))
    return str(directory)


def _run(model: str, work: Path, method: str, index: int) -> np.ndarray:
    from bergson.cli.commands import Build, Ekfac, Score, Trackstar
    from bergson.config.config import (
        DataConfig,
        HessianConfig,
        HessianPipelineConfig,
        IndexConfig,
        PreprocessConfig,
        QuerySetConfig,
        ScoreConfig,
        TrackstarConfig,
        TrackstarIndexConfig,
    )
    from bergson.data import load_scores

    data = np.load(work / "data.npz")
    train = _dataset(data["train"], work / f"train{index}")
    test = _dataset(data["test"], work / f"test{index}")
    run = work / f"run{index}"
    length = data["train"].shape[1]
    # bergson batches by tokens, at most the model's context: one passage a batch here
    common = dict(model=model, data=DataConfig(dataset=train), token_batch_size=length)
    query = QuerySetConfig(dataset=test, aggregation="none")
    if method == "ekfac":
        Ekfac(
            index_cfg=IndexConfig(str(run), **common),
            hessian_cfg=HessianConfig(method="kfac", ev_correction=True),
            score_cfg=ScoreConfig(),
            preprocess_cfg=PreprocessConfig(ev_correction=True),
            hessian_pipeline_cfg=HessianPipelineConfig(query=query),
        ).execute()
    elif method == "trackstar":
        Trackstar(
            index_cfg=TrackstarIndexConfig(str(run), **common), trackstar_cfg=TrackstarConfig(query=query)
        ).execute()
    elif method == "cosine":
        cosine = PreprocessConfig(unit_normalize=True)
        query_run = work / f"query{index}"
        query_index = IndexConfig(str(query_run), **{**common, "data": query.to_data()})
        Build(query_index, cosine).execute()
        Score(
            ScoreConfig(query_path=str(query_run)), IndexConfig(str(run / "scores"), **common), cosine
        ).execute()
    else:
        raise ValueError(method)
    scores = load_scores(run / "scores")
    return np.asarray(scores[:], dtype=np.float64).T  # (n_test, n_train)


if __name__ == "__main__":
    model_dir, work_dir, method_name, member = sys.argv[1:5]
    out = _run(model_dir, Path(work_dir), method_name, int(member))
    np.save(Path(work_dir) / f"scores{member}.npy", out)
    print(json.dumps({"shape": list(out.shape)}))
