"""What the correctness classifier sees.

The paper feeds its misprediction detector the full, unsorted vector of
per-pixel log-probabilities. That ties the detector to one class set; the
class-agnostic option (sorted top-k log-probabilities, entropy and margin)
is smaller, faster and transfers across class sets.
"""

from __future__ import annotations

import numpy as np

from ._kernels import agnostic_parts
from ._uncertainty import entropy, entropy_from_sums, margin_from_sums, top2_margin

__all__ = [
    "FEATURE_SETS",
    "features_from_logits",
    "log_softmax",
    "make_features",
    "softmax",
]

FEATURE_SETS = ("log_softmax", "agnostic")


def log_softmax(z: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log-softmax through logsumexp, without overflow.

    Parameters
    ----------
    z : ndarray of shape (n, C)
        Logits; float16 input is computed in float32.
    out : ndarray, optional
        Where to write the result (may be ``z`` itself when it is float32/64).

    Returns
    -------
    ndarray of shape (n, C)

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.features import log_softmax
    >>> np.exp(log_softmax(np.array([[1000.0, 1000.0]]))).tolist()
    [[0.5, 0.5]]
    """
    z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float32)
    shift = z.max(axis=1, keepdims=True)
    out = np.subtract(z, shift, out=out)
    lse = np.log(np.exp(out).sum(axis=1, keepdims=True))
    out -= lse
    return out


def softmax(z: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Softmax over axis 1 (classes) with one exp per entry, without overflow.

    Works on a pixel table (n, C) and on maps (N, C, H, W). ``out`` may be ``z``.
    float32 (and float16, computed in float32) goes through torch's fused
    softmax, about twice as fast as NumPy's separate max, exp, sum and divide
    passes; float64 stays in NumPy, exact and independent of the row order.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.features import softmax
    >>> softmax(np.array([[1000.0, 1000.0]])).tolist()
    [[0.5, 0.5]]
    """
    z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float32)
    if z.dtype == np.float32 and z.ndim >= 2 and z.size:
        return _torch_softmax(z, out)
    out = np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)
    return out


def _torch_softmax(z: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    import torch

    # Row by row whatever the thread count, so results do not depend on it.
    # torch needs a writeable source; a read-only array (a memory map) is copied.
    source = torch.from_numpy(z if z.flags.writeable else z.copy())
    if (
        out is None
        or out.dtype != z.dtype
        or not out.flags.c_contiguous
        or np.may_share_memory(out, z)
    ):
        result = torch.softmax(source, dim=1).numpy()
        if out is None:
            return result
        out[...] = result
        return out
    torch.softmax(source, dim=1, out=torch.from_numpy(out))
    return out


def features_from_logits(z: np.ndarray, kind: str = "log_softmax", *, top_k: int = 5):
    """``make_features(log_softmax(z), kind)`` for (n, C) float logits.

    The ``"agnostic"`` set comes from compiled row loops when numba is
    installed (the same numbers to float rounding, several times faster);
    ``z`` is not modified.
    """
    z = np.asarray(z)
    if z.dtype not in (np.float32, np.float64):
        z = z.astype(np.float32)
    if kind == "agnostic" and z.ndim == 2 and z.shape[0]:
        k = min(top_k, z.shape[1])
        parts = agnostic_parts(np.ascontiguousarray(z), k)
        if parts is not None:
            top, total, weighted = parts
            out = np.empty((z.shape[0], k + 2), dtype=z.dtype)
            out[:, :k] = top - np.log(total)[:, None].astype(z.dtype)
            out[:, k] = entropy_from_sums(total, weighted)
            # the top d is 0; with one column kept, p1 alone (as make_features)
            second = np.exp(top[:, 1].astype(np.float64)) if k >= 2 else 0.0
            out[:, k + 1] = margin_from_sums(total, second)
            return out
    return make_features(log_softmax(z), kind, top_k=top_k)


def make_features(log_proba: np.ndarray, kind: str = "log_softmax", *, top_k: int = 5):
    """Classifier features from log-probabilities of shape (n, C).

    ``"log_softmax"``
        The log-probabilities themselves (the paper's input).
    ``"agnostic"``
        The ``top_k`` largest log-probabilities in decreasing order, the
        entropy and the margin between the two largest probabilities. The
        same features mean the same thing whatever the class set.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.features import log_softmax, make_features
    >>> lp = log_softmax(np.array([[2.0, 0.0, 1.0]]))
    >>> make_features(lp, "agnostic", top_k=2).shape
    (1, 4)
    """
    # float64 stays float64 (so that a classifier sees exactly the same numbers whatever
    # the row order); anything else is computed in float32
    lp = np.asarray(log_proba)
    if lp.dtype != np.float64:
        lp = lp.astype(np.float32)
    if kind == "log_softmax":
        return lp
    if kind != "agnostic":
        raise ValueError(f"features must be one of {FEATURE_SETS}, got {kind!r}.")
    k = min(top_k, lp.shape[1])
    # partition then sort only the k kept columns: O(n C) rather than O(n C log C)
    top = -np.partition(-lp, k - 1, axis=1)[:, :k]
    top = -np.sort(-top, axis=1)
    # the margin of the k kept columns: p1 - p2, or p1 alone when only one is kept
    columns = [top, entropy(lp, axis=1), top2_margin(top, axis=1)]
    return np.column_stack(columns).astype(lp.dtype, copy=False)
