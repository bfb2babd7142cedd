"""The engine that fits, evaluates and predicts over a LogitStore, in bounded memory.

Work is cut into blocks of consecutive images (:func:`image_blocks`, depending
on the store only), run as joblib tasks on any backend, and merged in block
order, so every backend gives the same floating-point sums.

May import: numpy, joblib, scikit-learn, :mod:`sksegcal.metrics`,
:mod:`sksegcal._kernels`, :mod:`sksegcal.calibrators`, :mod:`sksegcal.features`,
:mod:`sksegcal.pixels` (lazily where heavy) and the store's ``._logit_store``,
``._format`` and ``._context``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._files import atomic_write_json
from .._kernels import argmax_rows
from .._safety import bounded_jobs, check_input_type
from .._validation import requests_groups
from ..context import estimator_context
from ..features import softmax
from ..pixels import _check_context_calibrator
from ._format import MANIFEST, SPLIT_PARTS, VALUE_DTYPE
from ._logit_store import LogitStore

DEFAULT_TASK_PIXELS = 4_000_000


def image_blocks(store: LogitStore, ids: np.ndarray, task_pixels: int) -> list[np.ndarray]:
    """Consecutive image blocks of about ``task_pixels`` pixels each.

    The partition depends on the store only (not on n_jobs or the backend),
    and results are merged in block order, so every backend gives the same
    floating-point sums.
    """
    blocks, current, size = [], [], 0
    for i in ids:
        current.append(int(i))
        size += store.image_info(i).n_pixels
        if size >= task_pixels:
            blocks.append(np.array(current))
            current, size = [], 0
    if current:
        blocks.append(np.array(current))
    return blocks


def _make_accumulator(store: LogitStore, params: dict | None = None):
    from ..metrics import CalibrationAccumulator

    return CalibrationAccumulator(
        store.n_classes, ignore_index=store.ignore_index, **(params or {})
    )


def _check_calibrator(name, estimator, store: LogitStore, path: str) -> str | None:
    """Check a calibrator against the store; returns the context it reads (None: logits)."""
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if estimator is None:
        return None
    if not hasattr(estimator, "predict_proba"):
        raise TypeError(f"calibrator {name!r} has no predict_proba: {estimator!r}.")
    try:
        check_is_fitted(estimator)
    except NotFittedError:
        raise NotFittedError(
            f"calibrator {name!r} ({type(estimator).__name__}) is not fitted; fit it first "
            "(e.g. fit_store(estimator, store)) or pass None for the uncalibrated model."
        ) from None
    except TypeError:  # not a scikit-learn estimator: its own predict_proba will tell
        pass
    check_input_type(estimator, store.values, what=f"calibrator {name!r}", where=store.path)
    return _check_context_calibrator(
        estimator,
        store.n_classes,
        what=f"calibrator {name!r}",
        where=f"the store {store.path}",
        path=path,
    )


def calibrator_fingerprint(estimator) -> str | None:
    """sha256 of an estimator's class, parameters and fitted state (None for None).

    Two calibrators with equal ``repr`` (``TemperatureScaling()`` fitted to
    T=0.26 and to T=2.61) differ here: the parameters (``get_params``) and
    every fitted attribute (public, ending in ``_``) are hashed, arrays by
    dtype, shape and bytes, nested estimators and torch modules recursively.
    The same fitted object gives the same hash in every process (after a
    joblib or skops round trip too), which is what resuming needs.
    """
    if estimator is None:
        return None
    h = hashlib.sha256()
    _feed(h, estimator, set())
    return h.hexdigest()


def _feed(h, obj, active: set) -> None:
    """Add a canonical byte form of ``obj`` to the hash ``h``."""
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
        return
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            h.update(b"objarray:")
            h.update(repr(a.shape).encode())
            for item in a.ravel():
                _feed(h, item, active)
            return
        a = np.ascontiguousarray(a)
        h.update(f"array:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
        return
    if id(obj) in active:  # a cycle
        h.update(b"cycle;")
        return
    active.add(id(obj))
    try:
        cls = type(obj)
        if isinstance(obj, (list, tuple)):
            h.update(f"{cls.__name__}[{len(obj)}]:".encode())
            for item in obj:
                _feed(h, item, active)
        elif isinstance(obj, dict):
            h.update(f"dict[{len(obj)}]:".encode())
            for key in sorted(obj, key=repr):
                _feed(h, key, active)
                _feed(h, obj[key], active)
        elif isinstance(obj, (set, frozenset)):
            h.update(f"set[{len(obj)}]:".encode())
            for item in sorted(obj, key=repr):
                _feed(h, item, active)
        elif _is_torch(obj, "Tensor"):
            _feed(h, obj.detach().cpu().numpy(), active)
        elif _is_torch(obj, "nn.Module"):
            h.update(f"module:{_hashed_module(cls)}.{cls.__qualname__};".encode())
            _feed(h, dict(obj.state_dict()), active)
        elif hasattr(obj, "get_params") and not isinstance(obj, type):
            # an estimator: its parameters and its public fitted attributes (ending
            # in "_"), not private caches that a first predict may fill
            h.update(f"estimator:{_hashed_module(cls)}.{cls.__qualname__};".encode())
            fitted = {
                k: v for k, v in vars(obj).items() if k.endswith("_") and not k.startswith("_")
            }
            _feed(h, {"params": obj.get_params(deep=False), "fitted": fitted}, active)
        elif hasattr(obj, "__dict__") and not callable(obj):
            h.update(f"object:{_hashed_module(cls)}.{cls.__qualname__};".encode())
            _feed(h, dict(vars(obj)), active)
        elif callable(obj):
            h.update(
                f"callable:{_hashed_module(obj)}."
                f"{getattr(obj, '__qualname__', repr(obj))};".encode()
            )
        else:
            try:
                h.update(b"pickle:" + pickle.dumps(obj, protocol=4))
            except Exception:  # noqa: BLE001 - last resort for exotic objects
                h.update(f"repr:{obj!r};".encode())
    finally:
        active.discard(id(obj))


# Output stores record the fingerprint and a resume compares it, so the name hashed for a
# class or function must not move with the code. Everything these packages export (the
# classes and functions users import from them) is hashed under the package's name, which
# is what their ``__module__`` said when the first stores were written; every other name
# under its ``__module__``. Frozen: a package added here or removed would change the
# fingerprint of calibrators that hold its names.
_HASHED_UNDER_PACKAGE = (
    "sksegcal.store",
    "sksegcal.metrics",
    "sksegcal.conformal",
    "sksegcal.integrations.mmseg",
)


def _hashed_module(obj) -> Any:
    """The module name the fingerprint hashes for a class, a function or a callable object."""
    module = getattr(obj, "__module__", "")
    for package in _HASHED_UNDER_PACKAGE:
        if isinstance(module, str) and module.startswith(package + "._"):
            named = obj if hasattr(obj, "__qualname__") else type(obj)
            exported = getattr(sys.modules.get(package), named.__name__, None)
            return package if exported is named else module
    return module


def _is_torch(obj, what: str) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cls = torch.Tensor if what == "Tensor" else torch.nn.Module
    return isinstance(obj, cls)


def _uncalibrated(store: LogitStore, x: np.ndarray) -> np.ndarray:
    if store.values == "logits":
        return softmax(x)
    # float16 rounding leaves stored probabilities a little off the simplex
    return x / x.sum(axis=1, keepdims=True)


def _keeps_prediction(estimator) -> bool:
    """Whether the calibrated argmax is, by construction, the argmax of the input.

    True for our calibrators that keep ``BaseLogitCalibrator.predict`` (every
    temperature-based one); an affine map, a pipeline or a foreign estimator
    may move the argmax, so its own probabilities decide.
    """
    from ..calibrators import BaseLogitCalibrator

    return estimator is None or (
        isinstance(estimator, BaseLogitCalibrator)
        and type(estimator).predict is BaseLogitCalibrator.predict
    )


def _softmax_temperatures(store: LogitStore, estimator, x: np.ndarray):
    """T with probabilities ``softmax(x / T)`` (uncalibrated: 1), or None.

    Only with numba: NumPy alone is faster through torch's softmax and a
    probability table (its row argmax and sums cost more than they save).
    """
    from .. import _kernels
    from ..calibrators import BaseLogitCalibrator

    if store.values != "logits" or not _kernels.HAVE_NUMBA:
        return None
    if estimator is None:
        return 1.0
    if isinstance(estimator, BaseLogitCalibrator):
        return estimator._softmax_temperatures(x)
    return None


def _zero_timings(calibrators) -> dict:
    """Seconds per step of an evaluation: reading, the model's argmax, and per calibrator."""
    steps = ["read", "argmax"] + [
        f"{step}:{n}" for step in ("predict", "metrics") for n in calibrators
    ]
    return dict.fromkeys(steps, 0.0)


def _boundary_regions(store: LogitStore, image_id, width: int) -> np.ndarray:
    """:func:`~sksegcal.metrics.boundary_mask` of one image, at its kept pixels in row order."""
    from ..metrics import boundary_mask

    labels = np.asarray(store.load_image(image_id).labels)
    mask = boundary_mask(
        labels, width=width, ignore_index=store.ignore_index, spatial_dims=labels.ndim
    )
    return mask[store.labelled(labels)]


def _chunk_region(store: LogitStore, y: np.ndarray, kept_regions: np.ndarray, pos: int):
    """The boundary mask of one chunk of an image (its kept pixels are the next ones)."""
    keep = store.labelled(y)
    region = np.zeros(y.shape, dtype=bool)
    k = int(keep.sum())
    region[keep] = kept_regions[pos : pos + k]
    return region, pos + k


def _evaluate_block(
    store: LogitStore,
    calibrators: dict,
    ids,
    chunk_pixels: int,
    acc_params,
    boundary_width: int | None = None,
):
    accs = {name: _make_accumulator(store, acc_params) for name in calibrators}
    timings = _zero_timings(calibrators)
    keeps = {name: _keeps_prediction(est) for name, est in calibrators.items()}
    n_keeping = sum(keeps.values())
    # the context of each image, computed once for the calibrators that read it
    contexts = {name: estimator_context(est) for name, est in calibrators.items()}
    context = next((c for c in contexts.values() if c is not None), None)
    c = store.n_classes
    for image_id in ids:
        t0 = time.perf_counter()
        # the boundary band needs the whole label map; chunks take their part of it
        if boundary_width is not None:
            kept_regions, pos = _boundary_regions(store, image_id, boundary_width), 0
        region = None
        # ignored pixels stay in (the accumulators skip their labels): compacting
        # every block would cost a copy of it
        for rows_read, y in store.iter_tables(
            image_id, chunk_pixels, context=context, ignored="keep"
        ):
            if not store.labelled(y).any():
                continue
            # the logit columns, contiguous for the kernels; the rows for those reading context
            x = rows_read if context is None else np.ascontiguousarray(rows_read[:, :c])
            if boundary_width is not None:
                region, pos = _chunk_region(store, y, kept_regions, pos)
            t1 = time.perf_counter()
            timings["read"] += t1 - t0
            # The model's prediction, once per chunk, for every method that keeps it:
            # one argmax pass, and accuracy/mIoU that tied near-uniform calibrated rows
            # (very large temperatures) cannot change.
            model_pred = argmax_rows(x) if n_keeping > 1 else None
            t2 = time.perf_counter()
            timings["argmax"] += t2 - t1
            t1 = t2
            for name, est in calibrators.items():
                # Temperature-based methods (and the uncalibrated model) are scored
                # straight from the logits: no probability table, one exp pass.
                rows = x if contexts[name] is None else rows_read
                temperature = _softmax_temperatures(store, est, rows)
                if temperature is not None:
                    t2 = time.perf_counter()
                    accs[name].update_logits(
                        y,
                        x,
                        temperature=temperature,
                        image_id=int(image_id),
                        y_pred=model_pred,
                        region=region,
                    )
                else:
                    proba = _uncalibrated(store, x) if est is None else est.predict_proba(rows)
                    t2 = time.perf_counter()
                    if keeps[name] and model_pred is None:
                        model_pred = argmax_rows(x)
                    accs[name].update(
                        y,
                        proba,
                        image_id=int(image_id),
                        y_pred=model_pred if keeps[name] else None,
                        region=region,
                    )
                t3 = time.perf_counter()
                timings[f"predict:{name}"] += t2 - t1
                timings[f"metrics:{name}"] += t3 - t2
                t1 = t3
            t0 = time.perf_counter()
    return accs, timings


def evaluate_store(
    store: LogitStore,
    calibrators: Mapping[str, Any],
    *,
    images=None,
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
    accumulator_params: Mapping[str, Any] | None = None,
    return_timings: bool = False,
    boundary_width: int | None = None,
):
    """Calibration metrics of several calibrators over a store, in bounded memory.

    Each image block is read once; each chunk goes through every calibrator
    and into one :class:`~sksegcal.metrics.CalibrationAccumulator` per method.
    Blocks run as joblib tasks (threads, processes, or a dask cluster through
    ``joblib.parallel_backend("dask")``) and their accumulators are merged in
    block order, so the result does not depend on ``n_jobs`` or the backend.

    With numba installed (the ``fast`` extra), the uncalibrated model and
    temperature-based calibrators (temperature scaling, selective scaling,
    Meta-Cal: probabilities ``softmax(z / T)`` with one or a per-pixel ``T``)
    are scored straight from the logits with
    :meth:`~sksegcal.metrics.CalibrationAccumulator.update_logits`, without
    a probability table. Other calibrators that keep the model's prediction
    (ensemble temperature scaling) are scored with the argmax of the logits,
    computed once per chunk and passed as ``y_pred``; the rest (vector and
    Dirichlet scaling, pipelines, foreign estimators) with the argmax of
    their own probabilities.

    Parameters
    ----------
    store : LogitStore
    calibrators : mapping of str to estimator or None
        Fitted objects with ``predict_proba`` on (n, C) float32 rows of the
        store's values; None means uncalibrated (softmax of the logits).
        Those that read the spatial context (``SelectiveScalingCalibrator(
        context="spatial")``, ``LocalTemperatureScaling()``, or a pipeline or
        search ending in one) get (n, C + K) rows: the logits, then the
        context columns, computed once per image (on the whole image, as
        ``flatten_segmentation(..., context="spatial")`` does) for all of them.
    images : None, "train", "validation", "test", array of ids or mask
    n_jobs : int or None, default=1
        joblib's ``n_jobs``; -1 uses every worker of the backend.
    backend : str or None
        joblib backend ("loky", "threading", "dask", ...); None uses the
        active ``joblib.parallel_backend`` context, else loky.
    chunk_pixels : int, optional
        Pixels per chunk; memory per worker is a few times
        ``chunk_pixels * n_classes * 4`` bytes. Default: ``4194304 // n_classes``
        (16 MB per float32 chunk whatever C).
    task_pixels : int, default=4000000
        Pixels per joblib task (consecutive images).
    accumulator_params : mapping, optional
        Keyword arguments of every
        :class:`~sksegcal.metrics.CalibrationAccumulator` (e.g.
        ``classwise=True``, ``n_base_bins``).
    return_timings : bool, default=False
        Also return seconds spent reading, taking the model's argmax,
        predicting and accumulating (summed over workers).
    boundary_width : int, optional
        Also tally the pixels within this many pixels of a label change
        apart from the rest: :func:`~sksegcal.metrics.boundary_mask` of each
        stored label map (Chebyshev distance, ignored pixels and the image
        border are no label change), and accumulators with
        ``regions=("boundary", "interior")``, read with
        ``acc.region("boundary")`` / ``acc.region_summary()``. The pooled
        metrics are the same as without it.

    Returns
    -------
    accumulators : dict of str to CalibrationAccumulator
        Call ``.summary()`` on each for the metrics.
    timings : dict of str to float
        Only with ``return_timings``.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.store import LogitStore, evaluate_store
    >>> rng = np.random.default_rng(0)
    >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
    >>> for name in range(3):
    ...     _ = store.add_image(name, rng.normal(size=(3, 10, 10)),
    ...                         rng.integers(0, 3, size=(10, 10)))
    >>> accs = evaluate_store(store, {"uncalibrated": None})
    >>> sorted(accs)
    ['uncalibrated']
    """
    from joblib import Parallel, delayed

    calibrators = dict(calibrators)
    if not calibrators:
        raise ValueError("calibrators is empty; pass e.g. {'uncalibrated': None}.")
    for name, est in calibrators.items():
        _check_calibrator(name, est, store, "evaluate_store")
    chunk_pixels = store.chunk_size(chunk_pixels)
    if boundary_width is not None:
        from ..metrics import BOUNDARY_REGIONS, boundary_mask

        if accumulator_params and "regions" in accumulator_params:
            raise ValueError("Give boundary_width or accumulator_params['regions'], not both.")
        boundary_mask(np.zeros((1, 1), dtype=np.int64), width=boundary_width)  # checks it
        accumulator_params = {**(accumulator_params or {}), "regions": BOUNDARY_REGIONS}
    blocks = image_blocks(store, store.image_ids(images), task_pixels)
    results = Parallel(n_jobs=bounded_jobs(n_jobs, len(blocks), backend), backend=backend)(
        delayed(_evaluate_block)(
            store, calibrators, ids, chunk_pixels, accumulator_params, boundary_width
        )
        for ids in blocks
    )
    accs = {name: _make_accumulator(store, accumulator_params) for name in calibrators}
    timings = _zero_timings(calibrators)
    for block_accs, block_timings in results:
        for name in calibrators:
            accs[name].merge(block_accs[name])  # in place, in block order
        for key, seconds in block_timings.items():
            timings[key] += seconds
    return (accs, timings) if return_timings else accs


def _predict_block(calibrator, store: LogitStore, out: LogitStore, ids, chunk_pixels):
    # a private handle: threads of one process must not share the records cache
    out = LogitStore(out.path, out._manifest, {})
    c = store.n_classes
    context = estimator_context(calibrator)
    for image_id in ids:
        info = store.image_info(image_id)
        proba = np.empty((c, *info.shape), dtype=VALUE_DTYPE)
        flat = proba.reshape(c, -1)  # a volume's voxels in row-major order
        r0 = 0
        # every pixel's row, ignored ones included (for inference)
        for x, y in store.iter_tables(image_id, chunk_pixels, context=context, ignored="keep"):
            p = _uncalibrated(store, x) if calibrator is None else calibrator.predict_proba(x)
            flat[:, r0 : r0 + len(y)] = np.asarray(p).T
            r0 += len(y)
        labels = np.asarray(store.load_image(image_id).labels)
        out.add_image(info.name, proba, labels, overwrite=True)


def predict_store(
    calibrator,
    store: LogitStore,
    out_path: str | os.PathLike,
    *,
    images=None,
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
) -> LogitStore:
    """Write calibrated probability maps of every image as a new store.

    The output holds float16 probabilities (C, H, W) of every pixel (ignored
    ones included, for inference) and the labels, with ``values=
    "probabilities"``, the same classes and split. An interrupted run resumes:
    images already in the output are skipped. The output's manifest records
    the input store, ``repr(calibrator)`` and a sha256 of the calibrator's
    fitted state (:func:`calibrator_fingerprint`); resuming with another input
    or another fit (even one with the same repr) is refused.

    Parameters
    ----------
    calibrator : estimator or None
        Fitted, with ``predict_proba``; None writes the softmax of the logits.
        One that reads the spatial context (as :func:`evaluate_store` says)
        gets the context columns of every pixel, computed per image.
    store : LogitStore
    out_path : str or path-like
    images, n_jobs, backend, chunk_pixels, task_pixels
        As in :func:`evaluate_store`. Memory per worker is about one image
        in float16 plus a few chunks.

    Returns
    -------
    LogitStore
        The output store.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.store import LogitStore, predict_store
    >>> rng = np.random.default_rng(0)
    >>> root = tempfile.mkdtemp()
    >>> store = LogitStore.create(root + "/logits", n_classes=3)
    >>> _ = store.add_image(0, rng.normal(size=(3, 4, 4)), rng.integers(0, 3, (4, 4)))
    >>> out = predict_store(None, store, root + "/proba")
    >>> out.values, bool(np.allclose(out.load_image(0).logits.sum(axis=0), 1, atol=1e-2))
    ('probabilities', True)
    """
    from joblib import Parallel, delayed

    context = _check_calibrator("calibrator", calibrator, store, "predict_store")
    source = {
        "calibrated_from": str(Path(store.path).resolve()),
        "calibrator": None if calibrator is None else repr(calibrator),
        "context": context,  # what the calibrator read beside the logits (informative)
        # repr holds no fitted state: the hash of it tells two fits apart
        "calibrator_sha256": calibrator_fingerprint(calibrator),
        "source": store.source,
    }
    out = LogitStore.create(
        out_path,
        n_classes=store.n_classes,
        class_names=store.class_names,
        ignore_index=store.ignore_index,
        values="probabilities",
        source=source,
        exist_ok=True,
        match_source=False,  # compared below, with a message that says what differs
    )
    recorded = out.source
    keys = ("calibrated_from", "calibrator_sha256")
    if any(recorded.get(key) != source[key] for key in keys):
        # resuming with another calibrator (or input) would mix two calibrations
        if recorded.get("calibrator_sha256") != source["calibrator_sha256"]:
            what = (
                "no fingerprint of its calibrator (written by an older sksegcal)"
                if "calibrator_sha256" not in recorded
                else f"calibrator {recorded.get('calibrator')} with fitted state sha256 "
                f"{str(recorded.get('calibrator_sha256'))[:16]}..."
            )
            raise ValueError(
                f"{out.path / MANIFEST} (field source.calibrator_sha256) holds the output of "
                f"{what}, but this call's calibrator {source['calibrator']} has fitted state "
                f"sha256 {str(source['calibrator_sha256'])[:16]}... (same repr or not, they "
                "are different fits); resuming would mix two calibrations. Write to a new "
                "directory, or resume with the calibrator that started it."
            )
        raise ValueError(
            f"{out.path / MANIFEST} (field source.calibrated_from) holds the output of a "
            f"calibrator on {recorded.get('calibrated_from')!r}, not on "
            f"{source['calibrated_from']!r}; write to a new directory."
        )
    ids = [i for i in store.image_ids(images) if store.image_info(i).name not in out]
    chunk_pixels = store.chunk_size(chunk_pixels)
    blocks = image_blocks(store, np.asarray(ids, dtype=np.int64), task_pixels)
    Parallel(n_jobs=bounded_jobs(n_jobs, len(blocks), backend), backend=backend)(
        delayed(_predict_block)(calibrator, store, out, block, chunk_pixels) for block in blocks
    )
    out.refresh()
    split = store.manifest["split"]
    if split is not None and all(n in out for p in SPLIT_PARTS for n in split[p]):
        manifest = out.manifest
        manifest["split"] = split
        atomic_write_json(out.path / MANIFEST, manifest)
        out._manifest = manifest
    return out


def fit_store(
    estimator,
    store: LogitStore,
    *,
    images="train",
    max_pixels: int = 1_000_000,
    stratify_by_correctness: bool = True,
    max_per_image: int | None = None,
    random_state=None,
    **fit_params,
):
    """Fit ``estimator`` on a seeded pixel sample of a store (see :meth:`LogitStore.sample`).

    Parameters
    ----------
    estimator : estimator
        Anything with ``fit(X, y, **fit_params)`` on (n, C) logits. One that
        reads a context (:func:`sksegcal.context.estimator_context` says which:
        ``SelectiveScalingCalibrator(context="spatial")``,
        ``LocalTemperatureScaling()``, or a pipeline, search or wrapper around
        one) gets rows of C logits followed by the context columns of their
        pixel, computed on the whole image before sampling, as
        ``flatten_segmentation(..., context="spatial")`` computes them.
    store : LogitStore
    images : default="train"
        The recorded split's training images by default.
    max_pixels, stratify_by_correctness, max_per_image, random_state
        Passed to :meth:`LogitStore.sample`.
    **fit_params
        Passed to ``estimator.fit``. The sample's image ids go as ``groups``
        to every estimator that requests them through scikit-learn's metadata
        routing (:class:`~sksegcal.SelectiveScalingCalibrator` does by default;
        ``set_fit_request(groups=True)`` asks for them on others), bare or
        inside a Pipeline, a search or a meta-estimator: a router is fitted
        with ``enable_metadata_routing=True``.

    Returns
    -------
    estimator
        The fitted estimator.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal import TemperatureScaling
    >>> from sksegcal.store import LogitStore, fit_store
    >>> rng = np.random.default_rng(0)
    >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
    >>> for name in range(8):
    ...     _ = store.add_image(name, 3 * rng.normal(size=(3, 10, 10)),
    ...                         rng.integers(0, 3, size=(10, 10)))
    >>> split = store.make_split(random_state=0)
    >>> ts = fit_store(TemperatureScaling(), store, max_pixels=300, random_state=0)
    >>> bool(ts.temperature_ > 1)  # random labels: the logits are over-confident
    True
    """
    context = estimator_context(estimator, where="fit_store")
    check_input_type(estimator, store.values, what="the estimator", where=store.path)
    X, y, groups = store.sample(
        max_pixels,
        context=context,
        images=images,
        stratify_by_correctness=stratify_by_correctness,
        max_per_image=max_per_image,
        random_state=random_state,
    )
    if "groups" not in fit_params and requests_groups(estimator):
        # image ids let the estimator hold out whole images (pixels of one image correlate);
        # they reach it through scikit-learn's metadata routing, wrapped or not
        fit_params["groups"] = groups
        if _routes_metadata(estimator):
            import sklearn

            with sklearn.config_context(enable_metadata_routing=True):
                return estimator.fit(X, y, **fit_params)
    return estimator.fit(X, y, **fit_params)


def _routes_metadata(estimator) -> bool:
    """Whether the estimator is a router (Pipeline, search, meta-estimator), not a consumer."""
    from sklearn.utils.metadata_routing import MetadataRouter, get_routing_for_object

    return isinstance(get_routing_for_object(estimator), MetadataRouter)
