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

import functools
import importlib.util
import os
import threading

import numpy as np

__all__ = ["HAVE_NUMBA", "argmax_rows", "shifted_exp", "softmax_stats", "tally"]

# numba itself is imported on the first compiled call (_compiled_loops), not here
HAVE_NUMBA = (
    os.environ.get("SKSEGCAL_DISABLE_NUMBA", "") in ("", "0")
    and importlib.util.find_spec("numba") is not None
)


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


@functools.cache
def _compiled_loops():
    """The numba module of loops, or None when numba cannot be imported after all."""
    try:
        from . import _numba_kernels
    except ImportError:  # pragma: no cover - a broken numba install
        return None
    return _numba_kernels


def _compiled(x: np.ndarray) -> bool:
    return (
        HAVE_NUMBA
        and x.ndim == 2
        and x.flags.c_contiguous
        and x.shape[1] > 0
        and _compiled_loops() is not None
    )


def argmax_rows(x: np.ndarray) -> np.ndarray:
    """``x.argmax(axis=1)`` of a float (n, C) array, as int64."""
    if _compiled(x) and x.dtype in (np.float32, np.float64):
        return _compiled_loops().argmax(x)
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
        total, squares = _compiled_loops().sums(e)
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
        pred = _compiled_loops().shift(x, beta, e) if compiled else _numpy_shift(x, beta, e)
    else:
        pred = np.ascontiguousarray(pred, dtype=np.int64)
        if compiled:
            worst = _compiled_loops().shift_given(x, beta, pred, e)
        else:
            _numpy_shift(x, beta, e, pred)
            worst = int((x > np.take_along_axis(x, pred[:, None], axis=1)).sum())
        if worst > 0:
            raise ValueError("y_pred is not the argmax of the logits in every row.")
    np.exp(e, out=e)
    return pred, e


def tally(
    values,
    *,
    normalise,
    pred,
    y,
    ignore_index,
    weights,
    codes,
    n_keys,
    n_bins,
    n_image_bins,
):
    """The accumulator's per-chunk tallies in one compiled pass (numba only).

    ``values`` are probabilities, or with ``normalise`` non-negative scores
    whose row sums are the normalisers (``shifted_exp`` output). Returns
    ``(top (3, n_bins), confusion (C, C), images (3, n_keys, n_image_bins),
    row_values (n,), sums [Brier, weight, pixels], checks [min, max,
    max |row sum - 1|, non-finite rows])``, fresh arrays: nothing is counted
    until the caller adds them. ``row_values`` holds each kept row's p(label),
    or with ``normalise`` its row sum (1 in ignored rows): the caller takes the
    NLL from it with one vectorised log rather than a scalar one per pixel.
    """
    empty_f = np.empty(0, dtype=np.float64)
    empty_i = np.empty(0, dtype=np.int64)
    return _compiled_loops().tally(
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
    _compiled_loops().shift(z, np.ones(1, dtype=z.dtype), d)
    e = _scratch_like(z)
    np.exp(d, out=e)
    return _compiled_loops().top_parts(d, e, int(k))
