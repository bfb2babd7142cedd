"""The spatial context features of one 3-D volume: the 2-D features with 3-D windows.

:func:`sksegcal.context.image_context` calls :func:`volume_context` for a
``(C, D, H, W)`` volume. The columns are those of
:data:`sksegcal.context.CONTEXT_FEATURES`, each window grown by the depth axis:

``disagree_3x3``, ``disagree_7x7``
    The share of the voxel's in-volume neighbours in its 3x3x3 (26 others) or
    7x7x7 (342 others) window whose predicted class differs from its own.
``boundary_distance``
    The Euclidean distance, in voxels, to the nearest predicted-boundary voxel
    (another predicted class among its 26 neighbours), clipped at
    ``max_distance``.
``entropy_mean_5x5``, ``entropy_max_5x5``, ``margin_mean_5x5``
    Mean and maximum over the 5x5x5 window.

As in 2-D, windows are cut at the volume's faces (only in-volume voxels
count, nothing is padded in) and the features read the logits alone. Voxels
are assumed isotropic: anisotropic spacing is not taken into account. NumPy
and SciPy only (no compiled path): the window operations are separable sums
and maxima, the distance SciPy's exact Euclidean distance transform.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._validation import check_finite

__all__ = ["volume_context"]


def _window_counts(n: int, radius: int) -> np.ndarray:
    i = np.arange(n)
    return (np.minimum(i + radius, n - 1) - np.maximum(i - radius, 0) + 1).astype(np.int64)


def _in_volume(shape: tuple[int, int, int], radius: int) -> np.ndarray:
    """In-volume voxels of each voxel's (2r+1)^3 window, itself included."""
    d, h, w = (_window_counts(n, radius) for n in shape)
    return d[:, None, None] * h[None, :, None] * w[None, None, :]


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum over each voxel's window, the outside counting 0 (float64, separable)."""
    out = values.astype(np.float64)
    for axis in range(3):
        out = ndimage.uniform_filter1d(out, 2 * radius + 1, axis=axis, mode="constant") * (
            2 * radius + 1
        )
    return out


def _same_counts(pred: np.ndarray, radius: int) -> np.ndarray:
    """How many in-volume neighbours (centre excluded) hold the centre's class."""
    d, h, w = pred.shape
    r = radius
    outside = np.iinfo(np.int32).min  # a code no class has
    padded = np.full((d + 2 * r, h + 2 * r, w + 2 * r), outside, dtype=np.int32)
    padded[r : r + d, r : r + h, r : r + w] = pred
    same = np.zeros(pred.shape, dtype=np.int32)
    for dz in range(-r, r + 1):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                if dz == dy == dx == 0:
                    continue
                shifted = padded[r + dz : r + dz + d, r + dy : r + dy + h, r + dx : r + dx + w]
                same += shifted == pred
    return same


def volume_context(z: np.ndarray, max_distance: float, out: np.ndarray | None = None):
    """The (K, D, H, W) float32 context features of one (C, D, H, W) float volume ``z``."""
    from .context import CONTEXT_FEATURES, _pixel_stats

    n_classes, d, h, w = z.shape
    shape = (len(CONTEXT_FEATURES), d, h, w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.shape}.")
    pred, entropy, margin = _pixel_stats(z.reshape(n_classes, -1), compiled=False)
    if not (np.isfinite(entropy).all() and np.isfinite(margin).all()):
        check_finite(z, where="logits")
    pred, entropy, margin = (a.reshape(d, h, w) for a in (pred, entropy, margin))
    boundary = None
    for k, r in enumerate((1, 3)):
        neighbours = _in_volume((d, h, w), r) - 1
        differ = neighbours - _same_counts(pred, r)
        if r == 1:
            boundary = differ > 0
        share = np.zeros((d, h, w), dtype=np.float32)
        np.divide(differ, neighbours, out=share, where=neighbours > 0, casting="unsafe")
        out[k] = share
    if boundary.any():
        distance = ndimage.distance_transform_edt(~boundary)
        out[2] = np.minimum(distance, max_distance)
    else:
        out[2] = max_distance
    counts = _in_volume((d, h, w), 2)
    out[3] = _box_sum(entropy, 2) / counts
    # edge replication puts only in-volume values into the window: the cut window's max
    out[4] = ndimage.maximum_filter(entropy, size=5, mode="nearest")
    out[5] = _box_sum(margin, 2) / counts
    return out
