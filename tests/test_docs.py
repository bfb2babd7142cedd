"""The documentation builds without warnings, its examples run, its docstrings' examples pass.

Both tests are slow (about 1-2 minutes together on 2 cores) and skip cleanly when
the ``docs`` extra (sphinx, numpydoc, sphinx-gallery, myst-parser) is not installed.
"""

import doctest
import importlib
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sksegcal

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOCS_BUILD_TIMEOUT_S = 600

# build outputs that may lie in docs/ after a local build; never copied
_DOCS_OUTPUTS = ("_build", "generated", "auto_examples", "sg_execution_times.rst")


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.slow
def test_sphinx_build_has_no_warnings_and_runs_the_gallery(tmp_path):
    missing = _missing("sphinx", "numpydoc", "sphinx_gallery", "myst_parser", "matplotlib")
    if missing:
        pytest.skip(f"the docs extra is not installed (missing {', '.join(missing)})")
    # build a fresh copy: sphinx-gallery writes into the source folder and skips
    # examples whose outputs are already there
    src = tmp_path / "docs"
    shutil.copytree(DOCS, src, ignore=shutil.ignore_patterns(*_DOCS_OUTPUTS))
    env = {**os.environ, "SKSEGCAL_REPO_ROOT": str(ROOT), "MPLBACKEND": "Agg"}
    env.pop("SKSEGCAL_DOCS_NO_GALLERY", None)
    # the dummy builder reads, resolves and checks every page as the html one does (the
    # warnings come from there) but writes nothing: the html writing and the viewcode
    # pages took a third of the build
    doctrees = tmp_path / "doctrees"
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "dummy",
        "-d", str(doctrees), str(src), str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=DOCS_BUILD_TIMEOUT_S
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout[-5000:]}\n{proc.stderr}"

    for page in ("index", "getting_started", "persistence", "user_guide", "api"):
        assert (doctrees / f"{page}.doctree").is_file(), page
    for name in ("SelectiveScalingCalibrator", "TorchMLPClassifier", "persistence"):
        assert (doctrees / "generated" / f"sksegcal.{name}.doctree").is_file(), name
    # every plot_*.py example ran (its page shows output), the mmseg one is only shown
    gallery = src / "auto_examples"
    examples = sorted(p.stem for p in (ROOT / "examples").glob("plot_*.py"))
    assert examples
    for stem in examples:
        rst = (gallery / f"{stem}.rst").read_text()
        assert "rst-class:: sphx-glr-script-out" in rst, f"{stem} produced no output"
    assert list((gallery / "images").glob("sphx_glr_plot_3_reliability_diagrams_*.png"))
    assert (doctrees / "auto_examples" / "mmseg_calibrated_inference.doctree").is_file()


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(sksegcal.__path__, "sksegcal."):
        if info.name.endswith("integrations.mmseg") and _missing("mmseg"):
            continue  # the optional mmseg integration; its doctests are skipped anyway
        names.append(info.name)
    return ["sksegcal", *sorted(names)]


@pytest.mark.slow
@pytest.mark.parametrize("module_name", _public_modules())
def test_docstring_examples_pass(module_name):
    """What ``python -m pytest --doctest-modules sksegcal`` runs, module by module."""
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [t for t in finder.find(module, module_name) if t.examples]
    for test in tests:
        runner.run(test, out=lambda s: None)
    result = runner.summarize(verbose=False)
    if result.failed:
        # rerun the failing ones for a readable report
        report: list[str] = []
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        for test in tests:
            runner.run(test, out=report.append)
        pytest.fail(
            f"{result.failed} docstring example(s) failed in {module_name}:\n"
            + "".join(report)[:8000]
        )
