"""Building mmseg segmentors for sksegcal: shipped configs, SyncBN -> BN, eval mode.

:func:`shipped_config` finds a config inside the mmsegmentation wheel,
:func:`load_model` builds a model from it on CPU without downloading anything,
and the private helpers answer what the other parts ask of a model (its head,
its class count, a built model ready for inference). Imports only
:mod:`._common` of the package.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mmseg
import torch

if TYPE_CHECKING:
    from mmengine.config import Config
    from mmseg.models import BaseSegmentor

__all__ = ["head", "load_model", "n_classes", "prepare_model", "shipped_config"]


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


def head(model):
    found = getattr(model, "decode_head", None)
    if isinstance(found, torch.nn.ModuleList):  # cascade segmentors: the last head predicts
        found = found[-1]
    if found is None:
        raise TypeError(
            f"{type(model).__name__} has no decode_head; pass an mmseg segmentor (e.g. "
            "EncoderDecoder built by load_model or mmseg.apis.init_model)."
        )
    return found


def n_classes(model) -> int:
    """Classes the segmentor's (last) decode head predicts; >= 2 (softmax heads)."""
    head_ = head(model)
    n = int(getattr(head_, "out_channels", 0) or head_.num_classes)
    if n < 2:
        raise ValueError(
            f"The model predicts {n} channel (a sigmoid binary head); sksegcal calibrates "
            "softmax outputs of >= 2 classes. Rebuild the model with num_classes=2 and "
            "use_sigmoid=False."
        )
    return n


def prepare_model(model_or_config, checkpoint, device, cfg_options):
    """A segmentor in eval mode from a model (weights loaded, moved, SyncBN reverted) or config."""
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
