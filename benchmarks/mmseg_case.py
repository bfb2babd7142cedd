"""The quality benchmark's mmsegmentation case: SegFormer-b0 trained on the MNI152 task.

A real mmseg model (the shipped ``segformer_mit-b0`` config, 3 classes, SyncBN -> BN, no
pretrained weights) trained on CPU on the same slices as the demo's U-Net, then its logits
extracted through ``sksegcal.integrations.mmseg.extract_logits``, the path a user's model takes.
The trained weights are cached beside the U-Net's.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIG = "segformer_mit-b0_8xb2-160k_ade20k-512x512"
SETTINGS = {"epochs": 100, "batch_size": 8, "lr": 1e-3, "seed": 0}


def _rgb_uint8(images: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) intensities around [0, 1] -> (N, H, W, 3) uint8, as a camera image."""
    gray = np.clip(images[:, 0] * 255.0, 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _build(n_classes: int):
    from sksegcal.integrations import mmseg as mm

    return mm.load_model(CONFIG, cfg_options={
        "model.decode_head.num_classes": n_classes,
        "model.data_preprocessor.size": None,  # no 512x512 padding: our slices are 96x80
        "model.data_preprocessor.size_divisor": 32,
    })


def train_segformer(images: np.ndarray, labels: np.ndarray, n_classes: int):
    """Train (deterministically, one thread) and return the model in eval mode."""
    import torch
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    torch.manual_seed(SETTINGS["seed"])
    model = _build(n_classes)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"])
    rgb = _rgb_uint8(images)
    rng = np.random.default_rng(SETTINGS["seed"])

    def batch(rows):
        inputs, samples = [], []
        for i in rows:
            inputs.append(torch.from_numpy(np.ascontiguousarray(rgb[i].transpose(2, 0, 1))))
            shape = labels[i].shape
            sample = SegDataSample(metainfo={"img_shape": shape, "ori_shape": shape,
                                             "pad_shape": shape})
            sample.gt_sem_seg = PixelData(data=torch.from_numpy(labels[i][None].astype(np.int64)))
            samples.append(sample)
        return {"inputs": inputs, "data_samples": samples}

    n_batches = max(len(images) // SETTINGS["batch_size"], 1)
    for _ in range(SETTINGS["epochs"]):
        for rows in np.array_split(rng.permutation(len(images)), n_batches):
            data = model.data_preprocessor(batch(rows), training=True)
            losses = model(**data, mode="loss")
            loss = sum(v for k, v in losses.items() if "loss" in k)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def segformer_logits(data, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C, H, W) of the calibration and shifted subsets, training once (cached)."""
    import torch

    torch.set_num_threads(1)
    train = data.select("model")
    key = hashlib.sha256(json.dumps([CONFIG, SETTINGS]).encode()
                         + train.images.tobytes() + train.labels.tobytes()).hexdigest()[:16]
    path = Path(cache) / f"segformer-mni152-{key}.pt"
    if path.is_file():
        model = _build(data.n_classes)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        model.eval()
    else:
        start = time.perf_counter()
        model = train_segformer(train.images, train.labels, data.n_classes)
        print(f"[segformer] trained in {time.perf_counter() - start:.0f}s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return tuple(_extract(model, data.select(part)) for part in ("calibration", "shifted"))


def _extract(model, part) -> np.ndarray:
    from sksegcal.integrations.mmseg import extract_logits

    names = list(range(len(part.images)))
    with tempfile.TemporaryDirectory() as tmp:
        store = extract_logits(
            model, (_rgb_uint8(part.images), part.labels), Path(tmp) / "store",
            pipeline=[{"type": "LoadImageFromNDArray"}, {"type": "PackSegInputs"}],
            names=names, reduce_zero_label=False, progress=False,
        )
        return np.stack([
            np.asarray(store.load_image(store.image_id(n)).logits, dtype=np.float32)
            for n in names
        ])
