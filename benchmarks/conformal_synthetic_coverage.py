"""Coverage of sksegcal.conformal over many random splits of synthetic data.

The soak versions of the coverage tests in tests/test_conformal.py (which run a few dozen
splits at sizes where a wrong quantile rank shows): split conformal's guarantee
``1 - alpha <= E[coverage] <= 1 - alpha + 1/(n + 1)`` on exchangeable pixels, conformal
risk control's ``alpha - 2/(n + 1) <= E[risk] <= alpha`` on correlated images, and the
randomized APS estimator end to end::

    python benchmarks/conformal_synthetic_coverage.py --splits 200

Prints one row per study: the mean over splits, its standard error and the bounds.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from sksegcal.conformal import (
    ConformalPixelSets,
    ConformalRiskControl,
    ImageRiskTally,
    ScoreHistogram,
    aps_scores,
    lac_scores,
)
from sksegcal.features import softmax


def _logits(n, c, scale, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    X = scale * (np.eye(c)[y] + rng.normal(size=(n, c)))
    return X.astype(np.float32), y


def _images(n_images, pixels, c=3, seed=0):
    """Images with an image-level difficulty (pixels of one image correlate)."""
    rng = np.random.default_rng(seed)
    Xs, ys, gs = [], [], []
    for i in range(n_images):
        y = rng.integers(0, c, size=pixels)
        hard = rng.uniform(0.5, 2.0)
        Xs.append(3.0 * (np.eye(c)[y] + hard * rng.normal(size=(pixels, c))))
        ys.append(y)
        gs.append(np.full(pixels, i))
    return np.concatenate(Xs).astype(np.float32), np.concatenate(ys), np.concatenate(gs)


def pixel_coverage(score, n_cal, n_splits, alpha=0.1, seed=0):
    """Mean coverage of new pixels over random splits; the thresholds from ScoreHistogram."""
    X, y = _logits(n=4000, c=4, scale=2.0, seed=5)
    p = softmax(X)
    s = (lac_scores(p) if score == "lac" else aps_scores(p))[np.arange(len(y)), y]
    rng = np.random.default_rng(seed)
    cover = []
    for _ in range(n_splits):
        perm = rng.permutation(len(y))
        t = ScoreHistogram().update(s[perm[:n_cal]]).threshold_level(alpha)
        cover.append(np.mean(np.ceil(s[perm[n_cal:]].astype(np.float64) * 2**16) <= t))
    return np.asarray(cover)


def image_risk(n_splits, n_images=60, alpha=0.1, seed=0):
    """Mean miscoverage of new images over random halvings; thresholds from ImageRiskTally."""
    X, y, g = _images(n_images=n_images, pixels=50, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one image cannot support alpha
        per_image = [
            ConformalRiskControl(alpha=alpha).fit(X[g == i], y[g == i], g[g == i]).state_
            for i in range(n_images)
        ]
    p = softmax(X)
    levels = np.ceil((1.0 - p[np.arange(len(y)), y]).astype(np.float64) * 2**16)
    rng = np.random.default_rng(seed)
    risks = []
    for _ in range(n_splits):
        perm = rng.permutation(n_images)
        tally = ImageRiskTally()
        for i in perm[: n_images // 2]:
            tally.merge(per_image[i])
        t = tally.lambda_level(alpha)
        risks.append(np.mean([np.mean(levels[g == i] > t) for i in perm[n_images // 2 :]]))
    return np.asarray(risks)


def randomized_aps(n_splits, n_cal=300, alpha=0.1, seed=1):
    """ConformalPixelSets(randomized APS) fitted and applied: coverage of new pixels."""
    X, y = _logits(n=1500, c=4, scale=1.5, seed=7)
    rng = np.random.default_rng(seed)
    cover = []
    for k in range(n_splits):
        perm = rng.permutation(len(y))
        cal, test = perm[:n_cal], perm[n_cal:]
        est = ConformalPixelSets(
            alpha=alpha,
            guarantee="pixel",
            conformity_score="aps",
            randomized=True,
            random_state=k,
        ).fit(X[cal], y[cal])
        cover.append(est.predict_set(X[test])[np.arange(len(test)), y[test]].mean())
    return np.asarray(cover)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", type=int, default=200)
    parser.add_argument("--alpha", type=float, default=0.1)
    args = parser.parse_args(argv)
    a, n = args.alpha, args.splits
    print("| study | calibration | splits | mean ± SE | lower bound | upper bound | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    studies = []
    for score in ("lac", "aps"):
        for n_cal in (10, 200):
            studies.append(
                (
                    f"pixel coverage, {score.upper()}",
                    f"{n_cal} pixels",
                    lambda score=score, n_cal=n_cal: pixel_coverage(score, n_cal, n, a),
                    (1 - a, 1 - a + 1 / (n_cal + 1)),
                )
            )
    studies.append(
        ("image risk (CRC)", "30 images", lambda: image_risk(n, alpha=a), (a - 2 / 31, a))
    )
    studies.append(
        (
            "randomized APS coverage",
            "300 pixels",
            lambda: randomized_aps(n, alpha=a),
            (1 - a, 1 - a + 1 / 301),
        )
    )
    for name, size, run, (low, high) in studies:
        t0 = time.perf_counter()
        values = run()
        mean, se = values.mean(), values.std() / np.sqrt(len(values))
        seconds = time.perf_counter() - t0
        print(
            f"| {name} | {size} | {len(values)} | {mean:.4f} ± {se:.4f} | {low:.4f} | "
            f"{high:.4f} | {seconds:.1f} |"
        )


if __name__ == "__main__":
    main()
