"""Coverage and set sizes of sksegcal.conformal on the real cases, over random splits.

Two studies.

``--study sizes`` (default): how the promise on new images depends on the number of
calibration images, for the default ``ConformalPixelSets(guarantee="image")`` and the
pixel-level ``guarantee="pixel"``:

    python benchmarks/conformal_coverage.py --study sizes --datasets mni152-tissue aal \
        --splits 200 --sizes 5 10 20 all

The held-out slices of `sksegcal demo`'s datasets through the shipped U-Nets (raw softmax;
nothing is trained); the unit is the slice (its two acquisitions together). Each split draws
``n`` calibration slices at random and tests on all the others ("all": every slice but
``--n-test-all``). Per split: the mean over test slices of their coverage (the fraction of a
slice's pixels whose class is in the set), its mean over splits and 10 % quantile, and the
mean set size. Thresholds come from per-slice library states merged per split; split 0 is
checked against the estimators fitted on the calibration pixels with ``groups``.

``--study methods``: raw softmax, TS and selective scaling, pixel sets and risk control:

Data: the held-out ("calibration") slices of `sksegcal demo`'s datasets and the U-Nets shipped
with the package (`load_demo_network`: nothing is trained). Each axial slice has two simulated
acquisitions; the exchangeable unit is the slice (its two images go together everywhere).

1. A fixed third of the slices (seed 0) fits the calibrators: temperature scaling and
   SelectiveScalingCalibrator() at its defaults. They are never refitted.
    python benchmarks/conformal_coverage.py --study methods --datasets mni152-tissue aal \
        --splits 200 --out /tmp/conformal-coverage.md

2. The other slices are split `--splits` times at random into conformal-calibration and test
   halves (by slice). For every method (raw softmax, TS, selective) and score (LAC, APS):
   - pixel sets (ConformalPixelSets): pooled test pixel coverage vs 1 - alpha, set sizes;
   - conformal risk control over slices (ConformalRiskControl) of the miscoverage fraction
     and of the false-negative rate of one class (--fnr-class, grey matter by default):
     the mean test loss vs alpha.
   Thresholds come from the library's own states: one ScoreHistogram / ImageRiskTally per
   slice (the estimators fitted on that slice alone), merged over the calibration slices of
   each split (merge == one pass is tested in tests/test_conformal.py). The test numbers are
   read from per-slice histograms of the test pixels' score levels. Split 0 is checked
   against the estimators fitted on all its calibration pixels and their predict_set.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal._segnet import (
    DEMO_SETTINGS,
    SegNetConfig,
    cache_dir,
    load_demo_network,
    predict_logits,
)
from sksegcal.conformal import (
    ConformalPixelSets,
    ConformalRiskControl,
    ImageRiskTally,
    ScoreHistogram,
    aps_scores,
    lac_scores,
)
from sksegcal.conformal._base import images_needed
from sksegcal.datasets import load_dataset
from sksegcal.features import softmax

N_BINS = 2**16
METHODS = ("raw softmax", "TS", "selective (default)")


def real_case(name: str):
    settings = DEMO_SETTINGS[(name, False)]
    data = load_dataset(name, random_state=0, cache_dir=cache_dir(), **settings["data"])
    cal = data.select("calibration")
    model, _ = load_demo_network(name, config=SegNetConfig(**settings["net"]))
    logits = predict_logits(model, cal.images)
    return logits, cal.labels.astype(np.int64), cal.slice_index, data.class_names


def table(Z):
    n, c, h, w = Z.shape
    return np.ascontiguousarray(np.moveaxis(Z, 1, -1).reshape(-1, c), dtype=np.float32)


def levels_of(P, score):
    s = lac_scores(P) if score == "lac" else aps_scores(P)
    return np.ceil(s.astype(np.float64) * N_BINS).astype(np.int32)


def per_unit(P, y, unit, score, fnr_class, alphas):
    """Per slice: the library states and the test-side histograms."""
    units = np.unique(unit)
    L = levels_of(P, score)
    r = np.arange(len(y))
    true = L[r, y]
    out = {
        "units": units,
        "H": [],
        "A": [],
        "F": [],
        "n": [],
        "nf": [],
        "sets": [],
        "crc": [],
        "fnr": [],
    }
    for u in units:
        rows = unit == u
        out["H"].append(np.bincount(true[rows], minlength=N_BINS + 1))
        out["A"].append(np.bincount(L[rows].ravel(), minlength=N_BINS + 1))
        f = rows & (y == fnr_class)
        out["F"].append(np.bincount(true[f], minlength=N_BINS + 1))
        out["n"].append(rows.sum())
        out["nf"].append(f.sum())
        kw = {"conformity_score": score, "input_type": "probabilities"}
        out["sets"].append(
            ConformalPixelSets(guarantee="pixel", **kw).fit(P[rows], y[rows]).state_
        )
        g = np.full(rows.sum(), u)
        # one slice alone has an infinite threshold (a warning, silenced in main): only its
        # state is kept, to be merged with the other calibration slices of each split
        out["crc"].append(ConformalRiskControl(**kw).fit(P[rows], y[rows], g).state_)
        if f.any():
            fnr = ConformalRiskControl(loss="fnr", target_class=fnr_class, **kw)
            out["fnr"].append(fnr.fit(P[rows], y[rows], g).state_)
        else:
            out["fnr"].append(None)
    for key in ("H", "A", "F"):
        out[key] = np.cumsum(np.asarray(out[key], dtype=np.float64), axis=1)  # counts <= t
    out["n"], out["nf"] = np.asarray(out["n"], float), np.asarray(out["nf"], float)
    return out


def run_splits(U, n_splits, alphas, n_cal, seed=0):
    rng = np.random.default_rng(seed)
    m = len(U["units"])
    res = {}
    for _ in range(n_splits):
        perm = rng.permutation(m)
        cal, test = perm[:n_cal], perm[n_cal:]
        for alpha in alphas:
            h = ScoreHistogram(N_BINS)
            for i in cal:
                h.merge(U["sets"][i])
            t = h.threshold_level(alpha)
            t = N_BINS if t is None else t
            cov = U["H"][test, t].sum() / U["n"][test].sum()
            size = U["A"][test, t].sum() / U["n"][test].sum()
            res.setdefault(("sets", alpha), []).append((cov, size))
            # an infinite lambda_hat (too few calibration slices) is what the estimator
            # returns too: every class in every set, loss 0; it counts, and is reported
            tally = ImageRiskTally(N_BINS)
            for i in cal:
                tally.merge(U["crc"][i])
            t = tally.lambda_level(alpha)
            finite = t is not None
            t = N_BINS if t is None else t
            risk = np.mean(1 - U["H"][test, t] / U["n"][test])
            size = U["A"][test, t].sum() / U["n"][test].sum()
            res.setdefault(("crc", alpha), []).append((risk, size, finite))
            tally = ImageRiskTally(N_BINS)
            for i in cal:
                if U["fnr"][i] is not None:
                    tally.merge(U["fnr"][i])
            t = tally.lambda_level(alpha)
            finite = t is not None
            t = N_BINS if t is None else t
            has = test[U["nf"][test] > 0]
            if has.size:  # else no test slice holds the class: no FNR to measure
                risk = np.mean(1 - U["F"][has, t] / U["nf"][has])
                size = U["A"][test, t].sum() / U["n"][test].sum()
                res.setdefault(("fnr", alpha), []).append((risk, size, finite))
    return {k: np.asarray(v) for k, v in res.items()}


def check_split0(P, y, unit, U, score, fnr_class, n_cal, alpha, seed=0):
    """The merged per-slice states equal the estimators fitted on all calibration pixels."""
    perm = np.random.default_rng(seed).permutation(len(U["units"]))
    cal_units, test_units = U["units"][perm[:n_cal]], U["units"][perm[n_cal:]]
    cal, test = np.isin(unit, cal_units), np.isin(unit, test_units)
    kw = {"conformity_score": score, "input_type": "probabilities", "alpha": alpha}
    est = ConformalPixelSets(guarantee="pixel", **kw).fit(P[cal], y[cal])
    h = ScoreHistogram(N_BINS)
    for i in perm[:n_cal]:
        h.merge(U["sets"][i])
    assert est.threshold_level_ == h.threshold_level(alpha)
    sets = est.predict_set(P[test])
    direct = sets[np.arange(test.sum()), y[test]].mean()
    t = est.threshold_level_
    via = U["H"][perm[n_cal:], t].sum() / U["n"][perm[n_cal:]].sum()
    assert abs(direct - via) < 1e-12, (direct, via)
    crc = ConformalRiskControl(**kw, loss="fnr", target_class=fnr_class).fit(
        P[cal], y[cal], unit[cal]
    )
    tally = ImageRiskTally(N_BINS)
    for i in perm[:n_cal]:
        if U["fnr"][i] is not None:
            tally.merge(U["fnr"][i])
    level = tally.lambda_level(alpha)
    assert crc.threshold_level_ == (N_BINS if level is None else level)


def unit_states(P, y, unit, score):
    """Per slice: the image-level tally, the pixel histogram, and test-side cumulative counts."""
    units = np.unique(unit)
    L = levels_of(P, score)
    true = L[np.arange(len(y)), y]
    kw = {"conformity_score": score, "input_type": "probabilities"}
    out = {"tally": [], "hist": [], "H": [], "A": [], "n": []}
    for u in units:
        rows = unit == u
        g = np.full(rows.sum(), u)
        out["tally"].append(ConformalPixelSets(**kw).fit(P[rows], y[rows], g).state_)
        out["hist"].append(
            ConformalPixelSets(guarantee="pixel", **kw).fit(P[rows], y[rows]).state_
        )
        out["H"].append(np.bincount(true[rows], minlength=N_BINS + 1))
        out["A"].append(np.bincount(L[rows].ravel(), minlength=N_BINS + 1))
        out["n"].append(rows.sum())
    out["H"] = np.cumsum(np.asarray(out["H"], dtype=np.float64), axis=1)
    out["A"] = np.cumsum(np.asarray(out["A"], dtype=np.float64), axis=1)
    out["n"] = np.asarray(out["n"], dtype=np.float64)
    return units, out


def size_splits(S, n_cal, n_splits, alphas, seed=0):
    """{(guarantee, alpha): rows of (coverage of the test slices, set size, finite)}."""
    rng = np.random.default_rng(seed)
    m = len(S["n"])
    res = {}
    for _ in range(n_splits):
        perm = rng.permutation(m)
        cal, test = perm[:n_cal], perm[n_cal:]
        tally, hist = ImageRiskTally(N_BINS), ScoreHistogram(N_BINS)
        for i in cal:
            tally.merge(S["tally"][i])
            hist.merge(S["hist"][i])
        for alpha in alphas:
            for guarantee, t in (
                ("image", tally.lambda_level(alpha)),
                ("pixel", hist.threshold_level(alpha)),
            ):
                finite = t is not None
                t = N_BINS if t is None else t
                cov = np.mean(S["H"][test, t] / S["n"][test])  # mean over new slices
                size = S["A"][test, t].sum() / S["n"][test].sum()
                res.setdefault((guarantee, alpha), []).append((cov, size, finite))
    return {k: np.asarray(v) for k, v in res.items()}


def check_size_split0(P, y, unit, units, S, n_cal, alpha, score, seed=0):
    perm = np.random.default_rng(seed).permutation(len(units))
    cal = np.isin(unit, units[perm[:n_cal]])
    kw = {"conformity_score": score, "input_type": "probabilities", "alpha": alpha}
    est = ConformalPixelSets(**kw).fit(P[cal], y[cal], unit[cal])
    tally = ImageRiskTally(N_BINS)
    for i in perm[:n_cal]:
        tally.merge(S["tally"][i])
    level = tally.lambda_level(alpha)
    assert est.threshold_level_ == (N_BINS if level is None else level)


def margin_study(Z, labels, slices, cls, sizes, labels_of_sizes, n_splits, alphas, seed=0):
    """ConformalMargins per slice (its two images one unit) over random slice splits."""
    from sksegcal.conformal import ConformalMargins
    from sksegcal.conformal._margins import dilation_distance, erosion_depth

    units = np.unique(slices)
    pred = Z.argmax(1) == cls
    per_image = ConformalMargins(alpha=0.5, target_class=cls, ignore_index=None)
    per_image.fit(Z, labels)  # the scores of every image (alpha plays no part in them)
    unit_of = np.searchsorted(units, slices)
    score = np.full((len(units), 2), -np.inf)
    np.maximum.at(score, unit_of, np.stack([per_image.outer_scores_, per_image.inner_scores_], 1))
    # areas of the outer / inner masks at k dilations / erosions, per slice
    big = 200
    out_area = np.zeros((len(units), big + 1))
    in_area = np.zeros((len(units), big + 1))
    for i in range(len(Z)):
        d = dilation_distance(pred[i])
        e = erosion_depth(pred[i])
        if (d >= 0).any():
            out_area[unit_of[i]] += np.cumsum(np.bincount(d[d >= 0], minlength=big + 1)[: big + 1])
        in_area[unit_of[i]] += np.array([(e > k).sum() for k in range(big + 1)])
    pred_area = np.bincount(unit_of, weights=pred.sum((1, 2)), minlength=len(units))
    rng = np.random.default_rng(seed)
    rows = []
    for n_cal, label in zip(sizes, labels_of_sizes):
        for alpha in alphas:
            res = []
            for _ in range(n_splits):
                perm = rng.permutation(len(units))
                cal, test = perm[:n_cal], perm[n_cal:]
                est = ConformalMargins(alpha=alpha, target_class=cls)
                est.__dict__.update(
                    outer_scores_=score[cal, 0],
                    inner_scores_=score[cal, 1],
                    n_features_in_=Z.shape[1],
                )
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    est._finish()
                ko, ki = est.outer_margin_, est.inner_margin_
                if not np.isfinite(ko):
                    res.append((1.0, np.nan, np.nan, np.nan, np.nan))
                    continue
                hold = (score[test, 0] <= ko) & (score[test, 1] <= ki)
                ko_i, ki_i = int(min(ko, big)), int(min(ki, big))
                res.append(
                    (
                        hold.mean(),
                        ko,
                        ki,
                        out_area[test, ko_i].sum() / pred_area[test].sum(),
                        in_area[test, ki_i].sum() / pred_area[test].sum(),
                    )
                )
            rows.append((label, n_cal, alpha, np.asarray(res), est.n_required_))
    return rows


def size_study(args):
    lines = []
    for name in args.datasets:
        t0 = time.perf_counter()
        try:
            Z, labels, slices, class_names = real_case(name)
        except FileNotFoundError as exc:  # AAL needs Debian's mricron-data
            lines += [f"## {name}", "", f"not run: {exc}", ""]
            print("\n".join(lines[-4:]), flush=True)
            continue
        n, c, h, w = Z.shape
        y = labels.reshape(-1)
        unit = np.repeat(slices, h * w)
        m = len(np.unique(slices))
        sizes = [m - args.n_test_all if s == "all" else int(s) for s in args.sizes]
        lines += [
            f"## {name}",
            "",
            f"{n} images ({m} slices x 2 acquisitions), {c} classes, {h}x{w}; raw softmax of "
            f"the shipped network; {args.splits} random splits per size; the test slices are "
            f'all the others ("all" = {m - args.n_test_all} calibration slices, '
            f"{args.n_test_all} test).",
            "",
            "| score | alpha | guarantee | calibration slices | mean coverage of new slices "
            "± SE | 10% quantile | splits below 1 - alpha | mean set size |",
            "|---|---|---|---|---|---|---|---|",
        ]
        P = softmax(table(Z))
        for score in args.scores:
            units, S = unit_states(P, y, unit, score)
            check_size_split0(P, y, unit, units, S, sizes[-1], 0.1, score)
            for n_cal, label in zip(sizes, args.sizes):
                res = size_splits(S, n_cal, args.splits, args.alphas)
                for alpha in args.alphas:
                    for guarantee in ("image", "pixel"):
                        v = res[(guarantee, alpha)]
                        cal = f"{n_cal} (all)" if label == "all" else str(n_cal)
                        if guarantee == "image" and not v[:, 2].any():
                            need = images_needed(alpha)
                            lines.append(
                                f"| {score} | {alpha} | image | {cal} | refused: needs "
                                f">= {need} slices (warning; every set full) | | | |"
                            )
                            continue
                        cov, size = v[:, 0], v[:, 1]
                        se = cov.std() / np.sqrt(len(cov))
                        lines.append(
                            f"| {score} | {alpha} | {guarantee} | {cal} | {fmt(cov.mean(), se)} "
                            f"| {np.quantile(cov, 0.1):.4f} | {np.mean(cov < 1 - alpha):.2f} | "
                            f"{size.mean():.3f} |"
                        )
        cls = args.margin_class
        if cls is None:
            present = np.array([np.bincount(t.ravel(), minlength=c) > 0 for t in labels])
            cls = 2 if name == "mni152-tissue" else int(np.argmax(present[:, 1:].sum(0)) + 1)
        lines += [
            "",
            f"### Margins of class {cls} ({class_names[cls]}), margin='both'",
            "",
            "Per split: the fraction of test slices (both acquisitions) whose class lies within "
            "the outer mask and whose inner mask lies within the class; the areas are the "
            "test slices' outer and inner mask areas over the predicted mask's.",
            "",
            "| alpha | calibration slices | slices where both hold ± SE | 10% quantile | "
            "median erosions / dilations | outer area / predicted | inner area / predicted |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, n_cal, alpha, v, need in margin_study(
            Z, labels, slices, cls, sizes, args.sizes, args.splits, args.alphas
        ):
            cal = f"{n_cal} (all)" if label == "all" else str(n_cal)
            if np.isnan(v[:, 1]).all():
                lines.append(f"| {alpha} | {cal} | refused: needs >= {need} slices | | | | |")
                continue
            hold = v[:, 0]
            se = hold.std() / np.sqrt(len(hold))
            lines.append(
                f"| {alpha} | {cal} | {fmt(hold.mean(), se)} | {np.quantile(hold, 0.1):.3f} | "
                f"{np.nanmedian(v[:, 2]):.0f} / {np.nanmedian(v[:, 1]):.0f} | "
                f"{np.nanmean(v[:, 3]):.2f} | {np.nanmean(v[:, 4]):.2f} |"
            )
        lines += ["", f"({time.perf_counter() - t0:.0f} s)", ""]
        print("\n".join(lines), flush=True)
    return lines


def fmt(v, se):
    return f"{v:.4f} ± {se:.4f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["mni152-tissue", "aal"])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument(
        "--alphas",
        type=float,
        nargs="+",
        default=None,
        help="default: 0.05 0.1 0.2 (sizes), 0.01 0.02 0.05 0.1 0.2 (methods)",
    )
    ap.add_argument(
        "--fnr-class",
        type=int,
        default=None,
        help="default: grey matter (1) on mni152-tissue, the region in the most slices on aal",
    )
    ap.add_argument("--scores", nargs="+", default=["lac", "aps"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--study", choices=("sizes", "methods"), default="sizes")
    ap.add_argument("--sizes", nargs="+", default=["5", "10", "20", "all"])
    ap.add_argument("--n-test-all", type=int, default=5)
    ap.add_argument(
        "--margin-class",
        type=int,
        default=None,
        help="class of the margins study (default: white matter on mni152-tissue, the region "
        "in the most slices on aal)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", UserWarning)  # infinite thresholds: reported in the tables
    if args.study == "sizes":
        args.alphas = args.alphas or [0.05, 0.1, 0.2]
        lines = size_study(args)
        if args.out:
            from pathlib import Path

            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    args.alphas = args.alphas or [0.01, 0.02, 0.05, 0.1, 0.2]
    lines = []
    for name in args.datasets:
        t0 = time.perf_counter()
        Z, labels, slices, class_names = real_case(name)
        n, c, h, w = Z.shape
        X = table(Z)
        y = labels.reshape(-1)
        unit = np.repeat(slices, h * w)
        all_units = np.unique(slices)
        rng = np.random.default_rng(0)
        fit_units = rng.choice(all_units, size=len(all_units) // 3, replace=False)
        fit_rows = np.isin(unit, fit_units)
        rest = ~fit_rows
        image_of_pixel = np.repeat(np.arange(n), h * w)
        ts = TemperatureScaling().fit(X[fit_rows], y[fit_rows])
        sel = SelectiveScalingCalibrator(random_state=0).fit(
            X[fit_rows], y[fit_rows], groups=image_of_pixel[fit_rows]
        )
        fnr_class = args.fnr_class
        if fnr_class is None:
            # grey matter; on aal the region present in the most slices (an image without
            # the class has no FNR, and CRC needs at least 1 / alpha - 1 images with it)
            present = np.array([np.bincount(t.ravel(), minlength=c) > 0 for t in labels])
            fnr_class = 1 if name == "mni152-tissue" else int(np.argmax(present[:, 1:].sum(0)) + 1)
        Xr, yr, ur = X[rest], y[rest], unit[rest]
        probs = {
            "raw softmax": softmax(Xr),
            "TS": ts.predict_proba(Xr),
            "selective (default)": sel.predict_proba(Xr),
        }
        m = len(np.unique(ur))
        n_cal = m // 2 + m % 2
        lines += [
            f"## {name}",
            "",
            f"{n} images ({len(all_units)} slices x 2 acquisitions), {c} classes, "
            f"{h}x{w}; calibrators fitted on {len(fit_units)} slices (TS temperature "
            f"{ts.temperature_:.3f}; selective's guard chose "
            f"{getattr(sel, 'guard_choice_', 'n/a')!r}); conformal on the other {m} slices: "
            f"{args.splits} random splits into {n_cal} calibration / {m - n_cal} test "
            f"slices. FNR class: {fnr_class} ({class_names[fnr_class]}).",
            "",
        ]
        results = {}
        for method, P in probs.items():
            for score in args.scores:
                U = per_unit(P, yr, ur, score, fnr_class, args.alphas)
                check_split0(P, yr, ur, U, score, fnr_class, n_cal, 0.1)
                results[(method, score)] = run_splits(U, args.splits, args.alphas, n_cal)
        k = args.splits
        lines += [
            "### Pixel sets (ConformalPixelSets): pooled test coverage over splits",
            "",
            "| method | score | alpha | target | mean coverage ± SE | std | splits below "
            "target | mean set size ± SE |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (method, score), res in results.items():
            for alpha in args.alphas:
                v = res[("sets", alpha)]
                cov, size = v[:, 0], v[:, 1]
                lines.append(
                    f"| {method} | {score} | {alpha} | {1 - alpha:.2f} | "
                    f"{fmt(cov.mean(), cov.std() / np.sqrt(k))} | {cov.std():.4f} | "
                    f"{np.mean(cov < 1 - alpha):.2f} | "
                    f"{fmt(size.mean(), size.std() / np.sqrt(k))} |"
                )
        lines += [
            "",
            "### Conformal risk control over slices: mean test loss over splits",
            "",
            "| method | score | loss | alpha | mean risk ± SE | std | splits above alpha | "
            "splits with finite lambda_hat | mean set size |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (method, score), res in results.items():
            for loss in ("crc", "fnr"):
                for alpha in args.alphas:
                    v = res.get((loss, alpha))
                    label = "miscoverage" if loss == "crc" else f"FNR {class_names[fnr_class]}"
                    if v is None or not v[:, 2].any():
                        lines.append(
                            f"| {method} | {score} | {label} | {alpha} | needs >= "
                            f"{int(np.ceil(1 / alpha - 1))} calibration slices | | | 0 | |"
                        )
                        continue
                    risk, size = v[:, 0], v[:, 1]
                    lines.append(
                        f"| {method} | {score} | {label} | {alpha} | "
                        f"{fmt(risk.mean(), risk.std() / np.sqrt(len(risk)))} | "
                        f"{risk.std():.4f} | {np.mean(risk > alpha):.2f} | "
                        f"{int(v[:, 2].sum())} / {len(v)} | {size.mean():.3f} |"
                    )
        # paired size comparison at the same alpha (same splits for every method)
        lines += [
            "",
            "### Set sizes at the same coverage: paired over the same splits",
            "",
            "| score | alpha | raw | TS | selective | selective / TS (mean ± SE of the "
            "paired ratio) | coverage raw / TS / selective |",
            "|---|---|---|---|---|---|---|",
        ]
        for score in args.scores:
            for alpha in args.alphas:
                v = {mth: results[(mth, score)][("sets", alpha)] for mth in METHODS}
                ratio = v["selective (default)"][:, 1] / v["TS"][:, 1]
                lines.append(
                    f"| {score} | {alpha} | "
                    + " | ".join(f"{v[mth][:, 1].mean():.3f}" for mth in METHODS)
                    + f" | {ratio.mean():.4f} ± {ratio.std() / np.sqrt(k):.4f} | "
                    + " / ".join(f"{v[mth][:, 0].mean():.4f}" for mth in METHODS)
                    + " |"
                )
        lines += ["", f"({time.perf_counter() - t0:.0f} s)", ""]
        print("\n".join(lines), flush=True)
    if args.out:
        from pathlib import Path

        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
