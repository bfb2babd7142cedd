"""Every compiled kernel of the package, built one way; importing this imports numba.

The row loops behind ``sksegcal._kernels`` and the window kernels of the spatial
context (``sksegcal.context``), each the compiled twin of a NumPy function.

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


# --------------------------------------------------------------------------
# the spatial context's kernels (sksegcal.context): per image, on 1-D views
# --------------------------------------------------------------------------
# Loops run over whole 1-D views (one row of a map, or its shifted slice),
# indexed from 0, and pick with min/max: that is what lets LLVM vectorise them
# (3-8x faster than 2-D or offset indexing and branches). The results do not
# depend on it: integer counts, and float additions in the NumPy order (no
# fastmath). cache=True keeps the machine code in __pycache__ (or
# NUMBA_CACHE_DIR): a process loads it instead of compiling for seconds.
@_jit
def top_two(z, t1, t2, pred):  # pragma: no cover - compiled
    # z (C, P): the largest, the second largest (ties give t2 == t1) and the
    # first index of the largest, as np.argmax. (NaN logits are reported by
    # the caller, whatever these give for them.)
    n_classes, n_pixels = z.shape
    t1[:] = z[0]
    t2[:] = -np.inf
    pred[:] = 0
    for c in range(1, n_classes):
        zc = z[c]
        for p in range(n_pixels):
            x = zc[p]
            top = t1[p]
            t2[p] = max(min(top, x), t2[p])
            t1[p] = max(x, top)
            pred[p] = c if x > top else pred[p]


@_jit
def exp_sums(e, z, t1, total, weighted):  # pragma: no cover - compiled
    # total = sum_c e, weighted = sum_c e * (z - t1), classes in order (as NumPy's
    # reduction over axis 0), no reassociation: the same bits as the fallback
    n_classes, n_pixels = e.shape
    total[:] = 0.0
    weighted[:] = 0.0
    for c in range(n_classes):
        ec, zc = e[c], z[c]
        for p in range(n_pixels):
            total[p] += ec[p]
            weighted[p] += ec[p] * (zc[p] - t1[p])


@_jit
def disagreement(pred, small, large, outside, share_s, share_l, boundary):  # pragma: no cover
    # Per pixel, count the pixels at offsets (dy, dx) != 0 with max(|dy|, |dx|) <=
    # small (<= large) that hold the centre's class. The map is laid out flat with
    # `large` columns and rows of `outside` around it, a code no pixel holds: an
    # outside pixel is never "the same", and the shares divide by the in-image
    # neighbours only, so the padding never enters a feature. One loop over the
    # flat map per offset (long, vectorised). The shares are (int / int) in
    # float64 rounded to float32, as np.divide does on the NumPy path.
    h, w = pred.shape
    r = large
    width = w + 2 * r
    flat = np.full((h + 2 * r) * width + 2 * r, outside, pred.dtype)
    for y in range(h):
        begin = r + (y + r) * width + r
        flat[begin : begin + w] = pred[y]
    start = r * width + r
    n = h * width
    centre = flat[start : start + n]
    # uint8 counts (at most 48 for large = 3; valid up to large = 7): 4x the lanes
    # of int32 per vector instruction, 2x faster
    same_small = np.zeros(n, np.uint8)
    same_large = np.zeros(n, np.uint8)
    for dy in range(-large, large + 1):
        for dx in range(-large, large + 1):
            if dy == 0 and dx == 0:
                continue
            begin = start + dy * width + dx
            other = flat[begin : begin + n]
            if abs(dy) <= small and abs(dx) <= small:
                for i in range(n):
                    s = np.uint8(other[i] == centre[i])
                    same_small[i] += s
                    same_large[i] += s
            else:
                for i in range(n):
                    same_large[i] += np.uint8(other[i] == centre[i])
    for y in range(h):
        rows_small = min(small, h - 1 - y) + min(small, y) + 1
        rows_large = min(large, h - 1 - y) + min(large, y) + 1
        row_small = same_small[y * width + r : y * width + r + w]
        row_large = same_large[y * width + r : y * width + r + w]
        for x in range(w):
            m = rows_small * (min(small, w - 1 - x) + min(small, x) + 1) - 1
            differ = m - np.int32(row_small[x])
            share_s[y, x] = np.float32(differ / m) if m > 0 else np.float32(0.0)
            boundary[y, x] = differ > 0
            m = rows_large * (min(large, w - 1 - x) + min(large, x) + 1) - 1
            differ = m - np.int32(row_large[x])
            share_l[y, x] = np.float32(differ / m) if m > 0 else np.float32(0.0)


@_jit
def clipped_sq_distance(boundary, radius, d2):  # pragma: no cover - compiled
    # The exact squared Euclidean distance to the nearest boundary pixel where that
    # distance is at most radius, some value > radius^2 elsewhere: a boundary pixel
    # within the distance lies within radius rows and radius columns, so the bounded
    # search finds the nearest one; anything farther is clipped anyway. Columns: g,
    # the distance to the nearest boundary pixel of the column, capped at radius + 1
    # (a scan down, one up); rows: the minimum of dx^2 + g^2 over |dx| <= radius.
    h, w = boundary.shape
    cap = np.int32(radius + 1)
    g = np.empty((h, w), np.int32)
    run = np.full(w, cap, np.int32)
    for y in range(h):
        b, gy = boundary[y], g[y]
        for x in range(w):
            run[x] = 0 if b[x] else min(run[x] + 1, cap)
            gy[x] = run[x]
    run[:] = cap
    for y in range(h - 1, -1, -1):
        b, gy = boundary[y], g[y]
        for x in range(w):
            run[x] = 0 if b[x] else min(run[x] + 1, cap)
            gy[x] = min(gy[x], run[x]) * min(gy[x], run[x])  # squared from here on
    for y in range(h):
        gy, out = g[y], d2[y]
        out[:] = gy
        for dx in range(1, min(radius, w - 1) + 1):
            step = np.int32(dx * dx)
            head, tail = out[: w - dx], out[dx:]  # pixels with a column dx right / left
            g_right, g_left = gy[dx:], gy[: w - dx]
            for x in range(w - dx):
                head[x] = min(head[x], g_right[x] + step)
            for x in range(w - dx):
                tail[x] = min(tail[x], g_left[x] + step)


@_jit
def clipped_distance(boundary, radius, max_distance, out):  # pragma: no cover
    # float32(min(sqrt(d2), max_distance)) with d2 the squared distance below, in
    # float64 (the same correctly rounded sqrt as NumPy's), as the EDT path does
    h, w = boundary.shape
    d2 = np.empty((h, w), np.int32)
    clipped_sq_distance(boundary, radius, d2)
    for y in range(h):
        src, dst = d2[y], out[y]
        for x in range(w):
            dst[x] = np.float32(min(np.sqrt(np.float64(src[x])), max_distance))


@_jit
def box_mean(values, radius, out):  # pragma: no cover - compiled
    # as the fallback: float64 sums over the zero-padded window, the taps of a
    # row left to right, then the rows top to bottom (the same additions, in
    # order), divided by the in-image count in float64, rounded to float32
    h, w = values.shape
    size = 2 * radius + 1
    padded = np.zeros((h + 2 * radius, w + 2 * radius), np.float64)
    for y in range(h):
        padded[y + radius, radius : radius + w] = values[y]
    rows = np.empty((h + 2 * radius, w), np.float64)
    for y in range(h + 2 * radius):
        src, acc = padded[y], rows[y]
        acc[:] = src[0:w]
        for dx in range(1, size):
            tap = src[dx : dx + w]
            for x in range(w):
                acc[x] += tap[x]
    acc = np.empty(w, np.float64)
    for y in range(h):
        acc[:] = rows[y]
        for dy in range(1, size):
            src = rows[y + dy]
            for x in range(w):
                acc[x] += src[x]
        n_rows = min(radius, h - 1 - y) + min(radius, y) + 1
        mean = out[y]
        for x in range(w):
            n = n_rows * (min(radius, w - 1 - x) + min(radius, x) + 1)
            mean[x] = np.float32(acc[x] / n)


@_jit
def box_max(values, radius, out):  # pragma: no cover - compiled
    # maximum over the cut window, rows then columns, reading in-image values only
    h, w = values.shape
    rows = np.empty((h, w), values.dtype)
    for y in range(h):
        src, acc = values[y], rows[y]
        acc[:] = src
        for dx in range(1, min(radius, w - 1) + 1):
            head, tail = acc[: w - dx], acc[dx:]
            right, left = src[dx:], src[: w - dx]
            for x in range(w - dx):
                head[x] = max(head[x], right[x])
            for x in range(w - dx):
                tail[x] = max(tail[x], left[x])
    for y in range(h):
        acc = out[y]
        acc[:] = rows[y]
        for dy in range(max(-radius, -y), min(radius, h - 1 - y) + 1):
            src = rows[y + dy]
            for x in range(w):
                acc[x] = max(acc[x], src[x])
