"""Tests of sksegcal.plotting (matplotlib is an optional extra)."""

import sys

import numpy as np
import pytest

from sksegcal.metrics import CalibrationAccumulator

pytest.importorskip("matplotlib")

from sksegcal import plotting  # noqa: E402


def _accs(classwise=False):
    rng = np.random.default_rng(0)
    n, c = 20000, 5
    z = rng.normal(scale=3.0, size=(n, c))
    pt = np.exp(z / 3)
    pt /= pt.sum(1, keepdims=True)
    y = (pt.cumsum(1) > rng.random((n, 1))).argmax(1)
    y[:500] = 255
    out = {}
    for name, t in [("uncalibrated", 1.0), ("TS", 3.0), ("selective", 5.0)]:
        p = np.exp(z / t)
        p /= p.sum(1, keepdims=True)
        out[name] = CalibrationAccumulator(c, classwise=classwise).update(y, p)
    return out


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_reliability_diagram_side_by_side_png(tmp_path, strategy):
    accs = _accs()
    path = tmp_path / "rel.png"
    fig = plotting.plot_reliability_diagram(
        accs, n_bins=10, strategy=strategy, title="demo", path=path, dpi=60
    )
    assert _is_png(path) and path.stat().st_size > 5_000
    # one reliability panel and one histogram per method
    assert len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[::2]] == list(accs)
    text = fig.axes[0].texts[0].get_text()
    ece = accs["uncalibrated"].expected_calibration_error(10, strategy=strategy)
    assert f"ECE {ece:.4f}" in text
    assert fig.axes[1].get_yscale() == "log"


def test_reliability_diagram_single_and_tuple_input(tmp_path):
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=500)
    y = rng.integers(0, 3, size=500)
    fig = plotting.plot_reliability_diagram((y, p), hist_log=False)
    assert len(fig.axes) == 2
    fig = plotting.plot_reliability_diagram([CalibrationAccumulator(3).update(y, p)] * 2)
    assert len(fig.axes) == 4
    with pytest.raises(TypeError, match="CalibrationAccumulator"):
        plotting.plot_reliability_diagram({"a": 3})


def test_classwise_grid_png(tmp_path):
    acc = _accs(classwise=True)["uncalibrated"]
    path = tmp_path / "cw.png"
    names = ["road", "car", "sky", "tree", "person"]
    fig = plotting.plot_classwise_reliability(acc, class_names=names, path=path, dpi=60)
    assert _is_png(path)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 5
    assert {ax.get_title().split(" ")[0] for ax in visible} == set(names)
    fig = plotting.plot_classwise_reliability(acc, classes=[2], n_bins=5)
    assert [ax.get_visible() for ax in fig.axes] == [True]
    with pytest.raises(ValueError, match="classwise=True"):
        plotting.plot_classwise_reliability(_accs()["TS"])


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"sksegcal\[plots\]"):
        plotting.plot_reliability_diagram(_accs()["TS"])
