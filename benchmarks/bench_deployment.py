"""Cost of calibrating inside the network: calibrator modules against the segmenter and NumPy.

Two measurements, on the CPU of this machine:

1. A SegFormer-b0-sized network (transformers ``SegformerConfig()`` defaults,
   random weights, 150 classes) on one 512x512 image: its forward pass alone,
   the uncalibrated probability path (forward, logits resized to the input as the
   bridges do, softmax), and ``CalibratedSegmenter`` with temperature scaling,
   selective scaling (default: soft, logistic detector) and local temperature
   scaling with its spatial context. Overhead = extra time over the uncalibrated
   path, and over the forward pass alone.
2. The same calibrators' modules against their NumPy ``predict_proba`` on the
   same 512x512x150 logits (for LTS, NumPy also needs the context columns:
   timed with and without ``flatten_segmentation(..., context="spatial")``).

Calibrators are fitted on small synthetic maps (their numbers do not change the
cost). Times are medians of ``--repeats`` runs with torch's default threads.

    python benchmarks/bench_deployment.py            # the figures in docs/deployment.md
    python benchmarks/bench_deployment.py --size 128 --repeats 2   # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import uniform_filter

from sksegcal import LocalTemperatureScaling, SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.deployment import CalibratedSegmenter
from sksegcal.pixels import flatten_segmentation


def synthetic_maps(n, c, size, seed=0):
    rng = np.random.default_rng(seed)
    labels = (np.add.outer(np.arange(size), np.arange(size)) // 8) % c
    labels = np.stack([np.roll(labels, 3 * i, axis=1) for i in range(n)])
    noise = uniform_filter(rng.normal(size=(n, c, size, size)), size=(1, 1, 3, 3))
    logits = 4.0 * np.moveaxis(np.eye(c, dtype=np.float32)[labels], -1, 1) + 12.0 * noise
    return logits.astype(np.float32), labels


def fitted_calibrators(c):
    logits, labels = synthetic_maps(6, c, 48)
    X, y, groups = flatten_segmentation(logits, labels)
    Xc, _, _ = flatten_segmentation(logits, labels, context="spatial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "TS": TemperatureScaling().fit(X, y),
            "selective (soft, default)": SelectiveScalingCalibrator(
                random_state=0, guard=None
            ).fit(X, y, groups=groups),
            "LTS (spatial context)": LocalTemperatureScaling().fit(Xc, y),
        }


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Softmax(torch.nn.Module):
    def forward(self, logits):
        return torch.softmax(logits, dim=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    net = SegformerForSemanticSegmentation(SegformerConfig(num_labels=args.classes)).eval()
    images = torch.randn(1, 3, args.size, args.size)
    calibrators = fitted_calibrators(args.classes)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, image "
        f"{args.size}x{args.size}, {args.classes} classes, median of {args.repeats}"
    )

    with torch.inference_mode():
        t_net = median_time(lambda: net(images).logits, args.repeats)
        base = CalibratedSegmenter(net, Softmax()).eval()
        t_base = median_time(lambda: base(images), args.repeats)
        print(f"segmenter forward (logits at 1/4 size): {t_net * 1e3:8.1f} ms")
        print(f"uncalibrated probabilities (forward, resize, softmax): {t_base * 1e3:8.1f} ms")
        for name, cal in calibrators.items():
            model = CalibratedSegmenter(net, cal).eval()
            t = median_time(lambda model=model: model(images), args.repeats)
            print(
                f"{name:28s} {t * 1e3:8.1f} ms   overhead {100 * (t - t_base) / t_base:5.1f}% "
                f"of the uncalibrated path, {100 * (t - t_base) / t_net:5.1f}% of the forward"
            )

        # module against NumPy predict_proba on the same full-size logits
        logits = F.interpolate(
            net(images).logits, size=images.shape[2:], mode="bilinear", align_corners=False
        )
    maps = logits.numpy()
    X = np.ascontiguousarray(np.moveaxis(maps, 1, -1).reshape(-1, args.classes))
    dummy = np.zeros((1, args.size, args.size), np.int64)
    print(f"module vs NumPy predict_proba on {X.shape[0]} pixels x {args.classes} classes")
    for name, cal in calibrators.items():
        module = cal.to_torch()
        with torch.inference_mode():
            t_module = median_time(lambda module=module: module(logits), args.repeats)
        if cal.reads_context == "spatial":
            Xc = flatten_segmentation(maps, dummy, context="spatial", ignore_index=None)[0]
            t_numpy = median_time(lambda cal=cal, Xc=Xc: cal.predict_proba(Xc), args.repeats)
            t_context = median_time(
                lambda: flatten_segmentation(maps, dummy, context="spatial", ignore_index=None),
                args.repeats,
            )
            print(
                f"{name:28s} module {t_module * 1e3:8.1f} ms, NumPy {t_numpy * 1e3:8.1f} ms "
                f"(+ context table {t_context * 1e3:.1f} ms): {t_numpy / t_module:.1f}x, "
                f"{(t_numpy + t_context) / t_module:.1f}x with the context"
            )
        else:
            t_numpy = median_time(lambda cal=cal: cal.predict_proba(X), args.repeats)
            print(
                f"{name:28s} module {t_module * 1e3:8.1f} ms, NumPy {t_numpy * 1e3:8.1f} ms: "
                f"{t_numpy / t_module:.1f}x"
            )


if __name__ == "__main__":
    main()
