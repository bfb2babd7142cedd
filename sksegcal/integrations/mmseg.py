"""mmsegmentation 1.x integration: logit extraction, calibrated inference, evaluation.

Importing this module (it needs the ``mmseg`` extra: ``pip install
"sksegcal[mmseg]"``)

* installs a small ``mmcv.ops`` stand-in when mmcv's compiled operators are
  missing (``mmcv-lite``; see :mod:`sksegcal.integrations._mmcv_shim`), so
  that mmsegmentation imports and runs on CPU;
* registers :class:`CalibrationMetric` in mmsegmentation's ``METRICS``
  registry, so that an mmseg config can say::

      custom_imports = dict(imports=["sksegcal.integrations.mmseg"],
                            allow_failed_imports=False)
      test_evaluator = [dict(type="IoUMetric", iou_metrics=["mIoU"]),
                        dict(type="CalibrationMetric", n_bins=15)]

The three jobs:

* :func:`extract_logits`: run a model over a dataset (the config's test
  dataloader, a dataset config or object, image/label file pairs, or arrays)
  and write every image's logits and labels into a
  :class:`~sksegcal.store.LogitStore`, resumably, in batches, at full
  resolution or a chosen size.
* :func:`calibrate_model`: make a model's ``seg_logits`` calibrated
  probabilities from a fitted (or joblib-saved) calibrator, with
  ``pred_sem_seg`` unchanged; works with ``inference_model`` and mmseg's own
  test loop. :func:`uncalibrate_model` undoes it.
* :class:`CalibrationMetric`: an mmengine metric streaming ECE, MCE, NLL,
  Brier score (and more) through a
  :class:`~sksegcal.metrics.CalibrationAccumulator`.

:func:`load_model` and :func:`shipped_config` build models from the configs
that ship inside the mmsegmentation wheel (SyncBN turned into BN so that they
run on CPU).
"""

from __future__ import annotations

import copy
import logging
import numbers
import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._mmcv_shim import install as _install_mmcv_shim

# Before anything imports mmseg.models: mmcv-lite has no compiled ops.
_install_mmcv_shim()

try:
    import mmseg
    import torch
    from mmengine.evaluator import BaseMetric
    from mmengine.logging import print_log
    from mmseg.registry import METRICS
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sksegcal.integrations.mmseg needs mmsegmentation 1.x and its stack; install them "
        'with pip install "sksegcal[mmseg]" (mmsegmentation==1.2.2, mmengine==0.10.7, '
        f"mmcv-lite==2.1.0, ftfy, regex). The import failed with: {exc}"
    ) from exc

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmseg.models import BaseSegmentor

    from ..store import LogitStore

__all__ = [
    "CalibrationMetric",
    "calibrate_model",
    "extract_logits",
    "load_model",
    "shipped_config",
    "uncalibrate_model",
]

#: Label of unlabelled pixels in mmsegmentation (``reduce_zero_label`` maps 0 to it).
IGNORE_INDEX = 255
# Rows of the (pixels, classes) table handed to a calibrator or the accumulator
# at once: bounds the temporaries to a few tens of MB per image.
_CHUNK_PIXELS = 262_144
# metainfo key set on the data samples of a calibrated model
_PROBA_FLAG = "seg_logits_are_probabilities"


# --------------------------------------------------------------------------- models
def shipped_config(name: str | os.PathLike) -> Path:
    """Path of a config that ships inside the mmsegmentation wheel.

    Parameters
    ----------
    name : str or path-like
        A path relative to mmseg's config folder
        (``"segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py"``), or a
        config's file name with or without ``.py``
        (``"segformer_mit-b0_8xb2-160k_ade20k-512x512"``). An existing file
        path is returned as it is.

    Returns
    -------
    path : Path
    """
    path = Path(name)
    if path.is_file():
        return path
    root = Path(mmseg.__file__).parent / ".mim" / "configs"
    if not root.is_dir():
        raise FileNotFoundError(
            f"mmsegmentation {mmseg.__version__} has no shipped configs at {root}; pass the path "
            "of a config file instead."
        )
    candidate = root / path
    if candidate.suffix != ".py":
        candidate = candidate.with_name(candidate.name + ".py")
    if candidate.is_file():
        return candidate
    stem = path.name[:-3] if path.name.endswith(".py") else path.name
    found = sorted(root.rglob(f"{stem}.py"))
    if len(found) == 1:
        return found[0]
    hint = f" ({len(found)} match: {[str(f.relative_to(root)) for f in found]})" if found else ""
    raise FileNotFoundError(
        f"No config {str(name)!r} in {root}{hint}; give a path relative to that folder, e.g. "
        "'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py'."
    )


def _sync_bn_to_bn(node: Any) -> Any:
    """Turn every ``SyncBN`` norm config into ``BN`` (in place; returns ``node``)."""
    if isinstance(node, Mapping):
        if node.get("type") in ("SyncBN", "MMSyncBN"):
            # SyncBatchNorm refuses CPU tensors whenever it synchronises (under
            # torch.distributed; always in older torch). At inference BN is the same
            # computation with the same parameters and buffers: checkpoints load unchanged.
            node["type"] = "BN"
        for value in node.values():
            _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _sync_bn_to_bn(value)
    return node


def _as_config(config):
    from mmengine.config import Config

    if isinstance(config, Config):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        return Config.fromfile(str(shipped_config(config)))
    raise TypeError(
        "config must be a path, a shipped config name or an mmengine Config; got "
        f"{type(config).__name__}."
    )


def load_model(
    config: str | os.PathLike | Config,
    checkpoint: str | os.PathLike | None = None,
    *,
    device: str = "cpu",
    cfg_options: Mapping[str, Any] | None = None,
) -> BaseSegmentor:
    """Build an mmseg segmentor in eval mode, with SyncBN replaced by BN.

    A thin layer over :func:`mmseg.apis.init_model` that also accepts the
    name of a shipped config, copies the config instead of changing it, and
    replaces ``SyncBN`` by ``BN`` everywhere in it (SyncBatchNorm fails on CPU
    when it synchronises; at inference it computes what BN computes). Nothing is
    downloaded: the backbone's ``init_cfg`` (pre-trained weights) is dropped,
    as ``init_model`` does; without a checkpoint the weights are random.

    Parameters
    ----------
    config : str, path-like or mmengine.Config
        Config file, or a config shipped with mmsegmentation (see
        :func:`shipped_config`).
    checkpoint : str or path-like, optional
        Weights to load (a local file).
    device : str, default="cpu"
    cfg_options : mapping, optional
        Overrides merged into the config first, e.g.
        ``{"model.decode_head.num_classes": 4}``.

    Returns
    -------
    model : mmseg.models.BaseSegmentor
        With ``model.cfg`` set to the config used.
    """
    from mmseg.apis import init_model

    cfg = _as_config(config)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    _sync_bn_to_bn(cfg.model)
    # init_model clears this for EncoderDecoder only; weights would be fetched only by an
    # init_weights() call, but a cleared init_cfg keeps that from downloading anything
    if "init_cfg" in cfg.model.get("backbone", {}):
        cfg.model.backbone.init_cfg = None
    return init_model(cfg, None if checkpoint is None else str(checkpoint), device=device)


def _head(model):
    head = getattr(model, "decode_head", None)
    if isinstance(head, torch.nn.ModuleList):  # cascade segmentors: the last head predicts
        head = head[-1]
    if head is None:
        raise TypeError(
            f"{type(model).__name__} has no decode_head; pass an mmseg segmentor (e.g. "
            "EncoderDecoder built by load_model or mmseg.apis.init_model)."
        )
    return head


def _n_classes(model) -> int:
    n = int(getattr(_head(model), "out_channels", 0) or _head(model).num_classes)
    if n < 2:
        raise ValueError(
            f"The model predicts {n} channel (a sigmoid binary head); sksegcal calibrates "
            "softmax outputs of >= 2 classes. Rebuild the model with num_classes=2 and "
            "use_sigmoid=False."
        )
    return n


def _prepare_model(model_or_config, checkpoint, device, cfg_options):
    if isinstance(model_or_config, torch.nn.Module):
        model = model_or_config
        if cfg_options:
            raise ValueError("cfg_options only applies when a config is given, not a model.")
        if checkpoint is not None:
            from mmengine.runner import load_checkpoint

            load_checkpoint(model, str(checkpoint), map_location="cpu")
        if device is not None:
            model.to(device)
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules()):
            from mmengine.model import revert_sync_batchnorm

            warnings.warn(
                "The model has SyncBatchNorm layers, which fail on CPU under torch.distributed "
                "(and in older torch); they are replaced by BatchNorm in place (the same "
                "computation at inference).",
                stacklevel=3,
            )
            model = revert_sync_batchnorm(model)
    else:
        model = load_model(
            model_or_config, checkpoint, device=device or "cpu", cfg_options=cfg_options
        )
    model.eval()
    return model


# --------------------------------------------------------------------------- data
def _read_label(path) -> np.ndarray:
    import mmcv
    from mmengine import fileio

    # as mmseg's LoadAnnotations reads segmentation maps (pillow, unchanged values)
    label = mmcv.imfrombytes(fileio.get(str(path)), flag="unchanged", backend="pillow")
    return np.asarray(label).squeeze()


def _reduce_zero_label(label: np.ndarray) -> np.ndarray:
    # as mmseg's LoadAnnotations: 0 becomes ignored, every other class moves down by one
    out = label.astype(np.int64)
    out[out == 0] = IGNORE_INDEX + 1
    out -= 1
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


def _as_list(batch):
    return batch


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


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is in the demo/dev extras, not the mmseg one
        tqdm = None
    if tqdm is not None:
        return tqdm(total=total, desc=desc, unit="img", disable=not enabled)
    return _NoProgress(total, enabled, desc)


class _NoProgress:
    """A minimal stand-in for tqdm: one log line every 10%."""

    def __init__(self, total, enabled, desc):
        self.total, self.enabled, self.desc, self.n, self._next = total, enabled, desc, 0, 0.1

    def update(self, k=1):
        self.n += k
        if self.enabled and self.total and self.n / self.total >= self._next:
            print_log(f"{self.desc}: {self.n}/{self.total} images", logger="current")
            self._next = (int(10 * self.n / self.total) + 1) / 10

    def close(self):
        pass


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

    from ..store import LogitStore

    if store_path is None:
        raise TypeError("extract_logits() needs store_path, the directory of the LogitStore.")
    if not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    size = _check_size(size)
    model_ = _prepare_model(model, checkpoint, device, cfg_options)
    if getattr(model_, "postprocess_result", None).__class__ is _CalibratedPostprocess:
        raise ValueError(
            "The model is calibrated (calibrate_model): its seg_logits are probabilities. "
            "Extract from the uncalibrated model (uncalibrate_model(model))."
        )
    n_classes = _n_classes(model_)
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
    loader = DataLoader(items, batch_size=batch_size, num_workers=num_workers, collate_fn=_as_list)
    bar = _progress(len(todo_idx), progress, "extract logits")
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


# --------------------------------------------------------------------------- calibration
def _load_calibrator(calibrator):
    if isinstance(calibrator, (str, os.PathLike)):
        from ..persistence import detect_format, load

        # a skops file loads through the safe path (our types only); a joblib file is a
        # pickle the user named in their own config, so it is trusted as joblib.load would
        trusted = None if detect_format(calibrator) == "skops" else True
        calibrator = load(calibrator, trusted=trusted)
    if not hasattr(calibrator, "predict_proba"):
        raise TypeError(
            f"The calibrator must be a fitted estimator with predict_proba (or the path of "
            "one saved with sksegcal.persistence.save or joblib.dump); got "
            f"{type(calibrator).__name__}."
        )
    return calibrator


def _check_calibrator_classes(calibrator, n_classes: int) -> None:
    n_features = getattr(calibrator, "n_features_in_", None)
    if n_features is not None and n_features != n_classes:
        raise ValueError(
            f"The calibrator was fitted on {n_features} classes but the model predicts "
            f"{n_classes}."
        )


def _proba_map(calibrator, logits, chunk_pixels: int):
    """Calibrated probabilities (C, H, W) of one image's logits (C, H, W), as a tensor."""
    c, h, w = logits.shape
    table = logits.detach().float().permute(1, 2, 0).reshape(-1, c).cpu().numpy()
    out = np.empty(table.shape, dtype=np.float32)
    for start in range(0, table.shape[0], chunk_pixels):
        stop = start + chunk_pixels
        out[start:stop] = calibrator.predict_proba(table[start:stop])
    proba = torch.from_numpy(out).reshape(h, w, c).permute(2, 0, 1).contiguous()
    return proba.to(device=logits.device)


class _CalibratedPostprocess:
    """``postprocess_result`` of a calibrated model (an instance attribute).

    It holds the model (not a bound method) so that ``copy.deepcopy`` and
    pickling of the model carry a working calibrated model along.
    """

    def __init__(self, model, calibrator, keep_logits: bool, chunk_pixels: int):
        self.model = model
        self.calibrator = calibrator
        self.keep_logits = keep_logits
        self.chunk_pixels = chunk_pixels

    def __call__(self, seg_logits, data_samples=None):
        from mmengine.structures import PixelData

        samples = type(self.model).postprocess_result(self.model, seg_logits, data_samples)
        for sample in samples:
            logits = sample.seg_logits.data
            proba = _proba_map(self.calibrator, logits, self.chunk_pixels)
            if self.keep_logits:
                sample.set_data({"seg_logits_uncalibrated": PixelData(data=logits)})
            # pred_sem_seg was computed from the logits above and is left as it is
            sample.set_data({"seg_logits": PixelData(data=proba)})
            sample.set_metainfo({_PROBA_FLAG: True})
        return samples


def calibrate_model(
    model: BaseSegmentor,
    calibrator: Any,
    *,
    keep_logits: bool = False,
    chunk_pixels: int = _CHUNK_PIXELS,
) -> BaseSegmentor:
    """Make a segmentor's ``seg_logits`` calibrated probabilities (in place).

    After this, everything that goes through the model's
    ``postprocess_result`` (``mmseg.apis.inference_model``,
    ``model.test_step``, mmseg's test loop when ``runner.model`` is
    calibrated before ``runner.test()``) returns data samples whose

    * ``seg_logits.data`` holds ``calibrator.predict_proba`` of the model's
      logits, reshaped to (C, H, W) (probabilities, not logits);
    * ``pred_sem_seg`` is the model's own argmax, unchanged (selective and
      temperature scaling never change it; a calibrator that can, such as
      vector scaling, does not change it here either);
    * metainfo ``seg_logits_are_probabilities`` is True (read by
      :class:`CalibrationMetric`);
    * ``seg_logits_uncalibrated`` holds the logits if ``keep_logits``.

    The model is patched, not wrapped: it keeps its class, weights and
    device, so every mmseg tool that takes a segmentor takes it.
    :func:`uncalibrate_model` removes the patch; calling this again replaces
    the calibrator.

    Parameters
    ----------
    model : mmseg.models.BaseSegmentor
    calibrator : estimator, str or path-like
        A fitted sksegcal calibrator (anything with ``predict_proba`` on
        (n_pixels, n_classes) float32 logits), or the path of one saved with
        ``joblib.dump``.
    keep_logits : bool, default=False
        Also keep the raw logits in ``seg_logits_uncalibrated``.
    chunk_pixels : int, default=262144
        Pixels passed to ``predict_proba`` at once (bounds the memory).

    Returns
    -------
    model : the same model object, calibrated.

    Examples
    --------
    >>> import joblib  # doctest: +SKIP
    >>> from mmseg.apis import inference_model  # doctest: +SKIP
    >>> model = calibrate_model(load_model(cfg, ckpt), "calibrator.joblib")  # doctest: +SKIP
    >>> result = inference_model(model, "image.png")  # doctest: +SKIP
    >>> proba = result.seg_logits.data  # (C, H, W), sums to 1 over C  # doctest: +SKIP
    """
    if not hasattr(type(model), "postprocess_result"):
        raise TypeError(
            f"{type(model).__name__} has no postprocess_result; calibrate_model takes an mmseg "
            "segmentor (BaseSegmentor subclass such as EncoderDecoder)."
        )
    calibrator = _load_calibrator(calibrator)
    _check_calibrator_classes(calibrator, _n_classes(model))
    if not isinstance(chunk_pixels, numbers.Integral) or chunk_pixels < 1:
        raise ValueError(f"chunk_pixels must be a positive integer; got {chunk_pixels!r}.")
    # an instance attribute shadows the class's method; deleting it restores the original
    model.postprocess_result = _CalibratedPostprocess(
        model, calibrator, bool(keep_logits), int(chunk_pixels)
    )
    return model


def uncalibrate_model(model: BaseSegmentor) -> BaseSegmentor:
    """Undo :func:`calibrate_model`; returns the model."""
    if isinstance(model.__dict__.get("postprocess_result"), _CalibratedPostprocess):
        del model.postprocess_result
    return model


# --------------------------------------------------------------------------- metric
# summary() key -> reported metric name (distinct from IoUMetric's aAcc / mIoU / mAcc,
# because an Evaluator refuses two metrics reporting the same name)
_METRIC_NAMES = {
    "ece": "ECE",
    "ece_equal_mass": "ECE_equal_mass",
    "rmsce": "RMSCE",
    "mce": "MCE",
    "nll": "NLL",
    "brier": "Brier",
    "mean_per_image_ece": "mean_image_ECE",
    "classwise_ece": "classwise_ECE",
    "sce": "SCE",
    "ace": "ACE",
    "accuracy": "pixel_accuracy",
    "miou": "mIoU_of_probs",
    "n_pixels": "n_pixels",
}
_DEFAULT_METRICS = ("ece", "mce", "rmsce", "nll", "brier", "mean_per_image_ece")


class CalibrationMetric(BaseMetric):
    """Calibration of per-pixel probabilities as an mmengine/mmseg evaluator metric.

    Streams each test image's probabilities into one
    :class:`~sksegcal.metrics.CalibrationAccumulator` (memory fixed whatever
    the dataset size; images are not kept), merges the accumulators of all
    processes in distributed testing, and reports ECE, MCE, RMS calibration
    error, NLL, Brier score and the mean per-image ECE (by default). Use it
    beside mmseg's ``IoUMetric``::

        custom_imports = dict(imports=["sksegcal.integrations.mmseg"],
                              allow_failed_imports=False)
        test_evaluator = [dict(type="IoUMetric", iou_metrics=["mIoU"]),
                          dict(type="CalibrationMetric", n_bins=15)]

    Probabilities are the softmax of the model's ``seg_logits``, or, if the
    model was calibrated with :func:`calibrate_model`, its ``seg_logits``
    as they are; with ``calibrator`` given, that calibrator's
    ``predict_proba`` of the logits (evaluate a saved calibrator without
    touching the model).

    Parameters
    ----------
    n_bins : int, default=15
        Equal-width confidence bins of ECE / MCE / RMSCE.
    ignore_index : int, default=255
        Label of unlabelled pixels, left out of every metric.
    metrics : sequence of str or "all", default=("ece", "mce", "rmsce", "nll", "brier", \
"mean_per_image_ece")
        Which numbers to report, by the keys of
        :meth:`CalibrationAccumulator.summary
        <sksegcal.metrics.CalibrationAccumulator.summary>`. They are
        reported as ECE, MCE, RMSCE, NLL, Brier, mean_image_ECE,
        ECE_equal_mass, classwise_ECE, SCE, ACE, pixel_accuracy,
        mIoU_of_probs and n_pixels.
    classwise : bool, default=False
        Keep per-class tallies (needed for classwise_ece, sce, ace).
    calibrator : estimator, str or path-like, optional
        Apply this calibrator (or the one saved with joblib at this path) to
        the logits before measuring.
    values : {"auto", "logits", "probabilities"}, default="auto"
        What ``seg_logits`` holds; "auto" trusts the flag set by
        :func:`calibrate_model` and otherwise assumes logits.
    n_base_bins : int, default=3600
        Resolution of the accumulator's confidence grid.
    chunk_pixels : int, default=262144
        Pixels converted at once (bounds the memory per image).
    collect_device : str, default="cpu"
        Where the per-process accumulators are gathered (mmengine).
    prefix : str, optional
        Prefix of the reported names (``prefix/ECE``); mmengine convention.

    Attributes
    ----------
    accumulator_ : CalibrationAccumulator or None
        The tallies of the images processed since the last evaluation (this
        process only).
    last_accumulator_ : CalibrationAccumulator or None
        The merged tallies behind the last reported numbers (main process),
        e.g. for ``reliability_curve()`` or plotting.
    """

    default_prefix = None

    def __init__(
        self,
        n_bins: int = 15,
        ignore_index: int = IGNORE_INDEX,
        metrics: Sequence[str] | str = _DEFAULT_METRICS,
        classwise: bool = False,
        calibrator=None,
        values: str = "auto",
        n_base_bins: int = 3600,
        chunk_pixels: int = _CHUNK_PIXELS,
        collect_device: str = "cpu",
        prefix: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix, **kwargs)
        if not isinstance(n_bins, numbers.Integral) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}.")
        metrics = (
            list(_METRIC_NAMES)
            if metrics == "all"
            else [metrics]
            if isinstance(metrics, str)
            else list(metrics)
        )
        unknown = [m for m in metrics if m not in _METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"Unknown metrics {unknown}; choose from {sorted(_METRIC_NAMES)} or 'all'."
            )
        needs_classwise = {"classwise_ece", "sce", "ace"} & set(metrics)
        if needs_classwise and not classwise and metrics != list(_METRIC_NAMES):
            raise ValueError(f"metrics {sorted(needs_classwise)} need classwise=True.")
        if values not in ("auto", "logits", "probabilities"):
            raise ValueError(
                f"values must be 'auto', 'logits' or 'probabilities'; got {values!r}."
            )
        self.n_bins = int(n_bins)
        self.ignore_index = ignore_index
        self.metrics = metrics
        self.classwise = bool(classwise)
        self.calibrator = None if calibrator is None else _load_calibrator(calibrator)
        self.values = values
        self.n_base_bins = int(n_base_bins)
        self.chunk_pixels = int(chunk_pixels)
        self.accumulator_ = None
        self.last_accumulator_ = None
        self._n_seen = 0
        self._uid = uuid.uuid4().hex

    def _accumulator(self, n_classes: int):
        from ..metrics import CalibrationAccumulator

        if self.accumulator_ is None:
            if self.calibrator is not None:
                _check_calibrator_classes(self.calibrator, n_classes)
            self.accumulator_ = CalibrationAccumulator(
                n_classes,
                ignore_index=self.ignore_index,
                n_base_bins=self.n_base_bins,
                classwise=self.classwise,
                per_image_n_bins=self.n_bins,
            )
        elif self.accumulator_.n_classes != n_classes:
            raise ValueError(
                f"seg_logits with {n_classes} classes after images with "
                f"{self.accumulator_.n_classes}."
            )
        return self.accumulator_

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Add the pixels of a batch of predictions to the accumulator."""
        for sample in data_samples:
            if not isinstance(sample, Mapping):  # a SegDataSample given directly
                sample = sample.to_dict()
            if "seg_logits" not in sample:
                raise KeyError(
                    "CalibrationMetric needs seg_logits in the predictions (mmseg 1.x "
                    "segmentors put them there); this data sample has none."
                )
            logits = sample["seg_logits"]["data"]
            if logits.dim() != 3 or logits.shape[0] < 2:
                raise ValueError(
                    f"seg_logits must be (C, H, W) with C >= 2; got {tuple(logits.shape)} "
                    "(sigmoid binary heads are not supported)."
                )
            if "gt_sem_seg" not in sample:
                raise KeyError(
                    "CalibrationMetric needs gt_sem_seg in the data samples: put "
                    "dict(type='LoadAnnotations') in the test pipeline (before PackSegInputs)."
                )
            label = sample["gt_sem_seg"]["data"].squeeze(0)
            c = logits.shape[0]
            if tuple(label.shape) != tuple(logits.shape[1:]):
                raise ValueError(
                    f"gt_sem_seg {tuple(label.shape)} and seg_logits {tuple(logits.shape[1:])} "
                    "differ in size."
                )
            acc = self._accumulator(c)
            is_proba = self.values == "probabilities" or (
                self.values == "auto" and bool(sample.get(_PROBA_FLAG, False))
            )
            if is_proba and self.calibrator is not None:
                raise ValueError(
                    "The model's seg_logits are already calibrated probabilities; give "
                    "CalibrationMetric a calibrator or calibrate the model, not both."
                )
            table = logits.detach().float().permute(1, 2, 0).reshape(-1, c)
            y = label.reshape(-1).cpu().numpy()
            # img_path identifies an image across processes; otherwise a per-instance id
            image_id = sample.get("img_path") or f"{self._uid}-{self._n_seen}"
            self._n_seen += 1
            for start in range(0, table.shape[0], self.chunk_pixels):
                stop = start + self.chunk_pixels
                x = table[start:stop]
                if self.calibrator is not None:
                    p = self.calibrator.predict_proba(x.cpu().numpy())
                elif is_proba:
                    p = x.cpu().numpy()
                else:
                    p = torch.softmax(x, dim=1).cpu().numpy()
                acc.update(y[start:stop], p, image_id=image_id)

    def evaluate(self, size: int) -> dict:
        """Gather the accumulators of all processes and compute the metrics."""
        # One entry per process, even an empty one: mmengine's result gathering
        # zips the per-process lists and would drop everything after a short list.
        self.results = [self.accumulator_]
        try:
            return super().evaluate(size)
        finally:
            self.accumulator_ = None
            self._n_seen = 0

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Merge the gathered accumulators and read the chosen metrics."""
        accs = [a for a in results if a is not None]
        if not accs or sum(a.n_pixels_ for a in accs) == 0:
            print_log(
                "CalibrationMetric saw no labelled pixel; its metrics are NaN.",
                logger="current",
                level=logging.WARNING,
            )
            return {_METRIC_NAMES[m]: float("nan") for m in self.metrics}
        merged = accs[0].copy()
        for other in accs[1:]:
            merged.merge(other)
        self.last_accumulator_ = merged
        summary = merged.summary(self.n_bins)
        out = {_METRIC_NAMES[m]: float(summary[m]) for m in self.metrics if m in summary}
        text = ", ".join(f"{k}={v:.4f}" for k, v in out.items())
        print_log(
            f"CalibrationMetric over {merged.n_pixels_} pixels ({self.n_bins} bins): {text}",
            logger="current",
        )
        return out


METRICS.register_module(name="CalibrationMetric", module=CalibrationMetric, force=True)
