"""Train the demo's U-Nets once and write them, with their manifest, into this folder.

Usage (from a checkout, with the ``demo`` extra and Debian's ``mricron-data``
installed for the AAL networks)::

    python -m sksegcal._weights.make_weights              # all four networks
    python -m sksegcal._weights.make_weights --only unet-mni152-tissue-quick
    python -m sksegcal._weights.make_weights --check      # retrain, compare, write nothing

Each network is trained exactly as ``sksegcal demo`` would train it (the
settings are those the demo reads, ``sksegcal._segnet.DEMO_SETTINGS``): the demo's data
settings with ``random_state=0``, its :class:`~sksegcal._segnet.SegNetConfig`
(seeded, one torch thread, deterministic kernels), on CPU. The float32 weights
are rounded to float16 and written as an uncompressed ``.npz`` with fixed zip
timestamps, so the same weights always give the same file and the same sha256
(the wheel compresses it). ``--check`` retrains and reports whether the files
would come out identical on this machine: the same machine type and torch
version should reproduce them; other CPUs may differ in the last bits of
training and so in the file, which is why the files are shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import time
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .._segnet import (
    DEMO_NETWORKS,
    DEMO_SETTINGS,
    SegNetConfig,
    _data_fingerprint,
    demo_network_name,
    predict_logits,
    train_unet,
)

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def demo_settings() -> dict:
    """The demo's per-(dataset, quick) data and network settings (``DEMO_SETTINGS``)."""
    return DEMO_SETTINGS


def npz_bytes(state: dict[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of the arrays, byte-for-byte reproducible (sorted, fixed dates)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for key in sorted(state):
            buf = io.BytesIO()
            # np.asarray, not np.ascontiguousarray: that makes 0-d counters 1-d
            np.lib.format.write_array(buf, np.asarray(state[key]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME), buf.getvalue())
    return out.getvalue()


def to_float16(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy arrays: floating tensors float16, counters int64."""
    state = {}
    for key, value in model.state_dict().items():
        array = value.detach().cpu().numpy()
        state[key] = array.astype(np.float16 if value.is_floating_point() else np.int64)
    for key, array in state.items():
        if array.dtype == np.float16 and not np.isfinite(array).all():
            raise ValueError(f"{key} overflows float16")
    return state


def cpu_model() -> str:
    """The processor's model name: training is bit-for-bit repeatable only on the same one."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_one(dataset: str, quick: bool, *, verbose: bool = True) -> tuple[str, bytes, dict]:
    """Train one network; return its name, its .npz bytes and its manifest entry."""
    from .. import __version__
    from ..datasets import load_dataset

    settings = demo_settings()[(dataset, quick)]
    data_kwargs = {"random_state": 0, **settings["data"]}
    data = load_dataset(dataset, **data_kwargs)
    train = data.select("model")
    config = SegNetConfig(**settings["net"])
    name = demo_network_name(dataset, quick)
    if verbose:
        print(f"{name}: {len(train)} training images {train.images.shape[2:]}, "
              f"{data.n_classes} classes, {config}", flush=True)

    def progress(epoch, loss):
        if verbose and (epoch + 1) % 10 == 0:
            print(f"  epoch {epoch + 1}/{config.epochs}  loss {loss:.4f}", flush=True)

    start = time.perf_counter()
    model, losses = train_unet(train.images, train.labels, data.n_classes, config,
                               progress=progress)
    seconds = time.perf_counter() - start
    state = to_float16(model)
    raw = npz_bytes(state)

    # what rounding to float16 does to the held-out logits (recorded, not hidden)
    held = data.select("calibration").images
    z32 = predict_logits(model, held)
    half = type(model)(data.n_classes, in_channels=train.images.shape[1], width=config.width,
                       depth=config.depth)
    half.load_state_dict({k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16
                                              else v) for k, v in state.items()})
    z16 = predict_logits(half, held)
    entry = {
        "file": f"{name}.npz",
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "dataset": dataset,
        "quick": quick,
        "n_classes": data.n_classes,
        "in_channels": int(train.images.shape[1]),
        "image_shape": list(train.images.shape[2:]),
        "config": asdict(config),
        "data": {"loader": f"sksegcal.datasets.load_dataset({dataset!r}, **kwargs)"
                 ".select('model')", "kwargs": data_kwargs, "n_images": len(train),
                 "sha256": _data_fingerprint(train.images, train.labels)},
        "dtype": "float16 (floating tensors), int64 (BatchNorm counters)",
        "made_with": {
            "script": "python -m sksegcal._weights.make_weights",
            "sksegcal": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(),
            "deterministic_algorithms": True,
            "seed": config.seed,
            "num_threads": config.num_threads,
        },
        "train_seconds": round(seconds, 1),
        "losses": [float(x) for x in losses],
        "float16_effect": {
            "images": "held-out 'calibration' subset",
            "max_abs_logit_change": float(np.abs(z32 - z16).max()),
            "argmax_agreement": float((z32.argmax(1) == z16.argmax(1)).mean()),
        },
    }
    if verbose:
        print(f"  trained in {seconds:.0f} s, {len(raw)} bytes, float16 changes logits by "
              f"<= {entry['float16_effect']['max_abs_logit_change']:.2g} "
              f"(argmax agreement {entry['float16_effect']['argmax_agreement']:.5f})",
              flush=True)
    return name, raw, entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sksegcal._weights.make_weights",
                                     description=__doc__.split("\n")[0])
    names = [demo_network_name(d, q) for d, q in DEMO_NETWORKS]
    parser.add_argument("--only", action="append", choices=names,
                        help="make only this network (repeatable)")
    parser.add_argument("--check", action="store_true",
                        help="retrain and compare with the shipped files; write nothing")
    args = parser.parse_args(argv)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest.setdefault("networks", {})
    manifest["about"] = (
        "Trained U-Nets of 'sksegcal demo'; made by 'python -m sksegcal._weights.make_weights' "
        "and loaded by sksegcal._segnet.load_demo_network, which checks each file's sha256.")
    status = 0
    for dataset, quick in DEMO_NETWORKS:
        name = demo_network_name(dataset, quick)
        if args.only and name not in args.only:
            continue
        name, raw, entry = make_one(dataset, quick)
        if args.check:
            old = manifest["networks"].get(name, {}).get("sha256")
            same = old == entry["sha256"]
            print(f"  {name}: {'identical to' if same else 'DIFFERS from'} the shipped file")
            status |= not same
            continue
        (HERE / entry["file"]).write_bytes(raw)
        manifest["networks"][name] = entry
        MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
