"""From the fixed grid of fine confidence bins to coarse bins, and calibration errors.

Pure functions of the accumulator's float64 tallies (weight, confidence sum,
correct weight per fine bin): they never see a pixel.
"""

from __future__ import annotations

import numpy as np

from ._inputs import check_n_bins

# Default resolution of the fixed confidence grid. 3600 is divisible by every
# common bin count (2-6, 8-10, 12, 15, 16, 18, 20, 24, 25, 30, 36, 40, 45, 50,
# 60, 75, 90, 100, ...), so equal-width bins built from it are exact.
DEFAULT_BASE_BINS = 3600


def base_bins_for(n_bins: int) -> int:
    """A fine grid that ``n_bins`` divides, so that equal-width bins are exact."""
    n_bins = check_n_bins(n_bins)
    if DEFAULT_BASE_BINS % n_bins == 0:
        return DEFAULT_BASE_BINS
    return n_bins * max(1, DEFAULT_BASE_BINS // n_bins)


def _fine_to_coarse_uniform(n_fine: int, n_bins: int) -> np.ndarray:
    """Map fine bins to ``n_bins`` equal-width bins.

    Exact when ``n_fine % n_bins == 0``; otherwise each fine bin goes to the
    coarse bin holding its midpoint (edges off by at most ``1 / n_fine``).
    """
    if n_fine % n_bins == 0:
        return np.arange(n_fine) // (n_fine // n_bins)
    return np.minimum(((np.arange(n_fine) + 0.5) * n_bins / n_fine).astype(np.int64), n_bins - 1)


def _fine_to_coarse_quantile(weight: np.ndarray, n_bins: int) -> np.ndarray:
    """Map fine bins to ~equal-mass bins, row by row for a 2-D ``weight``.

    A fine bin goes to the coarse bin in which the middle of its mass falls,
    so coarse bins are runs of whole fine bins: the edges are the exact
    quantiles rounded to the fine grid (off by at most one fine bin).
    """
    weight = np.atleast_2d(weight)
    total = weight.sum(axis=1, keepdims=True)
    mid = np.cumsum(weight, axis=1) - 0.5 * weight
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(total > 0, mid / np.where(total > 0, total, 1.0), 0.0)
    return np.clip((frac * n_bins).astype(np.int64), 0, n_bins - 1)


def coarsen(stats: np.ndarray, n_bins: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate fine tallies ``stats`` (..., 3, G) into (..., 3, n_bins).

    Returns the coarse stats and the coarse bin edges (..., n_bins + 1) in
    confidence units (for ``quantile``, edges of empty bins repeat).
    """
    *lead, three, n_fine = stats.shape
    n_bins = check_n_bins(n_bins)
    if n_bins > n_fine:
        raise ValueError(
            f"n_bins={n_bins} is out of range: it must be between 1 and the base grid "
            f"resolution n_base_bins={n_fine}."
        )
    flat = stats.reshape(-1, three, n_fine)
    k = flat.shape[0]
    if strategy == "uniform":
        m = _fine_to_coarse_uniform(n_fine, n_bins)
        maps = np.broadcast_to(m, (k, n_fine))
        edges = np.broadcast_to(np.linspace(0.0, 1.0, n_bins + 1), (k, n_bins + 1))
    elif strategy == "quantile":
        maps = _fine_to_coarse_quantile(flat[:, 0, :], n_bins)
        # left edge of coarse bin j = left edge of its first fine bin
        edges = np.empty((k, n_bins + 1))
        fine_edges = np.arange(n_fine + 1) / n_fine
        for r in range(k):
            first = np.searchsorted(maps[r], np.arange(n_bins), side="left")
            edges[r, :n_bins] = fine_edges[first]
        edges[:, n_bins] = 1.0
    else:
        raise ValueError(f"strategy must be 'uniform' or 'quantile'; got {strategy!r}.")
    offs = (np.arange(k) * n_bins)[:, None]
    idx = (maps + offs).ravel()
    out = np.empty((k, three, n_bins))
    for s in range(three):
        out[:, s, :] = np.bincount(
            idx, weights=flat[:, s, :].ravel(), minlength=k * n_bins
        ).reshape(k, n_bins)
    return out.reshape(*lead, three, n_bins), edges.reshape(*lead, n_bins + 1)


def ce_from_bins(stats: np.ndarray, norm: str):
    """Calibration error from coarse (..., 3, B) tallies: weight, confidence sum, hits."""
    w, s, h = stats[..., 0, :], stats[..., 1, :], stats[..., 2, :]
    total = w.sum(axis=-1)
    gap = np.abs(h - s)  # = w * |acc - conf|
    with np.errstate(invalid="ignore", divide="ignore"):
        if norm == "l1":
            return gap.sum(axis=-1) / total
        if norm == "l2":
            return np.sqrt(np.where(w > 0, gap**2 / np.where(w > 0, w, 1), 0).sum(-1) / total)
        if norm == "max":
            return np.where(w > 0, gap / np.where(w > 0, w, 1), -np.inf).max(axis=-1)
    raise ValueError(f"norm must be 'l1', 'l2' or 'max'; got {norm!r}.")
