"""Throughput of the store paths with the spatial context beside the per-pixel default.

    python benchmarks/bench_context_paths.py [--images 24] [--size 192] [--classes 19]

One process, one thread (torch, BLAS and OpenMP limited to 1: the development machine is
a shared 2-core one), a synthetic LogitStore of smooth random logit maps (the predicted
classes form regions, as a segmentation network's do) with labels that agree with the
argmax on about 85% of the pixels. Side by side, interleaved, best of ``--repeat``:

* ``fit_store`` of ``SelectiveScalingCalibrator(random_state=0)`` (the per-pixel default,
  the paper's MLP detector) and of ``SelectiveScalingCalibrator(context="spatial",
  random_state=0)`` on a ``--max-pixels`` sample of the train images, and the sample alone
  (reading every train image, and computing its context: the rest is the estimator's fit);
* ``evaluate_store`` of each fitted calibrator alone on the test images, with its
  ``return_timings`` (reading, context included; prediction; metrics);
* the spatial context alone: reading the test images' tables with and without it.

Throughput is pixels of the store read per second: the train images' for ``fit_store``
(whose time is mostly the detector's fit on the sample), the test images' for
``evaluate_store``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _store(path: Path, n_images: int, size: int, n_classes: int, seed: int = 0):
    from scipy import ndimage

    from sksegcal.store import LogitStore

    rng = np.random.default_rng(seed)
    store = LogitStore.create(path, n_classes=n_classes)
    for i in range(n_images):
        z = rng.normal(size=(n_classes, size, size)).astype(np.float32)
        z = ndimage.uniform_filter(z, size=(1, 9, 9)) * 12.0
        t = z.argmax(axis=0)
        wrong = rng.random(t.shape) < 0.15
        t[wrong] = rng.integers(0, n_classes, size=int(wrong.sum()))
        store.add_image(i, z, t)
    store.make_split(validation_size=0.25, test_size=0.25, random_state=0)
    return store


def _best(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--max-pixels", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from threadpoolctl import threadpool_limits

    from sksegcal import SelectiveScalingCalibrator, _kernels
    from sksegcal.store import evaluate_store, fit_store

    torch.set_num_threads(1)
    with threadpool_limits(limits=1), tempfile.TemporaryDirectory() as tmp:
        store = _store(Path(tmp) / "store", args.images, args.size, args.classes)
        split = store.split
        n_train = sum(
            store.record(int(i))["height"] * store.record(int(i))["width"] for i in split.train
        )
        n_test = sum(
            store.record(int(i))["height"] * store.record(int(i))["width"] for i in split.test
        )
        print(
            f"store: {args.images} images of {args.size}x{args.size}, C = {args.classes}, "
            f"{store.n_pixels:,} labelled pixels; train {len(split.train)} images "
            f"({n_train:,} px), test {len(split.test)} ({n_test:,} px); numba "
            f"{_kernels.HAVE_NUMBA}; 1 thread; best of {args.repeat}"
        )
        variants = {"per-pixel (default)": None, "spatial": "spatial"}

        def calibrator(context):
            return SelectiveScalingCalibrator(context=context, random_state=0)

        for context in variants.values():  # warm up both (numba compilation, torch, imports)
            fit_store(calibrator(context), store, max_pixels=2000, random_state=0)
        sample_s = {name: [] for name in variants}
        fit_store_s = {name: [] for name in variants}
        fitted, widths = {}, {}
        for _ in range(args.repeat):  # interleaved
            for name, context in variants.items():
                t0 = time.perf_counter()
                X, _, _ = store.sample(
                    args.max_pixels, context=context, images="train", random_state=0
                )
                t1 = time.perf_counter()
                fitted[name] = fit_store(
                    calibrator(context), store, max_pixels=args.max_pixels, random_state=0
                )
                t2 = time.perf_counter()
                sample_s[name].append(t1 - t0)
                fit_store_s[name].append(t2 - t1)
                widths[name] = X.shape
        print(f"\nfit_store on a {args.max_pixels:,}-row sample of the train images")
        print(
            "| detector input | fit_store (s) | of which sample (s) | fit_store (train px/s) |"
            " sample (train px/s) |"
        )
        print("|---|---|---|---|---|")
        for name, (_, n_cols) in widths.items():
            t_fit, t_sample = min(fit_store_s[name]), min(sample_s[name])
            print(
                f"| {name}, {n_cols} columns | {t_fit:.1f} | {t_sample:.2f} | "
                f"{n_train / t_fit:,.0f} | {n_train / t_sample:,.0f} |"
            )

        print("\nevaluate_store on the test images (each calibrator alone)")
        print("| calibrator | total (s) | px/s | read (+context) | predict | metrics |")
        print("|---|---|---|---|---|---|")
        for name, est in fitted.items():
            t, (_, timings) = _best(
                lambda e=est: evaluate_store(store, {"c": e}, images="test", return_timings=True),
                args.repeat,
            )
            print(
                f"| {name} | {t:.2f} | {n_test / t:,.0f} | {timings['read']:.2f} | "
                f"{timings['predict:c']:.2f} | {timings['metrics:c']:.2f} |"
            )

        def read(context):
            for i in split.test:
                for _ in store.iter_tables(int(i), context=context):
                    pass

        t_plain, _ = _best(lambda: read(None), args.repeat)
        t_ctx, _ = _best(lambda: read("spatial"), args.repeat)
        print(
            f"\nreading the test tables: {t_plain:.2f} s without context, {t_ctx:.2f} s with "
            f"it ({n_test / t_ctx:,.0f} px/s; the context costs "
            f"{(t_ctx - t_plain) / n_test * 1e9:.0f} ns per pixel)"
        )


if __name__ == "__main__":
    main()
