"""A compact U-Net trained on CPU, the segmentation model of the demo.

The demo needs a real segmentation network whose probabilities are
miscalibrated the way trained networks' are: over-confident, worst on the
pixels it gets wrong. A small U-Net trained with plain cross-entropy on a fixed
set of slices, for long enough that it overfits a little, is exactly that.
Training is seeded and runs single-process on CPU in deterministic mode.

The demo's networks are shipped: :func:`load_demo_network` reads float16
weights from ``sksegcal/_weights`` (an ``.npz`` of arrays, never a pickle),
checks them against their manifest (sha256, settings) and returns a float32
U-Net in under a second, so ``sksegcal demo`` trains nothing and prints the same
numbers on every machine. ``python -m sksegcal._weights.make_weights`` remakes
them. :func:`load_or_train` trains instead (``sksegcal demo --retrain``); its
weights are cached on disk under a key that hashes the training settings, the
data and the package version, so later runs skip training.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._files import atomic_write_via_path

__all__ = [
    "DEMO_NETWORKS",
    "DEMO_SETTINGS",
    "SegNetConfig",
    "UNet",
    "cache_dir",
    "demo_network_name",
    "load_demo_network",
    "load_or_train",
    "predict_logits",
    "train_unet",
]


@dataclass(frozen=True)
class SegNetConfig:
    """Settings of the U-Net and its training (all part of the cache key).

    Attributes
    ----------
    width : int
        Channels of the first level; level k has ``width * 2**k``.
    depth : int
        Number of levels (image sides must be divisible by ``2**(depth - 1)``).
    epochs : int
        Passes over the training images. Long on purpose: a little overfitting
        makes the network over-confident, as real segmentation networks are.
    batch_size : int
    lr : float
        Adam's learning rate (constant: no schedule, no label smoothing, no
        weight decay, nothing that would calibrate the network by accident).
    seed : int
        Seed of the initialisation and of the batch order.
    num_threads : int
        Torch CPU threads while training. Floating-point sums depend on the
        thread count, so it is fixed (and part of the cache key) to make the
        weights reproducible; one thread is also the fastest on a shared
        2-core machine.
    """

    width: int = 8
    depth: int = 3
    epochs: int = 40
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    num_threads: int = 1


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net: (N, in_channels, H, W) -> logits (N, n_classes, H, W).

    ``depth`` levels of two 3x3 conv + BatchNorm + ReLU blocks with widths
    ``width * 2**level``, max-pooling down, transposed convolutions up, skip
    connections. H and W must be divisible by ``2 ** (depth - 1)``. Deeper
    networks see more of the slice, which atlas labels (defined by position
    more than by intensity) need.
    """

    def __init__(self, n_classes: int, *, in_channels: int = 1, width: int = 16,
                 depth: int = 3):
        super().__init__()
        widths = [width * 2**level for level in range(depth)]
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(_block(c, w))
            c = w
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.dec.append(_block(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, n_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block(self.pool(x) if level else x)
            skips.append(x)
        skips.pop()  # the bottom level has no skip connection
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


@contextlib.contextmanager
def _fixed_threads(num_threads: int):
    """Deterministic kernels and a fixed torch thread count; both restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads != num_threads:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(previous)


@contextlib.contextmanager
def _deterministic_torch(seed: int, num_threads: int):
    """Seed torch, force deterministic kernels and fix the thread count; restore after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with _fixed_threads(num_threads):
            yield
    finally:
        torch.random.set_rng_state(state)


def train_unet(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    config: SegNetConfig = SegNetConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[UNet, list[float]]:
    """Train a :class:`UNet` with cross-entropy; seeded and deterministic on CPU.

    Parameters
    ----------
    images : ndarray of shape (N, 1, H, W), float32
    labels : ndarray of shape (N, H, W), integer in [0, n_classes)
    n_classes : int
    config : SegNetConfig
    progress : callable, optional
        Called as ``progress(epoch, mean_loss)`` after every epoch.

    Returns
    -------
    model : UNet, in eval mode
    losses : list of float, the mean training loss of every epoch
    """
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    losses = []
    with _deterministic_torch(config.seed, config.num_threads):
        model = UNet(n_classes, in_channels=x_all.shape[1], width=config.width,
                     depth=config.depth)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        loss_fn = nn.CrossEntropyLoss()
        order_rng = np.random.default_rng(config.seed)
        model.train()
        for epoch in range(config.epochs):
            order = order_rng.permutation(len(x_all))
            total, count = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                idx = torch.from_numpy(order[start : start + config.batch_size])
                if len(idx) < 2:  # BatchNorm needs two samples per batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x_all[idx]), y_all[idx])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                count += len(idx)
            losses.append(total / max(count, 1))
            if progress is not None:
                progress(epoch, losses[-1])
    model.eval()
    return model, losses


#: Chunks of fewer images are padded to this many: oneDNN picks its convolution kernels by
#: the batch's shape, and below 16 images (on one thread, AVX-512) it picks others whose
#: float sums round differently, so an image's logits would depend on its batch-mates.
_MIN_BATCH = 16


def predict_logits(model: nn.Module, images: np.ndarray, *, batch_size: int = 32,
                   num_threads: int = 1) -> np.ndarray:
    """Logits (N, C, H, W) float32 of a model for images (N, 1, H, W).

    Deterministic: runs on ``num_threads`` torch threads (default 1; the
    previous count is restored after) with deterministic kernels, in chunks of
    ``batch_size`` images, a chunk of fewer than 16 images padded with blank
    images to 16. The convolution kernels oneDNN picks (and so the rounding of
    their sums) depend on the thread count and on the batch's size; with both
    fixed, an image's logits are the same bits whatever the machine's core
    count, whatever ``batch_size`` and whatever images it is computed with
    (``tests/test_demo_weights.py`` checks it). Machines with other vector
    instructions (AVX2 rather than AVX-512) may still differ in the last bit.

    One thread costs little: the demo's networks are small, and on the 2-core
    machines the demo targets a second thread gains little. A single image
    costs as much as 16 (the padding): pass images in batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
    model.eval()
    out = []
    with _fixed_threads(num_threads), torch.inference_mode():
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
            n = len(chunk)
            if n < _MIN_BATCH:
                chunk = np.concatenate(
                    [chunk, np.zeros((_MIN_BATCH - n,) + chunk.shape[1:], np.float32)])
            out.append(model(torch.from_numpy(chunk))[:n].numpy().astype(np.float32,
                                                                           copy=False))
    if not out:
        raise ValueError("predict_logits needs at least one image.")
    return np.concatenate(out)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The model cache: ``path``, else ``$SKSEGCAL_CACHE``, else ``~/.cache/sksegcal``."""
    if path is not None:
        return Path(path)
    if os.environ.get("SKSEGCAL_CACHE"):
        return Path(os.environ["SKSEGCAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sksegcal"


def _cache_key(name: str, config: SegNetConfig, images: np.ndarray, labels: np.ndarray,
               n_classes: int) -> str:
    from . import __version__

    digest = hashlib.sha256()
    digest.update(json.dumps(
        {"name": name, "config": asdict(config), "n_classes": n_classes,
         "version": __version__, "torch": torch.__version__.split("+")[0],
         "shape": list(images.shape)},
        sort_keys=True).encode())
    # the data themselves, so a change in how the dataset is built invalidates the cache
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return digest.hexdigest()[:16]


def load_or_train(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    config: SegNetConfig = SegNetConfig(),
    *,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[UNet, dict]:
    """The trained U-Net for these training data and settings, from the cache if there.

    This is ``sksegcal demo --retrain``; the demo otherwise uses the shipped
    networks (:func:`load_demo_network`). Training is seeded and deterministic
    on one machine, but its weights, and so every number computed from them,
    can differ in the last bits between machines: floating-point sums depend
    on the CPU's vector instructions and the math library's kernels, and over
    hundreds of optimiser steps such differences grow. The shipped networks
    were trained once and are the same bits everywhere.

    Parameters
    ----------
    name : str
        Dataset name, part of the cache file name.
    images, labels, n_classes, config, progress
        As in :func:`train_unet`.
    cache : path, optional
        Cache folder; see :func:`cache_dir`.
    use_cache : bool, default=True
        False trains afresh and writes nothing.

    Returns
    -------
    model : UNet in eval mode
    info : dict
        ``cached`` (bool), ``path`` (cache file or None), ``train_seconds``,
        ``losses`` (per epoch), ``config``.
    """
    key = _cache_key(name, config, images, labels, n_classes)
    path = cache_dir(cache) / f"unet-{name}-{key}.pt"
    if use_cache and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            model = UNet(n_classes, in_channels=images.shape[1], width=config.width,
                         depth=config.depth)
            model.load_state_dict(saved["state_dict"])
            model.eval()
            return model, {"cached": True, "path": str(path), "config": asdict(config),
                           "train_seconds": float(saved.get("train_seconds", 0.0)),
                           "losses": list(saved.get("losses", []))}
        except Exception:  # a corrupt or stale cache file: retrain and overwrite it
            pass
    start = time.perf_counter()
    model, losses = train_unet(images, labels, n_classes, config, progress=progress)
    seconds = time.perf_counter() - start
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {"state_dict": model.state_dict(), "losses": losses,
                 "train_seconds": seconds, "config": asdict(config)}
        # atomic: a concurrent run never reads half a file
        atomic_write_via_path(path, lambda tmp: torch.save(saved, tmp))
    return model, {"cached": False, "path": str(path) if use_cache else None,
                   "config": asdict(config), "train_seconds": seconds, "losses": losses}


# ----------------------------------------------------------------- shipped networks
# Training settings of the demo's network per dataset; "quick" is for tests and smoke runs.
# The full settings train to a small training loss on one acquisition of each model slice,
# so the network overfits a little and is over-confident, as trained segmentation nets are.
DEMO_SETTINGS = {
    ("mni152-tissue", False): {
        # 150 epochs: the training loss falls to 0.04 and the network ends over-confident on
        # held-out slices (temperature about 1.3 in-domain, 2 under the shift); at 60 epochs it
        # was nearly calibrated (1.06), unlike the segmentation networks users bring
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 2,
                 "n_shifted_acquisitions": 2},
        "net": {"width": 16, "epochs": 150},
    },
    ("aal", False): {
        # atlas regions are defined by position more than by intensity: a 5-level U-Net sees
        # the whole slice (a 3-level one reached an mIoU of 0.01, this one about 0.1-0.2)
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 2,
                 "n_shifted_acquisitions": 2},
        "net": {"width": 12, "depth": 5, "epochs": 100},
    },
    ("mni152-tissue", True): {
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 1,
                 "n_shifted_acquisitions": 1, "slice_step": 3},
        "net": {"width": 8, "epochs": 15},
    },
    ("aal", True): {
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 1,
                 "n_shifted_acquisitions": 1, "slice_step": 3},
        "net": {"width": 8, "epochs": 15},
    },
}


#: (dataset, quick) pairs whose trained U-Nets ship in ``sksegcal/_weights``.
DEMO_NETWORKS = (("mni152-tissue", False), ("aal", False), ("mni152-tissue", True),
                 ("aal", True))
_MANIFEST = "manifest.json"


def _weights_dir():
    """The folder of the shipped weights (a Traversable; a function, so tests can swap it)."""
    from importlib.resources import files

    return files("sksegcal._weights")


def demo_network_name(dataset: str, quick: bool = False) -> str:
    """The manifest key (and file stem) of a shipped network: ``unet-<dataset>[-quick]``."""
    return f"unet-{dataset}" + ("-quick" if quick else "")


def _data_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of the training images (float32) and labels (uint8), with their shapes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"images": list(images.shape), "labels": list(labels.shape)})
                  .encode())
    digest.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def _demo_manifest() -> dict:
    return json.loads((_weights_dir() / _MANIFEST).read_text(encoding="utf-8"))


def load_demo_network(
    dataset: str,
    *,
    quick: bool = False,
    config: SegNetConfig | None = None,
) -> tuple[UNet, dict]:
    """The demo's trained U-Net for ``dataset``, from the weights shipped in the package.

    The weights were trained once by ``python -m sksegcal._weights.make_weights``
    (seeded, one thread, the demo's settings) and are stored as float16 arrays
    in an ``.npz`` read with ``allow_pickle=False``: nothing is unpickled. The
    file's sha256 is checked against ``sksegcal/_weights/manifest.json``,
    which also records how it was made. The weights are cast to float32, so
    the network (and :func:`predict_logits`) computes in float32 and gives the
    same logits on every machine. No data are needed: the AAL network loads
    without Debian's ``mricron-data``.

    Parameters
    ----------
    dataset : {"mni152-tissue", "aal"}
    quick : bool, default=False
        The small network of ``sksegcal demo --quick``.
    config : SegNetConfig, optional
        The settings the caller would train with (the demo's). If given and
        not those the shipped network was trained with, a ValueError says so,
        instead of silently using a network made with other settings.

    Returns
    -------
    model : UNet, float32, in eval mode
    info : dict
        ``shipped`` (True), ``cached`` (False: nothing was read from the user
        cache), ``path`` (the weights file), ``name``, ``sha256``, ``config``
        (the training settings, as :func:`load_or_train` reports them),
        ``train_seconds`` (what training them took once), ``losses`` (per
        epoch) and ``manifest`` (the whole manifest entry).

    Raises
    ------
    ValueError
        For an unknown dataset, a ``config`` other than the shipped one, or a
        weights file that does not match its manifest.
    """
    name = demo_network_name(dataset, quick)
    networks = _demo_manifest()["networks"]
    if name not in networks:
        shipped = sorted({key[0] for key in DEMO_NETWORKS})
        raise ValueError(f"No shipped network for dataset {dataset!r} (quick={quick}); "
                         f"choose one of {shipped}, or train one with load_or_train.")
    entry = networks[name]
    shipped_config = SegNetConfig(**entry["config"])
    if config is not None and config != shipped_config:
        raise ValueError(
            f"The shipped {name} network was trained with {shipped_config}, not {config}; "
            "train with these settings instead (sksegcal demo --retrain), or remake the "
            "shipped weights with 'python -m sksegcal._weights.make_weights'.")
    resource = _weights_dir() / entry["file"]
    raw = resource.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != entry["sha256"]:
        raise ValueError(
            f"The shipped weights {entry['file']} have sha256 {digest}, but the manifest "
            f"records {entry['sha256']}: the file is damaged or was replaced; reinstall "
            "sksegcal.")
    model = UNet(entry["n_classes"], in_channels=entry["in_channels"],
                 width=shipped_config.width, depth=shipped_config.depth)
    expected = model.state_dict()
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
        if set(arrays.files) != set(expected):
            raise ValueError(f"{entry['file']} does not hold the tensors of a {name} U-Net.")
        state = {}
        for key, target in expected.items():
            array = arrays[key]
            if array.shape != tuple(target.shape):
                raise ValueError(f"{entry['file']}: {key} has shape {array.shape}, the "
                                 f"network needs {tuple(target.shape)}.")
            # float16 on disk, float32 (the network's dtype) in memory
            dtype = np.float32 if target.is_floating_point() else np.int64
            state[key] = torch.from_numpy(array.astype(dtype))  # a copy, C-ordered, any ndim
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, {"shipped": True, "cached": False, "path": str(resource), "name": name,
                   "sha256": digest, "config": asdict(shipped_config),
                   "train_seconds": float(entry["train_seconds"]),
                   "losses": list(entry["losses"]), "manifest": entry}
