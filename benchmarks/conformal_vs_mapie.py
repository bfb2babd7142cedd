"""sksegcal's image-level prediction sets beside MAPIE 1.6's SemanticSegmentationController.

    python benchmarks/conformal_vs_mapie.py --datasets mni152-tissue aal --splits 200 \
        --n-calibration 10 --alpha 0.1

Both control the same quantity: each image's fraction of pixels whose class is not in
its set (MAPIE: 1 - recall of the one-hot labels, risk="recall", method="crc"; sksegcal:
``ConformalPixelSets(guarantee="image")``), by conformal risk control. Data: the held-out
slices of `sksegcal demo`'s datasets through the shipped U-Nets; the softmax of the logits
is what both get (MAPIE's ``predict_function`` returns it; given logits, MAPIE applies a
sigmoid per class instead: shown once, "MAPIE on logits").

Each split draws ``--n-calibration`` slices (two acquisitions each) and tests on all the
others. sksegcal's unit is the slice (``groups``); MAPIE has no groups, so its units are
the images (two per slice). The thresholds of every split come from per-unit states:
sksegcal's merged ImageRiskTally of the calibration slices; MAPIE's per-image risks
(``compute_risks`` of each image once) stacked for the calibration images and passed to its
own ``compute_best_predict_param``. Split 0 is checked against each library's one-call
fit / calibrate and predict. Memory (tracemalloc peak of the calibration call, beyond its
inputs) and time are measured on one calibration call of split 0's images.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
import warnings

import numpy as np
import torch
from conformal_coverage import N_BINS, levels_of, real_case, table

from sksegcal.conformal import ConformalPixelSets, ImageRiskTally
from sksegcal.features import softmax


def mapie_controller(alpha, predict_function):
    from mapie.risk_control import SemanticSegmentationController

    return SemanticSegmentationController(
        predict_function=predict_function, risk="recall", method="crc", target_level=1 - alpha
    )


def onehot(labels, c):
    return np.moveaxis(np.eye(c, dtype=np.int8)[labels], -1, 1)


def peak_and_time(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, peak / 2**20, seconds


def run_case(name, args):
    Z, labels, slices, _ = real_case(name)
    n, c, h, w = Z.shape
    units = np.unique(slices)
    m = len(units)
    X = table(Z)
    y = labels.reshape(-1)
    unit = np.repeat(slices, h * w)
    P = softmax(X)
    P_maps = np.moveaxis(P.reshape(n, h, w, c), -1, 1)  # (N, C, H, W) probabilities
    Y = onehot(labels, c)
    alpha = args.alpha

    # sksegcal: one tally per slice; test-side cumulative counts per image
    image = np.repeat(np.arange(n), h * w)
    L = levels_of(P, "lac")
    true = L[np.arange(len(y)), y]
    tallies, image_tallies = [], []
    for u in units:
        rows = unit == u
        est = ConformalPixelSets(input_type="probabilities").fit(P[rows], y[rows], unit[rows])
        tallies.append(est.state_)
    for i in range(n):  # images as the units, as MAPIE counts them
        rows = image == i
        est = ConformalPixelSets(input_type="probabilities").fit(P[rows], y[rows], image[rows])
        image_tallies.append(est.state_)
    H = np.cumsum(
        np.stack([np.bincount(true[image == i], minlength=N_BINS + 1) for i in range(n)]), 1
    )
    A = np.cumsum(
        np.stack([np.bincount(L[image == i].ravel(), minlength=N_BINS + 1) for i in range(n)]),
        1,
    )

    # MAPIE: per-image risks once, with its own compute_risks (softmax input, and logits)
    ctrl = mapie_controller(alpha, lambda x: x)
    risks = np.vstack(
        [ctrl.compute_risks(P_maps[i : i + 1], Y[i : i + 1], _refit=True)._risks for i in range(n)]
    )
    ctrl_logits = mapie_controller(alpha, lambda x: x)
    risks_logits = np.vstack(
        [
            ctrl_logits.compute_risks(Z[i : i + 1], Y[i : i + 1], _refit=True)._risks
            for i in range(n)
        ]
    )
    sig = 1 / (1 + np.exp(-Z.astype(np.float64)))

    def mapie_lambda(controller, rows):
        controller._risks = rows
        controller.compute_best_predict_param()
        return float(controller.best_predict_param[0])

    rng = np.random.default_rng(0)
    res = {k: [] for k in ("sksegcal", "sksegcal, images as units", "MAPIE", "MAPIE on logits")}
    for split in range(args.splits):
        perm = rng.permutation(m)
        cal_u, test_u = units[perm[: args.n_calibration]], units[perm[args.n_calibration :]]
        cal_i, test_i = np.isin(slices, cal_u), np.isin(slices, test_u)
        tally = ImageRiskTally(N_BINS)
        for j in perm[: args.n_calibration]:
            tally.merge(tallies[j])
        t = tally.lambda_level(alpha)
        t = N_BINS if t is None else t
        cov = H[test_i, t] / (h * w)
        res["sksegcal"].append((cov.mean(), A[test_i, t].sum() / (test_i.sum() * h * w), t))
        tally = ImageRiskTally(N_BINS)
        for i in np.flatnonzero(cal_i):
            tally.merge(image_tallies[i])
        ti = tally.lambda_level(alpha)
        ti = N_BINS if ti is None else ti
        cov = H[test_i, ti] / (h * w)
        res["sksegcal, images as units"].append(
            (cov.mean(), A[test_i, ti].sum() / (test_i.sum() * h * w), ti)
        )
        for key, controller, R, probs in (
            ("MAPIE", ctrl, risks, P_maps),
            ("MAPIE on logits", ctrl_logits, risks_logits, sig),
        ):
            lam = mapie_lambda(controller, R[cal_i])
            sets = probs[test_i] > lam
            covered = np.take_along_axis(sets, labels[test_i][:, None], 1)[:, 0]
            res[key].append((covered.mean(axis=(1, 2)).mean(), sets.sum(1).mean(), lam))
        if split == 0:  # each library's own one-call path gives the same sets
            rows = np.isin(unit, cal_u)
            est = ConformalPixelSets(alpha=alpha, input_type="probabilities").fit(
                P[rows], y[rows], unit[rows]
            )
            assert est.threshold_level_ == t
            one = mapie_controller(alpha, lambda x: x).calibrate(P_maps[cal_i], Y[cal_i])
            assert float(one.best_predict_param[0]) == res["MAPIE"][0][2]
            pred = one.predict(P_maps[test_i][:2])
            assert np.array_equal(pred, P_maps[test_i][:2] > one.best_predict_param[0])

    # memory and time of one calibration call on split 0's calibration images
    perm = np.random.default_rng(0).permutation(m)
    cal_u = units[perm[: args.n_calibration]]
    cal_i = np.isin(slices, cal_u)
    rows = np.isin(unit, cal_u)
    Xc, yc, gc = X[rows], y[rows], unit[rows]
    Zc, Yc = np.ascontiguousarray(Z[cal_i]), np.ascontiguousarray(Y[cal_i])
    ours_fit = lambda: ConformalPixelSets(alpha=alpha).fit(Xc, yc, gc)  # noqa: E731
    ours_fit()  # warm-up (torch's first softmax)
    _, ours_mb, ours_s = peak_and_time(ours_fit)

    def mapie_fit():  # from logits to sets, as a user would: softmax inside predict_function
        def proba(z):
            zz = np.moveaxis(z, 1, -1)
            return np.moveaxis(softmax(zz.reshape(-1, c)).reshape(zz.shape), -1, 1)

        return mapie_controller(alpha, proba).calibrate(Zc, Yc)

    _, mapie_mb, mapie_s = peak_and_time(mapie_fit)
    return {
        "shape": (n, c, h, w),
        "m": m,
        "res": {k: np.asarray(v) for k, v in res.items()},
        "memory": {"sksegcal": (ours_mb, ours_s), "MAPIE": (mapie_mb, mapie_s)},
        "n_cal_images": int(cal_i.sum()),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["mni152-tissue", "aal"])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--n-calibration", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # one slice alone: an infinite threshold
    for name in args.datasets:
        t0 = time.perf_counter()
        try:
            out = run_case(name, args)
        except FileNotFoundError as exc:
            print(f"## {name}\n\nnot run: {exc}\n")
            continue
        n, c, h, w = out["shape"]
        print(
            f"## {name}\n\n{n} images ({out['m']} slices), {c} classes, {h}x{w}; alpha = "
            f"{args.alpha}; {args.splits} splits of {args.n_calibration} calibration slices "
            f"({2 * args.n_calibration} images), the others tested.\n"
        )
        print(
            "| method | mean coverage of new images ± SE | 10% quantile | mean set size | "
            "threshold |"
        )
        print("|---|---|---|---|---|")
        for key, v in out["res"].items():
            cov, size = v[:, 0], v[:, 1]
            note = (
                f"threshold level {np.median(v[:, 2]):.0f} of {N_BINS}"
                if key.startswith("sksegcal")
                else f"lambda median {np.median(v[:, 2]):.2f} (p > lambda)"
            )
            print(
                f"| {key} | {cov.mean():.4f} ± {cov.std() / np.sqrt(len(cov)):.4f} | "
                f"{np.quantile(cov, 0.1):.4f} | {size.mean():.3f} | {note} |"
            )
        print(f"\nOne calibration call on {out['n_cal_images']} images:\n")
        print("| library | peak traced memory (MiB) | seconds |")
        print("|---|---|---|")
        for key, (mb, s) in out["memory"].items():
            print(f"| {key} | {mb:.1f} | {s:.2f} |")
        print(f"\n({time.perf_counter() - t0:.0f} s)\n", flush=True)


if __name__ == "__main__":
    main()
