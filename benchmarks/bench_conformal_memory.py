"""Peak memory of the streaming conformal fit, from 2M to 50M pixels.

    python benchmarks/bench_conformal_memory.py --pixels 2e6 1e7 5e7 --classes 8

Logits are generated in chunks of whole images (``--image-pixels`` each) and fed to
``ConformalPixelSets.partial_fit`` (the default image-level guarantee, with the image ids,
and ``guarantee="pixel"``) and ``ConformalRiskControl.partial_fit`` one chunk at a time;
tracemalloc records the peak of Python/NumPy allocations during the fit, beyond the chunk
being fed (generated outside the measured window). Beside it, the memory the exact
approach needs: every calibration score kept (float32, 4 bytes a pixel) for np.quantile.
Run in one process, after a warm-up fit (imports and torch's first softmax); tracemalloc
is started afresh for every chunk and the largest peak is kept.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np

from sksegcal.conformal import ConformalPixelSets, ConformalRiskControl


def chunks(total: int, image_pixels: int, images_per_chunk: int, c: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    done, image = 0, 0
    while done < total:
        n = min(image_pixels * images_per_chunk, total - done)
        n_img = -(-n // image_pixels)
        y = rng.integers(0, c, size=n)
        X = rng.standard_normal((n, c), dtype=np.float32)
        X[np.arange(n), y] += 2.0
        groups = image + np.arange(n) // image_pixels
        yield X, y, groups
        done += n
        image += n_img


def measure(est, total, image_pixels, images_per_chunk, c):
    peak, seconds = 0, 0.0
    for X, y, groups in chunks(total, image_pixels, images_per_chunk, c):
        tracemalloc.start()
        t0 = time.perf_counter()
        if isinstance(est, ConformalRiskControl) or est.guarantee == "image":
            est.partial_fit(X, y, groups)
        else:
            est.partial_fit(X, y)
        seconds += time.perf_counter() - t0
        peak = max(peak, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    return peak, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pixels", type=float, nargs="+", default=[2e6, 1e7, 5e7])
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--image-pixels", type=int, default=250_000)
    ap.add_argument("--images-per-chunk", type=int, default=2)
    args = ap.parse_args()
    c = args.classes
    warnings.simplefilter("ignore", UserWarning)  # few images in the smallest runs
    # warm up: the first fit imports and initialises torch's softmax, which tracemalloc
    # would count against the smallest size
    for X, y, groups in chunks(2000, 1000, 2, c):
        ConformalPixelSets(guarantee="pixel").partial_fit(X, y)
        ConformalPixelSets().partial_fit(X, y, groups)
        ConformalRiskControl().partial_fit(X, y, groups)
    print(
        f"C = {c}, images of {args.image_pixels:,} pixels, {args.images_per_chunk} images a "
        "chunk (the chunk itself is allocated outside the measured window)\n"
    )
    print(
        "| pixels | estimator | peak traced memory during fit (MiB) | fit seconds | "
        "state (MiB) | all scores kept, float32 (MiB) |"
    )
    print("|---|---|---|---|---|---|")
    for total in (int(p) for p in args.pixels):
        for make in (
            lambda: ConformalPixelSets(alpha=0.1),
            lambda: ConformalPixelSets(alpha=0.1, guarantee="pixel"),
            lambda: ConformalPixelSets(alpha=0.1, guarantee="pixel", conformity_score="aps"),
            lambda: ConformalRiskControl(alpha=0.1),
        ):
            est = make()
            peak, seconds = measure(est, total, args.image_pixels, args.images_per_chunk, c)
            state = est.state_.state_dict()
            state_mb = sum(np.asarray(v).nbytes for v in state.values()) / 2**20
            name = type(est).__name__ + f" ({est.conformity_score}"
            name += f", {est.guarantee})" if hasattr(est, "guarantee") else ")"
            print(
                f"| {total:,} | {name} | {peak / 2**20:.1f} | {seconds:.1f} | "
                f"{state_mb:.2f} | {total * 4 / 2**20:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
