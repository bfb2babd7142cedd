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
the per-pixel pass over the classes is compiled; the NumPy fallback gives
the same numbers.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np
from scipy import ndimage

from ._kernels import HAVE_NUMBA
from ._validation import check_finite

__all__ = ["CONTEXT_FEATURES", "image_context", "n_context_features", "spatial_context"]

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


def n_context_features() -> int:
    """Number of spatial context features (columns added by ``context="spatial"``)."""
    return len(CONTEXT_FEATURES)


# --------------------------------------------------------------------------
# per-pixel statistics over the classes
# --------------------------------------------------------------------------
@functools.cache
def _compiled_stats():
    """The numba kernels of the pass over the classes, or None without numba."""
    if not HAVE_NUMBA:
        return None
    try:
        import numba
    except ImportError:  # pragma: no cover - a broken numba install
        return None

    @numba.njit(nogil=True)
    def top_two(z, t1, t2, pred):  # pragma: no cover - compiled
        # z (C, P): the largest, the second largest (ties give t2 == t1) and the
        # first index of the largest, as np.argmax; classes outer, pixels inner
        n_classes, n_pixels = z.shape
        for p in range(n_pixels):
            t1[p] = z[0, p]
            t2[p] = -np.inf
            pred[p] = 0
        for c in range(1, n_classes):
            for p in range(n_pixels):
                x = z[c, p]
                if x > t1[p]:
                    t2[p] = t1[p]
                    t1[p] = x
                    pred[p] = c
                elif x > t2[p]:
                    t2[p] = x

    @numba.njit(nogil=True)
    def exp_sums(e, z, t1, total, weighted):  # pragma: no cover - compiled
        # total = sum_c e, weighted = sum_c e * (z - t1), classes in order (as NumPy's
        # reduction over axis 0), no reassociation: the same bits as the fallback
        n_classes, n_pixels = e.shape
        for p in range(n_pixels):
            total[p] = 0.0
            weighted[p] = 0.0
        for c in range(n_classes):
            for p in range(n_pixels):
                total[p] += e[c, p]
                weighted[p] += e[c, p] * (z[c, p] - t1[p])

    return top_two, exp_sums


def _pixel_stats(z: np.ndarray, *, compiled: bool | None = None):
    """Predicted class, softmax entropy and top-2 margin of each pixel of ``z`` (C, P).

    ``z`` is float32 or float64 and C-contiguous. Returns ``pred`` (int32) and
    float32 ``entropy`` and ``margin`` of shape (P,).
    """
    n_classes, n_pixels = z.shape
    kernels = _compiled_stats() if compiled is None or compiled else None
    if kernels is not None:
        top_two, exp_sums = kernels
        t1 = np.empty(n_pixels, z.dtype)
        t2 = np.empty(n_pixels, z.dtype)
        pred = np.empty(n_pixels, np.int32)
        top_two(z, t1, t2, pred)
    else:
        t1 = z.max(axis=0)
        pred = z.argmax(axis=0).astype(np.int32)
        masked = z.copy()
        masked[pred, np.arange(n_pixels)] = -np.inf
        t2 = masked.max(axis=0)
        del masked
    # e = exp(z - t1), in place of one buffer
    e = np.subtract(z, t1)
    np.exp(e, out=e)
    if kernels is not None:
        total = np.empty(n_pixels, z.dtype)
        weighted = np.empty(n_pixels, z.dtype)
        exp_sums(e, z, t1, total, weighted)
    else:
        total = e.sum(axis=0)
        e *= z - t1
        weighted = e.sum(axis=0)
    del e
    # H = -sum p log p = log S - sum(e d) / S with e = exp(d), d = z - max, S = sum e
    entropy = np.log(total) - weighted / total
    # p1 - p2 = (1 - exp(t2 - t1)) / S; one class: exp(-inf) = 0, the margin is 1
    margin = (1.0 - np.exp(t2 - t1)) / total
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


def _disagreement(pred: np.ndarray, radii: tuple[int, ...]) -> list[np.ndarray]:
    """Share of in-image neighbours of another class, for windows of the given radii.

    One pass over the offsets of the largest window; the centre is excluded.
    """
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
    shares = []
    for r in radii:
        neighbours = _in_image((h, w), r) - 1
        differ = neighbours - same[r]
        share = np.zeros((h, w), dtype=np.float32)
        np.divide(differ, neighbours, out=share, where=neighbours > 0, casting="unsafe")
        shares.append(share)
    return shares


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


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    return (_box_sum(values, radius) / _in_image(values.shape, radius)).astype(np.float32)


def _box_max(values: np.ndarray, radius: int) -> np.ndarray:
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


def _boundary_distance(disagree_3x3: np.ndarray, max_distance: float) -> np.ndarray:
    boundary = disagree_3x3 > 0
    if not boundary.any():
        return np.full(boundary.shape, max_distance, dtype=np.float32)
    distance = ndimage.distance_transform_edt(~boundary)
    return np.minimum(distance, max_distance).astype(np.float32)


# --------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------
def _as_image(z, where: str) -> np.ndarray:
    """One image's logits as a C-contiguous float32 (or float64) numpy array (C, H, W)."""
    if hasattr(z, "detach") and hasattr(z, "cpu"):  # a torch tensor, on any device
        z = z.detach().cpu().numpy()
    z = np.asarray(z)
    if z.ndim != 3:
        raise ValueError(f"{where} must have shape (C, H, W), got {z.shape}.")
    if z.dtype.kind != "f":
        raise TypeError(f"{where} must hold floating-point logits, got dtype {z.dtype}.")
    if z.shape[0] < 1 or z.shape[1] < 1 or z.shape[2] < 1:
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


def image_context(
    logits, *, max_distance: float = _DEFAULT_MAX_DISTANCE, out: np.ndarray | None = None
) -> np.ndarray:
    """The spatial context features of one image.

    Parameters
    ----------
    logits : array-like or torch.Tensor of shape (C, H, W)
        One image's logits (float16, float32 or float64).
    max_distance : float, default=16
        Clip of ``boundary_distance``, in pixels.
    out : ndarray of shape (K, H, W), float32, optional
        Where to write the result.

    Returns
    -------
    features : ndarray of shape (K, H, W), float32
        Columns in the order of :data:`CONTEXT_FEATURES`.
    """
    max_distance = _check_max_distance(max_distance)
    z = _as_image(logits, "logits")
    n_classes, h, w = z.shape
    shape = (len(CONTEXT_FEATURES), h, w)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be a float32 array of shape {shape}, got {out.shape}.")
    pred, entropy, margin = _pixel_stats(z.reshape(n_classes, h * w))
    if not (np.isfinite(entropy).all() and np.isfinite(margin).all()):
        # any NaN or infinite logit makes its pixel's entropy or margin non-finite
        check_finite(z, where="logits")
    pred, entropy, margin = (a.reshape(h, w) for a in (pred, entropy, margin))
    out[0], out[1] = _disagreement(pred, (1, 3))
    out[2] = _boundary_distance(out[0], max_distance)
    out[3] = _box_mean(entropy, 2)
    out[4] = _box_max(entropy, 2)
    out[5] = _box_mean(margin, 2)
    return out


def spatial_context(logits, *, max_distance: float = _DEFAULT_MAX_DISTANCE) -> np.ndarray:
    """Spatial context features of every pixel of a batch of logit maps.

    Parameters
    ----------
    logits : array-like or torch.Tensor of shape (N, C, H, W)
        Per-pixel logits of N images (float16, float32 or float64; a torch
        tensor may live on any device and is moved to the CPU one image at
        a time). A sequence of (C, H, W) images of one size works too.
    max_distance : float, default=16
        Clip of ``boundary_distance``, in pixels.

    Returns
    -------
    features : ndarray of shape (N, K, H, W), float32
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
        if logits.ndim != 4:
            raise ValueError(
                f"logits must have shape (N, C, H, W), got {tuple(logits.shape)}. For a "
                "single image add a leading axis ([None]) or call image_context."
            )
        n, _, h, w = (int(s) for s in logits.shape)
        images = (logits[i] for i in range(n))
    else:
        images = list(logits)
        if not images:
            raise ValueError("No images were given.")
        n = len(images)
        h, w = np.shape(images[0])[1:]
    out = np.empty((n, len(CONTEXT_FEATURES), h, w), dtype=np.float32)
    for i, z in enumerate(images):
        z = _as_image(z, f"logits of image {i}")
        if z.shape[1:] != (h, w):
            raise ValueError(
                f"image {i} is {z.shape[1:]} but image 0 is {(h, w)}; give images of one "
                "size, or call image_context on each."
            )
        image_context(z, max_distance=max_distance, out=out[i])
    return out
