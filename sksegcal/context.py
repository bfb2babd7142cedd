"""Spatial context features: what a pixel's neighbourhood says about its prediction.

Segmentation errors sit on boundaries, and a pixel seen alone cannot tell
whether it lies on one. These features read a small window of the model's
own output around each pixel (never the labels and never the image):

``disagree_3x3``, ``disagree_7x7``
    The share of the pixel's neighbours (the 8 or 48 others of its 3x3 or
    7x7 window) whose predicted class differs from its own.
``boundary_distance``
    The Euclidean distance, in pixels, to the nearest predicted-boundary
    pixel (a pixel with another predicted class among its 8 neighbours),
    clipped at ``max_distance`` (16). Boundary pixels have 0; an image
    with a single predicted class has ``max_distance`` everywhere.
``entropy_mean_5x5``, ``entropy_max_5x5``
    Mean and maximum, over the 5x5 window, of the entropy (nats) of the
    softmax of the logits.
``margin_mean_5x5``
    Mean, over the 5x5 window, of the margin ``p1 - p2`` between the two
    largest softmax probabilities.

Image borders: a window is cut at the image edge; only pixels inside the
image count (shares are over the in-image neighbours, means and maxima over
the in-image pixels, and the edge itself is not a boundary). No padding
value ever enters a feature. Ignored pixels (label ``ignore_index``) change
nothing: the features are functions of the logits alone, so an ignored
pixel's logits count like any other pixel's.

Every image is computed on its own, in bounded memory (one image's logits in
float32, or float64 for float64 input, at a time), with a fixed order of
operations: the same image gives the same float32 features bit for bit alone
or inside any batch. With numba installed (``pip install sksegcal[fast]``)
the pass over the classes and the window operations are compiled (the window
kernels cut the window by their loop bounds; the clipped distance searches
only ``max_distance`` rows and columns); the NumPy fallback gives the same
bits (the exponentials are NumPy's on both paths, the sums add in one order).

Every value lies in a known range and every row keeps known relations
(:data:`CONTEXT_RANGES`: shares and margins in [0, 1], distances >= 0,
entropies in [0, log C] with C the logit columns, all up to float32 rounding;
the window mean of the entropy at most its maximum, a distance of 0 exactly
where ``disagree_3x3 > 0``). :func:`check_context_block` tests the columns
after the logits of a pixel table against them; every calibrator that reads the context calls it
at fit and predict, so a table with another number of context columns (a
context column read as a logit, or a logit as a context column) is refused
with the column named instead of fitting the wrong number of classes.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

from . import _kernels

# whether numba was found at import; each call reads _kernels.HAVE_NUMBA (which can be switched)
from ._kernels import HAVE_NUMBA  # noqa: F401
from ._uncertainty import entropy_from_sums, margin_from_sums
from ._validation import check_finite

__all__ = [
    "CONTEXT_FEATURES",
    "CONTEXT_RANGES",
    "check_context_block",
    "image_context",
    "n_context_features",
    "spatial_context",
]

#: Names of the spatial context features, in column order.
CONTEXT_FEATURES: tuple[str, ...] = (
    "disagree_3x3",
    "disagree_7x7",
    "boundary_distance",
    "entropy_mean_5x5",
    "entropy_max_5x5",
    "margin_mean_5x5",
)

_DEFAULT_MAX_DISTANCE = 16.0


def _max_entropy(n_classes: int) -> float:
    """The largest softmax entropy over ``n_classes`` classes (nats): log C."""
    return float(np.log(n_classes))


#: The valid range ``(low, high)`` of each spatial context column; a callable bound
#: takes C, the number of logit columns. The shares are counts over counts and the
#: margin ``(1 - exp(t2 - t1)) / S`` with ``S >= 1``: both in [0, 1]. The distance is
#: clipped at ``max_distance``, a parameter of :func:`spatial_context`, so only its floor
#: is fixed. The entropy ``log S - sum(e d) / S`` of a softmax lies in [0, log C].
SPATIAL_RANGES: dict[str, tuple] = {
    "disagree_3x3": (0.0, 1.0),
    "disagree_7x7": (0.0, 1.0),
    "boundary_distance": (0.0, np.inf),
    "entropy_mean_5x5": (0.0, _max_entropy),
    "entropy_max_5x5": (0.0, _max_entropy),
    "margin_mean_5x5": (0.0, 1.0),
}


def _mean_above_max(mean: np.ndarray, maximum: np.ndarray, slack: float) -> np.ndarray:
    return mean - maximum > slack


def _boundary_mismatch(share: np.ndarray, distance: np.ndarray, slack: float) -> np.ndarray:
    return (share > 0) != (distance == 0)


def _share_not_nested(small: np.ndarray, large: np.ndarray, slack: float) -> np.ndarray:
    return (small > 0) & ~(large > 0)


#: Relations between two spatial columns that hold in every row: ``(a, b, violated, what
#: holds)``, ``violated(a, b, slack)`` marking the rows that break it. The mean and the
#: maximum are over the same window; a boundary pixel is one with another predicted class
#: among its 8 neighbours (``disagree_3x3 > 0``), the only pixels at distance 0 (all others
#: are at least 1 away, or at the clip); the 3x3 neighbours are among the 7x7 ones.
SPATIAL_RULES: tuple[tuple, ...] = (
    (
        "entropy_mean_5x5",
        "entropy_max_5x5",
        _mean_above_max,
        "a window's mean entropy never exceeds its maximum",
    ),
    (
        "disagree_3x3",
        "boundary_distance",
        _boundary_mismatch,
        "boundary_distance is 0 exactly where disagree_3x3 > 0 (the predicted boundary)",
    ),
    (
        "disagree_3x3",
        "disagree_7x7",
        _share_not_nested,
        "disagree_7x7 > 0 wherever disagree_3x3 > 0 (the 3x3 neighbours are among the 7x7)",
    ),
)

#: Per context kind: its column names, the range of each (:data:`SPATIAL_RANGES`) and the
#: relations every row keeps (:data:`SPATIAL_RULES`); :func:`check_context_block` reads it.
CONTEXT_RANGES: dict[str, tuple] = {
    "spatial": (CONTEXT_FEATURES, SPATIAL_RANGES, SPATIAL_RULES),
}


def n_context_features() -> int:
    """Number of spatial context features (columns added by ``context="spatial"``)."""
    return len(CONTEXT_FEATURES)


# --------------------------------------------------------------------------
# compiled kernels (numba), used when sksegcal._kernels.HAVE_NUMBA is set
# --------------------------------------------------------------------------
# Every kernel computes exactly what its NumPy counterpart below computes, in
# the same floating-point operations and order (integer counts, IEEE additions
# in the NumPy order, no fastmath), so both paths give the same bits (tested).
def _compiled_kernels():
    """The compiled kernels (:mod:`sksegcal._numba_kernels`), or None without numba."""
    return _kernels._compiled_loops()


def _kernels_for(compiled: bool | None):
    """The compiled kernels, or None for the NumPy path.

    ``compiled=None`` follows ``sksegcal._kernels.HAVE_NUMBA``, read at call time
    (``SKSEGCAL_DISABLE_NUMBA=1`` and the test suite's path switch set it).
    """
    if compiled is None:
        compiled = _kernels.HAVE_NUMBA
    return _compiled_kernels() if compiled else None


# --------------------------------------------------------------------------
# per-pixel statistics over the classes
# --------------------------------------------------------------------------
def _pixel_stats(z: np.ndarray, *, compiled: bool | None = None):
    """Predicted class, softmax entropy and top-2 margin of each pixel of ``z`` (C, P).

    ``z`` is float32 or float64 and C-contiguous. Returns ``pred`` (int32) and
    float32 ``entropy`` and ``margin`` of shape (P,).
    """
    n_classes, n_pixels = z.shape
    kernels = _kernels_for(compiled)
    if kernels is not None:
        t1 = np.empty(n_pixels, z.dtype)
        t2 = np.empty(n_pixels, z.dtype)
        pred = np.empty(n_pixels, np.int32)
        kernels.top_two(z, t1, t2, pred)
    else:
        t1 = z.max(axis=0)
        pred = z.argmax(axis=0).astype(np.int32)
        masked = z.copy()
        masked[pred, np.arange(n_pixels)] = -np.inf
        t2 = masked.max(axis=0)
        del masked
    # e = exp(z - t1), in place of one buffer; NumPy's exp on both paths (its SIMD
    # exp is faster than a compiled scalar one, and it fixes the bits)
    e = np.subtract(z, t1)
    np.exp(e, out=e)
    if kernels is not None:
        total = np.empty(n_pixels, z.dtype)
        weighted = np.empty(n_pixels, z.dtype)
        kernels.exp_sums(e, z, t1, total, weighted)
    else:
        total = e.sum(axis=0)
        e *= z - t1
        weighted = e.sum(axis=0)
    del e
    entropy = entropy_from_sums(total, weighted)
    # one class: t2 = -inf, exp(-inf) = 0, the margin is 1
    margin = margin_from_sums(total, np.exp(t2 - t1))
    return pred, entropy.astype(np.float32), margin.astype(np.float32)


# --------------------------------------------------------------------------
# window operations on one (H, W) map, the window cut at the image edge
# --------------------------------------------------------------------------
def _window_counts(n: int, radius: int) -> np.ndarray:
    """How many of the positions i - r .. i + r lie inside [0, n), for each i."""
    i = np.arange(n)
    return (np.minimum(i + radius, n - 1) - np.maximum(i - radius, 0) + 1).astype(np.int32)


@functools.lru_cache(maxsize=32)
def _in_image(shape: tuple[int, int], radius: int) -> np.ndarray:
    """Number of in-image pixels of each pixel's (2r+1)^2 window (itself included)."""
    counts = np.multiply.outer(_window_counts(shape[0], radius), _window_counts(shape[1], radius))
    counts.flags.writeable = False
    return counts


def _same_counts_numpy(pred: np.ndarray, radii: tuple[int, ...]) -> dict:
    """Per radius, how many in-image neighbours hold the centre's class (NumPy)."""
    h, w = pred.shape
    big = max(radii)
    # a code the map never holds marks the outside, so it never counts as "same"
    code = np.uint8 if pred.max(initial=0) < 255 else np.int32
    padded = np.full((h + 2 * big, w + 2 * big), np.iinfo(code).max, dtype=code)
    padded[big : big + h, big : big + w] = pred
    centre = padded[big : big + h, big : big + w]
    # counts up to 48 fit in uint8 for radii up to 3; int32 beyond
    count = np.uint8 if big <= 3 else np.int32
    same = {r: np.zeros((h, w), dtype=count) for r in radii}
    eq = np.empty((h, w), dtype=bool)
    for dy in range(-big, big + 1):
        for dx in range(-big, big + 1):
            if dy == 0 and dx == 0:
                continue
            np.equal(padded[big + dy : big + dy + h, big + dx : big + dx + w], centre, out=eq)
            for r in radii:
                if abs(dy) <= r and abs(dx) <= r:
                    np.add(same[r], eq, out=same[r], casting="unsafe")
    return same


def _disagreement(pred: np.ndarray, kernels=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shares of the 3x3 and 7x7 in-image neighbours of another class, and the boundary.

    One pass over the offsets of the 7x7 window; the centre is excluded. The
    boundary pixels are those with another class among their 3x3 neighbours.
    """
    h, w = pred.shape
    if kernels is not None:
        shares = np.empty((2, h, w), np.float32)
        boundary = np.empty((h, w), bool)
        # the narrowest code of the classes (4x fewer bytes to compare for C < 255),
        # and a code no class has for the outside
        if pred.max(initial=0) < 255:
            kernels.disagreement(pred.astype(np.uint8), 1, 3, np.uint8(255), *shares, boundary)
        else:
            kernels.disagreement(pred, 1, 3, np.int32(-1), *shares, boundary)
        return shares[0], shares[1], boundary
    same = _same_counts_numpy(pred, (1, 3))
    shares = []
    for r in (1, 3):
        neighbours = _in_image((h, w), r) - 1
        differ = neighbours - same[r]  # int32: exact counts on both paths
        if r == 1:
            boundary = differ > 0
        share = np.zeros((h, w), dtype=np.float32)
        np.divide(differ, neighbours, out=share, where=neighbours > 0, casting="unsafe")
        shares.append(share)
    return shares[0], shares[1], boundary


def _box_sum(values: np.ndarray, radius: int) -> np.ndarray:
    """Sum of ``values`` (float64) over each pixel's window, the outside counting 0."""
    h, w = values.shape
    size = 2 * radius + 1
    padded = np.zeros((h + 2 * radius, w + 2 * radius), dtype=np.float64)
    padded[radius : radius + h, radius : radius + w] = values
    rows = padded[:, 0:w].copy()
    for dx in range(1, size):
        rows += padded[:, dx : dx + w]
    out = rows[0:h].copy()
    for dy in range(1, size):
        out += rows[dy : dy + h]
    return out


def _box_mean(values: np.ndarray, radius: int, kernels=None) -> np.ndarray:
    """Mean of ``values`` over each pixel's cut window (float64 sums), as float32."""
    if kernels is not None:
        out = np.empty(values.shape, np.float32)
        kernels.box_mean(values, radius, out)
        return out
    return (_box_sum(values, radius) / _in_image(values.shape, radius)).astype(np.float32)


def _box_max(values: np.ndarray, radius: int, kernels=None) -> np.ndarray:
    if kernels is not None:
        out = np.empty_like(values)
        kernels.box_max(values, radius, out)
        return out
    # edge replication puts only in-image values into the window: the max of the cut window
    padded = np.pad(values, radius, mode="edge")
    h, w = values.shape
    size = 2 * radius + 1
    rows = padded[:, 0:w].copy()
    for dx in range(1, size):
        np.maximum(rows, padded[:, dx : dx + w], out=rows)
    out = rows[0:h].copy()
    for dy in range(1, size):
        np.maximum(out, rows[dy : dy + h], out=out)
    return out


# The bounded search does ~2 x clip operations per pixel; the EDT's cost does not depend on the
# clip. Measured (CPU time, smooth 19-class maps): at 128x128 the EDT takes 1.4 ms, the search
# 0.14 ms at a clip of 16, 0.37 at 64, 0.53 at 128; at 512x512 15.7 ms against 2.5, 7.5, 12.9.
# Above 64 px the EDT is used (the same bits either way).
_MAX_BOUNDED_RADIUS = 64


def _boundary_distance(boundary: np.ndarray, max_distance: float, kernels=None) -> np.ndarray:
    """Euclidean distance to the nearest ``boundary`` pixel, clipped at ``max_distance``.

    ``sqrt`` of the exact integer squared distance, in float64, then the clip and
    float32, on every path: the bounded search and the full EDT give the same bits.
    """
    if not boundary.any():
        return np.full(boundary.shape, max_distance, dtype=np.float32)
    radius = int(max_distance)  # a pixel within max_distance is within radius rows and columns
    if kernels is not None and radius <= _MAX_BOUNDED_RADIUS:
        out = np.empty(boundary.shape, np.float32)
        kernels.clipped_distance(boundary, radius, max_distance, out)
        return out
    from scipy import ndimage  # only on the NumPy path

    distance = ndimage.distance_transform_edt(~boundary)
    return np.minimum(distance, max_distance).astype(np.float32)


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------
def _as_image(z, where: str) -> np.ndarray:
    """One image's (C, H, W) or volume's (C, D, H, W) logits, C-contiguous float32 (or 64)."""
    if hasattr(z, "detach") and hasattr(z, "cpu"):  # a torch tensor, on any device
        z = z.detach().cpu().numpy()
    z = np.asarray(z)
    if z.ndim not in (3, 4):
        raise ValueError(
            f"{where} must have shape (C, H, W), or (C, D, H, W) for a volume, got {z.shape}."
        )
    if z.dtype.kind != "f":
        raise TypeError(f"{where} must hold floating-point logits, got dtype {z.dtype}.")
    if min(z.shape) < 1:
        raise ValueError(f"{where} has an empty axis: shape {z.shape}.")
    dtype = np.float64 if z.dtype == np.float64 else np.float32
    return np.ascontiguousarray(z, dtype=dtype)


def _check_max_distance(max_distance) -> float:
    if (
        isinstance(max_distance, bool)
        or not isinstance(max_distance, numbers.Real)
        or not 0 < max_distance < np.inf
    ):
        raise ValueError(
            f"max_distance must be a positive finite number of pixels, got {max_distance!r}."
        )
    return float(max_distance)


_OVERFLOW = (
    "The logits are finite but so large (near float32's limit, about 3e38) that their "
    "softmax entropy or top-2 margin overflows float32, and the spatial context features "
    "would be NaN; a network's logits are far smaller: check or rescale them."
)


def image_context(
    logits, *, max_distance: float = _DEFAULT_MAX_DISTANCE, out: np.ndarray | None = None
) -> np.ndarray:
    """The spatial context features of one image.

    Parameters
    ----------
    logits : array-like or torch.Tensor of shape (C, H, W) or (C, D, H, W)
        One image's logits (float16, float32 or float64). A volume (C, D, H, W)
        gets the same features over 3-D windows (3x3x3, 7x7x7, 5x5x5) and the
        3-D distance (:mod:`sksegcal._volume_context`).
    max_distance : float, default=16
        Clip of ``boundary_distance``, in pixels.
    out : ndarray of shape (K, H, W) or (K, D, H, W), float32, optional
        Where to write the result.

    Returns
    -------
    features : ndarray of shape (K, H, W) or (K, D, H, W), float32
        Columns in the order of :data:`CONTEXT_FEATURES`.
    """
    max_distance = _check_max_distance(max_distance)
    z = _as_image(logits, "logits")
    if z.ndim == 4:
        from ._volume_context import volume_context

        return volume_context(z, max_distance, out)
    n_classes, h, w = z.shape
    shape = (len(CONTEXT_FEATURES), h, w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.shape}.")
    kernels = _kernels_for(None)
    pred, entropy, margin = _pixel_stats(z.reshape(n_classes, h * w), compiled=kernels is not None)
    if not (np.isfinite(entropy).all() and np.isfinite(margin).all()):
        # any NaN or infinite logit makes its pixel's entropy or margin non-finite
        check_finite(z, where="logits")
        raise ValueError(_OVERFLOW)  # finite logits whose statistics overflow float32
    pred, entropy, margin = (a.reshape(h, w) for a in (pred, entropy, margin))
    out[0], out[1], boundary = _disagreement(pred, kernels)
    out[2] = _boundary_distance(boundary, max_distance, kernels)
    out[3] = _box_mean(entropy, 2, kernels)
    out[4] = _box_max(entropy, 2, kernels)
    out[5] = _box_mean(margin, 2, kernels)
    return out


def spatial_context(logits, *, max_distance: float = _DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Spatial context features of every pixel of a batch of logit maps.

    Parameters
    ----------
    logits : array-like or torch.Tensor of shape (N, C, H, W) or (N, C, D, H, W)
        Per-pixel logits of N images (float16, float32 or float64; a torch
        tensor may live on any device and is moved to the CPU one image at
        a time). A sequence of (C, H, W) images of one size works too.
    max_distance : float, default=16
        Clip of ``boundary_distance``, in pixels.

    Returns
    -------
    features : ndarray of shape (N, K, H, W) or (N, K, D, H, W), float32
        ``K = n_context_features()`` columns in the order of
        :data:`CONTEXT_FEATURES`. Each image is computed on its own (memory:
        one image's logits at a time), so an image's features are the same,
        bit for bit, alone or in any batch.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.context import CONTEXT_FEATURES, spatial_context
    >>> logits = np.zeros((1, 2, 4, 4), dtype=np.float32)
    >>> logits[0, 1, :, 2:] = 5.0  # class 0 on the left half, class 1 on the right
    >>> f = spatial_context(logits)
    >>> f.shape
    (1, 6, 4, 4)
    >>> f[0, CONTEXT_FEATURES.index("disagree_3x3"), 1].round(3).tolist()
    [0.0, 0.375, 0.375, 0.0]
    """
    max_distance = _check_max_distance(max_distance)
    if hasattr(logits, "detach") or (hasattr(logits, "ndim") and hasattr(logits, "shape")):
        if logits.ndim not in (4, 5):
            raise ValueError(
                f"logits must have shape (N, C, H, W) or, for volumes, (N, C, D, H, W); got "
                f"{tuple(logits.shape)}. For a "
                "single image add a leading axis ([None]) or call image_context."
            )
        n, spatial = int(logits.shape[0]), tuple(int(s) for s in logits.shape[2:])
        images = (logits[i] for i in range(n))
    else:
        images = list(logits)
        if not images:
            raise ValueError("No images were given.")
        n = len(images)
        spatial = tuple(np.shape(images[0])[1:])
    out = np.empty((n, len(CONTEXT_FEATURES), *spatial), dtype=np.float32)
    for i, z in enumerate(images):
        z = _as_image(z, f"logits of image {i}")
        if z.shape[1:] != spatial:
            raise ValueError(
                f"image {i} is {z.shape[1:]} but image 0 is {spatial}; give images of one "
                "size, or call image_context on each."
            )
        image_context(z, max_distance=max_distance, out=out[i])
    return out


# --------------------------------------------------------------------------
# which context an estimator reads, and the rows of an image for it
# --------------------------------------------------------------------------
#: The context kinds the package computes per image: a calibrator's ``reads_context``.
CONTEXT_KINDS: tuple[str, ...] = ("spatial",)


# Float rounding allowed beyond each bound. Absolute: the 3-D window means are float64
# running sums (scipy's uniform filter), whose cancellation leaves ~1e-16 around 0 and 1.
# Relative to log C, for the entropies: a float32 sum of C exponentials and of C products
# errs by at most ~(C + 4) units of 2**-24 relative to each sum, and the entropy by that times
# (1 + log C) (the weighted term is at most log C); twice that bound is allowed (measured:
# 7e-7 relative at C = 1000, 1.3e-7 at C = 3, against 4e-4 and 2e-6 allowed).
_ABSOLUTE_SLACK = 1e-6
_BIG = float(np.finfo(np.float64).max)


def _entropy_slack(n_classes: int) -> float:
    return (n_classes + 8) * 2.0**-23 * (1.0 + np.log(n_classes))


# rows per block of the check: bounded temporaries (a few MB) on tables of any length
_CHECK_BLOCK_ROWS = 1 << 16


def check_context_block(
    X: np.ndarray, n_logit_columns: int, kind: str, *, where: str = "X"
) -> None:
    """Check that the columns of ``X`` after its logit columns are context of ``kind``.

    ``X`` is a validated pixel table: ``n_logit_columns`` logit columns, then
    the ``context_width(kind)`` columns that
    ``flatten_segmentation(..., context=kind)`` (:func:`image_rows`) builds.
    Each context column is tested against its range in
    :data:`CONTEXT_RANGES` and each row against the relations declared there,
    with float32 rounding allowed; a NaN or infinite context value is out of
    range. One pass over blocks of rows (per-column minima and maxima, one
    comparison per relation), no copy of the table.

    Parameters
    ----------
    X : ndarray of shape (n_pixels, n_logit_columns + K)
    n_logit_columns : int
        C, the logit (or probability) columns before the context.
    kind : str
        One of :data:`CONTEXT_KINDS`.
    where : str, default="X"
        Who reads the table, named in the error.

    Raises
    ------
    ValueError
        Naming the first column out of its range (or the first relation
        broken), how many rows are, and the likely cause: the table was not
        built by ``flatten_segmentation(..., context=kind)`` of this package
        version, e.g. with another number of context columns, so a context
        column is read as a logit or a logit as a context column.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.context import check_context_block, image_rows
    >>> z = np.random.default_rng(0).normal(size=(3, 8, 8)).astype(np.float32)
    >>> X = image_rows(z, "spatial")                       # 3 logit + 6 context columns
    >>> check_context_block(X, 3, "spatial")               # passes
    >>> seven = np.hstack([X, X[:, 3:4]])                  # a seventh context column
    >>> check_context_block(seven, 4, "spatial")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The context columns 'entropy_mean_5x5' and 'entropy_max_5x5' of X ...
    """
    _check_kind(kind, "kind")
    names, ranges, rules = CONTEXT_RANGES[kind]
    k = len(names)
    c = int(n_logit_columns)
    if X.ndim != 2 or X.shape[1] != c + k:
        raise ValueError(
            f"{where} has shape {X.shape}; {c} logit columns and the {k} {kind!r} context "
            f"columns make {c + k}."
        )
    bounds = np.array(
        [[lo, hi(c) if callable(hi) else hi] for lo, hi in (ranges[m] for m in names)],
        dtype=np.float64,
    )
    slack = _ABSOLUTE_SLACK + np.array(
        [_entropy_slack(c) if callable(ranges[m][1]) else 0.0 for m in names]
    )
    # an infinite bound becomes the largest double, so an infinite value is out of range
    low = np.maximum(bounds[:, 0] - slack, -_BIG)
    high = np.minimum(bounds[:, 1] + slack, _BIG)
    pairs = [(names.index(a), names.index(b), test) for a, b, test, _ in rules]
    n = X.shape[0]
    lo_seen, hi_seen = np.full(k, np.inf), np.full(k, -np.inf)
    broken = np.zeros(len(rules), dtype=np.int64)
    nan_seen = False
    for r0 in range(0, n, _CHECK_BLOCK_ROWS):
        block = X[r0 : r0 + _CHECK_BLOCK_ROWS, c:]
        lo_b, hi_b = block.min(axis=0), block.max(axis=0)  # NaN propagates into both
        nan_seen = nan_seen or bool(np.isnan(lo_b).any())
        np.fmin(lo_seen, lo_b, out=lo_seen)
        np.fmax(hi_seen, hi_b, out=hi_seen)
        for p, (i, j, test) in enumerate(pairs):
            broken[p] += np.count_nonzero(test(block[:, i], block[:, j], max(slack[i], slack[j])))
    if not nan_seen and ((lo_seen >= low) & (hi_seen <= high)).all() and not broken.any():
        return
    cause = (
        f"The columns after the {c} logit columns are not the {k} {kind!r} context columns "
        f"{list(names)}: the table was likely not built by flatten_segmentation(..., "
        f"context={kind!r}) (or sksegcal.context.image_rows) of this package version, e.g. "
        "with another number of context columns, so that a context column is read as a logit "
        "or a logit as a context column. Rebuild the table with flatten_segmentation(logits, "
        f"labels, context={kind!r}), or give the calibrator the context the table holds."
    )
    out_of_range = []
    for m in range(k):
        count = 0
        for r0 in range(0, n, _CHECK_BLOCK_ROWS):
            part = X[r0 : r0 + _CHECK_BLOCK_ROWS, c + m]
            count += int(np.count_nonzero(~((part >= low[m]) & (part <= high[m]))))
        if count:
            out_of_range.append((m, count))
    if out_of_range:
        m, count = out_of_range[0]
        more = len(out_of_range) - 1
        others = f" ({more} more context column(s) out of range too)" if more else ""
        raise ValueError(
            f"The context column {names[m]!r} of {where} (column {c + m} of {c + k}) has "
            f"{count} of {n} rows outside its range [{bounds[m, 0]:.6g}, {bounds[m, 1]:.6g}] "
            f"(values from {lo_seen[m]:.6g} to {hi_seen[m]:.6g}){others}. {cause}"
        )
    p = int(np.flatnonzero(broken)[0])
    a, b, _, holds = rules[p]
    raise ValueError(
        f"The context columns {a!r} and {b!r} of {where} (columns {c + names.index(a)} and "
        f"{c + names.index(b)} of {c + k}) break a relation of real context in {broken[p]} "
        f"of {n} rows: {holds}. {cause}"
    )


def context_width(context: str | None) -> int:
    """The number of context columns after the C logit columns (0 without context)."""
    if context is None:
        return 0
    _check_kind(context, "context")
    return n_context_features()


def _check_kind(context, what: str) -> None:
    if not (isinstance(context, str) and context in CONTEXT_KINDS):
        raise ValueError(
            f"{what} must be None (logits only) or one of {list(CONTEXT_KINDS)} (logits "
            f"followed by the context columns computed per image), got {context!r}."
        )


def estimator_context(estimator, *, where: str = "this path") -> str | None:
    """The context the rows given to ``estimator`` must carry after the C logit columns.

    The one reader of the ``reads_context`` capability: an estimator that
    defines it (every calibrator of this package: ``None`` or ``"spatial"``)
    answers for itself; a :class:`~sklearn.pipeline.Pipeline` answers with its
    last step, a fitted search with ``best_estimator_``, an unfitted search
    with the context all its candidates share, and any other meta-estimator
    (``FrozenEstimator``, ``CalibratedClassifierCV``, ...) with its
    ``estimator``. Anything else reads the logits alone (None).

    Parameters
    ----------
    estimator : estimator or None
    where : str, default="this path"
        The path that builds the rows, named in the errors.

    Returns
    -------
    context : None or str
        One of :data:`CONTEXT_KINDS`; :func:`iter_image_rows` builds the rows.

    Raises
    ------
    ValueError
        When the estimator reads a context no path can compute (columns of the
        user's own: build the pixel table yourself), and for an unfitted search
        whose candidates differ in their context.

    Examples
    --------
    >>> from sklearn.pipeline import make_pipeline
    >>> from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
    >>> from sksegcal.context import estimator_context
    >>> estimator_context(make_pipeline(SelectiveScalingCalibrator(context="spatial")))
    'spatial'
    >>> estimator_context(TemperatureScaling()) is None
    True
    """
    if estimator is None or isinstance(estimator, type):
        return None
    declared = getattr(estimator, "reads_context", _UNDECLARED)
    if declared is not _UNDECLARED:
        if declared is not None and not (isinstance(declared, str) and declared in CONTEXT_KINDS):
            raise ValueError(
                f"{type(estimator).__name__} reads the context {declared!r} after the logit "
                f"columns, which {where} cannot compute (it computes {list(CONTEXT_KINDS)} "
                "per image). Build the pixel table with those columns yourself and call fit / "
                "predict_proba on it, or configure the estimator to read a context listed."
            )
        return declared
    if getattr(estimator, "best_estimator_", None) is not None:  # a fitted search
        return estimator_context(estimator.best_estimator_, where=where)
    from sklearn.pipeline import Pipeline

    if isinstance(estimator, Pipeline):
        return estimator_context(estimator.steps[-1][1], where=where) if estimator.steps else None
    inner = getattr(estimator, "estimator", None)
    if inner is None or not hasattr(inner, "get_params"):
        return None
    candidates = _search_candidates(estimator)
    if candidates is None:
        return estimator_context(inner, where=where)
    from sklearn.base import clone

    needs = {
        estimator_context(clone(inner).set_params(**params), where=where) for params in candidates
    }
    if len(needs) > 1:
        raise ValueError(
            f"The candidates of {type(estimator).__name__} differ in their context "
            f"({sorted(map(str, needs))}), but {where} builds one pixel table for all of "
            "them; search each context in a run of its own."
        )
    return needs.pop() if needs else estimator_context(inner, where=where)


_UNDECLARED = object()


def _search_candidates(search):
    """The parameter settings an unfitted scikit-learn search will try, or None."""
    import copy

    from sklearn.model_selection import ParameterGrid, ParameterSampler

    grid = getattr(search, "param_grid", None)
    if grid is not None:
        return list(ParameterGrid(grid))
    dists = getattr(search, "param_distributions", None)
    if dists is None:
        return None
    dists = [dists] if isinstance(dists, dict) else list(dists)
    if all(isinstance(v, (list, tuple)) for d in dists for v in d.values()):
        return list(ParameterGrid(dists))  # every setting the sampler may draw
    n_iter = getattr(search, "n_iter", 10)
    seed = copy.deepcopy(getattr(search, "random_state", None))  # the search's own draws
    return list(ParameterSampler(dists, n_iter, random_state=seed))


def iter_image_rows(logits, context: str | None, *, keep=None, chunk_pixels: int | None = None):
    """The pixel-table rows of one image: its C logit columns, then its context columns.

    The one builder of rows for every path (:func:`sksegcal.pixels.
    flatten_segmentation`, :func:`~sksegcal.pixels.predict_proba_maps`, the
    LogitStore, the conformal store path, the mmseg bridge, the command line).
    The context is computed on the whole image (ignored pixels included)
    before any row is dropped, so the same image gives the same rows bit for
    bit on every path.

    Parameters
    ----------
    logits : array-like or torch.Tensor of shape (C, H, W)
        One image's logits (a tensor may live on any device).
    context : None or str
        What :func:`estimator_context` says; None gives the logit columns only.
    keep : bool array of shape (H, W), optional
        The pixels whose rows to give (e.g. ``labels != ignore_index``); all by
        default.
    chunk_pixels : int, optional
        About how many pixels a block holds (whole image rows, at least one);
        the whole image by default.

    Yields
    ------
    rows : slice
        The image rows (first spatial axis) of the block.
    X : ndarray of shape (n, C) or (n, C + K)
        The block's (kept) pixels in row-major order: float32 with context,
        else the logits' dtype (float32 for a tensor).
    """
    if hasattr(logits, "detach") and hasattr(logits, "cpu"):  # a torch tensor
        logits = logits.detach()
        logits = (
            (logits if logits.dtype.is_floating_point and logits.itemsize == 8 else logits.float())
            .cpu()
            .numpy()
        )
    z = np.asarray(logits)
    k = context_width(context)
    c, spatial = z.shape[0], z.shape[1:]
    ctx = None if not k else np.moveaxis(image_context(z), 0, -1)
    if keep is not None:
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != spatial:
            raise ValueError(f"keep has shape {keep.shape}, the image {spatial}.")
    pixels_per_row = int(np.prod(spatial[1:], dtype=np.int64))
    n_rows = spatial[0]
    step = (
        n_rows
        if chunk_pixels is None
        else max(1, min(n_rows, chunk_pixels // max(pixels_per_row, 1)))
    )
    dtype = np.float32 if k else z.dtype
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(n_rows, r0 + step))
        # pixel-major view of the block; boolean indexing copies only the kept pixels
        block = np.moveaxis(z[:, rows], 0, -1)
        if keep is None:
            x = block.reshape(-1, c)
            m = x.shape[0]
        else:
            x = block[keep[rows]]
            m = x.shape[0]
        if not k:
            yield rows, np.array(x, dtype=dtype, copy=True) if keep is None else x
            continue
        X = np.empty((m, c + k), dtype=np.float32)
        X[:, :c] = x
        X[:, c:] = ctx[rows].reshape(-1, k) if keep is None else ctx[rows][keep[rows]]
        yield rows, X


def image_rows(logits, context: str | None, *, keep=None) -> np.ndarray:
    """All the rows :func:`iter_image_rows` gives for one image, as one table."""
    return next(iter_image_rows(logits, context, keep=keep))[1]
