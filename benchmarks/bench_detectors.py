"""Which correctness detector, and which temperature form, on the real cases.

Every detector is plugged in as ``SelectiveScalingCalibrator(classifier=...)`` with every
other setting left at its default (the guard included), on the data and the shipped networks
of ``sksegcal demo`` (MNI152 tissue, 3 classes; AAL, 117 classes), with the seeds and the
image-level splits of benchmarks/quality.py. Per detector: misprediction-detection AUROC on
the test pixels, Selective/TS ECE and NLL ratios in-domain and under the shift, fit time and
predict_proba throughput; per temperature form (soft, hard, generalised) the same ratios.

    python benchmarks/bench_detectors.py --datasets mni152-tissue aal --seeds 0 1 2 \
        --fit-pixels 300000 --out /tmp/detectors.md

A detector is fitted once per dataset and seed (``memory=``: the other temperature forms reuse
it), so a form's fit time is its temperature stage only; the detector's fit time is the first
fit minus that stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import defaultdict

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import evaluate  # noqa: E402  (the quality benchmark's scoring, reused)

from sksegcal import SelectiveScalingCalibrator, TemperatureScaling, TorchMLPClassifier  # noqa: E402
from sksegcal._segnet import (  # noqa: E402
    DEMO_SETTINGS,
    SegNetConfig,
    cache_dir,
    load_demo_network,
    predict_logits,  # noqa: E402
)
from sksegcal.datasets import load_dataset  # noqa: E402
from sksegcal.metrics import misprediction_detection_scores  # noqa: E402
from sksegcal.pixels import flatten_segmentation, split_images
from sksegcal.selective import default_detector  # noqa: E402

MODES = ("soft", "hard", "generalised")


def _confidence_columns(X, columns):
    return X[:, columns]


def detectors(n_classes: int, seed: int) -> dict:
    """The candidates, as a user would write them; "LogisticRegression" is the default's."""
    k = min(5, n_classes)  # agnostic features: top-k log-probabilities, entropy, margin
    return {
        # the paper's MLP (the package default until issue 13's measurement)
        "TorchMLPClassifier": TorchMLPClassifier(random_state=seed),
        "HistGradientBoosting": HistGradientBoostingClassifier(random_state=seed),
        # the package default (classifier=None): StandardScaler + LogisticRegression
        "LogisticRegression": default_detector(),
        # three class-agnostic summaries only: max log-probability, entropy, margin
        "LogisticRegression(3 features)": make_pipeline(
            FunctionTransformer(_confidence_columns, kw_args={"columns": [0, k, k + 1]}),
            StandardScaler(),
            LogisticRegression(),
        ),
    }


def load_case(name: str):
    """Calibration and shifted pixel tables of a dataset, as benchmarks/quality.py builds them."""
    settings = DEMO_SETTINGS[(name, False)]
    data = load_dataset(name, random_state=0, cache_dir=cache_dir(), **settings["data"])
    cal, shifted = data.select("calibration"), data.select("shifted")
    model, _ = load_demo_network(name, config=SegNetConfig(**settings["net"]))
    X_cal, y_cal, g_cal = flatten_segmentation(predict_logits(model, cal.images), cal.labels)
    X_sh, y_sh, g_sh = flatten_segmentation(predict_logits(model, shifted.images), shifted.labels)
    return (
        data.n_classes,
        X_cal,
        y_cal,
        cal.slice_index[g_cal],
        X_sh,
        y_sh,
        shifted.slice_index[g_sh],
    )


def split(slices_cal, slices_sh, seed, fit_pixels):
    """quality.py's split: by slice, 40% of the slices to test, a seeded fit subsample."""
    parts = split_images(slices_cal, validation_size=0.0, test_size=0.4, random_state=seed)
    fit = ~np.isin(slices_cal, parts.test)
    test = ~fit
    fit_rows = np.flatnonzero(fit)
    if len(fit_rows) > fit_pixels:
        fit_rows = np.sort(np.random.default_rng(seed).choice(fit_rows, fit_pixels, replace=False))
    return fit_rows, test, np.isin(slices_sh, parts.test)


def throughput(est, X, repeat=2):
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        est.predict_proba(X)
        best = min(best, time.perf_counter() - t0)
    return len(X) / best


def run(args) -> list[dict]:
    rows = []
    memory = tempfile.mkdtemp(prefix="sksegcal-detectors-")
    for name in args.datasets:
        t0 = time.perf_counter()
        n_classes, X_cal, y_cal, s_cal, X_sh, y_sh, s_sh = load_case(name)
        print(
            f"[{name}] {len(y_cal)} calibration pixels, {n_classes} classes "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
        for seed in args.seeds:
            fit_rows, test, test_sh = split(s_cal, s_sh, seed, args.fit_pixels)
            Xf, yf, gf = X_cal[fit_rows], y_cal[fit_rows], s_cal[fit_rows]
            cases = {
                "in-domain": (X_cal[test], y_cal[test]),
                "shifted": (X_sh[test_sh], y_sh[test_sh]),
            }
            bench = cases["in-domain"][0][: args.predict_pixels]
            t0 = time.perf_counter()
            ts = TemperatureScaling().fit(Xf, yf)
            ts_fit = time.perf_counter() - t0
            ts_thru = throughput(ts, bench)
            ts_scores = {c: evaluate(ts, X, y, n_classes) for c, (X, y) in cases.items()}
            for det_name, det in detectors(n_classes, seed).items():
                if args.detectors is not None and det_name not in args.detectors:
                    continue
                first = None
                for mode in args.modes:
                    est = SelectiveScalingCalibrator(
                        det, mode=mode, random_state=seed, memory=memory
                    )
                    t0 = time.perf_counter()
                    est.fit(Xf, yf, groups=gf)
                    fit_s = time.perf_counter() - t0
                    row = {
                        "dataset": name,
                        "seed": seed,
                        "detector": det_name,
                        "mode": mode,
                        "fit_s": fit_s,
                        "ts_fit_s": ts_fit,
                        "throughput": throughput(est, bench),
                        "ts_throughput": ts_thru,
                        "guard": est.guard_choice_,
                        "holdout_auroc": est.detection_auroc_,
                    }
                    if first is None:
                        first = row
                    for case, (X, y) in cases.items():
                        r = evaluate(est, X, y, n_classes)
                        row[f"ece_ratio_{case}"] = r["ece"] / ts_scores[case]["ece"]
                        row[f"nll_ratio_{case}"] = r["nll"] / ts_scores[case]["nll"]
                        row[f"ece_{case}"] = r["ece"]
                        row[f"ts_ece_{case}"] = ts_scores[case]["ece"]
                        if mode == args.modes[0]:
                            ok = y != 255
                            row[f"auroc_{case}"] = misprediction_detection_scores(
                                X[ok].argmax(1) == y[ok], est.predict_correctness(X[ok])
                            )["auroc"]
                    rows.append(row)
                    print(
                        f"[{name} seed {seed}] {det_name:32s} {mode:11s} "
                        f"ECE/TS {row['ece_ratio_in-domain']:.3f} "
                        f"shifted {row['ece_ratio_shifted']:.3f} "
                        f"NLL/TS {row['nll_ratio_in-domain']:.4f} "
                        f"shifted {row['nll_ratio_shifted']:.4f} guard {row['guard']} "
                        f"fit {fit_s:.1f}s ({fit_s / ts_fit:.1f}x TS) "
                        f"{row['throughput'] / 1e6:.2f}M px/s "
                        f"({row['throughput'] / ts_thru:.2f}x TS)"
                        + (
                            f" AUROC {row['auroc_in-domain']:.4f} / {row['auroc_shifted']:.4f}"
                            if "auroc_shifted" in row
                            else ""
                        ),
                        flush=True,
                    )
                # the detector's own fit time: the first (uncached) fit minus the temperature
                # stage of the same form refitted with the detector cached
                est = SelectiveScalingCalibrator(
                    det, mode=args.modes[0], random_state=seed, memory=memory
                )
                t0 = time.perf_counter()
                est.fit(Xf, yf, groups=gf)
                first["detector_fit_s"] = first["fit_s"] - (time.perf_counter() - t0)
    return rows


def table(rows, args) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["dataset"], r["detector"], r["mode"])].append(r)

    def cell(rs, key, fmt="{:.3f}"):
        v = np.array([r[key] for r in rs if key in r], dtype=float)
        if not len(v):
            return "n/a"
        if len(v) == 1:
            return fmt.format(v[0])
        return f"{fmt.format(v.mean())} ({fmt.format(v.min())}-{fmt.format(v.max())})"

    lines = [
        "Generated by `python benchmarks/bench_detectors.py --datasets "
        f"{' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))} "
        f"--fit-pixels {args.fit_pixels}`. Mean (min-max) over {len(args.seeds)} seeds; ratios "
        "to temperature scaling fitted on the same pixels (< 1: better than TS).",
        "",
        "### Detectors (soft mode, the default form)",
        "",
        "| case | detector | AUROC in-domain | AUROC shifted | ECE/TS in-domain | "
        "ECE/TS shifted | NLL/TS in-domain | NLL/TS shifted | guard kept selective | "
        "detector fit s | fit / TS fit | predict / TS throughput |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    first = args.modes[0]
    for (ds, det, mode), rs in by.items():
        if mode != first:
            continue
        kept = sum(r["guard"] == "selective" for r in rs)
        lines.append(
            f"| {ds} | {det} | {cell(rs, 'auroc_in-domain', '{:.4f}')} | "
            f"{cell(rs, 'auroc_shifted', '{:.4f}')} | {cell(rs, 'ece_ratio_in-domain')} | "
            f"{cell(rs, 'ece_ratio_shifted')} | {cell(rs, 'nll_ratio_in-domain', '{:.4f}')} | "
            f"{cell(rs, 'nll_ratio_shifted', '{:.4f}')} | {kept}/{len(rs)} | "
            f"{cell(rs, 'detector_fit_s', '{:.1f}')} | "
            f"{np.mean([r['fit_s'] / r['ts_fit_s'] for r in rs]):.1f} | "
            f"{np.mean([r['throughput'] / r['ts_throughput'] for r in rs]):.2f} |"
        )
    lines += [
        "",
        "### Temperature forms (each detector; guard on)",
        "",
        "| case | detector | form | ECE/TS in-domain | ECE/TS shifted | NLL/TS in-domain | "
        "NLL/TS shifted | guard kept selective | temperature stage s | "
        "predict / TS throughput |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (ds, det, mode), rs in by.items():
        kept = sum(r["guard"] == "selective" for r in rs)
        stage = (
            [r["fit_s"] - r["detector_fit_s"] for r in rs]
            if mode == first
            else [r["fit_s"] for r in rs]
        )
        lines.append(
            f"| {ds} | {det} | {mode} | {cell(rs, 'ece_ratio_in-domain')} | "
            f"{cell(rs, 'ece_ratio_shifted')} | {cell(rs, 'nll_ratio_in-domain', '{:.4f}')} | "
            f"{cell(rs, 'nll_ratio_shifted', '{:.4f}')} | {kept}/{len(rs)} | "
            f"{np.mean(stage):.1f} | "
            f"{np.mean([r['throughput'] / r['ts_throughput'] for r in rs]):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mni152-tissue", "aal"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--fit-pixels",
        type=int,
        default=300_000,
        help="pixels every calibrator is fitted on (a seeded subsample)",
    )
    parser.add_argument(
        "--predict-pixels",
        type=int,
        default=200_000,
        help="test pixels timed for predict_proba throughput",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--detectors", nargs="+", default=None, help="a subset of the detector names"
    )
    parser.add_argument("--out", default=None, help="write the Markdown tables here")
    parser.add_argument("--json", default=None, help="write every row here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    rows = run(args)
    report = table(rows, args)
    report += f"\n({(time.perf_counter() - start) / 60:.1f} min)\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)


if __name__ == "__main__":
    main()
