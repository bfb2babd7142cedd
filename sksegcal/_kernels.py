"""Row kernels of the metrics' hot path, compiled with numba when it is installed.

NumPy reduces short rows (one pixel's C class scores) slowly: an argmax over
(220k, 19) float32 rows takes ~9 ms, where a compiled loop takes ~2 ms, and a
softmax followed by the accumulator's passes reads the chunk five or six
times. numba (``pip install sksegcal[fast]``) compiles small row loops: the
argmax, the shift by the row maximum, the sums and binning of one
accumulator update, and the top-k of the class-agnostic features. The
exponentials stay in NumPy, whose SIMD ``exp`` is ~5x faster than a scalar
loop's (a vectorisable polynomial exp inside the loop was measured and was
not worth its code: docs/store.md). Without numba the same results come from
NumPy (to float rounding), more slowly. ``SKSEGCAL_DISABLE_NUMBA=1`` forces
the NumPy path.
"""

from __future__ import annotations

import os
import threading

import numpy as np

try:
    if os.environ.get("SKSEGCAL_DISABLE_NUMBA", "") not in ("", "0"):
        raise ImportError("disabled by SKSEGCAL_DISABLE_NUMBA")
    import numba
except ImportError:  # pragma: no cover - exercised with SKSEGCAL_DISABLE_NUMBA=1
    numba = None

__all__ = ["HAVE_NUMBA", "argmax_rows", "shifted_exp", "softmax_stats", "tally"]

HAVE_NUMBA = numba is not None


def _numpy_argmax(x: np.ndarray) -> np.ndarray:
    return x.argmax(axis=1)


def _numpy_shift(x: np.ndarray, beta: np.ndarray, out: np.ndarray, pred=None) -> np.ndarray:
    if pred is None:
        pred = x.argmax(axis=1)
    top = np.take_along_axis(x, pred[:, None], axis=1)
    np.subtract(x, top, out=out)
    out *= beta[:, None] if beta.size > 1 else beta[0]
    return pred


def _numpy_sums(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # in the array's dtype (a float64 accumulator makes einsum ~3x slower); each row
    # adds C numbers in [0, 1] with a 1 among them, so float32 loses nothing that shows
    total = np.einsum("ij->i", e).astype(np.float64)
    squares = np.einsum("ij,ij->i", e, e).astype(np.float64)
    return total, squares


if HAVE_NUMBA:
    # cache=True keeps the machine code beside this file (or in NUMBA_CACHE_DIR), so
    # a process compiles each signature once (~0.5 s) and later ones load it
    _jit = numba.njit(cache=True, nogil=True)
    # reassociation lets LLVM vectorise the row sums (otherwise bound by the latency
    # of one chain of additions); no "nnan"/"ninf": the kernels test finiteness
    _jit_sums = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})

    @_jit
    def _numba_argmax(x):  # pragma: no cover - compiled
        n, c = x.shape
        out = np.empty(n, dtype=np.int64)
        for i in range(n):
            best = x[i, 0]
            arg = 0
            for k in range(1, c):
                v = x[i, k]
                if v > best:  # the first of tied maxima, as np.argmax
                    best = v
                    arg = k
            out[i] = arg
        return out

    @_jit
    def _numba_shift(x, beta, out):  # pragma: no cover - compiled
        # out = (x - row max) * beta and the argmax, in one read of x; NaN makes
        # ">" false, so a NaN row keeps a finite "max" and its NaN reaches out
        n, c = x.shape
        pred = np.empty(n, dtype=np.int64)
        per_row = beta.size > 1
        for i in range(n):
            best = x[i, 0]
            arg = 0
            for k in range(1, c):
                v = x[i, k]
                if v > best:
                    best = v
                    arg = k
            pred[i] = arg
            b = beta[i] if per_row else beta[0]
            for k in range(c):
                out[i, k] = (x[i, k] - best) * b
        return pred

    @_jit
    def _numba_shift_given(x, beta, pred, out):  # pragma: no cover - compiled
        # as _numba_shift with the argmax given; returns how many entries lie above
        # their row's x[pred] (0 when pred is an argmax everywhere). Counting rather
        # than branching keeps the loop vectorised; NaN is left to later checks.
        n, c = x.shape
        per_row = beta.size > 1
        above = 0
        for i in range(n):
            top = x[i, pred[i]]
            b = beta[i] if per_row else beta[0]
            for k in range(c):
                d = x[i, k] - top
                above += d > 0
                out[i, k] = d * b
        return above

    @_jit
    def _numba_top_parts(d, e, k):  # pragma: no cover - compiled
        # d = z - row max, e = exp(d): per row the k largest d (descending) and
        # the sums of e and of e * d. The top-k is a branch-free insertion
        # network (max/min down the list): with branches, unpredictable on real
        # scores, the same loop was 3-5x slower.
        n, c = d.shape
        top = np.empty((n, k), dtype=d.dtype)
        total = np.empty(n)
        weighted = np.empty(n)
        lowest = d.dtype.type(-np.inf)
        kept = np.empty(k, dtype=d.dtype)
        for i in range(n):
            kept[:] = lowest
            s = 0.0
            sd = 0.0
            for j in range(c):
                x = d[i, j]
                s += e[i, j]
                sd += np.float64(e[i, j]) * x
                for p in range(k):
                    larger = max(kept[p], x)
                    x = min(kept[p], x)
                    kept[p] = larger
            top[i, :] = kept
            total[i] = s
            weighted[i] = sd
        return top, total, weighted

    @_jit_sums
    def _numba_sums(e):  # pragma: no cover - compiled
        n, c = e.shape
        total = np.empty(n, dtype=np.float64)
        squares = np.empty(n, dtype=np.float64)
        for i in range(n):
            s = 0.0
            ss = 0.0
            for k in range(c):
                v = np.float64(e[i, k])
                s += v
                ss += v * v
            total[i] = s
            squares[i] = ss
        return total, squares


    @_jit_sums
    def _numba_tally(v, normalise, pred, have_pred, y, has_ignore, ignore, w, codes,
                     n_keys, g, b):  # pragma: no cover - compiled
        # One pass over the kept rows: the reliability grid, confusion matrix,
        # Brier sum and per-image grids, into fresh arrays the caller adds to its
        # state only when the checks pass (an update is all or nothing). p(label)
        # goes out per row (1 where ignored) for NumPy's vectorised log.
        n, c = v.shape
        top = np.zeros((3, g))
        cm = np.zeros((c, c))
        img = np.zeros((3, n_keys, b))
        p_label = np.ones(n)
        brier = 0.0
        weight = 0.0
        pixels = 0
        lowest = np.inf
        highest = -np.inf
        worst_sum = 0.0
        non_finite = 0
        weighted = w.size > 0
        per_pixel_ids = codes.size > 0
        for i in range(n):
            yi = y[i]
            if has_ignore and yi == ignore:
                continue
            row = v[i]
            # float32 sums vectorise 8 wide; C numbers in [0, 1] lose nothing that shows
            s = row.dtype.type(0)
            ss = row.dtype.type(0)
            for k in range(c):
                s += row[k]
                ss += row[k] * row[k]
            if not normalise:
                lo = row[0]
                hi = row[0]
                for k in range(1, c):
                    lo = min(lo, row[k])
                    hi = max(hi, row[k])
                lowest = min(lowest, np.float64(lo))
                highest = max(highest, np.float64(hi))
            if have_pred:
                k = pred[i]
            else:
                best = row[0]
                k = 0
                for j in range(1, c):
                    if row[j] > best:
                        best = row[j]
                        k = j
            total = np.float64(s)
            scale = 1.0 / total if normalise else 1.0
            conf = row[k] * scale
            py = row[yi] * scale
            sq = ss * (scale * scale)
            # a NaN or infinite value leaves the sum of squares NaN or infinite (also
            # after scaling: inf * 0 is NaN): count, do not bin
            if not np.isfinite(sq):
                non_finite += 1
                continue
            worst_sum = max(worst_sum, abs(total - 1.0))
            wi = w[i] if weighted else 1.0
            good = wi if k == yi else 0.0
            fine = min(max(int(conf * g), 0), g - 1)
            top[0, fine] += wi
            top[1, fine] += wi * conf
            top[2, fine] += good
            cm[yi, k] += wi
            p_label[i] = py
            brier += wi * (sq - 2.0 * py + 1.0)
            weight += wi
            pixels += 1
            j = codes[i] if per_pixel_ids else 0
            coarse = min(max(int(conf * b), 0), b - 1)
            img[0, j, coarse] += wi
            img[1, j, coarse] += wi * conf
            img[2, j, coarse] += good
        sums = np.array([brier, weight, float(pixels)])
        check = np.array([lowest, highest, worst_sum, float(non_finite)])
        return top, cm, img, p_label, sums, check


def _compiled(x: np.ndarray) -> bool:
    return HAVE_NUMBA and x.ndim == 2 and x.flags.c_contiguous and x.shape[1] > 0


def argmax_rows(x: np.ndarray) -> np.ndarray:
    """``x.argmax(axis=1)`` of a float (n, C) array, as int64."""
    if _compiled(x) and x.dtype in (np.float32, np.float64):
        return _numba_argmax(x)
    return _numpy_argmax(x)


def softmax_stats(
    x: np.ndarray, beta: float | np.ndarray, *, pred: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What the metrics need of ``softmax(beta * x)``, without materialising it.

    Parameters
    ----------
    x : ndarray of shape (n, C), float32 or float64
        Logits.
    beta : float or ndarray of shape (n,)
        Positive inverse temperature, one or per row.
    pred : ndarray of shape (n,), optional
        The argmax of ``x``, when already computed (checked, not trusted).

    Returns
    -------
    pred : ndarray of shape (n,), int64
        The argmax of ``x`` (a positive ``beta`` keeps it).
    shifted_exp : ndarray of shape (n, C)
        ``exp(beta * (x - max))``, in ``x``'s dtype: the probabilities up to
        each row's normaliser.
    total : ndarray of shape (n,), float64
        Row sums of ``shifted_exp``: the confidence is ``1 / total``.
    squares : ndarray of shape (n,), float64
        Row sums of squares of ``shifted_exp``: ``sum(p**2) = squares / total**2``.
    """
    pred, e = shifted_exp(x, beta, pred=pred)
    if _compiled(e) and e.dtype in (np.float32, np.float64):
        total, squares = _numba_sums(e)
    else:
        total, squares = _numpy_sums(e)
    return pred, e, total, squares


_scratch = threading.local()
_SCRATCH_MAX_BYTES = 64 << 20


def _scratch_like(x: np.ndarray) -> np.ndarray:
    """A per-thread buffer shaped like ``x``, reused between calls.

    A fresh 16 MB array costs ~2 ms of page faults each time it is first
    written, as long as the kernel that fills it.
    """
    buf = getattr(_scratch, "buf", None)
    need = x.size * x.itemsize
    if need > _SCRATCH_MAX_BYTES:  # not kept alive between calls
        return np.empty_like(x)
    if buf is None or buf.nbytes < need:
        buf = _scratch.buf = np.empty(need, dtype=np.uint8)
    return buf[:need].view(x.dtype).reshape(x.shape)


def shifted_exp(
    x: np.ndarray,
    beta: float | np.ndarray,
    *,
    reuse: bool = False,
    pred: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax, exp(beta * (x - row max)))`` of (n, C) logits, in ``x``'s dtype.

    With ``reuse`` the second array is this thread's scratch buffer, valid
    until the next call in the same thread. A given ``pred`` saves the
    argmax; it must hold an argmax of every row (ValueError otherwise).
    """
    beta = np.atleast_1d(np.asarray(beta, dtype=x.dtype))
    e = _scratch_like(x) if reuse else np.empty_like(x)
    compiled = _compiled(x) and x.dtype in (np.float32, np.float64)
    if pred is None:
        pred = _numba_shift(x, beta, e) if compiled else _numpy_shift(x, beta, e)
    else:
        pred = np.ascontiguousarray(pred, dtype=np.int64)
        if compiled:
            worst = _numba_shift_given(x, beta, pred, e)
        else:
            _numpy_shift(x, beta, e, pred)
            worst = int((x > np.take_along_axis(x, pred[:, None], axis=1)).sum())
        if worst > 0:
            raise ValueError("y_pred is not the argmax of the logits in every row.")
    np.exp(e, out=e)
    return pred, e


def tally(values, *, normalise, pred, y, ignore_index, weights, codes, n_keys, n_bins,
          n_image_bins, nll_eps):
    """The accumulator's per-chunk tallies in one compiled pass (numba only).

    ``values`` are probabilities, or with ``normalise`` non-negative scores
    whose row sums are the normalisers (``shifted_exp`` output). Returns
    ``(top (3, n_bins), confusion (C, C), images (3, n_keys, n_image_bins),
    sums [NLL, Brier, weight, pixels], checks [min, max, max |row sum - 1|,
    non-finite rows])``, fresh arrays: nothing is counted until the caller
    adds them.
    """
    empty_f = np.empty(0, dtype=np.float64)
    empty_i = np.empty(0, dtype=np.int64)
    top, cm, img, p_label, sums, check = _numba_tally(
        values,
        bool(normalise),
        empty_i if pred is None else pred,
        pred is not None,
        y,
        ignore_index is not None,
        0 if ignore_index is None else int(ignore_index),
        empty_f if weights is None else weights,
        empty_i if codes is None else codes,
        int(n_keys),
        int(n_bins),
        int(n_image_bins),
    )
    # one vectorised log rather than a scalar one per pixel (ignored rows hold 1)
    nll = -np.log(np.maximum(p_label, nll_eps))
    nll_sum = float(nll.sum() if weights is None else nll @ weights)
    return top, cm, img, np.array([nll_sum, *sums]), check


def can_tally(values: np.ndarray) -> bool:
    """Whether :func:`tally` can take these values (numba, contiguous float rows)."""
    return _compiled(values) and values.dtype in (np.float32, np.float64)


def agnostic_parts(z: np.ndarray, k: int):
    """Pieces of the class-agnostic features of (n, C) logits, or None without numba.

    Returns ``(top, total, weighted)``: the ``k`` largest ``d = z - max`` per
    row (descending, ``z``'s dtype), and float64 ``sum(exp(d))`` and
    ``sum(exp(d) * d)``. Three passes (shift, NumPy's exp, one compiled loop)
    instead of NumPy's log-softmax, partition, sort and entropy.
    """
    if not (_compiled(z) and z.dtype in (np.float32, np.float64)):
        return None
    d = np.empty_like(z)
    _numba_shift(z, np.ones(1, dtype=z.dtype), d)
    e = _scratch_like(z)
    np.exp(d, out=e)
    return _numba_top_parts(d, e, int(k))
