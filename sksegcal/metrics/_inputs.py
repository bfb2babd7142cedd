"""What the metrics accept: labels, probabilities or logits, ids, weights, bin counts.

Every public entry point of :mod:`sksegcal.metrics` goes through these checks,
so an error names the argument, what was wrong and what to pass instead.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np

#: Lower clip of a float32 probability before its log is taken: float32's smallest
#: normal number (about 1.18e-38; one pixel adds at most about 87.3 nats). Other input
#: precisions are clipped at their own smallest normal (:func:`nll_clip`); the NLL
#: of logits is not clipped at all.
NLL_EPS: float = float(np.finfo(np.float32).tiny)

# Pixels processed at once by update() (larger chunks are cut): bounds the
# float32 / float64 temporaries to a few tens of MB whatever the input size.
_CHUNK_ROWS = 1 << 18

# Tolerance on the row sums of probabilities, by input precision: about ten machine
# epsilons of a half-precision input (float16 2**-10, bfloat16 2**-7), whose softmax
# rows are off by up to ~4e-4 and ~3.3e-3 respectively.
_ROW_SUM_ATOL = {"float16": 1e-2, "bfloat16": 8e-2}
_ROW_SUM_ATOL_DEFAULT = 1e-3

_NON_FINITE_LOGITS = "logits contain NaN or +inf values (in non-ignored pixels)."


def row_sum_tolerance(precision: str) -> float:
    """How far a row of probabilities of this input precision may sum from 1."""
    return _ROW_SUM_ATOL.get(precision, _ROW_SUM_ATOL_DEFAULT)


def nll_clip(precision: str) -> float:
    """Smallest normal number of the input precision: the lower clip before ``log p``."""
    if precision == "bfloat16":  # float32's exponent range
        return NLL_EPS
    return float(np.finfo(np.dtype(precision)).tiny)


def check_n_bins(n_bins: Any, name: str = "n_bins") -> int:
    """A positive int, or a ValueError (bools and floats such as 10.5 are refused)."""
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, numbers.Integral):
        raise ValueError(f"{name} must be a positive int; got {n_bins!r}.")
    if n_bins < 1:
        raise ValueError(f"{name} must be a positive int; got {n_bins!r}.")
    return int(n_bins)


def is_tensor(a: Any) -> bool:
    # torch is only looked at when the caller already imported it.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _precision_of(a: Any) -> str | None:
    """"bfloat16" for a bfloat16 tensor (NumPy has no such dtype), else None."""
    if is_tensor(a) and a.dtype == sys.modules["torch"].bfloat16:
        return "bfloat16"
    return None


def to_numpy(a: Any, name: str) -> np.ndarray:
    """Array-like or torch tensor -> NumPy array, without copying where possible."""
    if is_tensor(a):
        torch = sys.modules["torch"]
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:  # NumPy has no bfloat16
            a = a.to(torch.float32)
        return a.numpy()
    arr = np.asarray(a)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a numeric array; got dtype {arr.dtype}.")
    return arr


class Chunk(NamedTuple):
    """One validated chunk: (n, C) float32 values and what goes with them."""

    x: np.ndarray  # (n, C) float32: probabilities or logits
    precision: str  # the input's float type: "float16", "bfloat16", "float32", ...
    spatial: tuple[int, ...] | None  # (N, *spatial) of (N, C, *spatial) input
    y: np.ndarray  # (n,) int64 labels
    yv: np.ndarray  # labels of the kept rows
    rows: np.ndarray | None  # kept rows, None when all are kept
    w: np.ndarray | None  # (n,) float64 weights
    ids: Any  # None or (keys, codes): see check_image_id
    source: np.ndarray | None  # the input itself when wider than float32 (for p(label))


def prepare_values(
    values: Any, name: str = "y_prob"
) -> tuple[np.ndarray, str, tuple[int, ...] | None, np.ndarray | None]:
    """Return C-contiguous float32 (n, C) values, the input precision, the image shape.

    (N, C, *spatial) input is moved to (N * prod(spatial), C) (a chunk-sized
    copy); the returned shape is (N, *spatial) so labels can be checked.
    ``name`` is "y_prob" (probabilities) or "logits". The fourth value is the
    input array when its dtype is wider than float32 (None otherwise), so
    that the probability of the label can be read at full precision.
    """
    precision = _precision_of(values)
    p = to_numpy(values, name)
    if p.dtype.kind != "f":
        what = "probabilities" if name == "y_prob" else "logits"
        raise TypeError(
            f"{name} must hold floating-point {what}; got dtype {p.dtype}. "
            "Pass the network's scores, not labels."
        )
    precision = precision or p.dtype.name
    source = p if p.dtype.itemsize > 4 else None
    spatial = None
    if p.ndim == 1 and name == "y_prob":
        # Binary problem given as P(class 1), as scikit-learn scorers pass it.
        p1 = p.astype(np.float32)
        p = np.empty((p1.size, 2), dtype=np.float32)
        p[:, 1] = p1
        p[:, 0] = 1.0 - p1
    elif p.ndim == 2:
        p = np.ascontiguousarray(p, dtype=np.float32)
    elif p.ndim >= 3:
        spatial = (p.shape[0], *p.shape[2:])
        p = np.ascontiguousarray(np.moveaxis(p, 1, -1), dtype=np.float32).reshape(-1, p.shape[1])
    else:
        shapes = "1-D, 2-D" if name == "y_prob" else "2-D"
        raise ValueError(
            f"{name} must be {shapes} (n, C) or (N, C, H, W); got shape {p.shape}."
        )
    return p, precision, spatial, source


def label_probabilities(chunk: Chunk, n: int) -> np.ndarray:
    """float64 p(label) of the kept rows, read from the (wider than float32) input."""
    src = chunk.source
    idx = np.arange(n) if chunk.rows is None else chunk.rows
    yv = chunk.yv
    if src.ndim == 1:  # P(class 1) of a binary problem
        p1 = src[idx].astype(np.float64)
        return np.where(yv == 1, p1, 1.0 - p1)
    if src.ndim == 2:
        return src[idx, yv].astype(np.float64)
    per = int(np.prod(src.shape[2:], dtype=np.int64))
    where = np.unravel_index(idx % per, src.shape[2:])
    return src[(idx // per, yv, *where)].astype(np.float64)


def inverse_temperature(temperature: Any, n: int, spatial, dtype) -> np.ndarray:
    """1 / temperature as a (1,) or (n,) array, checked positive and finite."""
    t = to_numpy(temperature, "temperature")
    if t.ndim == 0:
        t = t.reshape(1)
    elif spatial is not None and tuple(t.shape) == spatial or t.shape == (n,):
        t = t.reshape(-1)
    else:
        expected = f"(n,) = ({n},)" if spatial is None else f"(N, *spatial) = {spatial}"
        raise ValueError(
            f"temperature must be a number or one per pixel of shape {expected}; got "
            f"shape {tuple(t.shape)}."
        )
    t = t.astype(np.float64)
    if not (np.isfinite(t).all() and (t > 0).all()):
        raise ValueError("temperature must be positive and finite.")
    return (1.0 / t).astype(dtype)


def prepare_labels(
    y_true: Any, n_rows: int, spatial: tuple[int, ...] | None, name: str = "y_true"
) -> np.ndarray:
    """Return int64 labels of shape (n_rows,), checking the shape."""
    if is_tensor(y_true):
        y = y_true.detach().cpu().numpy()
    else:
        y = np.asarray(y_true)
    if y.dtype.kind == "f":
        if not np.all(y == np.round(y)):
            raise ValueError(
                f"{name} must hold integer class indices; got non-integer floats."
            )
    elif y.dtype.kind not in "biu":
        raise TypeError(f"{name} must hold integer class indices; got dtype {y.dtype}.")
    if spatial is not None:
        if tuple(y.shape) != spatial:
            raise ValueError(
                f"Shape mismatch: y_prob has images of shape (N, *spatial) = {spatial} "
                f"(from (N, C, H, W) input) but {name} has shape {tuple(y.shape)}."
            )
    elif y.ndim != 1 or y.shape[0] != n_rows:
        raise ValueError(
            f"Shape mismatch: y_prob has {n_rows} rows but {name} has shape "
            f"{tuple(y.shape)}; expected ({n_rows},)."
        )
    return y.reshape(-1).astype(np.int64, copy=False)


def _key(k: Any) -> Hashable:
    k = k.item() if isinstance(k, np.generic) else k
    if not isinstance(k, Hashable):
        raise TypeError(f"image_id values must be hashable; got {type(k).__name__}.")
    return k


def check_image_id(image_id: Any, n_rows: int, spatial: tuple[int, ...] | None):
    """Return None or ``(keys, codes)``: image ids and each pixel's index into them.

    ``codes`` is None when one id covers the whole chunk.
    """
    if image_id is None:
        return None
    if isinstance(image_id, (str, bytes)) or np.ndim(image_id) == 0:
        return [_key(image_id)], None
    ids = to_numpy(image_id, "image_id") if is_tensor(image_id) else np.asarray(image_id)
    if spatial is not None and ids.shape == (spatial[0],):
        # One id per image of an (N, C, H, W) chunk: pixels are image-contiguous.
        per = int(np.prod(spatial[1:], dtype=np.int64))
        return [_key(k) for k in ids], np.repeat(np.arange(ids.size), per)
    if ids.ndim >= 1 and ids.size == n_rows:
        ids = ids.reshape(-1)
        if ids.dtype == object:
            # tuples / mixed ids: factorise through a dict
            lookup: dict = {}
            codes = np.fromiter(
                (lookup.setdefault(_key(k), len(lookup)) for k in ids), np.int64, ids.size
            )
            return list(lookup), codes
        uniq, codes = np.unique(ids, return_inverse=True)
        return [_key(k) for k in uniq], codes.reshape(-1)
    expected = f"({spatial[0]},) or {spatial}" if spatial is not None else f"({n_rows},)"
    raise ValueError(
        f"Shape mismatch: image_id has shape {ids.shape}; expected a scalar or {expected}."
    )


def check_region(region: Any, n_rows: int, spatial, n_regions: int) -> np.ndarray:
    """int64 region codes of shape (n_rows,) in ``[0, n_regions)``.

    A boolean mask (two regions only) reads ``True`` as the first region.
    """
    r = to_numpy(region, "region") if is_tensor(region) else np.asarray(region)
    shapes = {(n_rows,)}
    if spatial is not None:
        shapes |= {tuple(spatial), (spatial[0], n_rows // max(spatial[0], 1))}
    if r.shape not in shapes:
        expected = f"({n_rows},)" if spatial is None else f"{tuple(spatial)} or ({n_rows},)"
        raise ValueError(
            f"Shape mismatch: region has shape {r.shape}; expected {expected}, one region "
            "per pixel."
        )
    if r.dtype == np.bool_:
        if n_regions != 2:
            raise ValueError(
                f"A boolean region mask selects the first of two regions; this accumulator "
                f"has {n_regions}: pass integer codes in [0, {n_regions - 1}]."
            )
        return (~r).reshape(-1).astype(np.int64)
    if r.dtype.kind not in "iu":
        raise TypeError(
            f"region must hold integer region codes or booleans; got dtype {r.dtype}."
        )
    codes = r.reshape(-1).astype(np.int64, copy=False)
    if codes.size and (int(codes.min()) < 0 or int(codes.max()) >= n_regions):
        raise ValueError(
            f"region holds codes outside [0, {n_regions - 1}]: one code per region of the "
            "accumulator, in the order of its regions."
        )
    return codes


def check_sample_weight(
    sample_weight: Any, n_rows: int, against: str = "y_prob"
) -> np.ndarray | None:
    """float64 weights of shape (n_rows,): finite and non-negative (as scikit-learn)."""
    if sample_weight is None:
        return None
    w = to_numpy(sample_weight, "sample_weight").astype(np.float64, copy=False)
    if w.size != n_rows:
        raise ValueError(
            f"Shape mismatch: sample_weight has {w.size} values but {against} has "
            f"{n_rows} pixels."
        )
    w = w.reshape(-1)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sample_weight must be finite and non-negative.")
    return w


def _shape(a: Any) -> tuple[int, ...]:
    return tuple(a.shape) if hasattr(a, "shape") else np.shape(a)


def split_large_chunk(y_true, y_prob, image_id, sample_weight, extra=None):
    """Cut a chunk of more than ``_CHUNK_ROWS`` pixels into pieces, or return None.

    2-D input is cut by rows, (N, C, *spatial) input by whole images; labels,
    per-pixel or per-image ids, weights and ``extra`` (predictions, per-pixel
    temperatures) are cut alongside.
    """
    shp = _shape(y_prob)
    if len(shp) <= 2:
        n = shp[0] if shp else 0
        if n <= _CHUNK_ROWS:
            return None
        if len(_shape(y_true)) != 1 or _shape(y_true)[0] != n:
            raise ValueError(
                f"Shape mismatch: y_prob has {n} rows but y_true has shape "
                f"{_shape(y_true)}; expected ({n},)."
            )
        per, n_units, step = 1, n, _CHUNK_ROWS
    else:
        n_units = shp[0]
        per = int(np.prod(shp[2:], dtype=np.int64))
        if n_units * per <= _CHUNK_ROWS or n_units < 2:
            return None
        if _shape(y_true)[:1] != (n_units,):
            raise ValueError(
                f"Shape mismatch: y_prob has {n_units} images (shape {shp}) but y_true "
                f"has shape {_shape(y_true)}; expected {(n_units, *shp[2:])}."
            )
        step = max(1, _CHUNK_ROWS // max(per, 1))

    def cut(a, s, e):
        if isinstance(a, tuple):  # several per-pixel arguments riding together
            return tuple(cut(part, s, e) for part in a)
        if a is None or isinstance(a, (str, bytes)) or np.ndim(a) == 0:
            return a  # one id for the whole chunk
        a = a if is_tensor(a) else np.asarray(a)
        if per == 1 or _shape(a)[:1] == (n_units,):
            return a[s:e]
        # per-pixel values given flat for (N, C, H, W) input
        return a.reshape(n_units, -1)[s:e]

    return [
        (
            y_true[s:e],
            y_prob[s:e],
            cut(image_id, s, e),
            cut(sample_weight, s, e),
            cut(extra, s, e),
        )
        for s in range(0, n_units, step)
        for e in [min(s + step, n_units)]
    ]


def n_classes_of(y_prob) -> int:
    """The class count of (n, C), (n,) (binary) or (N, C, H, W) probabilities."""
    shape = _shape(y_prob)
    if len(shape) == 1:
        return 2
    if len(shape) < 1:
        raise ValueError("y_prob must be 1-D, 2-D (n, C) or (N, C, H, W); got a scalar.")
    return int(shape[1])
