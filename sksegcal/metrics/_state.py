"""A CalibrationAccumulator as a dict of arrays and scalars, and back, without pickle.

The dict holds NumPy arrays (float64 tallies), str, int, float and bool only,
so ``np.savez(path, **state, allow_pickle=False)`` writes it and
``dict(np.load(path, allow_pickle=False))`` reads it (scalars come back as
0-d arrays, which :func:`from_state` accepts). Image ids, which may be ints,
strings or tuples (the automatic ids of (N, C, H, W) chunks), travel as one
JSON string. Everything read is checked: a dict from an untrusted file gives
either an accumulator or a ValueError naming the offending key.

An accumulator with ``regions`` adds the ``region*`` keys (the names as a JSON
list, then each tally with a leading region axis, per-image tallies aligned
with ``image_keys``); they must add up to the pooled tallies. A state without
them is an accumulator without regions, as every earlier version wrote.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import numpy as np

FORMAT = "sksegcal.CalibrationAccumulator"
VERSION = 1

_SETTINGS = ("n_classes", "n_base_bins", "classwise", "per_image_n_bins", "check_input")
_REQUIRED = {
    "format", "version", *_SETTINGS, "uid", "n_auto_images", "top", "nll_sum",
    "brier_sum", "total_weight", "n_pixels", "confusion_matrix", "image_keys",
    "image_tallies",
}  # fmt: skip
_OPTIONAL = {"ignore_index", "classwise_tallies"}
# with regions: all of these (and region_classwise_tallies when classwise)
_REGION_KEYS = {
    "regions",
    "region_top",
    "region_sums",
    "region_confusion_matrix",
    "region_image_tallies",
}
_OPTIONAL |= _REGION_KEYS | {"region_classwise_tallies"}
# columns of region_sums, one row per region
_REGION_SUMS = ("nll_sum", "brier_sum", "total_weight", "n_pixels")


def _bad(key: str, what: str) -> ValueError:
    return ValueError(f"Invalid CalibrationAccumulator state: {key!r} {what}.")


def _encode_key(k: Any):
    if isinstance(k, tuple):
        return [_encode_key(part) for part in k]
    if k is None or isinstance(k, (str, bool, int)):
        return k
    if isinstance(k, float) and np.isfinite(k):
        return k
    raise TypeError(
        f"image_id {k!r} of type {type(k).__name__} cannot be saved without pickle: "
        "use int, str or tuple ids."
    )


def _decode_key(k: Any):
    if isinstance(k, list):
        return tuple(_decode_key(part) for part in k)
    if k is None or isinstance(k, (str, bool, int, float)):
        return k
    raise _bad("image_keys", "holds a JSON object; ids are ints, floats, strings or lists")


def to_state(acc) -> dict[str, Any]:
    """The accumulator's configuration and tallies (see :meth:`state_dict`)."""
    keys = list(acc._images)
    b = acc.per_image_n_bins
    tallies = np.stack([acc._images[k] for k in keys]) if keys else np.zeros((0, 3, b))
    state = {
        "format": FORMAT,
        "version": VERSION,
        "n_classes": acc.n_classes,
        "n_base_bins": acc.n_base_bins,
        "classwise": acc.classwise,
        "per_image_n_bins": acc.per_image_n_bins,
        "check_input": acc.check_input,
        "uid": acc._uid,
        "n_auto_images": int(acc._n_auto_images),
        "top": acc._top.copy(),
        "nll_sum": float(acc._nll_sum),
        "brier_sum": float(acc._brier_sum),
        "total_weight": float(acc.total_weight_),
        "n_pixels": int(acc.n_pixels_),
        "confusion_matrix": acc.confusion_matrix_.copy(),
        "image_keys": json.dumps([_encode_key(k) for k in keys], allow_nan=False),
        "image_tallies": tallies.astype(np.float64),
    }
    if acc.ignore_index is not None:  # left out for None: np.savez cannot store None
        state["ignore_index"] = acc.ignore_index
    if acc.classwise:
        state["classwise_tallies"] = acc._cls.copy()
    if acc.regions is not None:
        state.update(_regions_to_state(acc, keys))
    return state


def _regions_to_state(acc, keys: list) -> dict[str, Any]:
    parts = [acc._region_accs[name] for name in acc.regions]
    zero = np.zeros((3, acc.per_image_n_bins))
    for part in parts:
        if not part._images.keys() <= set(keys):  # never: regions see the pooled chunks
            raise RuntimeError("a region holds an image id the pooled tallies do not")
    state = {
        "regions": json.dumps(list(acc.regions)),
        "region_top": np.stack([p._top for p in parts]),
        "region_sums": np.array(
            [[p._nll_sum, p._brier_sum, p.total_weight_, float(p.n_pixels_)] for p in parts],
            dtype=np.float64,
        ),
        "region_confusion_matrix": np.stack([p.confusion_matrix_ for p in parts]),
        "region_image_tallies": np.stack(
            [
                np.stack([p._images.get(k, zero) for k in keys])
                if keys
                else np.zeros((0, 3, acc.per_image_n_bins))
                for p in parts
            ]
        ).astype(np.float64),
    }
    if acc.classwise:
        state["region_classwise_tallies"] = np.stack([p._cls for p in parts])
    return state


def _scalar(d, key, kind):
    """A Python scalar of ``kind`` ("int", "bool", "float", "str") from a scalar or 0-d array."""
    v = d[key]
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise _bad(key, f"must be a scalar; got an array of shape {v.shape}")
        v = v[()]
    if isinstance(v, np.generic):
        v = v.item()
    ok = {
        "bool": lambda x: isinstance(x, bool),
        "int": lambda x: isinstance(x, numbers.Integral) and not isinstance(x, bool),
        "float": lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool),
        "str": lambda x: isinstance(x, str),
    }[kind]
    if not ok(v):
        raise _bad(key, f"must be a {kind}; got {type(v).__name__} {v!r}"[:200])
    if kind == "float":
        v = float(v)
        if not np.isfinite(v):
            raise _bad(key, f"must be finite; got {v}")
    return v


def _array(d, key, shape):
    v = d[key]
    if not isinstance(v, np.ndarray):
        raise _bad(key, f"must be a NumPy array; got {type(v).__name__}")
    if v.dtype != np.float64:
        raise _bad(key, f"must have dtype float64; got {v.dtype}")
    if v.shape != shape:
        raise _bad(key, f"must have shape {shape}; got {v.shape}")
    if not np.isfinite(v).all() or (v < 0).any():
        raise _bad(key, "must hold finite, non-negative tallies")
    return v.copy()


def _positive(d, key, minimum=1):
    v = _scalar(d, key, "int")
    if v < minimum:
        raise _bad(key, f"must be an int >= {minimum}; got {v}")
    return v


def _check_bins(key, st, total, rel=1e-9):
    """Weights sum to the total; confidence sums and hits lie within [0, weight]."""
    w, conf, hits = st[..., 0, :], st[..., 1, :], st[..., 2, :]
    slack = rel * max(1.0, float(np.max(w, initial=0.0)))
    if (conf > w + slack).any() or (hits > w + slack).any():
        raise _bad(key, "holds a bin whose confidence sum or hit count exceeds its weight")
    if total is not None and abs(float(w.sum()) - total) > rel * max(1.0, total) * 10:
        raise _bad(key, f"weights sum to {float(w.sum())!r}, not the total_weight {total!r}")


def from_state(cls, d: Any):
    """Rebuild an accumulator from :func:`to_state`'s dict, checking every entry."""
    if not isinstance(d, dict) and not hasattr(d, "keys"):
        raise TypeError(f"state must be a dict; got {type(d).__name__}.")
    d = {str(k): d[k] for k in d.keys()}
    missing = sorted(_REQUIRED - d.keys())
    if missing:
        raise ValueError(f"Invalid CalibrationAccumulator state: missing keys {missing}.")
    unknown = sorted(d.keys() - _REQUIRED - _OPTIONAL)
    if unknown:
        raise ValueError(f"Invalid CalibrationAccumulator state: unknown keys {unknown}.")
    if _scalar(d, "format", "str") != FORMAT:
        raise _bad("format", f"must be {FORMAT!r}")
    version = _scalar(d, "version", "int")
    if version != VERSION:
        raise _bad("version", f"is {version}; this sksegcal reads version {VERSION}")

    c = _positive(d, "n_classes", 2)
    g = _positive(d, "n_base_bins")
    b = _positive(d, "per_image_n_bins")
    classwise = _scalar(d, "classwise", "bool")
    ignore = d.get("ignore_index")
    if ignore is not None:
        ignore = _scalar(d, "ignore_index", "int")
    acc = cls(
        c,
        ignore_index=ignore,
        n_base_bins=g,
        classwise=classwise,
        per_image_n_bins=b,
        check_input=_scalar(d, "check_input", "bool"),
    )
    acc._uid = _scalar(d, "uid", "str")
    acc._n_auto_images = _positive(d, "n_auto_images", 0)

    total = _scalar(d, "total_weight", "float")
    if total < 0:
        raise _bad("total_weight", f"must be non-negative; got {total}")
    acc.total_weight_ = total
    acc.n_pixels_ = _positive(d, "n_pixels", 0)
    acc._nll_sum = _scalar(d, "nll_sum", "float")
    acc._brier_sum = _scalar(d, "brier_sum", "float")
    if acc._nll_sum < 0 or acc._brier_sum < 0:
        raise _bad("nll_sum" if acc._nll_sum < 0 else "brier_sum", "must be non-negative")
    acc._top = _array(d, "top", (3, g))
    _check_bins("top", acc._top, total)
    acc.confusion_matrix_ = _array(d, "confusion_matrix", (c, c))
    cm_total = float(acc.confusion_matrix_.sum())
    if abs(cm_total - total) > 1e-8 * max(1.0, total):
        raise _bad("confusion_matrix", f"sums to {cm_total!r}, not the total_weight {total!r}")
    if acc.n_pixels_ == 0 and total > 0:
        raise _bad("n_pixels", "is 0 but total_weight is positive")

    if classwise:
        if "classwise_tallies" not in d:
            raise _bad("classwise_tallies", "is missing although classwise is True")
        acc._cls = _array(d, "classwise_tallies", (c, 3, g))
        _check_bins("classwise_tallies", acc._cls, None)
        per_class = acc._cls[:, 0, :].sum(axis=1)
        if np.abs(per_class - total).max(initial=0.0) > 1e-8 * max(1.0, total):
            raise _bad("classwise_tallies", "weights do not sum to the total_weight per class")
    elif "classwise_tallies" in d:
        raise _bad("classwise_tallies", "is present although classwise is False")

    text = _scalar(d, "image_keys", "str")
    try:
        keys = json.loads(text)
    except ValueError:
        raise _bad("image_keys", "is not valid JSON") from None
    if not isinstance(keys, list):
        raise _bad("image_keys", "must be a JSON list")
    keys = [_decode_key(k) for k in keys]
    if len(set(keys)) != len(keys):
        raise _bad("image_keys", "holds the same id twice")
    img = _array(d, "image_tallies", (len(keys), 3, b))
    _check_bins("image_tallies", img, None)
    acc._images = {k: img[j].copy() for j, k in enumerate(keys)}
    if "regions" in d:
        _regions_from_state(acc, d, keys)
    else:
        present = sorted(k for k in d if k.startswith("region"))
        if present:
            raise _bad(present[0], "is present although the state names no regions")
    return acc


def _near(key: str, got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Region tallies add up to the pooled ones (float64 summation order aside)."""
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if not np.allclose(got, want, rtol=1e-9, atol=1e-9 * scale):
        raise _bad(key, f"does not add up over the regions to the pooled {what}")


def _regions_from_state(acc, d: dict, keys: list) -> None:
    text = _scalar(d, "regions", "str")
    try:
        names = json.loads(text)
    except ValueError:
        raise _bad("regions", "is not valid JSON") from None
    if not (
        isinstance(names, list)
        and len(names) >= 2
        and all(isinstance(n, str) and n for n in names)
    ):
        raise _bad("regions", "must be a JSON list of at least two non-empty names")
    if len(set(names)) != len(names):
        raise _bad("regions", "holds the same name twice")
    missing = sorted(_REGION_KEYS - d.keys())
    if acc.classwise and "region_classwise_tallies" not in d:
        missing.append("region_classwise_tallies")
    if missing:
        raise ValueError(
            f"Invalid CalibrationAccumulator state: regions are named but keys {missing} "
            "are missing."
        )
    if not acc.classwise and "region_classwise_tallies" in d:
        raise _bad("region_classwise_tallies", "is present although classwise is False")
    r, c, g, b = len(names), acc.n_classes, acc.n_base_bins, acc.per_image_n_bins
    top = _array(d, "region_top", (r, 3, g))
    sums = _array(d, "region_sums", (r, len(_REGION_SUMS)))
    cm = _array(d, "region_confusion_matrix", (r, c, c))
    img = _array(d, "region_image_tallies", (r, len(keys), 3, b))
    cls = _array(d, "region_classwise_tallies", (r, c, 3, g)) if acc.classwise else None
    pixels = sums[:, 3]
    if (pixels != np.round(pixels)).any():
        raise _bad("region_sums", "holds a pixel count (last column) that is not an integer")
    for j in range(r):
        total = float(sums[j, 2])
        _check_bins("region_top", top[j], total)
        _check_bins("region_image_tallies", img[j], None)
        if abs(float(cm[j].sum()) - total) > 1e-8 * max(1.0, total):
            raise _bad("region_confusion_matrix", "does not sum to the region's total weight")
        if pixels[j] == 0 and total > 0:
            raise _bad("region_sums", "holds a region with weight but no pixels")
    _near("region_top", top.sum(0), acc._top, "confidence grid")
    _near("region_confusion_matrix", cm.sum(0), acc.confusion_matrix_, "confusion matrix")
    _near(
        "region_image_tallies",
        img.sum(0),
        np.stack([acc._images[k] for k in keys]) if keys else np.zeros((0, 3, b)),
        "per-image tallies",
    )
    pooled = np.array([acc._nll_sum, acc._brier_sum, acc.total_weight_])
    _near("region_sums", sums[:, :3].sum(0), pooled, "NLL, Brier and weight sums")
    if int(pixels.sum()) != acc.n_pixels_:
        raise _bad(
            "region_sums", f"counts {int(pixels.sum())} pixels, not the n_pixels {acc.n_pixels_}"
        )
    if cls is not None:
        _check_bins("region_classwise_tallies", cls, None)
        _near("region_classwise_tallies", cls.sum(0), acc._cls, "classwise tallies")
    acc.regions = tuple(names)
    acc._region_accs = {}
    for j, name in enumerate(names):
        part = acc._twin()
        part._top = top[j].copy()
        part._nll_sum, part._brier_sum = float(sums[j, 0]), float(sums[j, 1])
        part.total_weight_, part.n_pixels_ = float(sums[j, 2]), int(pixels[j])
        part.confusion_matrix_ = cm[j].copy()
        if cls is not None:
            part._cls = cls[j].copy()
        part._images = {k: img[j, i].copy() for i, k in enumerate(keys)}
        acc._region_accs[name] = part
