"""Boundary pixels of label maps, and calibration on the boundary band against the interior.

Segmentation errors sit on boundaries: the selective-scaling paper (Wang et al.,
CVPR 2023) finds per-image ECE about three times higher within a few pixels of
a label change than in the interior. :func:`boundary_mask` marks that band;
``CalibrationAccumulator(regions=BOUNDARY_REGIONS)`` keeps a second set of
tallies per band, and :func:`boundary_accumulator` fills one straight from
``(N, C, H, W)`` maps and ``(N, H, W)`` labels, or ``(N, C, D, H, W)`` volumes
and ``(N, D, H, W)`` labels (the band then a 3-D neighbourhood).
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


def _footprint(width: int, distance: str, spatial_dims: int = 2) -> np.ndarray:
    """The window of offsets (``(dy, dx)`` or ``(dz, dy, dx)``) within ``width`` pixels."""
    r = np.arange(-width, width + 1)
    if distance == "chebyshev":
        return np.ones((r.size,) * spatial_dims, dtype=bool)
    if distance == "euclidean":
        grids = np.meshgrid(*([r] * spatial_dims), indexing="ij", sparse=True)
        return sum(g**2 for g in grids) <= width**2
    raise ValueError(f"distance must be one of {_DISTANCES}; got {distance!r}.")


def _check_spatial_dims(spatial_dims: Any) -> int:
    if isinstance(spatial_dims, (bool, np.bool_)) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes); got {spatial_dims!r}.")
    return int(spatial_dims)


def boundary_mask(
    labels: Any,
    *,
    width: int = DEFAULT_BOUNDARY_WIDTH,
    ignore_index: int | None = 255,
    distance: str = "chebyshev",
    spatial_dims: int = 2,
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
    labels : array-like of shape (H, W) or (N, H, W); (D, H, W) or (N, D, H, W)
        Integer label maps (NumPy array or torch tensor); with a leading
        batch axis each image (volume) is treated on its own.
    width : int, default=2
        Band half-width in pixels (>= 1).
    ignore_index : int or None, default=255
        Label of unlabelled pixels; ``None`` treats every value as a label.
    distance : {"chebyshev", "euclidean"}, default="chebyshev"
        ``"chebyshev"``: ``max(|dy|, |dx|) <= width``, a ``(2 width + 1)``
        square (the same band as eroding each class mask ``width`` times with
        a 3 x 3 square, as Boundary IoU does); ``"euclidean"``:
        ``dy**2 + dx**2 <= width**2``, a disk (width 1 is the 4-neighbourhood).
        For volumes the same in three axes: a cube, or a ball (width 1 is the
        6-neighbourhood).
    spatial_dims : {2, 3}, default=2
        2: labels are images, (H, W) or (N, H, W). 3: labels are volumes,
        (D, H, W) or (N, D, H, W), and the window extends along D too.

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
    spatial_dims = _check_spatial_dims(spatial_dims)
    _footprint(1, distance)  # checks distance
    lab = labels.detach().cpu().numpy() if is_tensor(labels) else np.asarray(labels)
    if lab.dtype.kind not in "biu":
        raise TypeError(
            f"labels must hold integer class indices; got dtype {lab.dtype}. Pass the "
            "label maps, not probabilities."
        )
    if lab.ndim not in (spatial_dims, spatial_dims + 1):
        what = "(H, W) or several (N, H, W)" if spatial_dims == 2 else "(D, H, W) or (N, D, H, W)"
        raise ValueError(
            f"labels must be one {what} label maps (spatial_dims={spatial_dims}); got shape "
            f"{lab.shape}." + (" For volumes pass spatial_dims=3." if lab.ndim == 4 else "")
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
    # no two pixels of an image are farther apart than the sum of its sides less one each
    # (Chebyshev or Euclidean): a wider band is the same band, and its window only costs memory
    span = sum(lab.shape[-spatial_dims:]) - spatial_dims
    width = min(width, max(1, span))
    square = distance == "chebyshev"
    # the square window is passed by its size: its footprint array is never built
    footprint = np.ones((1,) * spatial_dims, bool) if square else _footprint(
        width, distance, spatial_dims
    )
    side = (2 * width + 1,) * spatial_dims
    if lab.ndim == spatial_dims + 1:  # one image at a time: no window reaches the next
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
    y_true : array-like of shape (N, H, W) or (H, W); (N, D, H, W) for volumes
        Integer labels; ``ignore_index`` pixels are skipped. Volumes need the
        batch axis: (N, C, D, H, W) maps with (N, D, H, W) labels, the band
        then a 3-D neighbourhood (``boundary_mask(..., spatial_dims=3)``).
    y_prob : array-like of shape (N, C, H, W) or (C, H, W), optional
        Probabilities (or (N, C, D, H, W)). Give exactly one of ``y_prob`` and
        ``logits``.
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
    if lab.ndim not in (3, 4) or len(values.shape) != lab.ndim + 1:
        raise ValueError(
            "boundary_accumulator takes label maps (N, H, W) with (N, C, H, W) maps, or "
            f"(N, D, H, W) with (N, C, D, H, W) volumes; got labels of shape {lab.shape} and "
            f"maps of shape {tuple(values.shape)}. For pixel tables use CalibrationAccumulator("
            "regions=BOUNDARY_REGIONS).update(y, p, region=mask) with your own mask."
        )
    mask = boundary_mask(
        lab, width=width, ignore_index=ignore_index, distance=distance, spatial_dims=lab.ndim - 1
    )
    n_classes = int(values.shape[1])
    acc = CalibrationAccumulator(
        n_classes, ignore_index=ignore_index, regions=BOUNDARY_REGIONS, **accumulator_params
    )
    if y_prob is None:
        acc.update_logits(lab, values, temperature=temperature, image_id=image_id, region=mask)
    else:
        acc.update(lab, values, image_id=image_id, region=mask)
    return acc
