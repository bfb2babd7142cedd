"""The spatial context of stored images, for the engine: per image, from the stored logits.

A calibrator that reads the spatial context (:func:`sksegcal.pixels._estimator_context`
says which do) takes rows of C logits followed by the K columns of
:func:`sksegcal.context.image_context`. Here they are computed on the whole
image (one image in memory: its float16 logits, a float32 copy inside
``image_context`` and the K float32 maps) before any pixel is dropped or
sampled, exactly as ``flatten_segmentation(..., context="spatial")`` computes
them, so that a store and an in-memory pixel table give the same rows bit for
bit. Without context every function here falls through to the store's own
block readers, unchanged.

May import: numpy, torch (lazily), :mod:`sksegcal.pixels`, the store's
``._format`` and ``._sampling``.
"""

from __future__ import annotations

import numpy as np

from ..pixels import _context_rows
from ._format import VALUE_DTYPE
from ._sampling import sample_store


def read_image(store, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One image's stored logits (C, H, W) float16 and labels (H, W), read in one block."""
    record = store._records[store._names[image_id]]
    h, w = record["height"], record["width"]
    z = np.empty((store.n_classes, h, w), dtype=VALUE_DTYPE)
    labels = []
    r0 = 0
    # the block reader validates the files; its buffer is reused, hence the copy
    for block, t in store._iter_blocks(image_id, h * w):
        z[:, r0 : r0 + block.shape[1]] = block
        labels.append(t)
        r0 += block.shape[1]
    return z, np.concatenate(labels)


def iter_blocks(store, image_id: int, block_pixels: int, context: str | None):
    """Yield (logits (C, rows, W) float16, labels (rows, W), context rows or None) row blocks.

    The context rows are (rows * W, K) float32, row-major, of the same pixels.
    Without context: the store's own blocks (``LogitStore._iter_blocks``).
    """
    if context is None:
        for z, t in store._iter_blocks(image_id, block_pixels):
            yield z, t, None
        return
    z, t = read_image(store, image_id)
    ctx = _context_rows(z)
    h, w = t.shape
    rows = max(1, min(h, block_pixels // max(w, 1)))  # the store reader's blocks
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        yield z[:, r0:r1], t[r0:r1], ctx[r0 * w : r1 * w]


def iter_tables(
    store, image_id: int, chunk_pixels: int, context: str | None, drop_ignored: bool = True
):
    """Yield (X (n, C) float32, y (n,) int64, context (n, K) float32 or None) of one image.

    ``LogitStore._iter_image_tables`` (the same rows, blocks and
    ``drop_ignored`` rule) with the context rows of the same pixels beside.
    """
    if context is None:
        for x, y in store._iter_image_tables(image_id, chunk_pixels, drop_ignored):
            yield x, y, None
        return
    import torch

    c = store.n_classes
    for z, t, ctx in iter_blocks(store, image_id, chunk_pixels, context):
        keep = store._keep(t).ravel()
        if not drop_ignored and not keep.any():
            continue
        # as the store's reader: torch casts float16 to float32 while it transposes
        x = np.empty((keep.size, c), dtype=np.float32)
        torch.from_numpy(x).copy_(torch.from_numpy(z.reshape(c, -1)).t())
        y = t.ravel().astype(np.int64)
        if not drop_ignored or keep.all():
            yield x, y, ctx
        else:
            yield x[keep], y[keep], ctx[keep]


class _WithContext:
    """A store as the sampler reads it: each table row carries its context columns.

    The sampler stratifies by the argmax of the first ``n_classes`` columns, so the
    context after them never changes which pixels are drawn.
    """

    def __init__(self, store, context: str):
        self._store = store
        self._context = context

    def __getattr__(self, name):
        return getattr(self._store, name)

    def _iter_image_tables(self, image_id: int, chunk_pixels: int, drop_ignored: bool = True):
        for x, y, ctx in iter_tables(
            self._store, image_id, chunk_pixels, self._context, drop_ignored
        ):
            yield np.concatenate([x, ctx], axis=1), y


def sample_table(store, max_pixels: int, *, context: str | None = None, **kwargs):
    """:meth:`LogitStore.sample`, with the context columns of each row appended.

    The rows (pixels, their order, their logits and labels) are those of
    ``store.sample(max_pixels, **kwargs)``; with ``context="spatial"`` each
    row holds the C logits then the K context columns of its pixel, computed
    on its whole image. Only images that give rows are read (and their
    context computed).
    """
    if context is None:
        return store.sample(max_pixels, **kwargs)
    return sample_store(_WithContext(store, context), max_pixels, **kwargs)
