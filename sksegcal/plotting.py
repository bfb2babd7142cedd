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

__all__ = [
    "plot_classwise_reliability",
    "plot_reliability_diagram",
    "plot_segmentation_examples",
    "plot_set_size_maps",
]

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
        f"Expected a CalibrationAccumulator or a (y_true, y_prob) tuple; got {type(obj).__name__}."
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


def _bar_colors(rgb: str, sparse: np.ndarray, alpha: float = 1.0) -> list:
    """One RGBA colour per bar: ``rgb`` at ``alpha``, faded to a fifth of it on sparse bins."""
    from matplotlib.colors import to_rgba

    return [to_rgba(rgb, alpha * (0.2 if s else 1.0)) for s in sparse]


def _draw_reliability(
    ax, curve, *, show_gap: bool, label_y: bool, min_fraction: float = 0.0
) -> None:
    edges = curve.bin_edges
    widths = np.diff(edges)
    left = edges[:-1]
    filled = curve.count > 0
    acc = np.where(filled, curve.accuracy, 0.0)
    conf = np.where(filled, curve.confidence, 0.0)
    # a bin with a handful of pixels has an accuracy of pure chance: faded, its count written
    sparse = (curve.fraction < min_fraction)[filled]
    ax.bar(
        left[filled],
        acc[filled],
        width=widths[filled],
        align="edge",
        color=_bar_colors(_ACC_COLOR, sparse),
        edgecolor="white",
        linewidth=0.6,
        label="accuracy",
    )
    for x, w, n in zip(left[filled][sparse], widths[filled][sparse], curve.count[filled][sparse]):
        ax.text(
            x + w / 2,
            0.02,
            f"n={n:,.0f}",
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=6,
            color="0.25",
        )
    if show_gap:
        # The gap between the bin's mean confidence and its accuracy: above the
        # bar when over-confident, inside it when under-confident.
        lo = np.minimum(acc, conf)
        # over-confident gaps sit on the empty area above the bar: light fill;
        # under-confident gaps sit inside the bar: hatch only, so it stays blue
        over = (conf > acc)[filled]
        face = [
            (0.84, 0.15, 0.16, 0.25 * (0.3 if s else 1.0)) if o else (0, 0, 0, 0)
            for o, s in zip(over, sparse)
        ]
        ax.bar(
            left[filled],
            np.abs(conf - acc)[filled],
            bottom=lo[filled],
            width=widths[filled],
            align="edge",
            color=face,
            edgecolor=_bar_colors(_GAP_COLOR, sparse),
            linewidth=0.6,
            hatch="//",
            label="gap to confidence",
        )
    ax.plot([0, 1], [0, 1], ls="--", color="black", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    # no equal aspect: the panel keeps the full column width, so that its bins sit exactly
    # above the histogram's (the figure's proportions keep it about square)
    ax.tick_params(labelbottom=False)
    if label_y:
        ax.set_ylabel("accuracy")
    ax.grid(alpha=0.25, lw=0.5)


def _legend_items(show_gap: bool, sparse: bool, min_fraction: float):
    """Legend handles drawn for the legend (the bars' own colours vary with their counts)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    items = [
        (Line2D([], [], ls="--", color="black", lw=1), "perfect calibration"),
        (Patch(color=_ACC_COLOR), "accuracy"),
    ]
    if show_gap:
        items.append(
            (
                Patch(facecolor=(0.84, 0.15, 0.16, 0.25), edgecolor=_GAP_COLOR, hatch="//"),
                "gap to confidence",
            )
        )
    if sparse:
        items.append(
            (
                Patch(color=_bar_colors(_ACC_COLOR, [True])[0]),
                f"bin under {min_fraction:.1%} of pixels (faded, n = its pixels)",
            )
        )
    return [h for h, _ in items], [t for _, t in items]


def _dense_mce(curve, min_fraction: float) -> float:
    """The largest |accuracy - confidence| over the bins holding at least ``min_fraction``."""
    keep = (curve.count > 0) & (curve.fraction >= min_fraction)
    if not keep.any():
        return float("nan")
    return float(np.abs(curve.accuracy[keep] - curve.confidence[keep]).max())


def _draw_histogram(ax, curve, *, log: bool, label_y: bool, mean_conf: float, acc: float):
    edges = curve.bin_edges
    ax.bar(
        edges[:-1],
        curve.fraction,
        width=np.diff(edges),
        align="edge",
        color=_HIST_COLOR,
        edgecolor="white",
        linewidth=0.6,
    )
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
    min_bin_fraction: float = 1e-3,
    path: str | None = None,
    dpi: int = 150,
):
    """Reliability diagram with the confidence histogram beneath it, one column per model.

    Bins holding less than ``min_bin_fraction`` of the pixels are drawn faded
    with their pixel count: their accuracy rests on a few pixels. MCE, a
    maximum over bins, is often set by such a bin, so the panel also gives the
    MCE over the other bins. Every panel spans the same x axis as the
    histogram under it.

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
    min_bin_fraction : float, default=1e-3
        Bins below this share of the pixels are faded and counted (0: none).
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
    any_sparse = False
    for j, (name, acc) in enumerate(items):
        curve = acc.reliability_curve(n_bins, strategy=strategy)
        ax = fig.add_subplot(gs[0, j])
        _draw_reliability(
            ax, curve, show_gap=show_gap, label_y=j == 0, min_fraction=min_bin_fraction
        )
        ece = acc.calibration_error(n_bins, strategy=strategy)
        mce = acc.calibration_error(n_bins, norm="max", strategy=strategy)
        dense = _dense_mce(curve, min_bin_fraction)
        mce_text = f"MCE {mce:.4f}"
        if min_bin_fraction > 0 and np.isfinite(dense) and dense < mce:
            mce_text += f"\n  {dense:.4f} on bins \u2265 {min_bin_fraction:.1%}"
        ax.text(
            # upper left: the corner bars reach least often (over-confident
            # bars sit under the diagonal, under-confident ones rarely reach 1)
            0.03,
            0.97,
            f"ECE {ece:.4f}\n{mce_text}\nNLL {acc.negative_log_likelihood():.4f}\n"
            f"Brier {acc.brier_score():.4f}\npixels {acc.n_pixels_:,}",
            transform=ax.transAxes,
            ha="left",
            va="top",
            fontsize=7.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9},
        )
        if name:
            ax.set_title(name)
        any_sparse |= bool(((curve.count > 0) & (curve.fraction < min_bin_fraction)).any())
        # histograms share their y axis so that models compare at a glance
        hx = fig.add_subplot(gs[1, j], sharex=ax, sharey=hist_axes[0] if hist_axes else None)
        hist_axes.append(hx)
        w = curve.count
        mean_conf = float((curve.confidence[w > 0] * w[w > 0]).sum() / w.sum())
        _draw_histogram(
            hx, curve, log=hist_log, label_y=j == 0, mean_conf=mean_conf, acc=acc.accuracy()
        )
        fractions.append(curve.fraction)
    allf = np.concatenate(fractions)
    if hist_log and (allf > 0).any():
        hist_axes[0].set_ylim(max(allf[allf > 0].min() / 2, 1e-7), 1.5)
    else:
        hist_axes[0].set_ylim(0, max(allf.max() * 1.1, 1e-3))
    handles, labels = _legend_items(show_gap, any_sparse, min_bin_fraction)
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 2 * k),
        fontsize=8,
        frameon=False,
    )
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
        ax.bar(
            left[filled],
            curves.accuracy[k][filled],
            width=widths[filled],
            align="edge",
            color=_ACC_COLOR,
            alpha=0.85,
            edgecolor="white",
            linewidth=0.5,
        )
        # pixel share of each bin, drawn in front at a quarter of the height
        ax.bar(
            left,
            0.25 * curves.fraction[k],
            width=widths,
            align="edge",
            color=_HIST_COLOR,
            alpha=0.75,
            edgecolor="white",
            linewidth=0.5,
            zorder=3,
        )
        ax.plot(
            curves.confidence[k][filled],
            curves.accuracy[k][filled],
            "o-",
            color=_GAP_COLOR,
            ms=2.5,
            lw=0.9,
            zorder=4,
        )
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
        title
        or "Per-class reliability\nblue: class frequency per bin of p(class); red: at "
        "the bin's mean p;\ngrey: share of pixels in the bin (x 0.25)",
        fontsize=9,
    )
    if path is not None:
        fig.savefig(path, dpi=dpi)
    return fig


def _image_maps(value, name: str, slice_index: int | None = None) -> list[np.ndarray]:
    """One method's set sizes as a list of (H, W) maps: an (N, H, W) or (N, D, H, W) array,
    or N (H, W) or (D, H, W) maps; a volume is shown by one slice along D (the middle one)."""
    if isinstance(value, (list, tuple)):
        images = [np.asarray(a) for a in value]
    else:
        value = np.asarray(value)
        if value.ndim not in (3, 4):
            raise ValueError(
                f"the size maps of {name!r} must be (N, H, W) or (N, D, H, W); got {value.shape}."
            )
        images = list(value)
    images = [_volume_slice(a, slice_index) if a.ndim == 3 else a for a in images]
    bad = [a.shape for a in images if a.ndim != 2 or a.size == 0]
    if bad:
        raise ValueError(f"every size map of {name!r} must be a non-empty (H, W) map; got {bad}.")
    return images


def _volume_slice(volume: np.ndarray, slice_index: int | None) -> np.ndarray:
    depth = volume.shape[0]
    k = depth // 2 if slice_index is None else int(slice_index)
    if not -depth <= k < depth:
        raise ValueError(f"slice_index {slice_index} is outside the {depth} slices.")
    return volume[k]


def plot_set_size_maps(
    size_maps: Mapping[str, Any],
    *,
    n_classes: int | None = None,
    titles: Sequence[str] | None = None,
    panel_size: float = 2.2,
    slice_index: int | None = None,
):
    """Heat maps of conformal prediction-set sizes: one row per method, one column per image.

    Parameters
    ----------
    size_maps : mapping of str to array-like of shape (N, H, W), (N, D, H, W) or list of N maps
        Set sizes per pixel (e.g.
        :meth:`sksegcal.conformal.ConformalPixelSets.predict_set_size_maps`)
        of the same N images under each method; a list lets the images differ
        in size. Volumes (D, H, W) are shown by one axial slice each.
    n_classes : int, optional
        Top of the shared colour scale (default: the largest size shown).
    titles : sequence of str, optional
        One title per image column.
    panel_size : float, default=2.2
        Inches per panel.
    slice_index : int, optional
        For volumes: the slice ``[:, slice_index]`` along D to show (default
        the middle one, ``D // 2``); the panel titles then give the slice's
        mean set size.

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
    maps = {str(k): _image_maps(v, str(k), slice_index) for k, v in size_maps.items()}
    counts = {len(m) for m in maps.values()}
    if len(counts) != 1 or not next(iter(counts)):
        raise ValueError(
            f"every method must have size maps of the same images; got {sorted(counts)} images."
        )
    n = next(iter(counts))
    for j in range(n):
        shapes = {m[j].shape for m in maps.values()}
        if len(shapes) != 1:
            raise ValueError(
                f"the size maps of image {j} differ in shape between methods: {sorted(shapes)}."
            )
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries for {n} images.")
    top = (
        int(n_classes)
        if n_classes is not None
        else int(max(a.max() for m in maps.values() for a in m))
    )
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
            image = ax.imshow(m[j], cmap=cmap, vmin=-0.5, vmax=top + 0.5, interpolation="nearest")
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


def _class_legend(fig, cmap, n_classes: int, class_names) -> None:
    """Colour swatches of the label classes under the figure (a note when there are too many)."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    if n_classes > 12:
        fig.text(
            0.01,
            0.005,
            f"labels and prediction: {n_classes} classes, one colour each "
            f"from '{cmap}' (colours repeat)",
            fontsize=7,
            ha="left",
            va="bottom",
        )
        return
    colours = colormaps[cmap]
    norm = Normalize(vmin=0, vmax=max(n_classes - 1, 1))
    handles = [Patch(color=colours(norm(k)), label=str(class_names[k])) for k in range(n_classes)]
    fig.legend(
        handles=handles,
        loc="outside lower left",
        ncols=min(n_classes, 6),
        fontsize=7,
        frameon=False,
        title="classes (labels, prediction)",
        title_fontsize=7,
    )


def plot_segmentation_examples(
    *,
    images,
    labels,
    probs: Mapping[str, Any],
    class_names: Sequence[str],
    p_correct=None,
    temperature=None,
    rows: int | None = None,
    row_labels: Sequence[str] | None = None,
    note: str | None = None,
    ignore_index: int = 255,
    flag_below: float = 0.5,
    panel_size: float = 2.1,
):
    """Example images, one row each: the maps behind a calibration, side by side.

    Columns: the image; the labels and the network's prediction (class colours
    in a legend); the top-label confidence under each method of ``probs``; the
    difference of the last two confidences (red: the later method is more
    confident; blue: less); the errors (argmax != label, ignored pixels grey);
    with ``p_correct`` the detector's P(correct); with ``temperature`` the
    per-pixel temperature (log scale; a map that is one value everywhere says
    so instead of stretching a colour bar over rounding noise).

    Parameters
    ----------
    images : array of shape (N, 1, H, W) or (N, H, W)
    labels : array of shape (N, H, W)
    probs : mapping of str to array of shape (N, C, H, W)
        Probabilities of each method, in column order; the first one's argmax
        is the prediction.
    class_names : sequence of str
    p_correct, temperature : array of shape (N, H, W), optional
    rows : int, optional
        How many images to show (default: all).
    row_labels : sequence of str, optional
        One label per row (e.g. "in-domain, slice 40", "shifted, slice 40").
    note : str, optional
        A line under the title, e.g. what a method's panels really show.
    ignore_index : int, default=255
    flag_below : float, default=0.5
        The detector's flag threshold, named in its column title.
    panel_size : float, default=2.1
        Inches per panel.

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.features import softmax
    >>> from sksegcal.plotting import plot_segmentation_examples
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(2, 3, 8, 8))
    >>> fig = plot_segmentation_examples(
    ...     images=rng.random((2, 8, 8)), labels=rng.integers(0, 3, (2, 8, 8)),
    ...     probs={"raw": softmax(z), "T=2": softmax(z / 2)}, class_names=["a", "b", "c"],
    ...     row_labels=["first", "second"])
    >>> [ax.get_ylabel() for ax in fig.axes[:8:7]]  # the first column of each row
    ['first', 'second']
    """
    from matplotlib.colors import ListedColormap, LogNorm, TwoSlopeNorm
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    Figure = _figure_cls()
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    n = len(images) if rows is None else min(rows, len(images))
    if row_labels is not None and len(row_labels) < n:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n} rows.")
    n_classes = len(class_names)
    cmap = "tab20" if n_classes > 10 else "viridis"
    names = list(probs)
    first = np.asarray(probs[names[0]])
    preds = first[:n].argmax(axis=1)
    conf = {m: np.asarray(p)[:n].max(axis=1) for m, p in probs.items()}
    cols = ["image", "labels", "prediction"] + [f"confidence:\n{m}" for m in names]
    diff = None
    if len(names) >= 2:
        diff = conf[names[-1]] - conf[names[-2]]
        cols.append(f"confidence difference:\n{names[-1]} \u2212 {names[-2]}")
    cols.append("errors\n(argmax \u2260 label)")
    if p_correct is not None:
        cols.append(f"detector P(correct)\n(flag < {flag_below:g})")
    t_norm, t_constant = None, None
    if temperature is not None:
        t = np.asarray(temperature[:n], dtype=np.float64)
        t = t[np.isfinite(t) & (t > 0)]
        lo, hi = (float(t.min()), float(t.max())) if t.size else (1.0, 10.0)
        if hi <= lo * 1.01:  # one temperature everywhere: no colour scale of rounding noise
            t_constant = float(np.median(t)) if t.size else 1.0
            lo, hi = t_constant / 2, t_constant * 2
        t_norm = LogNorm(vmin=lo, vmax=max(hi, lo * 1.01))
        cols.append("temperature T = 1/beta\n(log scale)")
    error_cmap = ListedColormap(["#1b1b1b", "#e8432e", "#a0a0a0"])
    fig = Figure(figsize=(panel_size * len(cols), 2.3 * n + 1.4), layout="constrained")
    axes = fig.subplots(n, len(cols), squeeze=False)
    d_max = 0.01
    if diff is not None:
        d_max = max(float(np.nanmax(np.abs(diff))), 0.01)
    for r in range(n):
        lab = np.asarray(labels[r])
        shown = np.ma.masked_equal(lab, ignore_index)
        panels = [
            (images[r], "gray", {}),
            (shown, cmap, dict(vmin=0, vmax=n_classes - 1)),
            (preds[r], cmap, dict(vmin=0, vmax=n_classes - 1)),
        ]
        panels += [(conf[m][r], "magma", dict(vmin=1.0 / n_classes, vmax=1.0)) for m in names]
        if diff is not None:
            panels.append((diff[r], "RdBu_r", dict(norm=TwoSlopeNorm(0.0, -d_max, d_max))))
        errors = (preds[r] != lab).astype(np.int8)
        errors[lab == ignore_index] = 2
        panels.append((errors, error_cmap, dict(vmin=-0.5, vmax=2.5)))
        if p_correct is not None:
            panels.append((p_correct[r], "RdYlGn", dict(vmin=0.0, vmax=1.0)))
        if temperature is not None:
            panels.append(
                (np.clip(temperature[r], t_norm.vmin, t_norm.vmax), "cividis", dict(norm=t_norm))
            )
        for c, (img, cm, kw) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cm, interpolation="nearest", **kw)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=7.5)
            if c == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if cols[c].startswith("temperature") and t_constant is not None:
                ax.text(
                    0.5,
                    0.04,
                    f"T = {t_constant:.3g} everywhere",
                    transform=ax.transAxes,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="white",
                )
            if r == n - 1 and c >= 3:
                bar = fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
                bar.ax.tick_params(labelsize=6.5)
                if cols[c].startswith("errors"):
                    bar.set_ticks([0, 1, 2], labels=["correct", "error", "ignored"])
                if cols[c].startswith("confidence difference"):
                    bar.set_ticks(
                        [-d_max, 0.0, d_max], labels=[f"{-d_max:+.2g}", "0", f"{d_max:+.2g}"]
                    )
                if kw.get("norm") is t_norm and t_norm is not None:
                    bar.ax.xaxis.set_minor_formatter(NullFormatter())
                    bar.ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
                    ticks = (
                        [t_constant]
                        if t_constant is not None
                        else np.geomspace(t_norm.vmin, t_norm.vmax, 4)
                    )
                    bar.set_ticks(ticks)
    _class_legend(fig, cmap, n_classes, class_names)
    if note:
        fig.suptitle(note, fontsize=9, color="#b22222")
    return fig
