"""What the default SelectiveScalingCalibrator costs beside temperature scaling.

Side by side in one process, on synthetic over-confident logits (float32, images
of 4096 pixels, ``groups`` passed to fit): fit time and predict_proba
throughput of the default calibrator as ratios to TemperatureScaling's, and,
the same for the paper's MLP as the detector and for
``mode="generalised"``; with ``--detectors`` also for other correctness
detectors (AUROC on the held-out pixels, fit and predict time).

    python benchmarks/bench_fit_cost.py --pixels 1000000 --classes 19 42 150

"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def make_data(n: int, c: int, seed: int = 0):
    """Over-confident logits whose errors a detector can partly see (harder pixels)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    hardness = rng.gamma(2.0, 0.5, n)  # per-pixel difficulty
    X = 6.0 * (np.eye(c, dtype=np.float32)[y] + hardness[:, None] * rng.normal(size=(n, c)))
    groups = np.arange(n) // 4096
    return X.astype(np.float32), y, groups


def timed(fn, repeat=1):
    best = np.inf
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(n: int, c: int, detectors: bool, repeat: int) -> list[dict]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression

    from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
    from sksegcal.mlp import TorchMLPClassifier

    X, y, groups = make_data(n, c)
    Xp, _, _ = make_data(n, c, seed=1)
    ts_fit, ts = timed(lambda: TemperatureScaling().fit(X, y), repeat)
    ts_pred, _ = timed(lambda: ts.predict_proba(Xp), repeat)
    rows = [{"what": "TemperatureScaling", "fit_s": ts_fit, "predict_s": ts_pred}]
    # (detector, mode): the default, the paper's MLP and the generalised temperature over
    # the default detector
    candidates = {
        "default (LogisticRegression)": (None, "soft"),
        "paper's MLP (TorchMLP)": (TorchMLPClassifier(random_state=0), "soft"),
        "default, mode='generalised'": (None, "generalised"),
    }
    if detectors:
        candidates.update({
            "LogisticRegression, no scaler": (LogisticRegression(max_iter=200), "soft"),
            "HistGradientBoostingClassifier": (HistGradientBoostingClassifier(
                max_iter=100, random_state=0), "soft"),
        })
    for name, (det, mode) in candidates.items():
        est = SelectiveScalingCalibrator(det, mode=mode, random_state=0)
        fit_s, est = timed(lambda est=est: est.fit(X, y, groups=groups), repeat)
        pred_s, _ = timed(lambda est=est: est.predict_proba(Xp), repeat)
        rows.append({
            "what": name, "fit_s": fit_s, "predict_s": pred_s,
            "fit_ratio": fit_s / ts_fit, "throughput_ratio": ts_pred / pred_s,
            "auroc": est.detection_auroc_, "guard": est.guard_choice_,
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pixels", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 42, 150])
    parser.add_argument("--detectors", action="store_true",
                        help="also time LogisticRegression and HistGradientBoosting detectors")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the MLP and the float32 softmax)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import torch

    print(f"{args.pixels} pixels, float32, images of 4096 pixels")
    torch.set_num_threads(args.threads)
    print(f"{'C':>4} {'calibrator':34} {'fit s':>7} {'pred s':>7} {'fit/TS':>7} "
          f"{'thru/TS':>8} {'AUROC':>6} guard")
    for c in args.classes:
        for r in run(args.pixels, c, args.detectors, args.repeat):
            ratio = (f"{r['fit_ratio']:7.2f} {r['throughput_ratio']:8.2f} "
                     f"{r['auroc']:6.3f} {r['guard']}" if "fit_ratio" in r else "")
            print(f"{c:>4} {r['what']:34} {r['fit_s']:7.2f} {r['predict_s']:7.2f} {ratio}",
                  flush=True)


if __name__ == "__main__":
    main()
