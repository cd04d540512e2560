"""Shared setting of the benchmarks (DESIGN.md, section 5)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from skorch import NeuralNetClassifier

from sktda.datasets import load_digits_split
from sktda.models import MLP

RESULTS = Path(__file__).parent / "results"


def digits_net(max_epochs: int = 30, **kwargs) -> NeuralNetClassifier:
    """MLP 64-128-10 with dropout 0.1, SGD momentum 0.9, lr 0.05, batch 64."""
    params = dict(
        module__n_features=64,
        module__n_outputs=10,
        module__hidden=(128,),
        module__dropout=0.1,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=max_epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetClassifier(MLP, **params)


def digits_data():
    """1000 training and 200 test digits, fixed seed."""
    return load_digits_split(n_train=1000, n_test=200, random_state=0)


README = Path(__file__).resolve().parents[1] / "README.md"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--readme",
        action="store_true",
        help="also replace this benchmark's table in README.md (between its markers)",
    )
    return p


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def emit(name: str, title: str, table: str, readme: bool = False) -> None:
    """Print the table with the command that made it, save it under results/, and
    put it into the README between ``<!-- bench:NAME -->`` markers when asked."""
    script = Path(sys.argv[0]).resolve().relative_to(Path(__file__).resolve().parents[1])
    command = " ".join(["python", str(script), *sys.argv[1:]])
    text = f"{table}\n\nMade by `{command}` on {machine()}, {time.strftime('%Y-%m-%d')}.\n"
    print(f"### {title}\n\n{text}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(f"### {title}\n\n{text}")
    if readme:
        write_block(name, text)


def write_block(name: str, text: str) -> None:
    """Replace README.md's ``<!-- bench:NAME -->`` block with ``text``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    content = README.read_text()
    if start not in content or end not in content:
        raise SystemExit(f"README.md has no {start} ... {end} block to replace.")
    head, rest = content.split(start, 1)
    README.write_text(f"{head}{start}\n{text}{end}{rest.split(end, 1)[1]}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cnn_net(max_epochs: int = 30, **kwargs) -> NeuralNetClassifier:
    """ConvNet on 8x8 digits: two 3x3 conv blocks (32, 64 channels) with max pooling,
    dropout 0.1, linear output; SGD momentum 0.9, lr 0.05, batch 64."""
    from sktda.models import ConvNet

    params = dict(
        module__channels=(32, 64),
        module__dropout=0.1,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.SGD,
        optimizer__momentum=0.9,
        lr=0.05,
        max_epochs=max_epochs,
        batch_size=64,
        train_split=None,
        verbose=0,
    )
    params.update(kwargs)
    return NeuralNetClassifier(ConvNet, **params)


def identical_class_rate(A, y_train, predicted) -> float:
    """Hanawa et al. (ICLR 2021)'s identical-class test: how often the top proponent
    of a test sample has the class the model predicts for it."""
    import numpy as np

    return float(np.mean(np.asarray(y_train)[np.argmax(A, axis=1)] == np.asarray(predicted)))


def relatif(A, self_influence):
    """RelatIF-normalised scores, as ``normalize="relatif"`` computes them."""
    import numpy as np

    root = np.sqrt(np.abs(self_influence))
    return A / np.maximum(root, 1e-6 * root.max())[None, :]
