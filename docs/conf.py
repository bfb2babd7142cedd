"""Sphinx configuration of the sksegcal documentation.

Build (warnings as errors, gallery examples executed)::

    sphinx-build -W --keep-going -b html docs docs/_build/html

Run every docstring example (the same ones ``tests/test_docs.py`` runs)::

    SKSEGCAL_DOCS_NO_GALLERY=1 sphinx-build -b doctest docs docs/_build/doctest

Set ``SKSEGCAL_DOCS_NO_GALLERY=1`` to skip running the examples (they are still
rendered, without outputs). The build writes ``docs/generated/`` (API pages) and
``docs/auto_examples/`` (the gallery) next to the sources.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import matplotlib

HERE = Path(__file__).resolve().parent
# the repository (examples/ lives there); a test builds a copy of docs/ elsewhere
ROOT = Path(os.environ.get("SKSEGCAL_REPO_ROOT", HERE.parent)).resolve()
sys.path.insert(0, str(ROOT))  # this checkout's sksegcal, even when not installed
sys.path.insert(0, str(HERE))  # _sg_figures, the gallery scraper

import sksegcal  # noqa: E402

matplotlib.use("Agg")  # the gallery runs headless

# -- project -----------------------------------------------------------------
project = "sksegcal"
author = "sksegcal developers"
copyright = "2026, sksegcal developers"
release = sksegcal.__version__
version = ".".join(release.split(".")[:2])

# -- extensions --------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# -- autodoc / autosummary / numpydoc ----------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module page lists exactly its __all__
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"  # numpydoc's Parameters sections already give the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True

# -- MyST (the Markdown pages) -----------------------------------------------
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# -- sphinx-gallery ----------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    # plot_*.py files run in the build; others (the mmseg one) are only rendered
    "filename_pattern": r"/plot_",
    "plot_gallery": "False" if os.environ.get("SKSEGCAL_DOCS_NO_GALLERY") else "True",
    "doc_module": ("sksegcal",),
    "backreferences_dir": "auto_examples/backrefs",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": False,  # report every failing example; -W fails the build
    "only_warn_on_example_error": False,
    "matplotlib_animations": False,
    "image_scrapers": ("matplotlib", "_sg_figures"),
    "reset_modules": ("matplotlib",),
}

# -- doctest (sphinx-build -b doctest docs out) -------------------------------
doctest_global_setup = "import numpy as np"

# -- HTML --------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"sksegcal {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Calibrated per-pixel probabilities for semantic segmentation",
    "fixed_sidebar": True,
}


# -- hooks -------------------------------------------------------------------
_OPTIONAL_PAGES = ("quality",)  # linked from index.rst only once they exist
_SKLEARN_PLUMBING = re.compile(r"^set_\w+_request$|^set_output$")
# "(n_features_in_,)" in a type: RST reads ``name_`` as a link to a target "name"
_TRAILING_UNDERSCORE_IN_SHAPE = re.compile(r"\((\w+_),\)")


def _drop_missing_optional_pages(app, docname, source):
    if docname != "index" or all((HERE / f"{p}.md").exists() for p in _OPTIONAL_PAGES):
        return
    start = source[0].find(".. optional-pages")
    end = source[0].find(".. end-optional-pages")
    if start >= 0 and end > start:
        source[0] = source[0][:start] + source[0][end + len(".. end-optional-pages") :]


def _skip_sklearn_plumbing(app, what, name, obj, skip, options):
    # scikit-learn's metadata-routing setters: their docstrings link into
    # scikit-learn's own docs, and they are not part of our API
    if _SKLEARN_PLUMBING.match(name.rsplit(".", 1)[-1]):
        return True
    return skip


def _escape_shape_names(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        lines[i] = _TRAILING_UNDERSCORE_IN_SHAPE.sub(r"(``\1``,)", line)


def setup(app):
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("autodoc-skip-member", _skip_sklearn_plumbing)
    # before numpydoc (priority 500) so its parsed sections see the escaped text
    app.connect("autodoc-process-docstring", _escape_shape_names, priority=400)
