"""The commands chain: what ``fit`` writes, ``evaluate``, ``conformal`` and ``report`` read."""

from __future__ import annotations

import json

import pytest

from conftest import extract_store, overconfident_maps, save_maps
from sksegcal.cli import main

pytest.importorskip("skops")


@pytest.fixture
def store(tmp_path):
    """A store of 12 small over-confident images, extracted by the command."""
    save_maps(tmp_path, *overconfident_maps(12, 3, 12, 12, scale=5.0, noise=0.8))
    return extract_store(tmp_path)


def test_fit_then_evaluate_and_report_without_trusted(store, tmp_path, monkeypatch, capsys):
    from sksegcal.persistence import detect_format

    monkeypatch.chdir(tmp_path)
    # the default output: a skops file, which evaluate opens without --trusted
    assert main(["fit", str(store), "--method", "temperature", "-q"]) == 0
    assert "(skops)" in capsys.readouterr().out
    assert detect_format(tmp_path / "calibrator.skops") == "skops"
    results = tmp_path / "results"
    assert main(["evaluate", str(store), "-c", "calibrator.skops", "-o", str(results), "-q"]) == 0
    assert main(["report", str(results), "-q"]) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    assert "calibrator" in json.dumps(metrics)
    # joblib on request, and then --trusted is needed (a pickle runs code)
    assert main(["fit", str(store), "--method", "temperature", "-o", "ts.joblib", "-q"]) == 0
    assert detect_format(tmp_path / "ts.joblib") == "joblib"
    assert main(["evaluate", str(store), "-c", "ts.joblib", "-o", str(tmp_path / "r2"), "-q"]) == 1
    assert "--trusted" in capsys.readouterr().err


@pytest.mark.parametrize(
    "method",
    [
        "lts",
        "temperature",
    ],
)
def test_fit_then_conformal(store, tmp_path, method, capsys):
    cal = tmp_path / f"{method}.skops"
    assert (
        main(["fit", str(store), "--method", method, "-o", str(cal), "--max-pixels", "3000", "-q"])
        == 0
    )
    out = tmp_path / f"conformal-{method}"
    assert main(["conformal", str(store), "-c", str(cal), "-o", str(out), "-q"]) == 0, (
        capsys.readouterr().err
    )
    report = json.loads((out / "conformal.json").read_text())
    assert method in json.dumps(report)


def test_help_answers_without_importing_torch():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\nfrom sksegcal.cli import main\nfor argv in ([], ['fit'], ['demo']):\n"
        "    try:\n        main([*argv, '--help'])\n    except SystemExit:\n        pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("no torch")
    assert "--groups" in out.stdout  # fit's help names the grouped split
