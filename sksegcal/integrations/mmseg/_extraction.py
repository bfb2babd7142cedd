"""Extraction: run an mmseg model over a dataset into a :class:`~sksegcal.store.LogitStore`.

:func:`extract_logits` and what it needs: the data sources it accepts (the
config's dataloaders, dataset configs and objects, image/label file pairs,
arrays), label reading and ``reduce_zero_label`` as mmseg does them, and the
per-image write into the store. Imports :mod:`._common`, :mod:`._loading`
and :mod:`._inference` (to refuse a calibrated model), the store lazily.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmseg
import numpy as np
import torch

from ..._progress import progress as progress_bar
from ._common import IGNORE_INDEX, log
from ._inference import is_calibrated
from ._loading import n_classes as n_classes_of
from ._loading import prepare_model

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmseg.models import BaseSegmentor

    from ...store import LogitStore

__all__ = ["extract_logits"]


def _read_label(path) -> np.ndarray:
    import mmcv
    from mmengine import fileio

    # as mmseg's LoadAnnotations reads segmentation maps (pillow, unchanged values)
    label = mmcv.imfrombytes(fileio.get(str(path)), flag="unchanged", backend="pillow")
    return np.asarray(label).squeeze()


def _reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg 1.x's ``reduce_zero_label``: 0 -> 255 (ignored), k -> k - 1, 255 stays 255.

    mmseg's LoadAnnotations does, on uint8 maps, ``gt[gt == 0] = 255;
    gt = gt - 1; gt[gt == 254] = 255``: both 0 and the ignore label 255 end at
    255. The same here on int64 (no wrap-around for values above 255).
    """
    out = label.astype(np.int64)  # a copy
    zero = out == 0
    out -= 1
    out[zero | (out == IGNORE_INDEX - 1)] = IGNORE_INDEX
    return out


def _dataset_reduce_zero_label(dataset_cfg) -> bool:
    """A dataset config's reduce_zero_label, or its class's default."""
    import inspect

    from mmseg.registry import DATASETS

    if dataset_cfg is None:
        return False
    if "reduce_zero_label" in dataset_cfg:
        return bool(dataset_cfg["reduce_zero_label"])
    cls = DATASETS.get(dataset_cfg.get("type", "BaseSegDataset"))
    if cls is None:
        return False
    default = inspect.signature(cls.__init__).parameters.get("reduce_zero_label")
    return bool(default.default) if default is not None else False


def _test_pipeline(model, pipeline, from_arrays: bool):
    """Transforms that load and prepare an image, without LoadAnnotations."""
    from mmengine.dataset import Compose

    if pipeline is None:
        cfg = getattr(model, "cfg", None)
        pipeline = None if cfg is None else cfg.get("test_pipeline")
        if pipeline is None and cfg is not None and "test_dataloader" in cfg:
            pipeline = cfg.test_dataloader.dataset.get("pipeline")
        if pipeline is None:
            raise ValueError(
                "The model has no config with a test_pipeline (model.cfg); pass pipeline=[...] "
                "(e.g. [dict(type='LoadImageFromFile'), dict(type='PackSegInputs')])."
            )
    steps = [copy.deepcopy(dict(t)) for t in pipeline if dict(t).get("type") != "LoadAnnotations"]
    if steps:
        # mmseg's inference_model rewrites model.cfg.test_pipeline[0] in place to the
        # type of its last input, so set the loader from what we feed, both ways
        loader = steps[0].get("type")
        if from_arrays and loader == "LoadImageFromFile":
            steps[0]["type"] = "LoadImageFromNDArray"
        elif not from_arrays and loader == "LoadImageFromNDArray":
            steps[0]["type"] = "LoadImageFromFile"
    return Compose(steps)


class _Items:
    """Indexable (name, packed inputs, labels-or-None) for a DataLoader."""

    def __init__(self, kind, names, source, indices, pipeline=None, reduce_zero_label=False):
        self.kind = kind
        self.names = names
        self.source = source
        self.indices = list(indices)
        self.pipeline = pipeline
        self.reduce_zero_label = reduce_zero_label

    def __len__(self) -> int:
        return len(self.indices)

    def _label(self, label):
        if label is None:
            return None
        label = np.asarray(label)
        return _reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, k):
        i = self.indices[k]
        if self.kind == "dataset":
            # prepare_data, not __getitem__: no random substitute for a failing image
            data = self.source.prepare_data(i)
            if data is None:
                raise ValueError(f"The dataset's pipeline returned None for image {i}.")
            return self.names[i], data, None
        if self.kind == "paths":
            image, label = self.source[i]
            data = self.pipeline({"img_path": str(image)})
            return self.names[i], data, self._label(None if label is None else _read_label(label))
        images, labels = self.source
        data = self.pipeline({"img": np.asarray(images[i])})
        return self.names[i], data, self._label(None if labels is None else labels[i])


def _is_pathlike(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _dataset_names(dataset) -> list[str]:
    prefix = (getattr(dataset, "data_prefix", None) or {}).get("img_path", "")
    names = []
    for i in range(len(dataset)):
        path = str(dataset.get_data_info(i)["img_path"])
        rel = os.path.relpath(path, prefix) if prefix else os.path.basename(path)
        if rel.startswith(".."):
            rel = os.path.basename(path)
        names.append(os.path.splitext(rel)[0].replace(os.sep, "/"))
    return names


def _resolve_data(model, data, pipeline, reduce_zero_label, names):
    """(kind, source, names, pipeline, reduce_zero_label, class names, description)."""
    from mmengine.dataset import BaseDataset

    cfg = getattr(model, "cfg", None)
    if data is None or isinstance(data, str) and data in ("test", "val"):
        split = "test" if data is None else data
        key = f"{split}_dataloader"
        if cfg is None or key not in cfg:
            raise ValueError(
                f"data={data!r} takes the dataset of the config's {key}, but the model has no "
                "config with one (model.cfg); pass a dataset, file pairs or arrays."
            )
        data = cfg[key]["dataset"]
    if isinstance(data, Mapping):
        from mmengine.registry import init_default_scope
        from mmseg.registry import DATASETS

        init_default_scope(cfg.get("default_scope", "mmseg") if cfg is not None else "mmseg")
        dataset_cfg = copy.deepcopy(dict(data))
        if reduce_zero_label is not None:
            dataset_cfg["reduce_zero_label"] = bool(reduce_zero_label)
        data = DATASETS.build(dataset_cfg)
    if isinstance(data, BaseDataset):
        if reduce_zero_label is not None and bool(
            data.metainfo.get("reduce_zero_label", False)
        ) != bool(reduce_zero_label):
            raise ValueError(
                f"reduce_zero_label={reduce_zero_label} but the dataset was built with "
                f"reduce_zero_label={data.metainfo.get('reduce_zero_label')}; rebuild it or "
                "leave reduce_zero_label=None."
            )
        data.full_init()
        dataset_names = list(names) if names is not None else _dataset_names(data)
        return (
            "dataset",
            data,
            dataset_names,
            None,
            bool(data.metainfo.get("reduce_zero_label", False)),
            data.metainfo.get("classes"),
            f"{type(data).__name__}({len(data)} images)",
        )

    if reduce_zero_label is None:
        # labels of the same dataset as the config's test set: honour its setting
        test_cfg = None if cfg is None else cfg.get("test_dataloader", {}).get("dataset")
        reduce_zero_label = _dataset_reduce_zero_label(test_cfg)
    classes = (getattr(model, "dataset_meta", None) or {}).get("classes")

    if (
        isinstance(data, Sequence)
        and len(data)
        and all(
            isinstance(p, Sequence) and not _is_pathlike(p) and len(p) == 2 and _is_pathlike(p[0])
            for p in data
        )
    ):
        pairs = [(Path(img), None if lab is None else Path(lab)) for img, lab in data]
        if names is None:
            stems = [img.stem for img, _ in pairs]
            names = stems if len(set(stems)) == len(stems) else [str(img) for img, _ in pairs]
        return (
            "paths",
            pairs,
            list(names),
            _test_pipeline(model, pipeline, from_arrays=False),
            bool(reduce_zero_label),
            classes,
            f"{len(pairs)} image files",
        )

    if isinstance(data, tuple) and len(data) == 2 and not _is_pathlike(data[0]):
        images, labels = data
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = images[None]
        n = len(images)
        if labels is not None:
            if isinstance(labels, np.ndarray) and labels.ndim == 2:
                labels = labels[None]
            if len(labels) != n:
                raise ValueError(f"data has {n} images but {len(labels)} label maps.")
        if n and np.asarray(images[0]).ndim not in (2, 3):
            raise ValueError(
                "images must be (N, H, W, 3) or a list of (H, W, 3) arrays (BGR, as "
                f"mmcv.imread gives); got an image of shape {np.asarray(images[0]).shape}."
            )
        return (
            "arrays",
            (images, labels),
            list(range(n)) if names is None else list(names),
            _test_pipeline(model, pipeline, from_arrays=True),
            bool(reduce_zero_label),
            classes,
            f"{n} in-memory images",
        )
    raise TypeError(
        "data must be None or 'test'/'val' (the config's dataloader), a dataset config dict, "
        "an mmengine dataset, a list of (image_path, label_path) pairs, or a tuple "
        f"(images, labels) of arrays; got {type(data).__name__}."
    )


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be None, an int or (height, width); got {size!r}.") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive; got {size!r}.")
    return h, w


def _source_description(model_or_config, model, checkpoint, size, rzl, ignore_index, desc):
    config = None
    if not isinstance(model_or_config, torch.nn.Module):
        config = str(getattr(model_or_config, "filename", None) or model_or_config)
    elif getattr(model, "cfg", None) is not None:
        config = getattr(model.cfg, "filename", None)
    return {
        "framework": "mmsegmentation",
        "mmseg_version": mmseg.__version__,
        "model": type(model).__name__,
        "config": config,
        "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
        "data": desc,
        "size": None if size is None else list(size),
        "reduce_zero_label": rzl,
        "ignore_index": ignore_index,
    }


def extract_logits(
    model: BaseSegmentor | str | os.PathLike | Config,
    data: Any = None,
    store_path: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 1,
    size: int | tuple[int, int] | None = None,
    reduce_zero_label: bool | None = None,
    ignore_index: int = IGNORE_INDEX,
    pipeline: Sequence[Mapping] | None = None,
    names: Sequence[int | str] | None = None,
    cfg_options: Mapping[str, Any] | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> LogitStore:
    """Run an mmseg model over a dataset and store every image's logits and labels.

    Each image's ``seg_logits`` (what mmseg's ``postprocess_result`` gives:
    padding removed, resized to the image's original size) and its labels go
    into a :class:`~sksegcal.store.LogitStore` as float16 (C, H, W) logits and
    (H, W) labels. The run resumes: images already in the store are skipped,
    so an interrupted extraction is finished by calling it again.

    Parameters
    ----------
    model : mmseg segmentor, or config (path, shipped config name, mmengine.Config)
        A built model (kept on its device unless ``device`` is given), or a
        config to build one from with :func:`load_model`.
    data : None, "test", "val", dict, dataset, list of pairs, or (images, labels)
        What to run on:

        * None or ``"test"`` / ``"val"``: the dataset of the config's
          ``test_dataloader`` / ``val_dataloader`` (its pipeline, its
          ``reduce_zero_label``, its label map);
        * a dataset config dict, or a built mmengine/mmseg dataset;
        * a list of ``(image_path, label_path)`` pairs (``label_path`` may be
          None: all pixels ignored), run through the config's
          ``test_pipeline`` without ``LoadAnnotations``;
        * a tuple ``(images, labels)``: an (N, H, W, 3) uint8 array or a list
          of (H, W, 3) arrays in BGR order (as ``mmcv.imread`` gives; the
          model's data preprocessor converts), and (N, H, W) labels or a list
          (or None).
    store_path : str or path-like
        Directory of the store (created, or resumed if it exists).
    checkpoint : str or path-like, optional
        Weights to load into the model (local file).
    device : str, optional
        Device to run on; default ``"cpu"`` for a config, the model's own
        device for a built model.
    batch_size : int, default=1
        Images per forward pass. Images of different sizes after the
        pipeline go through in separate passes.
    size : int or (height, width), optional
        Store logits resized (bilinear) and labels resized (nearest) to this
        size instead of each image's full resolution (the paper stored 56x56).
    reduce_zero_label : bool, optional
        For files and arrays: map label 0 to ``ignore_index`` and shift the
        others down by one, as mmseg does. None takes the setting of the
        config's test dataset (its class default when the config does not
        say). For datasets, the dataset's own setting is used; a value that
        contradicts it is an error.
    ignore_index : int, default=255
        Label of unlabelled pixels (mmseg's convention).
    pipeline : list of dict, optional
        Transforms for files/arrays, replacing the config's ``test_pipeline``.
    names : sequence of int or str, optional
        Image names in the store. Default: the image path relative to the
        dataset's image folder without extension (datasets), the file stem
        (files; full paths if stems repeat), 0..N-1 (arrays).
    cfg_options : mapping, optional
        Config overrides when ``model`` is a config.
    num_workers : int, default=0
        DataLoader workers that load and transform images.
    progress : bool, default=True
        Show a progress bar (tqdm when installed).

    Returns
    -------
    store : LogitStore
        The store, holding every image of ``data``.

    Examples
    --------
    >>> from sksegcal.integrations.mmseg import extract_logits  # doctest: +SKIP
    >>> store = extract_logits(  # doctest: +SKIP
    ...     "configs/segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py", None,
    ...     "ade20k-val-logits", checkpoint="segformer_mit-b0_ade20k.pth", size=128)
    """
    from torch.utils.data import DataLoader

    from ...store import LogitStore

    if store_path is None:
        raise TypeError("extract_logits() needs store_path, the directory of the LogitStore.")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    size = _check_size(size)
    model_ = prepare_model(model, checkpoint, device, cfg_options)
    if is_calibrated(model_):
        raise ValueError(
            "The model is calibrated (calibrate_model): its seg_logits are probabilities. "
            "Extract from the uncalibrated model (uncalibrate_model(model))."
        )
    n_classes = n_classes_of(model_)
    kind, source, item_names, pipe, rzl, classes, desc = _resolve_data(
        model_, data, pipeline, reduce_zero_label, names
    )
    if len(set(item_names)) != len(item_names):
        raise ValueError("Image names must be unique; pass names=[...].")
    if classes is not None and len(classes) != n_classes:
        classes = None  # e.g. a config whose num_classes was overridden

    source_info = _source_description(model, model_, checkpoint, size, rzl, ignore_index, desc)
    store = LogitStore.create(
        store_path,
        n_classes=n_classes,
        class_names=classes,
        ignore_index=ignore_index,
        source=source_info,
        exist_ok=True,
        # not the mmseg version or the config's path: those may change harmlessly
        match_source=("model", "checkpoint", "size", "reduce_zero_label"),
    )

    todo = set(store.missing(item_names))
    todo_idx = [i for i, name in enumerate(item_names) if name in todo]
    if not todo_idx:
        return store
    items = _Items(kind, item_names, source, todo_idx, pipe, rzl)
    # collate_fn=list: a batch stays the list of items (a builtin, so workers can pickle it)
    loader = DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    bar = progress_bar(
        total=len(todo_idx), desc="extract logits", unit="img", enabled=progress, log=log
    )
    try:
        for batch in loader:
            # the data preprocessor stacks a batch: only same-size inputs go together
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(tuple(item[1]["inputs"].shape), []).append(item)
            for group in groups.values():
                with torch.no_grad():
                    outputs = model_.test_step(
                        {
                            "inputs": [d["inputs"] for _, d, _ in group],
                            "data_samples": [d["data_samples"] for _, d, _ in group],
                        }
                    )
                for (name, _, label), out in zip(group, outputs):
                    logits = out.seg_logits.data.float()
                    if label is None:
                        label = (
                            out.gt_sem_seg.data.squeeze(0).cpu().numpy()
                            if "gt_sem_seg" in out
                            else np.full(logits.shape[1:], ignore_index, np.int64)
                        )
                    _add_image(store, name, logits, label, size, ignore_index, rzl)
                    bar.update(1)
    finally:
        bar.close()
    return store.refresh()


def _add_image(store, name, logits, label, size, ignore_index, rzl) -> None:
    import torch.nn.functional as F

    label = np.asarray(label)
    if label.shape != tuple(logits.shape[1:]):
        raise ValueError(
            f"Image {name!r}: labels have shape {label.shape} but the model's seg_logits "
            f"{tuple(logits.shape[1:])} (the original image size); the label map must have the "
            "image's size."
        )
    c = logits.shape[0]
    bad = (label != ignore_index) & ((label < 0) | (label >= c))
    if bad.any():
        raise ValueError(
            f"Image {name!r}: labels {np.unique(label[bad])[:5].tolist()} are outside "
            f"[0, {c - 1}] and not the ignore index {ignore_index}. Check reduce_zero_label "
            f"(now {rzl}) and the model's num_classes."
        )
    if size is not None:
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        lab = torch.from_numpy(label.astype(np.float32))[None, None]
        label = F.interpolate(lab, size=size, mode="nearest-exact")[0, 0].numpy()
        label = label.astype(np.int64)
    store.add_image(name, logits.cpu().numpy(), label)
