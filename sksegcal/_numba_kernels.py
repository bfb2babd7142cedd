"""The compiled row loops behind ``sksegcal._kernels``; importing this imports numba.

``sksegcal._kernels`` imports it on first use only, so that importing the
package (every calibrator, the CLI) does not pay numba's ~0.15 s and ~55 MB.
"""

import numba
import numpy as np

# cache=True keeps the machine code beside this file (or in NUMBA_CACHE_DIR), so
# a process compiles each signature once (~0.5 s) and later ones load it
_jit = numba.njit(cache=True, nogil=True)
# reassociation lets LLVM vectorise the row sums (otherwise bound by the latency
# of one chain of additions); no "nnan"/"ninf": the kernels test finiteness
_jit_sums = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})


@_jit
def argmax(x):  # pragma: no cover
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
def shift(x, beta, out):  # pragma: no cover
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
def shift_given(x, beta, pred, out):  # pragma: no cover
    # as shift with the argmax given; returns how many entries lie above
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
def top_parts(d, e, k):  # pragma: no cover
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
def sums(e):  # pragma: no cover
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
def tally(
    v, normalise, pred, have_pred, y, has_ignore, ignore, w, codes, n_keys, g, b
):  # pragma: no cover
    # One pass over the kept rows: the reliability grid, confusion matrix,
    # Brier sum and per-image grids, into fresh arrays the caller adds to its
    # state only when the checks pass (an update is all or nothing). p(label),
    # or with normalise the row sum, goes out per row (1 where ignored) for
    # NumPy's vectorised log.
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
        p_label[i] = total if normalise else py
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
