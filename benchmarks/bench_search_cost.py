"""What CalibratorSearchCV costs beside temperature scaling (fit time, predict throughput).

Side by side in one process, on the synthetic over-confident logits of
bench_fit_cost.py (float32, images of 4096 pixels, ``groups`` passed to fit):
TS, the default SelectiveScalingCalibrator and the default CalibratorSearchCV,
as ratios to TS's fit time and predict_proba throughput, with the search's
choice and the share of its time spent cross-validating each candidate.

    python benchmarks/bench_search_cost.py --pixels 1000000 --classes 19 42 150

Goal: the search's fit within 10x TS's.
"""

from __future__ import annotations

import argparse
import warnings

from bench_fit_cost import make_data, timed


def run(n: int, c: int, repeat: int, max_cv_pixels: int | None) -> list[dict]:
    from sksegcal import CalibratorSearchCV, SelectiveScalingCalibrator, TemperatureScaling

    X, y, groups = make_data(n, c)
    Xp, _, _ = make_data(n, c, seed=1)
    # warm-up on a slice: compiled kernels and imports are not part of any timing
    small = slice(0, 20_000)
    TemperatureScaling().fit(X[small], y[small]).predict_proba(Xp[small])
    CalibratorSearchCV(random_state=0).fit(X[small], y[small], groups=groups[small]).predict_proba(
        Xp[small]
    )
    ts_fit, ts = timed(lambda: TemperatureScaling().fit(X, y), repeat)
    ts_pred, _ = timed(lambda: ts.predict_proba(Xp), repeat)
    rows = [{"what": "TemperatureScaling", "fit_s": ts_fit, "predict_s": ts_pred}]
    for name, est in (
        ("SelectiveScalingCalibrator()", SelectiveScalingCalibrator(random_state=0)),
        ("CalibratorSearchCV()", CalibratorSearchCV(random_state=0)),
        (
            f"CalibratorSearchCV(max_cv_pixels={max_cv_pixels})",
            CalibratorSearchCV(max_cv_pixels=max_cv_pixels, random_state=0),
        ),
    ):
        fit_s, est = timed(lambda est=est: est.fit(X, y, groups=groups), repeat)
        pred_s, _ = timed(lambda est=est: est.predict_proba(Xp), repeat)
        row = {
            "what": name,
            "fit_s": fit_s,
            "predict_s": pred_s,
            "fit_ratio": fit_s / ts_fit,
            "throughput_ratio": ts_pred / pred_s,
            "note": "",
        }
        if isinstance(est, CalibratorSearchCV):
            r = est.cv_results_
            folds = est.n_splits_
            row["note"] = (
                f"chose {est.best_name_}; refit {est.refit_time_:.1f}s; CV fit s per candidate: "
                + ", ".join(f"{m} {t * folds:.1f}" for m, t in zip(r["name"], r["mean_fit_time"]))
            )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 42, 150])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument(
        "--max-cv-pixels",
        type=int,
        default=50_000,
        help="a second search with this cross-validation sample beside the default's",
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"{args.pixels} pixels, float32, images of 4096 pixels")
    print(f"{'C':>4} {'calibrator':40} {'fit s':>7} {'pred s':>7} {'fit/TS':>7} {'thru/TS':>8}")
    for c in args.classes:
        for r in run(args.pixels, c, args.repeat, args.max_cv_pixels):
            ratio = (
                f"{r['fit_ratio']:7.2f} {r['throughput_ratio']:8.2f}  {r['note']}"
                if "fit_ratio" in r
                else ""
            )
            print(
                f"{c:>4} {r['what']:40} {r['fit_s']:7.2f} {r['predict_s']:7.2f} {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
