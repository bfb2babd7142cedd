"""The paper's comparison on this project's real cases: every method, several seeds.

Writes one Markdown table per metric (mean +- std across seeds) in the shape of the
paper's Table, plus the misprediction-detection quality of each correctness classifier.

    python benchmarks/quality.py --datasets mni152-tissue --seeds 0 1 2 --out docs/quality.md

Datasets: mni152-tissue and aal (the data and U-Nets of `sksegcal demo`, trained once and
cached in $SKSEGCAL_CACHE or ~/.cache/sksegcal) and mni152-segformer (the MNI152 task with an
mmsegmentation SegFormer-b0, see mmseg_case.py). Cases: each dataset's in-domain test slices
and the shifted acquisitions of the same slices; the seeds vary the image-level split of the
calibration slices and every random choice of the calibrators.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sksegcal import (
    DirichletScaling,
    EnsembleTemperatureScaling,
    MetaCalScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
    TorchMLPClassifier,
    VectorScaling,
)
from sksegcal._segnet import DEMO_SETTINGS as _DEMO_SETTINGS
from sksegcal._segnet import SegNetConfig, cache_dir, load_or_train, predict_logits
from sksegcal.datasets import load_dataset
from sksegcal.features import softmax
from sksegcal.metrics import CalibrationAccumulator, misprediction_detection_scores
from sksegcal.pixels import flatten_segmentation, split_images
from sksegcal.store import _keeps_prediction

METRICS = ("ece", "nll", "brier", "mce", "accuracy", "miou")


def methods(seed: int, max_fit_pixels: int, epochs: int) -> dict:
    def mlp(**kw):
        return TorchMLPClassifier(max_epochs=epochs, n_threads=1, random_state=seed, **kw)

    def selective(**kw):
        kw.setdefault("classifier", mlp())
        return SelectiveScalingCalibrator(max_fit_pixels=max_fit_pixels, random_state=seed, **kw)

    # every setting spelled out, so that a change of the package's defaults cannot relabel a row
    paper = {"t1": 1.0, "threshold": 0.5, "mode": "hard", "features": "log_softmax"}
    hard = {"t1": "auto", "t2": "auto", "threshold": "auto", "mode": "hard",
            "features": "log_softmax"}
    soft = {"t1": "auto", "t2": "auto", "mode": "soft", "features": "log_softmax"}
    agnostic = {"features": "agnostic"}
    return {
        "Uncalibrated": None,
        "TS": TemperatureScaling(),
        "Vector": VectorScaling(),
        "Dirichlet (ODIR)": DirichletScaling(),
        "Meta-Cal (T=1e10)": MetaCalScaling(),
        "Ensemble TS": EnsembleTemperatureScaling(),
        "Selective, paper (t1=1, t2=1e10, thr 0.5, MLP weight 2)": selective(
            t2=1e10, classifier=mlp(class_weight="paper"), **paper),
        "Selective, t1=1, t2=2, thr 0.5, MLP weight 2": selective(
            t2=2.0, classifier=mlp(class_weight="paper"), **paper),
        "Selective, t1=1, t2 fitted, thr 0.5": selective(t2="auto", **paper),
        "Selective, hard, t1+t2+threshold fitted": selective(**hard),
        "Selective, soft, log-prob features": selective(**soft),
        "Selective, hard, agnostic features": selective(**{**hard, **agnostic}),
        "Selective, soft, agnostic features (default)": selective(**{**soft, **agnostic}),
        "Selective, soft, log-prob features, LogReg": selective(
            classifier=make_pipeline(StandardScaler(), LogisticRegression()), **soft),
        "Selective, soft, log-prob features, HGB": selective(
            classifier=HistGradientBoostingClassifier(random_state=seed), **soft),
    }


def evaluate(estimator, X, y, n_classes):
    acc = CalibrationAccumulator(n_classes, ignore_index=255)
    # methods that keep the model's prediction are scored with it, as evaluate_store
    # does: a row that t = 1e10 makes exactly uniform must not count as class 0
    keeps = _keeps_prediction(estimator)
    for start in range(0, len(y), 262_144):
        part = slice(start, start + 262_144)
        if estimator is None:
            p = softmax(X[part].astype(np.float32))
        else:
            p = estimator.predict_proba(X[part])
        acc.update(y[part], p, y_pred=X[part].argmax(axis=1) if keeps else None)
    return acc.summary()


def run_dataset(name, seeds, max_fit_pixels, epochs, results, detection, timings,
                fit_pixels=1_000_000):
    # the same data and network as `sksegcal demo --dataset NAME` (and the same cache);
    # "mni152-segformer": the same data, an mmsegmentation SegFormer-b0 (mmseg_case.py)
    base = "mni152-tissue" if name == "mni152-segformer" else name
    settings = _DEMO_SETTINGS[(base, False)]
    data = load_dataset(base, random_state=0, cache_dir=cache_dir(), **settings["data"])
    cal, shifted = data.select("calibration"), data.select("shifted")
    t0 = time.perf_counter()
    if name == "mni152-segformer":
        from mmseg_case import segformer_logits

        Z_cal, Z_sh = segformer_logits(data, cache_dir())
    else:
        train = data.select("model")
        model, info = load_or_train(name, train.images, train.labels, data.n_classes,
                                    SegNetConfig(**settings["net"]))
        Z_cal, Z_sh = predict_logits(model, cal.images), predict_logits(model, shifted.images)
    print(f"[{name}] logits ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    X_cal, y_cal, g_cal = flatten_segmentation(Z_cal, cal.labels)
    X_sh, y_sh, g_sh = flatten_segmentation(Z_sh, shifted.labels)
    slices_cal, slices_sh = cal.slice_index[g_cal], shifted.slice_index[g_sh]
    for seed in seeds:
        # split by slice: an acquisition of a test slice never helps fit the calibrator
        split = split_images(slices_cal, validation_size=0.0, test_size=0.4, random_state=seed)
        fit = ~np.isin(slices_cal, split.test)
        test = ~fit
        # every method fits on the same seeded subsample, so that the C x C baselines
        # (vector, Dirichlet) stay tractable at 117 classes
        fit_rows = np.flatnonzero(fit)
        if len(fit_rows) > fit_pixels:
            fit_rows = np.sort(np.random.default_rng(seed).choice(fit_rows, fit_pixels,
                                                                  replace=False))
        fit = np.zeros_like(fit)
        fit[fit_rows] = True
        test_sh = np.isin(slices_sh, split.test)
        cases = {
            f"{name}": (X_cal[test], y_cal[test]),
            f"{name} shifted": (X_sh[test_sh], y_sh[test_sh]),
        }
        for label, est in methods(seed, max_fit_pixels, epochs).items():
            t0 = time.perf_counter()
            if isinstance(est, SelectiveScalingCalibrator):
                est.fit(X_cal[fit], y_cal[fit], groups=slices_cal[fit])
            elif est is not None:
                est.fit(X_cal[fit], y_cal[fit])
            timings[label].append(time.perf_counter() - t0)
            for case, (X, y) in cases.items():
                results[case][label].append(evaluate(est, X, y, data.n_classes))
                if isinstance(est, SelectiveScalingCalibrator):
                    correct = X.argmax(1) == y
                    detection[case][label].append(
                        misprediction_detection_scores(correct, est.predict_correctness(X))
                    )
            print(
                f"[{name} seed {seed}] {label}: "
                f"ECE {results[name][label][-1]['ece']:.4f} "
                f"shifted {results[name + ' shifted'][label][-1]['ece']:.4f} "
                f"({timings[label][-1]:.1f}s)",
                flush=True,
            )


def _cell(values, fmt="{:.4f}"):
    values = np.asarray(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"


def markdown(results, detection, timings, args) -> str:
    cases = list(results)
    labels = list(next(iter(results.values())))
    lines = [
        "# Quality benchmark: the paper's comparison on our real cases",
        "",
        "Generated by `python benchmarks/quality.py "
        f"--datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))} "
        f"--max-fit-pixels {args.max_fit_pixels} --epochs {args.epochs} "
        f"--fit-pixels {args.fit_pixels}`.",
        f"Mean ± standard deviation over {len(args.seeds)} seeds (image-level split of the "
        "calibration slices and every calibrator's randomness); lower is better except "
        "accuracy and mIoU.",
        "",
    ]
    for metric in METRICS:
        lines += [
            f"## {metric.upper()}",
            "",
            "| method | " + " | ".join(cases) + " |",
            "|---|" + "---|" * len(cases),
        ]
        for label in labels:
            cells = [_cell([r[metric] for r in results[c][label]]) for c in cases]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "## ECE ratio to temperature scaling (goal: <= 0.74)",
        "",
        "| method | " + " | ".join(cases) + " |",
        "|---|" + "---|" * len(cases),
    ]
    for label in labels:
        if not label.startswith("Selective"):
            continue
        cells = []
        for c in cases:
            ratio = [a["ece"] / b["ece"] for a, b in zip(results[c][label], results[c]["TS"])]
            cells.append(_cell(ratio, "{:.2f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Misprediction detection of the correctness classifier (test pixels)",
        "",
        "| classifier (selective variant) | case | AUROC | AUPR (errors) | FPR@95%TPR |",
        "|---|---|---|---|---|",
    ]
    for c in cases:
        for label, scores in detection[c].items():
            lines.append(
                f"| {label} | {c} | {_cell([s['auroc'] for s in scores], '{:.3f}')} | "
                f"{_cell([s['aupr_error'] for s in scores], '{:.3f}')} | "
                f"{_cell([s['fpr_at_95_tpr'] for s in scores], '{:.3f}')} |"
            )
    lines += [
        "",
        "## Fit time per method (seconds, mean over seeds and datasets)",
        "",
        "| method | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {np.mean(v):.1f} |" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mni152-tissue"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-fit-pixels", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--fit-pixels", type=int, default=1_000_000,
                        help="pixels every method is fitted on (a seeded subsample)")
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    results = defaultdict(lambda: defaultdict(list))
    detection = defaultdict(lambda: defaultdict(list))
    timings = defaultdict(list)
    for name in args.datasets:
        run_dataset(
            name, args.seeds, args.max_fit_pixels, args.epochs, results, detection, timings,
            args.fit_pixels,
        )
    report = markdown(results, detection, timings, args)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
