"""Summary tables made from the saved benchmark results (``results/NAME.md``, each
written by its script with the command that made it): the README's headline table
and the documentation's summaries. Standard library only, so that the
documentation build can import it without running anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

RESULTS = Path(__file__).resolve().parent / "results"


class Result(NamedTuple):
    header: list[str]
    rows: list[dict[str, str]]
    made_by: str


def read(name: str) -> Result:
    """The table of ``results/NAME.md`` (its first markdown table) and its 'Made by' line."""
    lines = (RESULTS / f"{name}.md").read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]
    header = cells[0]
    rows = [dict(zip(header, row)) for row in cells[2:]]
    made_by = next((line for line in lines if line.startswith("Made by")), "")
    return Result(header, rows, made_by)


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _find(rows, **match) -> dict[str, str] | None:
    """The first row whose cells start with the given prefixes (keys: column names
    with spaces as underscores)."""
    for row in rows:
        if all(row.get(key.replace("_", " "), "").startswith(value) for key, value in match.items()):
            return row
    return None


def _seconds(value: str) -> str:
    return f"{float(value):.1f} s" if float(value) < 100 else f"{float(value):.0f} s"


PEERS = ("dattri", "kronfluence", "bergson", "cleanlab")

# (result file, what is compared, row filters, sktda's default row) for the headline table:
# method="auto" is TRAK on classifiers and EK-FAC on language models
HEADLINE = [
    ("lds_digits", "LDS, MLP on digits (10 models)", {"models": "10"}, "sktda trak"),
    ("cnn_digits", "LDS, CNN on digit images (10 models)", {"models": "10"}, "sktda trak"),
    ("sequence", "LDS, transformer language model on text (10 models)", {"models": "10"}, "sktda ekfac"),
    (
        "huggingface_gpt2",
        "LDS, transformers GPT-2 language model on text (5 models)",
        {"models": "5"},
        "sktda ekfac",
    ),
    ("detection", "AUROC of mislabeled digits (30% flipped)", {"noise": "30%"}, "sktda default"),
    ("finetune_detection", "AUROC of mislabeled fine-tuning data (LoRA fine-tune)", {}, "sktda default"),
    (
        "huggingface_bert",
        "AUROC of mislabeled text, padded transformers BERT (20% flipped)",
        {},
        "sktda default",
    ),
]


HEADLINE_NOTE = (
    "Cells: score (seconds). LDS rows: sktda's default method (TRAK on the image classifiers, "
    "EK-FAC on the language models) over the models named, the seconds those of "
    "featurizing the training set and attributing the test set (the peers run on "
    "sktda's trained models); AUROC rows: the seconds of the whole detection, "
    "training included. Made from `benchmarks/results/` by `python benchmarks/publish.py`; "
    "each result names the command that made it."
)


def headline() -> str:
    """sktda's default against each peer on the main settings: score (seconds), with
    the seconds those of attribution (LDS rows; training excluded, it is shared) or
    of the whole detection (AUROC rows); the table and its note."""
    versions = {}
    rows = []
    for name, what, where, ours in HEADLINE:
        result = read(name)
        lds = "LDS" in result.header
        score, seconds = ("LDS", "attribution s") if lds else ("AUROC", "wall s")
        cells = [what]
        for who in ("sktda", *PEERS):
            row = _find(result.rows, **where, method=ours if who == "sktda" else who)
            if row is not None and who != "sktda":
                versions[who] = " ".join(row["method"].split()[:2])
            cells.append("" if row is None else f"{row[score]} ({_seconds(row[seconds])})")
        rows.append(cells)
    header = ["benchmark", "sktda default", *(versions.get(p, p) for p in PEERS)]
    return f"{markdown(header, rows)}\n\n{HEADLINE_NOTE}"


def speed() -> str:
    """Featurization time as a multiple of one training epoch, per model."""
    result = read("speed")
    rows = []
    for model in dict.fromkeys(row["model"] for row in result.rows):
        cells = [model]
        for featurization in ("sktda, per-layer routes", "sktda, per-layer blocks", "sktda, vmap", "dattri"):
            row = _find(result.rows, model=model, featurization=featurization)
            ratio = None if row is None else float(row["time vs one epoch"])
            cells.append("" if ratio is None else f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x")
        rows.append(cells)
    header = [
        "model",
        "sktda (per-layer routes)",
        "sktda EK-FAC (per-layer blocks)",
        "vmap + dense projection",
        "dattri TRAK cache",
    ]
    return markdown(header, rows)


METHOD_SETTINGS = [("lds_digits", "MLP"), ("cnn_digits", "CNN"), ("sequence", "text LM")]


def _method(row) -> str:
    """A row's method, a peer's without its setting's regularization."""
    return row["method"].split(" (")[0]


def methods() -> str:
    """LDS of every method (default normalisation) with 1 and 10 models, per setting."""
    lds = {
        (_method(row), name, row["models"]): row["LDS"]
        for name, _ in METHOD_SETTINGS
        for row in read(name).rows
        if not row["method"].endswith((", raw", ", relatif")) and "vmap" not in row["method"]
    }
    columns = [(name, setting, models) for name, setting in METHOD_SETTINGS for models in ("1", "10")]
    plural = {"1": "1 model", "10": "10 models"}
    rows = [
        [label, *(lds.get((label, name, models), "") for name, _, models in columns)]
        for label in dict.fromkeys(label for label, _, _ in lds)
    ]
    header = ["method", *(f"{setting}, {plural[models]}" for _, setting, models in columns)]
    return markdown(header, rows)


def detection() -> str:
    """AUROC and test accuracy after filtering of the main detectors at every noise level."""
    result = read("detection")
    chosen = ["no filtering", "sktda default", "sktda paper", "cleanlab 2.9 self-confidence"]
    rows = []
    for noise in dict.fromkeys(row["noise"] for row in result.rows):
        for method in chosen:
            row = _find(result.rows, noise=noise, method=method)
            if row is not None:
                rows.append([noise, row["method"], row["AUROC"], row["test accuracy"], row["wall s"]])
    return markdown(["noise", "method", "AUROC", "test accuracy after filtering", "wall s"], rows)


GPU_RESULTS = ("speed_cuda", "speed_transformers_cuda")


def _device(made_by: str) -> str:
    """The machine a result names first: 'Made by `...` on NVIDIA H100 80GB HBM3, ...'."""
    return made_by.split("` on ", 1)[-1].split(",")[0]


def gpu() -> str:
    """Featurization on a GPU: samples per second of one training epoch and of
    sktda's featurization, and their ratio, per model and device."""
    rows = []
    for name in GPU_RESULTS:
        result = read(name)
        for model in dict.fromkeys(row["model"] for row in result.rows):
            epoch = _find(result.rows, model=model, featurization="one training epoch")
            ours = _find(result.rows, model=model, featurization="sktda, per-layer routes")
            rows.append(
                [
                    model,
                    _device(result.made_by),
                    f"{float(epoch['samples/s']):.0f}",
                    f"{float(ours['samples/s']):.0f}",
                    f"{float(ours['time vs one epoch']):.2f}x",
                ]
            )
    header = ["model", "device", "training samples/s", "featurization samples/s", "time vs one epoch"]
    return markdown(header, rows)


# name: (the summary, the result files it is made from)
SUMMARIES = {
    "headline": (headline, [name for name, *_ in HEADLINE]),
    "speed_summary": (speed, ["speed"]),
    "methods": (methods, [name for name, _ in METHOD_SETTINGS]),
    "detection_summary": (detection, ["detection"]),
    "gpu": (gpu, list(GPU_RESULTS)),
}


def made_by(names: list[str]) -> str:
    """The commands that made the result files, one line each."""
    return "\n".join(f"- `{name}`: {read(name).made_by.removeprefix('Made by ')}" for name in names)
