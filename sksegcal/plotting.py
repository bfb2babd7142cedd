"""Reliability diagrams and confidence histograms from calibration accumulators.

matplotlib is an optional dependency (the ``plots`` extra) imported only when
a function here is called. Figures are built with the object-oriented API
(:class:`matplotlib.figure.Figure`, no pyplot state), so they can be saved
from scripts and worker processes without a display and still show in
notebooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .metrics import CalibrationAccumulator

__all__ = ["plot_classwise_reliability", "plot_reliability_diagram", "plot_set_size_maps"]

_ACC_COLOR = "#1f77b4"
_GAP_COLOR = "#d62728"
_HIST_COLOR = "#7f7f7f"


def _figure_cls():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise ImportError(
            "sksegcal.plotting needs matplotlib, an optional dependency. Install it with "
            "`pip install 'sksegcal[plots]'` (or `pip install matplotlib`)."
        ) from exc
    return Figure


def _as_accumulator(obj: Any, n_classes_hint: int | None = None) -> CalibrationAccumulator:
    if isinstance(obj, CalibrationAccumulator):
        return obj
    if isinstance(obj, tuple) and len(obj) == 2:
        y_true, y_prob = obj
        y_prob = np.asarray(y_prob)
        acc = CalibrationAccumulator(y_prob.shape[1] if y_prob.ndim > 1 else 2)
        return acc.update(y_true, y_prob)
    raise TypeError(
        "Expected a CalibrationAccumulator or a (y_true, y_prob) tuple; got "
        f"{type(obj).__name__}."
    )


def _named(accumulators: Any) -> list[tuple[str, CalibrationAccumulator]]:
    if isinstance(accumulators, (CalibrationAccumulator, tuple)):
        return [("", _as_accumulator(accumulators))]
    if isinstance(accumulators, Mapping):
        return [(str(k), _as_accumulator(v)) for k, v in accumulators.items()]
    if isinstance(accumulators, Sequence):
        return [(f"model {i}", _as_accumulator(v)) for i, v in enumerate(accumulators)]
    raise TypeError(
        "accumulators must be a CalibrationAccumulator, a dict {name: accumulator} or a "
        f"list of accumulators; got {type(accumulators).__name__}."
    )


def _draw_reliability(ax, curve, *, show_gap: bool, label_y: bool) -> None:
    edges = curve.bin_edges
    widths = np.diff(edges)
    left = edges[:-1]
    filled = curve.count > 0
    acc = np.where(filled, curve.accuracy, 0.0)
    conf = np.where(filled, curve.confidence, 0.0)
    ax.bar(left[filled], acc[filled], width=widths[filled], align="edge",
           color=_ACC_COLOR, edgecolor="white", linewidth=0.6, label="accuracy")
    if show_gap:
        # The gap between the bin's mean confidence and its accuracy: above the
        # bar when over-confident, inside it when under-confident.
        lo = np.minimum(acc, conf)
        # over-confident gaps sit on the empty area above the bar: light fill;
        # under-confident gaps sit inside the bar: hatch only, so it stays blue
        over = (conf > acc)[filled]
        face = [(0.84, 0.15, 0.16, 0.25) if o else (0, 0, 0, 0) for o in over]
        ax.bar(left[filled], np.abs(conf - acc)[filled], bottom=lo[filled],
               width=widths[filled], align="edge", color=face,
               edgecolor=_GAP_COLOR, linewidth=0.6, hatch="//", label="gap to confidence")
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal", adjustable="box")
    ax.tick_params(labelbottom=False)
    if label_y:
        ax.set_ylabel("accuracy")
    ax.grid(alpha=0.25, lw=0.5)


def _draw_histogram(ax, curve, *, log: bool, label_y: bool, mean_conf: float, acc: float):
    edges = curve.bin_edges
    ax.bar(edges[:-1], curve.fraction, width=np.diff(edges), align="edge",
           color=_HIST_COLOR, edgecolor="white", linewidth=0.6)
    ax.axvline(mean_conf, color=_GAP_COLOR, lw=1.2, ls="-", label=f"mean conf {mean_conf:.3f}")
    ax.axvline(acc, color=_ACC_COLOR, lw=1.2, ls="--", label=f"accuracy {acc:.3f}")
    ax.set_xlim(0, 1)
    if log:
        ax.set_yscale("log")
        pos = curve.fraction[curve.fraction > 0]
        if pos.size:
            ax.set_ylim(max(pos.min() / 2, 1e-7), 1.5)
    else:
        ax.set_ylim(0, max(curve.fraction.max() * 1.1, 1e-3))
    ax.set_xlabel("confidence (top-label probability)")
    if label_y:
        ax.set_ylabel("fraction of pixels")
    ax.legend(loc="upper left", fontsize=6.5, framealpha=0.85, edgecolor="none")
    ax.grid(alpha=0.25, lw=0.5)


def plot_reliability_diagram(
    accumulators: Any,
    *,
    n_bins: int = 15,
    strategy: str = "uniform",
    show_gap: bool = True,
    hist_log: bool = True,
    title: str | None = None,
    panel_size: float = 3.6,
    path: str | None = None,
    dpi: int = 150,
):
    """Reliability diagram with the confidence histogram beneath it, one column per model.

    Parameters
    ----------
    accumulators : CalibrationAccumulator, dict or list
        One accumulator, a dict ``{name: accumulator}`` (e.g. uncalibrated,
        temperature scaling, selective scaling; shown left to right in dict
        order) or a list. A ``(y_true, y_prob)`` tuple is accepted in place
        of an accumulator.
    n_bins : int, default=15
        Number of bins.
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width or (approximately) equal-mass bins.
    show_gap : bool, default=True
        Shade the gap between each bin's accuracy and mean confidence.
    hist_log : bool, default=True
        Log scale for the histogram (segmentation confidences pile up near 1).
    title : str, optional
        Figure title.
    panel_size : float, default=3.6
        Width of one column in inches.
    path : str or path-like, optional
        Save the figure there (PNG by extension).
    dpi : int, default=150
        Resolution when saving.

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import CalibrationAccumulator
    >>> from sksegcal.plotting import plot_reliability_diagram
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(scale=3, size=(2000, 4))
    >>> y = rng.integers(0, 4, size=2000)
    >>> def acc_for(t):
    ...     p = np.exp(z / t) / np.exp(z / t).sum(1, keepdims=True)
    ...     return CalibrationAccumulator(4).update(y, p)
    >>> fig = plot_reliability_diagram({"uncalibrated": acc_for(1), "T=5": acc_for(5)})
    >>> len(fig.axes)
    4
    """
    Figure = _figure_cls()
    items = _named(accumulators)
    k = len(items)
    fig = Figure(figsize=(panel_size * k, panel_size * 1.45), layout="constrained")
    gs = fig.add_gridspec(2, k, height_ratios=[3, 1.1])
    hist_axes, fractions = [], []
    for j, (name, acc) in enumerate(items):
        curve = acc.reliability_curve(n_bins, strategy=strategy)
        ax = fig.add_subplot(gs[0, j])
        _draw_reliability(ax, curve, show_gap=show_gap, label_y=j == 0)
        ece = acc.calibration_error(n_bins, strategy=strategy)
        mce = acc.calibration_error(n_bins, norm="max", strategy=strategy)
        ax.text(
            # upper left: the corner bars reach least often (over-confident
            # bars sit under the diagonal, under-confident ones rarely reach 1)
            0.03, 0.97,
            f"ECE {ece:.4f}\nMCE {mce:.4f}\nNLL {acc.negative_log_likelihood():.4f}\n"
            f"Brier {acc.brier_score():.4f}\npixels {acc.n_pixels_:,}",
            transform=ax.transAxes, ha="left", va="top", fontsize=7.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
        if name:
            ax.set_title(name)
        if j == 0:
            handles, labels = ax.get_legend_handles_labels()
        # histograms share their y axis so that models compare at a glance
        hx = fig.add_subplot(gs[1, j], sharex=ax, sharey=hist_axes[0] if hist_axes else None)
        hist_axes.append(hx)
        w = curve.count
        mean_conf = float((curve.confidence[w > 0] * w[w > 0]).sum() / w.sum())
        _draw_histogram(hx, curve, log=hist_log, label_y=j == 0, mean_conf=mean_conf,
                        acc=acc.accuracy())
        fractions.append(curve.fraction)
    allf = np.concatenate(fractions)
    if hist_log and (allf > 0).any():
        hist_axes[0].set_ylim(max(allf[allf > 0].min() / 2, 1e-7), 1.5)
    else:
        hist_axes[0].set_ylim(0, max(allf.max() * 1.1, 1e-3))
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def plot_classwise_reliability(
    accumulator: CalibrationAccumulator,
    *,
    classes: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    n_bins: int = 10,
    strategy: str = "uniform",
    max_classes: int = 20,
    ncols: int | None = None,
    panel_size: float = 2.3,
    title: str | None = None,
    path: str | None = None,
    dpi: int = 150,
):
    """Grid of per-class reliability diagrams (p_k against the frequency of class k).

    Needs an accumulator built with ``classwise=True``. Each panel shows, for
    one class, the observed frequency of that class in each bin of its
    predicted probability, the pixel share of each bin as grey bars along the
    bottom, and the class's calibration error in the title.

    Parameters
    ----------
    accumulator : CalibrationAccumulator
        Built with ``classwise=True``.
    classes : sequence of int, optional
        Classes to show; by default the ``max_classes`` most frequent ones.
    class_names : sequence of str, optional
        Names indexed by class id.
    n_bins : int, default=10
        Number of bins per class.
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width or (approximately) equal-mass bins.
    max_classes : int, default=20
        Cap on the number of panels when ``classes`` is None.
    ncols : int, optional
        Panels per row (default: about the square root of the panel count, at most 5).
    panel_size : float, default=2.3
        Size of one panel in inches.
    title : str, optional
        Figure title.
    path : str or path-like, optional
        Save the figure there.
    dpi : int, default=150
        Resolution when saving.

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import CalibrationAccumulator
    >>> from sksegcal.plotting import plot_classwise_reliability
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(scale=3, size=(2000, 3))
    >>> p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    >>> acc = CalibrationAccumulator(3, classwise=True).update(rng.integers(0, 3, 2000), p)
    >>> names = ["road", "car", "sky"]
    >>> fig = plot_classwise_reliability(acc, classes=[0, 1, 2], class_names=names)
    >>> [ax.get_title().split(" ")[0] for ax in fig.axes if ax.get_visible()]
    ['road', 'car', 'sky']
    """
    Figure = _figure_cls()
    if not isinstance(accumulator, CalibrationAccumulator):
        raise TypeError(
            f"accumulator must be a CalibrationAccumulator; got {type(accumulator).__name__}."
        )
    curves = accumulator.classwise_reliability_curve(n_bins, strategy=strategy)
    per_class = accumulator.classwise_calibration_error(n_bins, strategy=strategy, average=False)
    support = curves.support
    if classes is None:
        order = np.argsort(-support, kind="stable")
        classes = [int(c) for c in order[:max_classes] if support[c] > 0]
    classes = list(classes)
    if not classes:
        raise ValueError("No class to plot: none has any labelled pixel.")
    n = len(classes)
    if ncols is None:
        ncols = min(5, int(np.ceil(np.sqrt(n))))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + 0.4), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    total = float(support.sum())
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_visible(False)
            continue
        k = classes[i]
        edges = curves.bin_edges[k]
        w = curves.count[k]
        filled = w > 0
        left, widths = edges[:-1], np.diff(edges)
        ax.bar(left[filled], curves.accuracy[k][filled], width=widths[filled], align="edge",
               color=_ACC_COLOR, alpha=0.85, edgecolor="white", linewidth=0.5)
        # pixel share of each bin, drawn in front at a quarter of the height
        ax.bar(left, 0.25 * curves.fraction[k], width=widths, align="edge",
               color=_HIST_COLOR, alpha=0.75, edgecolor="white", linewidth=0.5, zorder=3)
        ax.plot(curves.confidence[k][filled], curves.accuracy[k][filled], "o-",
                color=_GAP_COLOR, ms=2.5, lw=0.9, zorder=4)
        ax.plot([0, 1], [0, 1], ls="--", color="black", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal", adjustable="box")
        name = class_names[k] if class_names is not None else f"class {k}"
        ax.set_title(f"{name} ({support[k] / total:.1%})\nCE {per_class[k]:.4f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.25, lw=0.5)
    for ax in axes[-1]:
        ax.set_xlabel("p(class)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("frequency", fontsize=8)
    fig.suptitle(
        title or "Per-class reliability\nblue: class frequency per bin of p(class); red: at "
        "the bin's mean p;\ngrey: share of pixels in the bin (x 0.25)",
        fontsize=9,
    )
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _image_maps(value, name: str) -> list[np.ndarray]:
    """One method's set sizes as a list of (H, W) maps: an (N, H, W) array or N (H, W) maps."""
    if isinstance(value, (list, tuple)):
        images = [np.asarray(a) for a in value]
    else:
        value = np.asarray(value)
        if value.ndim != 3:
            raise ValueError(f"the size maps of {name!r} must be (N, H, W); got {value.shape}.")
        images = list(value)
    bad = [a.shape for a in images if a.ndim != 2 or a.size == 0]
    if bad:
        raise ValueError(f"every size map of {name!r} must be a non-empty (H, W) map; got {bad}.")
    return images


def plot_set_size_maps(
    size_maps: Mapping[str, Any],
    *,
    n_classes: int | None = None,
    titles: Sequence[str] | None = None,
    panel_size: float = 2.2,
):
    """Heat maps of conformal prediction-set sizes: one row per method, one column per image.

    Parameters
    ----------
    size_maps : mapping of str to array-like of shape (N, H, W) or list of N (H, W) maps
        Set sizes per pixel (e.g.
        :meth:`sksegcal.conformal.ConformalPixelSets.predict_set_size_maps`)
        of the same N images under each method; a list lets the images differ
        in size.
    n_classes : int, optional
        Top of the shared colour scale (default: the largest size shown).
    titles : sequence of str, optional
        One title per image column.
    panel_size : float, default=2.2
        Inches per panel.

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.plotting import plot_set_size_maps
    >>> sizes = {"raw": np.ones((2, 8, 8), int), "TS": np.full((2, 8, 8), 2)}
    >>> fig = plot_set_size_maps(sizes, n_classes=3)
    >>> len(fig.axes)  # 2 x 2 panels and the colour bar
    5
    """
    Figure = _figure_cls()
    if not isinstance(size_maps, Mapping) or not size_maps:
        raise TypeError("size_maps must be a non-empty mapping {method name: (N, H, W) sizes}.")
    # each image is drawn on its own: images of one method may differ in size
    maps = {str(k): _image_maps(v, str(k)) for k, v in size_maps.items()}
    counts = {len(m) for m in maps.values()}
    if len(counts) != 1 or not next(iter(counts)):
        raise ValueError(
            f"every method must have size maps of the same images; got {sorted(counts)} images."
        )
    n = next(iter(counts))
    for j in range(n):
        shapes = {m[j].shape for m in maps.values()}
        if len(shapes) != 1:
            raise ValueError(f"the size maps of image {j} differ in shape between methods: "
                             f"{sorted(shapes)}.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images.")
    top = (int(n_classes) if n_classes is not None
           else int(max(a.max() for m in maps.values() for a in m)))
    top = max(top, 1)
    rows = len(maps)
    fig = Figure(figsize=(panel_size * n + 0.8, panel_size * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, n, squeeze=False))
    from matplotlib import colormaps

    # one colour per size: sizes are integers 0 .. top
    cmap = colormaps["viridis"].resampled(top + 1)
    image = None
    for r, (name, m) in enumerate(maps.items()):
        for j in range(n):
            ax = axes[r, j]
            image = ax.imshow(
                m[j], cmap=cmap, vmin=-0.5, vmax=top + 0.5, interpolation="nearest"
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"mean {m[j].mean():.2f}", fontsize=8)
            if r == 0 and titles is not None:
                ax.set_title(f"{titles[j]}\nmean {m[j].mean():.2f}", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8)
    bar = fig.colorbar(image, ax=axes, shrink=0.8, label="classes in the set")
    if top <= 12:
        bar.set_ticks(range(top + 1))
    return fig
