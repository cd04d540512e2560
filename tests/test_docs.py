"""The documentation covers the library: every public name is in the API reference,
and the summary tables the pages include can be made from the saved benchmark
results. (CI builds the site itself, with warnings as errors, after the tests.)"""

import importlib
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "sktda",
    "sktda.metrics",
    "sktda.model_selection",
    "sktda.datasets",
    "sktda.models",
    "sktda.plotting",
    "sktda.routes",
]


def _api_reference() -> dict[str, set[str]]:
    """The names listed under each ``.. module::`` of doc/api.rst."""
    listed: dict[str, set[str]] = {}
    module = None
    for line in (ROOT / "doc" / "api.rst").read_text().splitlines():
        if match := re.match(r"\.\. module:: (\S+)", line):
            module = match.group(1)
            listed.setdefault(module, set())
        elif module and re.match(r"   [A-Za-z_]\w*$", line):
            listed[module].add(line.strip())
    return listed


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_api_reference_lists_every_public_name(module):
    public = set(importlib.import_module(module).__all__) - {"__version__"}
    assert _api_reference().get(module, set()) == public


def test_api_reference_lists_only_public_modules():
    assert set(_api_reference()) == set(PUBLIC_MODULES)


@pytest.fixture
def summaries(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    yield importlib.import_module("summaries")
    sys.modules.pop("summaries", None)


def test_summary_tables_are_made_from_the_saved_results(summaries):
    for name, (make, sources) in summaries.SUMMARIES.items():
        lines = make().splitlines()
        assert lines[0].startswith("| ") and set(lines[1]) <= set("|-"), name
        assert len(lines) > 3, name
        for source in sources:
            assert summaries.read(source).made_by.startswith("Made by `python benchmarks/"), source
    for row in summaries.headline().split("\n\n")[0].splitlines()[2:]:
        sktda_cell = row.split("|")[2].strip()
        assert re.fullmatch(r"[0-9.]+ \([0-9.]+ s\)", sktda_cell), row


def test_read_parses_a_result_file(summaries, tmp_path, monkeypatch):
    monkeypatch.setattr(summaries, "RESULTS", tmp_path)
    (tmp_path / "toy.md").write_text(
        "### Toy\n\n| method | LDS |\n|---|---|\n| a | 0.5 |\n| b |  |\n\nMade by `python benchmarks/toy.py` on here.\n"
    )
    result = summaries.read("toy")
    assert result.header == ["method", "LDS"]
    assert result.rows == [{"method": "a", "LDS": "0.5"}, {"method": "b", "LDS": ""}]
    assert result.made_by == "Made by `python benchmarks/toy.py` on here."


def test_hugging_face_recipes_run(tmp_path, monkeypatch):
    """Every code block of the Hugging Face page, in order, in one namespace."""
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "doc" / "user_guide" / "huggingface.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 5
    # a module of its own, as a user's script is, so that its classes pickle
    module = types.ModuleType("huggingface_recipes")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    for block in blocks:
        exec(compile(block, "huggingface.md", "exec"), namespace)
    assert namespace["A"].shape == (5, 60)
    assert len(namespace["y_kept"]) == 54 and type(namespace["X_kept"]).__name__ == "SliceDict"
    assert namespace["top"].proponents.shape == (3, 5)
    assert namespace["lora"].n_members_ == 2 and namespace["best"]["ensemble"] in ("independent", "dropout")


def test_frozen_model_recipes_run(tmp_path, monkeypatch):
    """Every code block of "Attributing a model you already trained", in order."""
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "doc" / "user_guide" / "frozen.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 6
    namespace = {}
    for block in blocks:
        exec(compile(block, "frozen.md", "exec"), namespace)
    assert namespace["A"].shape == (20, 300) and namespace["own"].n_members_ == 9
    assert namespace["tracin"].n_members_ == 1 and len(namespace["tracin"].train_features_) == 2
    assert -1 <= namespace["lds"] <= 1 and (namespace["flags"] == -1).mean() == pytest.approx(0.2, abs=0.01)
