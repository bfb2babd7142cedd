"""Conformal calibration and evaluation over a LogitStore, one image at a time.

Each joblib task takes a block of consecutive images, reads them one at a
time in row chunks, and returns a fixed-size state (a score histogram or a
risk tally) or a set accumulator; the states are merged in block order, so
the result does not depend on ``n_jobs`` or the backend (randomised APS draws
from a stream per image, so it does not either).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .._safety import bounded_jobs, check_input_type
from ..context import context_width, estimator_context
from ..store._engine import DEFAULT_TASK_PIXELS, image_blocks
from ._base import BaseConformal
from ._margins import (
    ConformalMargins,
    MarginAccumulator,
    _evaluate_margins_block,
    fit_margins_store,
)
from ._metrics import ConformalSetAccumulator


def _blocks(store, ids: np.ndarray, task_pixels: int) -> list[np.ndarray]:
    """Consecutive images of about ``task_pixels`` pixels a block (the store engine's blocks)."""
    return image_blocks(store, ids, task_pixels)


def _check_inputs(estimator, store) -> None:
    if not isinstance(estimator, BaseConformal):
        raise TypeError(
            "estimator must be a ConformalPixelSets, ConformalRiskControl or ConformalMargins, "
            f"got {type(estimator).__name__}."
        )
    if estimator.calibrator is None and estimator.input_type != store.values:
        raise ValueError(
            f"the store {store.path} holds {store.values} but the estimator has input_type="
            f"{estimator.input_type!r}; set input_type={store.values!r}."
        )
    check_input_type(estimator.calibrator, store.values, what="the calibrator", where=store.path)


def _context_of(estimator, store) -> str | None:
    """The context the estimator's calibrator reads (None without a calibrator)."""
    if estimator.calibrator is None:
        return None
    return estimator_context(estimator.calibrator, where=f"the store {store.path}")


def _image_tables(store, image_id: int, chunk_pixels: int, context: str | None):
    """Yield (X, y) tables of one image's labelled pixels (the store's reader).

    With context the context columns follow the logits, computed on the whole
    stored image before ignored pixels are dropped, so the calibrator in front
    gets the rows ``flatten_segmentation(..., context=context)`` would give it.
    """
    yield from store.iter_tables(int(image_id), chunk_pixels, context=context)


def _fit_block(estimator, store, ids, chunk_pixels):
    state = estimator._new_state()
    context = _context_of(estimator, store)
    for image_id in ids:
        chunks = _image_tables(store, image_id, chunk_pixels, context)
        counts = estimator._image_histogram(chunks, estimator._rng(2, int(image_id)))
        estimator._add_image(state, counts)
    return state


def fit_conformal_store(
    estimator,
    store,
    *,
    images="validation",
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
):
    """Calibrate a conformal estimator on a store's images, in bounded memory.

    Images are read one at a time, in row chunks; each joblib task fills the
    estimator's fixed-size state over a block of images and the states are
    merged, so memory holds one chunk and one state per worker whatever the
    number of pixels. The estimator is fitted in place, as ``fit`` would fit
    it on the images' pixel table (up to the randomised draws of APS).

    Parameters
    ----------
    estimator : ConformalPixelSets, ConformalRiskControl or ConformalMargins
        Unfitted (or fitted: it is refitted). Its calibrator, if any, must
        take the store's (n, C) rows. Margins read whole images.
    store : LogitStore
    images : None, "train", "validation", "test", array of ids or mask, default="validation"
        The conformal calibration images. They must be exchangeable with the
        images the sets are used on and not used to fit the calibrator.
    n_jobs, backend
        joblib's; states are merged in block order, so the result does not
        depend on them.
    chunk_pixels : int, optional
        Pixels per chunk (default: 4M values, ``4194304 // n_classes``).
    task_pixels : int, default=4000000
        Pixels per joblib task.

    Returns
    -------
    estimator
        The fitted estimator.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> from sksegcal.conformal import ConformalRiskControl, fit_conformal_store
    >>> from sksegcal.store import LogitStore
    >>> rng = np.random.default_rng(0)
    >>> store = LogitStore.create(tempfile.mkdtemp() + "/s", n_classes=3)
    >>> for name in range(20):
    ...     t = rng.integers(0, 3, size=(8, 8))
    ...     z = 3.0 * (np.moveaxis(np.eye(3)[t], -1, 0) + rng.normal(size=(3, 8, 8)))
    ...     _ = store.add_image(name, z, t)
    >>> crc = fit_conformal_store(ConformalRiskControl(alpha=0.2), store, images=None)
    >>> crc.n_calibration_
    20
    """
    from joblib import Parallel, delayed

    ids = store.image_ids(images)
    if not isinstance(estimator, ConformalMargins):
        _check_inputs(estimator, store)
    if len(ids) == 0:
        raise ValueError("images selects no image of the store; there is nothing to calibrate on.")
    if isinstance(estimator, ConformalMargins):  # whole images, not row chunks
        blocks = _blocks(store, ids, task_pixels)
        return fit_margins_store(
            estimator, store, ids, n_jobs=n_jobs, backend=backend, blocks=blocks
        )
    for attr in ("state_", "n_features_in_"):
        estimator.__dict__.pop(attr, None)
    context = _context_of(estimator, store)
    # a calibrator that reads the spatial context takes C logits and K context columns
    n_features = store.n_classes + context_width(context)
    estimator.n_features_in_ = n_features
    estimator._start(n_features)
    chunk_pixels = store.chunk_size(chunk_pixels)
    blocks = _blocks(store, ids, task_pixels)
    states = Parallel(n_jobs=bounded_jobs(n_jobs, len(blocks), backend), backend=backend)(
        delayed(_fit_block)(estimator, store, block, chunk_pixels) for block in blocks
    )
    for state in states:
        estimator.state_.merge(state)  # in block order
    if hasattr(estimator, "_images_seen"):
        # ids are positions in this store: states of two stores share no image
        estimator._images_seen = {(str(store.path.resolve()), int(i)) for i in ids}
    return estimator._finish()


def _evaluate_block(estimators, store, ids, chunk_pixels):
    margins = {k: v for k, v in estimators.items() if isinstance(v, ConformalMargins)}
    estimators = {k: v for k, v in estimators.items() if k not in margins}
    accs = {
        name: ConformalSetAccumulator(store.n_classes, ignore_index=store.ignore_index)
        for name in estimators
    }
    accs.update({name: _evaluate_margins_block(est, store, ids) for name, est in margins.items()})
    contexts = {name: _context_of(est, store) for name, est in estimators.items()}
    for image_id in ids:
        for context in sorted(set(contexts.values()), key=str):
            names = [name for name in estimators if contexts[name] == context]
            for X, y in _image_tables(store, image_id, chunk_pixels, context):
                for name in names:
                    accs[name].update(y, estimators[name].predict_set(X), image_id=int(image_id))
    return accs


def evaluate_conformal_store(
    estimators: Mapping[str, Any],
    store,
    *,
    images="test",
    n_jobs: int | None = 1,
    backend=None,
    chunk_pixels: int | None = None,
    task_pixels: int = DEFAULT_TASK_PIXELS,
) -> dict[str, ConformalSetAccumulator]:
    """Coverage, set sizes and per-image risks of fitted conformal estimators on a store.

    Parameters
    ----------
    estimators : mapping of str to fitted ConformalPixelSets, ConformalRiskControl or
        ConformalMargins
    store : LogitStore
    images : default="test"
        The images to evaluate on (not those the estimators were calibrated on).
    n_jobs, backend, chunk_pixels, task_pixels
        As in :func:`fit_conformal_store`.

    Returns
    -------
    accumulators : dict of str to ConformalSetAccumulator or MarginAccumulator
        One per estimator, with per-image tallies keyed by store image id (a
        :class:`MarginAccumulator` for a :class:`ConformalMargins`).
    """
    from joblib import Parallel, delayed

    estimators = dict(estimators)
    if not estimators:
        raise ValueError("estimators is empty.")
    for est in estimators.values():
        if not isinstance(est, ConformalMargins):
            _check_inputs(est, store)
    chunk_pixels = store.chunk_size(chunk_pixels)
    blocks = _blocks(store, store.image_ids(images), task_pixels)
    results = Parallel(n_jobs=bounded_jobs(n_jobs, len(blocks), backend), backend=backend)(
        delayed(_evaluate_block)(estimators, store, block, chunk_pixels) for block in blocks
    )
    accs = {
        name: MarginAccumulator(est.target_class, ignore_index=est.ignore_index)
        if isinstance(est, ConformalMargins)
        else ConformalSetAccumulator(store.n_classes, ignore_index=store.ignore_index)
        for name, est in estimators.items()
    }
    for block in results:
        for name in estimators:
            accs[name].merge(block[name])
    return accs


__all__ = ["evaluate_conformal_store", "fit_conformal_store"]
