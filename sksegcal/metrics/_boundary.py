"""Boundary pixels of label maps, and calibration on the boundary band against the interior.

Segmentation errors sit on boundaries: the selective-scaling paper (Wang et al.,
CVPR 2023) finds per-image ECE about three times higher within a few pixels of
a label change than in the interior. :func:`boundary_mask` marks that band;
``CalibrationAccumulator(regions=BOUNDARY_REGIONS)`` keeps a second set of
tallies per band, and :func:`boundary_accumulator` fills one straight from
``(N, C, H, W)`` maps and ``(N, H, W)`` labels.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from ._accumulator import CalibrationAccumulator
from ._inputs import is_tensor

#: The two regions of a boundary study, in the order a boolean mask selects them:
#: ``True`` (a :func:`boundary_mask` pixel) is ``"boundary"``, ``False`` is ``"interior"``.
BOUNDARY_REGIONS: tuple[str, str] = ("boundary", "interior")

#: Default band width in pixels (the paper's "a few pixels of a label change").
DEFAULT_BOUNDARY_WIDTH = 2

_DISTANCES = ("chebyshev", "euclidean")


def _check_width(width: Any) -> int:
    if isinstance(width, (bool, np.bool_)) or not isinstance(width, numbers.Integral):
        raise ValueError(f"width must be an int >= 1 (pixels); got {width!r}.")
    if width < 1:
        raise ValueError(f"width must be an int >= 1 (pixels); got {width!r}.")
    return int(width)


def _footprint(width: int, distance: str) -> np.ndarray:
    """The window of offsets ``(dy, dx)`` within ``width`` pixels, as a boolean array."""
    r = np.arange(-width, width + 1)
    if distance == "chebyshev":
        return np.ones((r.size, r.size), dtype=bool)
    if distance == "euclidean":
        return r[:, None] ** 2 + r[None, :] ** 2 <= width**2
    raise ValueError(f"distance must be one of {_DISTANCES}; got {distance!r}.")


def boundary_mask(
    labels: Any,
    *,
    width: int = DEFAULT_BOUNDARY_WIDTH,
    ignore_index: int | None = 255,
    distance: str = "chebyshev",
) -> np.ndarray:
    """Pixels within ``width`` pixels of a pixel with another label.

    A labelled pixel ``p`` is a boundary pixel when some pixel ``q`` of the
    same image with ``dist(p, q) <= width`` carries a different label, both
    labels not ``ignore_index``. Ignored pixels are never boundary pixels and
    do not make their neighbours boundary pixels (an unlabelled margin is not
    a label change); the image border is not a label change either (the window
    is clipped to the image). The interior is every other labelled pixel,
    i.e. ``~mask & (labels != ignore_index)``.

    Parameters
    ----------
    labels : array-like of shape (H, W) or (N, H, W)
        Integer label maps (NumPy array or torch tensor); with three
        dimensions each image is treated on its own.
    width : int, default=2
        Band half-width in pixels (>= 1).
    ignore_index : int or None, default=255
        Label of unlabelled pixels; ``None`` treats every value as a label.
    distance : {"chebyshev", "euclidean"}, default="chebyshev"
        ``"chebyshev"``: ``max(|dy|, |dx|) <= width``, a ``(2 width + 1)``
        square (the same band as eroding each class mask ``width`` times with
        a 3 x 3 square, as Boundary IoU does); ``"euclidean"``:
        ``dy**2 + dx**2 <= width**2``, a disk (width 1 is the 4-neighbourhood).

    Returns
    -------
    mask : ndarray of bool, the shape of ``labels``

    Notes
    -----
    Two morphological filters per call (:func:`scipy.ndimage.maximum_filter`
    and ``minimum_filter`` over the labels, ignored pixels set just below and
    just above every label): a labelled pixel lies on the boundary exactly when the
    largest and smallest label in its window differ. Separable for the
    Chebyshev square, so the cost does not grow with ``width``.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import boundary_mask
    >>> labels = np.zeros((4, 6), dtype=np.uint8)
    >>> labels[:, 3:] = 1
    >>> labels[0, 0] = 255
    >>> boundary_mask(labels, width=1).astype(int)
    array([[0, 0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0, 0],
           [0, 0, 1, 1, 0, 0]])
    """
    from scipy import ndimage

    width = _check_width(width)
    _footprint(1, distance)  # checks distance
    lab = labels.detach().cpu().numpy() if is_tensor(labels) else np.asarray(labels)
    if lab.dtype.kind not in "biu":
        raise TypeError(
            f"labels must hold integer class indices; got dtype {lab.dtype}. Pass the "
            "label maps, not probabilities."
        )
    if lab.ndim not in (2, 3):
        raise ValueError(
            f"labels must be one (H, W) or several (N, H, W) label maps; got shape {lab.shape}."
        )
    if ignore_index is not None and not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None; got {ignore_index!r}.")
    valid = np.ones(lab.shape, dtype=bool) if ignore_index is None else lab != ignore_index
    if not valid.any():
        return valid
    # Ignored pixels become one below / above every label (not the dtype's extremes:
    # ndimage's separable passes do not keep int64's extremes exact)
    lo, hi = int(lab[valid].min()) - 1, int(lab[valid].max()) + 1
    small = np.iinfo(np.int32)
    x = lab.astype(np.int32 if small.min <= lo and hi <= small.max else np.int64)
    # no two pixels of an image are farther apart than (H - 1) + (W - 1) (Chebyshev or
    # Euclidean): a wider band is the same band, and its window would only cost memory
    width = min(width, max(1, lab.shape[-2] + lab.shape[-1] - 2))
    square = distance == "chebyshev"
    # the square window is passed by its size: its footprint array is never built
    footprint = np.ones((1, 1), bool) if square else _footprint(width, distance)
    side = (2 * width + 1, 2 * width + 1)
    if lab.ndim == 3:  # one image at a time: no window reaches into the next image
        footprint, side = footprint[None], (1, *side)
    kw = {"size": side} if square else {"footprint": footprint}
    # "nearest" repeats the edge pixels, which the clipped window already holds
    high = ndimage.maximum_filter(np.where(valid, x, lo), mode="nearest", **kw)
    low = ndimage.minimum_filter(np.where(valid, x, hi), mode="nearest", **kw)
    return valid & (high != low)


def boundary_accumulator(
    y_true: Any,
    y_prob: Any = None,
    *,
    logits: Any = None,
    temperature: Any = 1.0,
    width: int = DEFAULT_BOUNDARY_WIDTH,
    distance: str = "chebyshev",
    ignore_index: int | None = 255,
    image_id: Any = None,
    **accumulator_params: Any,
) -> CalibrationAccumulator:
    """A :class:`CalibrationAccumulator` of label maps with boundary and interior tallies.

    The mask is :func:`boundary_mask` of ``y_true``; the accumulator has
    ``regions=BOUNDARY_REGIONS``, so ``acc.region("boundary")`` and
    ``acc.region("interior")`` give every metric of either band (pooled and
    per image) beside the pooled ones of ``acc``. Feed more maps with
    ``acc.update(y, p, region=boundary_mask(y, width=...))`` or merge
    accumulators of other batches.

    Parameters
    ----------
    y_true : array-like of shape (N, H, W) or (H, W)
        Integer labels; ``ignore_index`` pixels are skipped.
    y_prob : array-like of shape (N, C, H, W) or (C, H, W), optional
        Probabilities. Give exactly one of ``y_prob`` and ``logits``.
    logits : array-like of shape (N, C, H, W) or (C, H, W), optional
        Logits, scored as ``softmax(logits / temperature)`` without
        materialising it (:meth:`CalibrationAccumulator.update_logits`).
    temperature : float or array-like of shape (N, H, W), default=1.0
        With ``logits`` only.
    width, distance
        Of :func:`boundary_mask`.
    ignore_index : int or None, default=255
    image_id : array-like of shape (N,), optional
        One id per image (default: fresh ids), for the per-image ECE.
    **accumulator_params
        Further :class:`CalibrationAccumulator` arguments (``n_bins`` of the
        per-image ECE is ``per_image_n_bins``, ``classwise``, ...).

    Returns
    -------
    acc : CalibrationAccumulator

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.metrics import boundary_accumulator
    >>> rng = np.random.default_rng(0)
    >>> labels = np.zeros((2, 8, 8), dtype=np.uint8)
    >>> labels[:, :, 4:] = 1
    >>> logits = 3.0 * rng.normal(size=(2, 2, 8, 8)).astype(np.float32)
    >>> acc = boundary_accumulator(labels, logits=logits, width=1)
    >>> acc.region("boundary").n_pixels_, acc.region("interior").n_pixels_
    (32, 96)
    >>> s = acc.region_summary()
    >>> s["boundary"]["ece"] >= 0 and s["interior"]["nll"] > 0
    True
    """
    if (y_prob is None) == (logits is None):
        raise ValueError("Give exactly one of y_prob and logits (the (N, C, H, W) maps).")
    values = logits if y_prob is None else y_prob
    values = values if is_tensor(values) else np.asarray(values)
    lab = y_true.detach().cpu().numpy() if is_tensor(y_true) else np.asarray(y_true)
    ndim = len(values.shape)
    if lab.ndim == 2 and ndim == 3:  # one image: (H, W) labels with (C, H, W) maps
        lab, values = lab[None], values[None]
        if np.ndim(temperature) == 2:
            temperature = temperature[None]
    if lab.ndim != 3 or ndim not in (3, 4):
        raise ValueError(
            "boundary_accumulator takes label maps (N, H, W) with (N, C, H, W) maps; got "
            f"labels of shape {lab.shape}. For pixel tables use CalibrationAccumulator("
            "regions=BOUNDARY_REGIONS).update(y, p, region=mask) with your own mask."
        )
    mask = boundary_mask(lab, width=width, ignore_index=ignore_index, distance=distance)
    n_classes = int(values.shape[1])
    acc = CalibrationAccumulator(
        n_classes, ignore_index=ignore_index, regions=BOUNDARY_REGIONS, **accumulator_params
    )
    if y_prob is None:
        acc.update_logits(lab, values, temperature=temperature, image_id=image_id, region=mask)
    else:
        acc.update(lab, values, image_id=image_id, region=mask)
    return acc
