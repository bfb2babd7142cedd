"""The extraction loop shared by the torch and transformers bridges.

A bridge supplies one function, ``forward(inputs, label_shapes) -> logits``:
a list of (C, *spatial) float32 tensors, one per image, each at its label's
size. This module does everything around it: reading batches (a DataLoader or
any iterable of ``(images, labels)`` tuples or dicts), naming images, the
``groups`` mapping (patient, video, ...), skipping images a store already
holds (resume), the progress bar, and the sink: a
:class:`~sksegcal.store.LogitStore` or in-memory arrays.

Group labels of a store live in ``groups.json`` in the store folder (image
name -> group), beside the manifest; :func:`image_groups` reads them as one
label per store image id, so that ``image_groups(store)[groups]`` turns the
image ids of a pixel table into patient (or video) ids.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._files import atomic_write_json
from .._progress import progress as progress_bar

__all__ = ["ExtractedLogits", "GROUPS_FILE", "extract", "image_groups", "keep_argmax"]

GROUPS_FILE = "groups.json"

# the keys a batch dict may use, in the order they are looked up
IMAGE_KEYS = ("images", "image", "pixel_values", "img", "inputs")
LABEL_KEYS = ("labels", "label", "masks", "mask", "seg", "segmentation")
NAME_KEYS = ("names", "name")
GROUP_KEYS = ("groups", "group")


class ExtractedLogits(NamedTuple):
    """What an extraction into arrays returns.

    Attributes
    ----------
    logits : ndarray of shape (N, C, H, W) or (N, C, D, H, W), float32, or a list of arrays
        A list when the images differ in size.
    labels : ndarray of shape (N, H, W) or (N, D, H, W), int64, or a list of arrays
    names : list of int or str
    groups : list or None
        One group label per image, or None when no groups were given.
    """

    logits: Any
    labels: Any
    names: list
    groups: list | None


def keep_argmax(z, ref, dtype):
    """``z`` (C, *spatial) cast to ``dtype`` with its argmax over axis 0 kept equal to ``ref``.

    A cast can round two close values to one, and the argmax of a tie is the
    first class: at such pixels the winner ``ref`` (None: ``z``'s own argmax)
    is raised by one unit in the last place of ``dtype``, the smallest change
    that keeps the model's prediction. Returns a tensor of ``dtype`` on the CPU.
    """
    import torch

    out = z.detach().to("cpu", dtype)
    if dtype == z.dtype and ref is None:
        return out  # no cast, nothing to keep: skips two passes over the logits
    ref = (z.argmax(0) if ref is None else ref).cpu()
    if out.argmax(0).equal(ref):
        return out
    arr = out.numpy()
    ref_np = ref.numpy()
    bad = arr.argmax(0) != ref_np
    if bad.any():
        top = arr.max(0)[bad]
        idx = (ref_np[bad],) + tuple(np.nonzero(bad))
        arr[idx] = np.nextafter(top, np.inf, dtype=arr.dtype)
    return torch.from_numpy(arr)


def _first(batch: Mapping, keys, what: str, required: bool = True):
    for key in keys:
        if key in batch:
            return batch[key]
    if required:
        raise ValueError(
            f"A batch dict must hold the {what} under one of the keys {list(keys)}; "
            f"it has {sorted(map(str, batch))}."
        )
    return None


def split_batch(batch, image_keys=IMAGE_KEYS):
    """(inputs, labels, names, groups) of one batch; names and groups may be None.

    ``inputs`` is what the bridge forwards: a tensor or list of images, or, for
    a dict, the dict itself less the labels, names and groups (so that extra
    model arguments such as ``pixel_mask`` travel with the images).
    """
    if isinstance(batch, Mapping):
        labels = _first(batch, LABEL_KEYS, "labels", required=False)
        names = _first(batch, NAME_KEYS, "names", required=False)
        groups = _first(batch, GROUP_KEYS, "groups", required=False)
        _first(batch, image_keys, "images")
        drop = set(LABEL_KEYS) | set(NAME_KEYS) | set(GROUP_KEYS)
        inputs = {k: v for k, v in batch.items() if k not in drop}
        return inputs, labels, names, groups
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3, 4):
        images, labels, *rest = batch
        names = rest[0] if rest else None
        groups = rest[1] if len(rest) > 1 else None
        return images, labels, names, groups
    raise TypeError(
        "Each batch must be a tuple (images, labels) (optionally (images, labels, names, "
        f"groups)) or a dict with images and labels; got {type(batch).__name__}."
    )


def as_label_list(labels, n: int, ignore_index: int) -> list[np.ndarray]:
    """The labels of a batch as a list of n int64 arrays."""
    if labels is None:
        raise ValueError(
            "A batch has no labels; extraction stores each image's logits with its label "
            "map. For unlabelled images use predict_proba (calibrated inference)."
        )
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, np.ndarray):
        out = list(labels)
    else:
        out = [np.asarray(t.detach().cpu() if hasattr(t, "detach") else t) for t in labels]
    if len(out) != n:
        raise ValueError(f"A batch holds {n} images but {len(out)} label maps.")
    result = []
    for t in out:
        t = np.asarray(t)
        if t.ndim >= 3 and t.shape[0] == 1:
            t = t[0]  # a (1, *spatial) channel axis, as many data sets give it
        if not (np.issubdtype(t.dtype, np.integer) or np.issubdtype(t.dtype, np.floating)):
            raise TypeError(f"labels must be integer class indices; got dtype {t.dtype}.")
        if np.issubdtype(t.dtype, np.floating):
            if not np.all(np.isfinite(t)) or np.any(t != np.round(t)):
                raise ValueError("labels must hold whole class indices; got non-integers.")
        result.append(t.astype(np.int64, copy=False))
    return result


def batch_size_of(inputs) -> int:
    if isinstance(inputs, Mapping):
        inputs = _first(inputs, IMAGE_KEYS, "images")
    return len(inputs)


def _as_list(values, n: int, what: str) -> list | None:
    if values is None:
        return None
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, numbers.Number)):
        values = [values]
    values = [v.item() if hasattr(v, "item") else v for v in values]
    if len(values) != n:
        raise ValueError(f"A batch holds {n} images but {len(values)} {what}.")
    return values


def _check_group(g):
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, (str, numbers.Integral)):
        raise TypeError(f"Group labels must be int or str (they are stored as JSON); got {g!r}.")
    return g if isinstance(g, str) else int(g)


def _group_of(groups, name, index, batch_group):
    """The group of one image: the batch's own label, else the ``groups`` argument."""
    if batch_group is not None:
        return _check_group(batch_group)
    if groups is None:
        return None
    if callable(groups):
        return _check_group(groups(name))
    if isinstance(groups, Mapping):
        if name not in groups:
            raise ValueError(f"groups has no entry for image {name!r}.")
        return _check_group(groups[name])
    if index >= len(groups):
        raise ValueError(f"groups has {len(groups)} entries; image {index} has none.")
    return _check_group(groups[index])


def _take(inputs, idx: list[int]):
    """The images ``idx`` of a batch (a tensor, a list, or a dict of them)."""
    if isinstance(inputs, Mapping):
        n = batch_size_of(inputs)
        return {k: (_take(v, idx) if _is_batched(v, n) else v) for k, v in inputs.items()}
    if hasattr(inputs, "index_select"):
        import torch

        return inputs.index_select(0, torch.as_tensor(idx, device=inputs.device))
    if isinstance(inputs, np.ndarray):
        return inputs[idx]
    return [inputs[i] for i in idx]


def _is_batched(v, n: int) -> bool:
    return (hasattr(v, "shape") and len(v.shape) and v.shape[0] == n) or (
        isinstance(v, (list, tuple)) and len(v) == n
    )


def _dtype(store_path):
    import torch

    return torch.float32 if store_path is None else torch.float16


def read_groups_file(path: Path) -> dict:
    file = path / GROUPS_FILE
    if not file.is_file():
        return {}
    pairs = json.loads(file.read_text("utf-8"))
    return {name: group for name, group in pairs}


def _write_groups(path: Path, new: dict) -> None:
    # read-merge-write: each batch adds its images' groups (names may be int or str,
    # so the file is a list of [name, group] pairs, not a JSON object)
    merged = read_groups_file(path)
    merged.update(new)
    atomic_write_json(path / GROUPS_FILE, sorted(merged.items(), key=lambda p: str(p[0])))


def image_groups(store) -> np.ndarray:
    """The group label of every image of a store, indexed by store image id.

    The labels (patient, video, ...) recorded by the bridges' ``groups``;
    ``image_groups(store)[ids]`` maps the image ids of a pixel table (the
    ``groups`` of :meth:`~sksegcal.store.LogitStore.sample`) to them, e.g.
    for :class:`~sklearn.model_selection.GroupKFold` by patient. Images
    without a recorded group get their own name.

    Returns
    -------
    ndarray of shape (n_images,), object
    """
    recorded = read_groups_file(Path(store.path))
    out = np.empty(store.n_images, dtype=object)
    for i, name in enumerate(store.image_names):
        out[i] = recorded.get(name, name)
    return out


def extract(
    data: Iterable,
    forward: Callable,
    *,
    store_path: str | os.PathLike | None,
    ignore_index: int,
    names: Sequence | None,
    groups: Any,
    source: Mapping[str, Any],
    match_source: Sequence[str],
    class_names: Sequence[str] | None,
    progress: bool,
    image_keys=IMAGE_KEYS,
    desc: str = "extract logits",
):
    """Run ``forward`` over ``data`` into a store (``store_path``) or arrays.

    ``forward(inputs, label_shapes)`` returns one float32 (C, *spatial)
    tensor per image of ``inputs``, at its label's shape.
    """
    from ..store import LogitStore

    store, created = None, False
    held: set = set()
    if store_path is not None:
        path = Path(store_path)
        if (path / "manifest.json").exists():
            store = LogitStore.open(path, on_damaged="missing")
            held = set(store.image_names)
    out_logits, out_labels, out_names, out_groups = [], [], [], []
    n_seen = 0
    total = len(data) if hasattr(data, "__len__") else None
    bar = progress_bar(total=total, desc=desc, unit="batch", enabled=progress)
    try:
        for batch in data:
            inputs, labels, batch_names, batch_groups = split_batch(batch, image_keys)
            n = batch_size_of(inputs)
            batch_names = _as_list(batch_names, n, "names")
            if batch_names is None:
                if names is not None:
                    if n_seen + n > len(names):
                        raise ValueError(f"names has {len(names)} entries; the data has more.")
                    batch_names = list(names[n_seen : n_seen + n])
                else:
                    batch_names = list(range(n_seen, n_seen + n))
            batch_groups = _as_list(batch_groups, n, "groups") or [None] * n
            todo = [i for i, name in enumerate(batch_names) if name not in held]
            if todo:
                label_list = as_label_list(labels, n, ignore_index)
                if len(todo) < n:
                    inputs = _take(inputs, todo)
                label_list = [label_list[i] for i in todo]
                logits = forward(inputs, [t.shape for t in label_list])
                new_groups = {}
                for k, i in enumerate(todo):
                    name = batch_names[i]
                    # float16 in a store: the cast must not change the predicted class
                    z = keep_argmax(logits[k], None, _dtype(store_path))
                    if tuple(z.shape[1:]) != label_list[k].shape:
                        raise ValueError(
                            f"Image {name!r}: logits {tuple(z.shape)} do not match its labels "
                            f"{label_list[k].shape}."
                        )
                    group = _group_of(groups, name, n_seen + i, batch_groups[i])
                    if store_path is None:
                        out_logits.append(z.cpu().numpy())
                        out_labels.append(label_list[k])
                        out_names.append(name)
                        out_groups.append(group)
                        continue
                    if not created:
                        # also on resume: checks the class count and the source agree
                        created = True
                        store = LogitStore.create(
                            store_path,
                            n_classes=int(z.shape[0]),
                            class_names=class_names,
                            ignore_index=ignore_index,
                            source=dict(source),
                            exist_ok=True,
                            match_source=tuple(match_source),
                        )
                    store.add_image(name, z.cpu().numpy(), label_list[k])
                    held.add(name)
                    if group is not None:
                        new_groups[name] = group
                if new_groups:
                    _write_groups(store.path, new_groups)
            n_seen += n
            bar.update(1)
    finally:
        bar.close()
    if store_path is not None:
        if store is None:
            raise ValueError("The data held no images; nothing was written.")
        return store.refresh()
    if not out_names:
        raise ValueError("The data held no images.")
    shapes = {z.shape for z in out_logits}
    if len(shapes) == 1:
        out_logits = np.stack(out_logits)
        out_labels = np.stack(out_labels)
    has_groups = any(g is not None for g in out_groups)
    return ExtractedLogits(out_logits, out_labels, out_names, out_groups if has_groups else None)


@contextmanager
def eval_mode(model):
    """The model in eval mode while it runs (dropout off, BatchNorm statistics fixed).

    Its training flag is restored afterwards, also on an error; a callable that is not
    an ``nn.Module`` is left alone.
    """
    import torch

    module = model if isinstance(model, torch.nn.Module) else None
    training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if module is not None:
            module.train(training)
