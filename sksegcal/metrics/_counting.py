"""One validated chunk -> its tallies, on the compiled path or the NumPy path.

Both paths compute the same :class:`Tallies` (to float rounding): the compiled
one (numba, :mod:`sksegcal._kernels`) in one pass over the rows, the NumPy one
in a few vectorised passes. Nothing here touches an accumulator: the caller
adds the tallies only when the whole chunk went through (an update is all or
nothing). ``SKSEGCAL_DISABLE_NUMBA=1`` or ``sksegcal._kernels.HAVE_NUMBA =
False`` forces NumPy; ``classwise=True`` always uses it.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import NamedTuple

import numpy as np

from .._kernels import argmax_rows, can_tally, shifted_exp, softmax_stats, tally
from ._inputs import (
    _NON_FINITE_LOGITS,
    Chunk,
    label_probabilities,
    nll_clip,
    row_sum_tolerance,
)


class Settings(NamedTuple):
    """What of an accumulator's configuration the counting needs."""

    n_classes: int
    ignore_index: int | None
    n_base_bins: int
    classwise: bool
    per_image_n_bins: int
    check_input: bool


class Tallies(NamedTuple):
    """The float64 tallies of one chunk's kept pixels."""

    top: np.ndarray  # (3, n_base_bins): weight, sum of w * confidence, sum of w * correct
    confusion: np.ndarray  # (C, C)
    nll: float
    brier: float
    weight: float
    pixels: int
    classwise: np.ndarray | None  # (C, 3, n_base_bins)
    images: tuple[list[Hashable], np.ndarray] | None  # keys, (3, len(keys), per_image_n_bins)


class Counted(NamedTuple):
    """A chunk's tallies, and with regions those of each region (in region order)."""

    pool: Tallies
    regions: list[Tallies] | None


# ---------------------------------------------------------------------------
# probabilities
# ---------------------------------------------------------------------------


def count_probabilities(chunk: Chunk, y_pred, s: Settings, regions=None) -> Counted:
    """Tallies of a chunk of probabilities (``y_pred``: given predictions or None).

    ``regions``: None or ``(codes, n_regions)``, each row's region code in
    ``[0, n_regions)``; the regions' tallies come beside the chunk's.
    """
    p, rows, yv = chunk.x, chunk.rows, chunk.yv
    n, c = p.shape
    if not s.classwise and can_tally(p):
        return _split_compiled(chunk, p, y_pred, s, None, regions)
    # Passes over the (n, C) chunk: argmax (unless given) and sum of squares
    # (plus, when checking, the row sums and one global min). Everything after
    # works on n-vectors.
    pred_all = argmax_rows(p) if y_pred is None else y_pred
    sumsq_all = np.einsum("ij,ij->i", p, p)
    pred = pred_all if rows is None else pred_all[rows]
    flat = p.reshape(-1)
    base = np.arange(n, dtype=np.int64) * c if rows is None else rows * c
    conf32 = flat[base + pred]
    py32 = flat[base + yv]
    sumsq = (sumsq_all if rows is None else sumsq_all[rows]).astype(np.float64)
    if s.check_input:
        _check_probs(p, rows, conf32, sumsq, chunk.precision)
    py = py32.astype(np.float64)
    nll = -np.log(np.maximum(_wide_label_probs(chunk, n, py), nll_clip(chunk.precision)))
    return _split_numpy(chunk, s, regions, pred, conf32.astype(np.float64), py, nll, sumsq, p)


def _wide_label_probs(chunk: Chunk, n: int, py: np.ndarray) -> np.ndarray:
    # the float32 copy cannot hold a float64 input's p(label) below ~1e-38
    return py if chunk.source is None else label_probabilities(chunk, n)


def _check_probs(p, rows, conf32, sumsq, precision) -> None:
    # NaN/inf propagate into the sum of squares and the argmax picks NaN,
    # so finiteness needs no extra pass over the chunk.
    if not (np.isfinite(sumsq).all() and np.isfinite(conf32).all()):
        raise ValueError("y_prob contains NaN or infinite values (in non-ignored pixels).")
    # A global min over contiguous memory is cheap; only when it is
    # negative are the non-ignored rows looked at one by one.
    if p.size and p.min() < 0:
        pv = p if rows is None else p[rows]
        rmin = float(pv.min())
    else:
        rmin = 0.0
    _check_prob_range(rmin, float(conf32.max()))
    rsum = np.einsum("ij->i", p)
    if rows is not None:
        rsum = rsum[rows]
    _check_row_sums(float(np.abs(rsum - 1.0).max()), precision)


def _check_prob_range(lowest: float, highest: float) -> None:
    if highest > 1.0 + 1e-6 or lowest < 0:
        raise ValueError(
            f"y_prob must be probabilities in [0, 1]; got values in [{lowest:.4g}, "
            f"{highest:.4g}]. Pass softmax(logits), not logits."
        )


def _check_row_sums(worst: float, precision: str) -> None:
    atol = row_sum_tolerance(precision)
    if worst > atol:
        raise ValueError(
            f"Rows of y_prob must sum to 1; the largest deviation is {worst:.3g} "
            f"(tolerance {atol} for {precision} input). Pass normalised probabilities "
            "(softmax over classes)."
        )


# ---------------------------------------------------------------------------
# logits
# ---------------------------------------------------------------------------


def count_logits(chunk: Chunk, beta: np.ndarray, y_pred, s: Settings, regions=None) -> Counted:
    """Tallies of ``softmax(beta * logits)``; the NLL is exact (no clip).

    ``regions`` as in :func:`count_probabilities`.

    ``-log p_y = log(sum_k exp(d_k)) - d_y`` with ``d = beta * (z - max z)``:
    the normaliser comes from the exponentials, ``d_y`` from the logits, so a
    label probability that underflows float32 still counts in full.
    """
    z, rows, yv = chunk.x, chunk.rows, chunk.yv
    n, c = z.shape
    if not s.classwise and can_tally(z):
        pred_all, e = shifted_exp(z, beta, reuse=True, pred=y_pred)
        return _split_compiled(chunk, e, pred_all, s, (z, beta), regions)
    pred, e, total_all, squares = softmax_stats(z, beta, pred=y_pred)
    total = total_all
    if rows is not None:
        pred, total, squares = pred[rows], total_all[rows], squares[rows]
    # a NaN or +inf logit makes its row's sums NaN (-inf is a probability of 0)
    if not (np.isfinite(total).all() and np.isfinite(squares).all()):
        raise ValueError(_NON_FINITE_LOGITS)
    inv_total = 1.0 / total
    base = np.arange(n, dtype=np.int64) * c if rows is None else rows * c
    flat = e.reshape(-1)
    # probabilities in the working dtype, as update() would see them
    conf = (flat[base + pred] * inv_total).astype(z.dtype).astype(np.float64)
    py = (flat[base + yv] * inv_total).astype(z.dtype).astype(np.float64)
    nll = np.log(total) - _label_gap(z, beta, rows, yv, pred, base)
    sumsq = squares * inv_total**2
    probs = e / total_all[:, None].astype(e.dtype) if s.classwise else None
    return _split_numpy(chunk, s, regions, pred, conf, py, nll, sumsq, probs)


def _label_gap(z, beta, rows, yv, pred, base) -> np.ndarray:
    """float64 ``beta * (z_y - z_pred)`` of the kept rows (``z_pred`` is the row max)."""
    flat = z.reshape(-1)
    gap = flat[base + yv].astype(np.float64) - flat[base + pred].astype(np.float64)
    b = beta.astype(np.float64)
    if b.size > 1:
        b = b if rows is None else b[rows]
    return gap * b


# ---------------------------------------------------------------------------
# regions: the same counting on each region's rows
# ---------------------------------------------------------------------------


def _region_view(chunk: Chunk, codes: np.ndarray, r: int, s: Settings):
    """The chunk restricted to the kept rows of region ``r``, its settings, their selector.

    Rows outside the region get a label the counting skips (the ignore index,
    or -1 when there is none: never a class), so the compiled pass reads the
    same values array; ``sel`` picks the region's rows among the kept rows.
    """
    skip = -1 if s.ignore_index is None else s.ignore_index
    kept = np.arange(chunk.y.size) if chunk.rows is None else chunk.rows
    sel = codes[kept] == r
    rows = kept[sel]
    y = np.full(chunk.y.size, skip, dtype=np.int64)
    y[rows] = chunk.yv[sel]
    sub = chunk._replace(y=y, yv=chunk.yv[sel], rows=rows)
    return sub, s._replace(ignore_index=skip), sel


def _split_compiled(chunk: Chunk, values, pred, s: Settings, logits, regions) -> Counted:
    # The pooled tallies are counted exactly as without regions (the same sums,
    # bit for bit); each region is one more compiled pass over the same values.
    pool = _compiled(chunk, values, pred, s, logits=logits)
    if regions is None:
        return Counted(pool, None)
    codes, n_regions = regions
    parts = []
    for r in range(n_regions):
        sub, sub_s, _ = _region_view(chunk, codes, r, s)
        parts.append(_compiled(sub, values, pred, sub_s, logits=logits))
    return Counted(pool, parts)


def _split_numpy(chunk: Chunk, s: Settings, regions, pred, conf, py, nll, sumsq, probs) -> Counted:
    # the per-row quantities are computed once; only the binning runs per region
    pool = _numpy(chunk, s, pred, conf, py, nll, sumsq, probs)
    if regions is None:
        return Counted(pool, None)
    codes, n_regions = regions
    parts = []
    for r in range(n_regions):
        sub, _, sel = _region_view(chunk, codes, r, s)
        parts.append(_numpy(sub, s, pred[sel], conf[sel], py[sel], nll[sel], sumsq[sel], probs))
    return Counted(pool, parts)


# ---------------------------------------------------------------------------
# the two back-ends
# ---------------------------------------------------------------------------


def _compiled(chunk: Chunk, values, pred, s: Settings, *, logits) -> Tallies:
    """One compiled pass over probabilities, or with ``logits`` over shifted exps."""
    normalise = logits is not None
    keys, codes = chunk.ids if chunk.ids is not None else ([None], None)
    top, cm, img, row_values, sums, check = tally(
        values,
        normalise=normalise,
        pred=pred,
        y=chunk.y,
        ignore_index=s.ignore_index,
        weights=chunk.w,
        codes=codes,
        n_keys=len(keys),
        n_bins=s.n_base_bins,
        n_image_bins=s.per_image_n_bins,
    )
    lo, hi, worst_sum, non_finite = check
    if non_finite:
        raise ValueError(
            _NON_FINITE_LOGITS
            if normalise
            else "y_prob contains NaN or infinite values (in non-ignored pixels)."
        )
    if s.check_input and not normalise:
        _check_prob_range(lo, hi)
        _check_row_sums(worst_sum, chunk.precision)
    rows = chunk.rows
    kept = row_values if rows is None else row_values[rows]
    n, c = values.shape
    if normalise:  # kept holds the row sums of exp(d)
        z, beta = logits
        base = np.arange(n, dtype=np.int64) * c if rows is None else rows * c
        kept_pred = pred if rows is None else pred[rows]
        nll = np.log(kept) - _label_gap(z, beta, rows, chunk.yv, kept_pred, base)
    else:  # kept holds p(label)
        py = _wide_label_probs(chunk, n, kept)
        nll = -np.log(np.maximum(py, nll_clip(chunk.precision)))
    wv = None if chunk.w is None else (chunk.w if rows is None else chunk.w[rows])
    return Tallies(
        top=top,
        confusion=cm,
        nll=float(nll.sum() if wv is None else nll @ wv),
        brier=float(sums[0]),
        weight=float(sums[1]),
        pixels=int(sums[2]),
        classwise=None,
        images=None if chunk.ids is None else (keys, img),
    )


def _numpy(chunk: Chunk, s: Settings, pred, conf, py, nll, sumsq, probs) -> Tallies:
    """The kept pixels' tallies from their prediction, confidence, p(label), NLL, sum p**2."""
    c = s.n_classes
    yv, rows, w = chunk.yv, chunk.rows, chunk.w
    wv = None if w is None else (w if rows is None else w[rows])
    correct = pred == yv

    g = s.n_base_bins
    # conf (float32, 24-bit mantissa) * g (< 2**29) is exact in float64, so
    # the floor is the exact bin: coarse equal-width bins that divide the
    # grid agree exactly with binning the raw confidence directly.
    fine = np.minimum((conf * g).astype(np.int64), g - 1)
    hits_split = np.bincount(2 * fine + correct, weights=wv, minlength=2 * g).reshape(g, 2)
    top = np.empty((3, g))
    top[0] = hits_split.sum(axis=1)
    top[1] = np.bincount(fine, weights=conf if wv is None else conf * wv, minlength=g)
    top[2] = hits_split[:, 1]

    brier = sumsq - 2.0 * py + 1.0
    cm = np.bincount(yv * c + pred, weights=wv, minlength=c * c).reshape(c, c)
    if wv is None:
        sums = float(nll.sum()), float(brier.sum()), float(yv.size)
    else:
        sums = float(nll @ wv), float(brier @ wv), float(wv.sum())

    cls = None
    if s.classwise:
        cls = _classwise(probs if rows is None else probs[rows], yv, wv, g)
    images = None
    if chunk.ids is not None:
        keys, codes = chunk.ids
        if codes is not None and rows is not None:
            codes = codes[rows]
        images = keys, _image_tallies(len(keys), codes, conf, correct, wv, s.per_image_n_bins)
    return Tallies(top, cm.astype(np.float64), *sums, int(yv.size), cls, images)


def _classwise(pv, yv, wv, g) -> np.ndarray:
    n, c = pv.shape
    pv64 = pv.astype(np.float64)
    fine = np.minimum((pv64 * g).astype(np.int64), g - 1)
    fine += (np.arange(c, dtype=np.int64) * g)[None, :]
    flat = fine.ravel()
    if wv is None:
        cnt = np.bincount(flat, minlength=c * g)
        psum = np.bincount(flat, weights=pv64.ravel(), minlength=c * g)
    else:
        cnt = np.bincount(flat, weights=np.repeat(wv, c), minlength=c * g)
        psum = np.bincount(flat, weights=(pv64 * wv[:, None]).ravel(), minlength=c * g)
    lab = np.bincount(fine[np.arange(yv.size), yv], weights=wv, minlength=c * g)
    out = np.empty((c, 3, g))
    out[:, 0, :] = cnt.reshape(c, g)
    out[:, 1, :] = psum.reshape(c, g)
    out[:, 2, :] = lab.reshape(c, g)
    return out


def _image_tallies(k, codes, conf, correct, wv, b) -> np.ndarray:
    bins = np.minimum((conf * b).astype(np.int64), b - 1)
    w = np.ones_like(conf) if wv is None else wv
    inv = np.zeros(conf.size, dtype=np.int64) if codes is None else codes
    idx = inv * b + bins
    return np.stack(
        [
            np.bincount(idx, weights=w, minlength=k * b),
            np.bincount(idx, weights=w * conf, minlength=k * b),
            np.bincount(idx, weights=w * correct, minlength=k * b),
        ],
        axis=0,
    ).reshape(3, k, b)
