"""Sphinx configuration of sktda's documentation (``make -C doc html``).

The gallery executes ``examples/*.py``; ``SKTDA_EXAMPLES_SMALL=1`` makes the
examples run their smaller settings (Read the Docs builds the docs that way).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import sktda

DOC = Path(__file__).resolve().parent
ROOT = DOC.parent
sys.path.insert(0, str(DOC / "sphinxext"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import summaries  # noqa: E402  (benchmarks/summaries.py: summaries of the saved results)

project = "sktda"
author = "the sktda developers"
copyright = "2026, the sktda developers"
release = version = sktda.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_tables"]
templates_path = ["_templates"]

# every cross-reference must resolve, apart from the types of other projects (no
# intersphinx: the build works offline)
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|torch|sklearn|skorch|peft|pandas|matplotlib|joblib|imblearn|dask)(\..*)?"),
    (
        r"py:.*",
        r"(array-like|ndarray|callable|optional|default|of|shape|or|str|int|float|bool|dict|list|tuple|None)",
    ),
]

autosummary_generate = True
# members inherited from sktda's own bases are documented; those of scikit-learn's
# and torch's bases are theirs to document
autodoc_default_options = {
    "members": True,
    "inherited-members": ",".join(
        [
            "BaseEstimator",
            "ClassNamePrefixFeaturesOutMixin",
            "TransformerMixin",
            "OutlierMixin",
            "MetaEstimatorMixin",
            "Module",
            "CrossEntropyLoss",
            "_MetadataRequester",
            "_SetOutputMixin",
            "tuple",
        ]
    ),
}
autodoc_typehints = "none"  # the numpydoc sections give the types
autodoc_inherit_docstrings = False
numpydoc_show_class_members = False
numpydoc_xref_param_type = False

myst_heading_anchors = 3
myst_enable_extensions = ["deflist"]

# summary tables of the saved benchmark results, included by the pages; the full
# tables are included from benchmarks/results/ directly
TABLES = DOC / "_tables"
TABLES.mkdir(exist_ok=True)
for _name, (_make, _sources) in summaries.SUMMARIES.items():
    _text = f"{_make()}\n\nFrom:\n\n{summaries.made_by(_sources)}\n"
    if not (TABLES / f"{_name}.md").exists() or (TABLES / f"{_name}.md").read_text() != _text:
        (TABLES / f"{_name}.md").write_text(_text)

html_theme = "pydata_sphinx_theme"
html_title = f"sktda {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_context = {"default_mode": "light"}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["sktda.css"]

# Read the Docs builds within a time limit: the examples run their smaller settings
# there, unless the project sets SKTDA_EXAMPLES_SMALL itself
if os.environ.get("READTHEDOCS") == "True":
    os.environ.setdefault("SKTDA_EXAMPLES_SMALL", "1")

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # execute every example, not only plot_*.py
    "within_subsection_order": "gallery_order.ExampleOrder",
    "download_all_examples": False,
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "show_memory": False,
    "backreferences_dir": "generated/backreferences",
    "doc_module": ("sktda",),
    "plot_gallery": "True",
    # always execute: a cached output might come from the other example size
    "run_stale_examples": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
}
