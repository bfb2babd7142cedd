"""Extraction throughput through the bridges against the bare forward pass, on CPU.

A SegFormer-b0-sized model (transformers' default ``SegformerConfig``: MiT-b0
encoder, 256-wide decoder; 150 classes as for ADE20K), randomly initialised,
on 512x512 images that are already prepared (``pixel_values``), so that every
row times the same forward passes:

* ``forward``: ``model(pixel_values)`` alone, quarter-resolution logits;
* ``forward+resize``: plus one ``F.interpolate`` of the batch's logits to
  512x512 (bilinear, ``align_corners=False``), what the torch bridge's rule does;
* ``forward+post``: plus the image processor's
  ``post_process_semantic_segmentation`` to 512x512 (what any user needs to
  get a map at the image's size);
* ``torch bridge -> arrays`` / ``transformers bridge -> arrays``: the full
  extraction into float32 arrays at 512x512;
* ``transformers bridge -> store``: into a LogitStore (float16 on disk).

Each row is the best of ``--repeats`` runs over the same batches (the
minimum is the least disturbed by other processes). Run::

    python benchmarks/bench_extraction.py --images 4 --batch-size 2 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--store", action="store_true", help="also time the store writer")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import SegformerConfig, SegformerForSemanticSegmentation
    from transformers.models.segformer.image_processing_pil_segformer import (
        SegformerImageProcessorPil,
    )

    from sksegcal.integrations import torch as torch_bridge
    from sksegcal.integrations import transformers as hf_bridge

    torch.manual_seed(0)
    model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=args.classes)).eval()
    processor = SegformerImageProcessorPil()
    s = args.size
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, args.images, args.batch_size):
        n = min(args.batch_size, args.images - start)
        batches.append(
            {
                "pixel_values": torch.randn(n, 3, s, s, generator=g),
                "labels": torch.randint(0, args.classes, (n, s, s), generator=g),
            }
        )

    def forward():
        with torch.inference_mode():
            for b in batches:
                model(pixel_values=b["pixel_values"])

    def forward_resize():
        with torch.inference_mode():
            for b in batches:
                logits = model(pixel_values=b["pixel_values"]).logits
                torch.nn.functional.interpolate(
                    logits, size=(s, s), mode="bilinear", align_corners=False
                )

    def forward_post():
        with torch.inference_mode():
            for b in batches:
                out = model(pixel_values=b["pixel_values"])
                processor.post_process_semantic_segmentation(
                    out, target_sizes=[(s, s)] * len(b["labels"])
                )

    def torch_arrays():
        torch_bridge.extract_logits(model, batches, progress=False)

    def hf_arrays():
        hf_bridge.extract_logits(model, processor, batches, progress=False)

    def hf_store():
        path = tempfile.mkdtemp()
        try:
            hf_bridge.extract_logits(model, processor, batches, path + "/s", progress=False)
        finally:
            shutil.rmtree(path)

    rows = [
        ("forward", forward),
        ("forward+resize", forward_resize),
        ("forward+post", forward_post),
        ("torch bridge -> arrays", torch_arrays),
        ("transformers bridge -> arrays", hf_arrays),
    ]
    if args.store:
        rows.append(("transformers bridge -> store", hf_store))
    forward()  # warm-up
    best = {}
    for _ in range(args.repeats):
        for name, fn in rows:  # interleaved, so that load changes hit every row alike
            t0 = time.perf_counter()
            fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    print(
        f"SegFormer-b0 config, {args.classes} classes, {args.images} images of {s}x{s}, "
        f"batch {args.batch_size}, {args.threads} threads, best of {args.repeats}"
    )
    print(f"{'path':32s} {'s/image':>8s} {'img/s':>7s} {'vs forward':>10s} {'vs fwd+post':>11s}")
    for name, _ in rows:
        t = best[name] / args.images
        print(
            f"{name:32s} {t:8.3f} {1 / t:7.2f} {best[name] / best['forward']:10.3f} "
            f"{best[name] / best['forward+post']:11.3f}"
        )


if __name__ == "__main__":
    main()
