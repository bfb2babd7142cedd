"""The figures and result files say what the data say: sparse bins, alignment, labels, numbers."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")

from sksegcal.features import softmax  # noqa: E402
from sksegcal.metrics import CalibrationAccumulator  # noqa: E402
from sksegcal.plotting import plot_reliability_diagram, plot_segmentation_examples  # noqa: E402


def _accumulator(n=20_000, seed=0):
    """Confidences 0.97 (3% wrong), 0.6 (40% wrong), and one wrong pixel alone at 0.35."""
    rng = np.random.default_rng(seed)
    p = np.tile([0.97, 0.015, 0.015], (n, 1))
    p[: n // 4] = [0.6, 0.2, 0.2]
    p[0] = [0.35, 0.33, 0.32]
    y = np.zeros(n, int)
    wrong = rng.random(n) < np.where(p[:, 0] > 0.9, 0.03, 0.4)
    y[wrong] = 1
    y[0] = 2
    return CalibrationAccumulator(3).update(y, p)


def test_sparse_bins_are_faded_counted_and_left_out_of_a_second_mce():
    acc = _accumulator()
    curve = acc.reliability_curve(15)
    sparse = (curve.count > 0) & (curve.fraction < 1e-3)
    assert sparse.sum() == 1
    fig = plot_reliability_diagram(acc)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert f"n={curve.count[sparse][0]:,.0f}" in texts
    stats = next(t for t in texts if t.startswith("ECE"))
    # MCE over every bin is the lone pixel's gap; the second figure is over the others
    mce = acc.calibration_error(15, norm="max")
    keep = (curve.count > 0) & ~sparse
    dense = np.abs(curve.accuracy[keep] - curve.confidence[keep]).max()
    assert f"MCE {mce:.4f}" in stats and f"{dense:.4f} on bins" in stats
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("faded" in t for t in legend)


def test_sparse_bin_with_correct_pixels_is_drawn_faded():
    acc = _accumulator()
    acc.update(np.zeros(3, int), np.tile([0.36, 0.33, 0.31], (3, 1)))
    ax = plot_reliability_diagram(acc).axes[0]
    alphas = sorted(
        {
            round(p.get_facecolor()[3], 2)
            for p in ax.patches
            if p.get_height() > 0 and p.get_facecolor()[2] > 0.5
        }
    )
    assert alphas[0] <= 0.25 and alphas[-1] == 1.0


def test_reliability_panels_align_with_their_histograms():
    # three columns and a title: the shape of the report's figures
    accs = {"a": _accumulator(), "b": _accumulator(seed=1), "c": _accumulator(seed=2)}
    fig = plot_reliability_diagram(accs, title="a title")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    top, bottom = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(
        [top.get_position().x0, top.get_position().x1],
        [bottom.get_position().x0, bottom.get_position().x1],
        atol=1e-3,
    )


def _example_maps(n=2, c=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(n, 10, 12))
    logits = 3 * np.moveaxis(np.eye(c)[labels], -1, 1) + rng.normal(size=(n, c, 10, 12))
    return rng.random((n, 1, 10, 12)), labels, logits


def test_examples_have_class_legend_row_labels_difference_and_note():
    images, labels, logits = _example_maps()
    probs = {"uncalibrated": softmax(logits), "selective scaling": softmax(logits / 1.5)}
    fig = plot_segmentation_examples(
        images=images,
        labels=labels,
        probs=probs,
        class_names=["bg", "grey", "white"],
        temperature=np.full((2, 10, 12), 1.5),
        row_labels=["in-domain, slice 1", "shifted"],
        note="The guard kept temperature scaling",
    )
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["bg", "grey", "white"]
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("confidence difference") for t in titles)
    n_columns = 8  # image, labels, prediction, 2 confidences, difference, errors, temperature
    assert [fig.axes[0].get_ylabel(), fig.axes[n_columns].get_ylabel()] == [
        "in-domain, slice 1",
        "shifted",
    ]
    assert fig._suptitle.get_text() == "The guard kept temperature scaling"
    # a constant temperature map says so instead of a colour bar of rounding noise
    assert any("T = 1.5 everywhere" in t.get_text() for ax in fig.axes for t in ax.texts)
    # the difference map holds the difference (TS at 1.5 lowers every confidence here)
    diff_ax = next(ax for ax in fig.axes if ax.get_title().startswith("confidence difference"))
    shown = diff_ax.images[0].get_array()
    expected = probs["selective scaling"][0].max(0) - probs["uncalibrated"][0].max(0)
    np.testing.assert_allclose(shown, expected)


def test_result_numbers_are_numbers(tmp_path):
    from sksegcal import SelectiveScalingCalibrator
    from sksegcal.cli._calibrate import selective_info
    from sksegcal.cli._demo import _rewrite_timings
    from sksegcal.cli._report import summaries, write_metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    X = 3 * np.eye(3)[y] + rng.normal(size=(3000, 3))
    sel = SelectiveScalingCalibrator(random_state=0).fit(X, y, groups=np.arange(3000) // 100)
    info = selective_info(sel, None)
    assert isinstance(info["t1"], float) and isinstance(info["t2"], float)
    results = summaries({"test": {"raw": CalibrationAccumulator(3).update(y, softmax(X))}})
    write_metrics(tmp_path, results, {"calibrators": {"selective scaling": info}})
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert isinstance(saved["calibrators"]["selective scaling"]["t2"], float)
    assert saved["results"]["test"]["raw"]["n_pixels"] == 3000
    row = next(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert row["n_pixels"] == "3000"
    # report.md's timings end with the report's own time and the total
    page = tmp_path / "report.md"
    page.write_text("# r\n\n## Timings (seconds)\n\n- data: 1.0\n\nafter\n")
    _rewrite_timings(page, {"data": 1.0, "report": 2.0, "total": 3.0})
    assert page.read_text() == (
        "# r\n\n## Timings (seconds)\n\n- data: 1.0\n- report: 2.0\n- total: 3.0\n\nafter\n"
    )


def test_the_guards_fallback_is_said_on_the_example_figure():
    from sksegcal import SelectiveScalingCalibrator
    from sksegcal.cli._demo import fallback_note

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 3000)
    X = 3 * np.eye(3)[y] + rng.normal(size=(3000, 3))  # no signal for a detector to find
    sel = SelectiveScalingCalibrator(random_state=0).fit(X, y, groups=np.arange(3000) // 100)
    if sel.guard_choice_ == "ts":
        assert fallback_note(sel).startswith(
            f"The guard kept temperature scaling (T = {sel.t1_:.3g}"
        )
    sel.guard_choice_ = "ts"  # whichever the data gave, both answers are checked
    assert "show that TS" in fallback_note(sel)
    sel.guard_choice_ = "selective"
    assert fallback_note(sel) is None
