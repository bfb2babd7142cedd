"""The paper's comparison on this project's real cases: every method, several seeds.

Writes one Markdown table per metric (mean +- std across seeds) in the shape of the
paper's Table, plus the misprediction-detection quality of each correctness classifier.

    python benchmarks/quality.py --datasets mni152-tissue --seeds 0 1 2 3 4 --methods core \
        --fit-pixels 300000 --bootstrap 1000 --out /tmp/quality-mni152.md

Datasets: mni152-tissue and aal (the data of `sksegcal demo` and the U-Nets shipped with the
package, `load_demo_network`: nothing is trained) and mni152-segformer (the MNI152 task with an
mmsegmentation SegFormer-b0, trained and cached, see mmseg_case.py). `--methods core` runs
Uncalibrated, TS, the package's default SelectiveScalingCalibrator (every setting left at its
default, the guard included), the default with guard=None and the paper's recipe; `--methods
all` adds the other baselines and variants. Per seed the report gives the default's ECE and NLL
ratio to TS, the guard's choice and a bootstrap interval of the ECE ratio (test slices resampled
with replacement, both methods' ECE recomputed from per-slice bin tallies).
Cases: each dataset's in-domain test slices and the shifted acquisitions of the same slices;
the seeds vary the image-level split of the calibration slices and every random choice of
the calibrators.

`--methods spatial` (issues 13 and 14) runs every `--regimes` of the model on each dataset:

    python benchmarks/quality.py --methods spatial --datasets mni152-tissue \
        --seeds 0 1 2 3 4 --regimes original ts-divided x0.6 --fit-pixels 150000 \
        --lts-pixels 50000 --bootstrap 1000 --out /tmp/spatial-mni152.md
    python benchmarks/quality.py --methods spatial --datasets aal --seeds 0 1 2 3 4 \
        --fit-pixels 150000 --lts-pixels 50000 --bootstrap 1000 --out /tmp/spatial-aal.md

Regimes (`regime_maps`): the logits as they are; divided by the model's own TS temperature
(an already globally calibrated model); times 0.6 (under-confident); on AAL, its 117 classes
merged by logsumexp into 2 (background / brain) or 4 groups (background / left / right
hemisphere / cerebellum and vermis). Methods: Uncalibrated, TS, the package's default
SelectiveScalingCalibrator and its guard=None twin, the default with context="spatial",
LocalTemperatureScaling(), and (original regime) TS, the default and the spatial default
fitted on the calibration images plus perturbed copies of them (`perturb_images`, Tomani et
al. 2021). Every estimator is built with the package's defaults, so a change of a default
changes these rows on a rerun. Beside ECE / NLL and their ratios to TS with bootstrap
intervals: the detectors' AUROC and the ECE of pixels within 2 px of a ground-truth label
boundary and of the others.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
from scipy import ndimage
from scipy.special import logsumexp
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sksegcal import (
    CalibratorSearchCV,
    DirichletScaling,
    EnsembleTemperatureScaling,
    LocalTemperatureScaling,
    MetaCalScaling,
    SelectiveScalingCalibrator,
    TemperatureScaling,
    TorchMLPClassifier,
    VectorScaling,
)
from sksegcal._segnet import DEMO_SETTINGS as _DEMO_SETTINGS
from sksegcal._segnet import SegNetConfig, cache_dir, load_demo_network, predict_logits
from sksegcal.datasets import load_dataset, perturb_images
from sksegcal.features import softmax
from sksegcal.metrics import CalibrationAccumulator, misprediction_detection_scores
from sksegcal.pixels import flatten_segmentation, split_images
from sksegcal.store._engine import _keeps_prediction

METRICS = ("ece", "nll", "brier", "mce", "accuracy", "miou")


DEFAULT = "Selective, package default"
NO_GUARD = "Selective, package default, guard=None"
PAPER = "Selective, paper (t1=1, t2=1e10, thr 0.5, MLP weight 2)"
ECE_BINS = 15


def core_methods(seed: int, epochs: int) -> dict:
    """The short list: the default as a user gets it, without its guard, and the paper."""
    paper_mlp = TorchMLPClassifier(
        max_epochs=epochs, n_threads=1, random_state=seed, class_weight="paper"
    )
    return {
        "Uncalibrated": None,
        "TS": TemperatureScaling(),
        DEFAULT: SelectiveScalingCalibrator(random_state=seed),
        NO_GUARD: SelectiveScalingCalibrator(guard=None, random_state=seed),
        PAPER: SelectiveScalingCalibrator(
            classifier=paper_mlp,
            t1=1.0,
            t2=1e10,
            threshold=0.5,
            mode="hard",
            features="log_softmax",
            guard=None,
            random_state=seed,
        ),
    }


def methods(seed: int, max_fit_pixels: int, epochs: int) -> dict:
    def mlp(**kw):
        return TorchMLPClassifier(max_epochs=epochs, n_threads=1, random_state=seed, **kw)

    def selective(**kw):
        kw.setdefault("classifier", mlp())
        return SelectiveScalingCalibrator(max_fit_pixels=max_fit_pixels, random_state=seed, **kw)

    # every setting spelled out, so that a change of the package's defaults cannot relabel a row
    paper = {"t1": 1.0, "threshold": 0.5, "mode": "hard", "features": "log_softmax"}
    hard = {
        "t1": "auto",
        "t2": "auto",
        "threshold": "auto",
        "mode": "hard",
        "features": "log_softmax",
    }
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
            t2=1e10, classifier=mlp(class_weight="paper"), **paper
        ),
        "Selective, t1=1, t2=2, thr 0.5, MLP weight 2": selective(
            t2=2.0, classifier=mlp(class_weight="paper"), **paper
        ),
        "Selective, t1=1, t2 fitted, thr 0.5": selective(t2="auto", **paper),
        "Selective, hard, t1+t2+threshold fitted": selective(**hard),
        "Selective, soft, log-prob features": selective(**soft),
        "Selective, hard, agnostic features": selective(**{**hard, **agnostic}),
        "Selective, soft, agnostic features, guard=ts": selective(**{**soft, **agnostic}),
        DEFAULT: SelectiveScalingCalibrator(random_state=seed),
        NO_GUARD: SelectiveScalingCalibrator(guard=None, random_state=seed),
        "Selective, soft, log-prob features, LogReg": selective(
            classifier=make_pipeline(StandardScaler(), LogisticRegression()), **soft
        ),
        "Selective, soft, log-prob features, HGB": selective(
            classifier=HistGradientBoostingClassifier(random_state=seed), **soft
        ),
    }


def evaluate(estimator, X, y, n_classes, groups=None, n_logit_columns=None, boundary=None):
    """Summary metrics; with groups, also per-group tallies for the bootstrap.

    X: what the estimator reads; its first ``n_logit_columns`` (default: all) columns
    are the model's logits (the uncalibrated probabilities and the kept prediction).
    boundary (n,) bool: also ECE / NLL of the boundary pixels and of the others
    (``ece_boundary``, ``ece_interior``, ...), from the same probabilities.

    The tallies, shape (n_groups, ECE_BINS + 1, 3): per group and equal-width confidence
    bin the pixel count, the confidence sum and the correct count; the last "bin" holds
    the pixel count, the NLL sum and 0.
    """
    acc = CalibrationAccumulator(n_classes, ignore_index=255)
    regions = (
        {}
        if boundary is None
        else {
            "boundary": CalibrationAccumulator(n_classes, ignore_index=255),
            "interior": CalibrationAccumulator(n_classes, ignore_index=255),
        }
    )
    # methods that keep the model's prediction are scored with it, as evaluate_store
    # does: a row that t = 1e10 makes exactly uniform must not count as class 0
    keeps = _keeps_prediction(estimator)
    nl = X.shape[1] if n_logit_columns is None else n_logit_columns
    if groups is not None:
        codes, inverse = np.unique(groups, return_inverse=True)
        tallies = np.zeros((len(codes), ECE_BINS + 1, 3))
    for start in range(0, len(y), 262_144):
        part = slice(start, start + 262_144)
        if estimator is None:
            p = softmax(X[part, :nl].astype(np.float32))
        else:
            p = estimator.predict_proba(X[part])
        y_pred = X[part, :nl].argmax(axis=1) if keeps else None
        acc.update(y[part], p, y_pred=y_pred)
        for region, racc in regions.items():
            m = boundary[part] if region == "boundary" else ~boundary[part]
            if m.any():
                racc.update(y[part][m], p[m], y_pred=None if y_pred is None else y_pred[m])
        if groups is None:
            continue
        yy = y[part]
        ok = yy != 255
        pred = (p.argmax(axis=1) if y_pred is None else y_pred)[ok]
        pp, yy, g = p[ok], yy[ok], inverse[part][ok]
        rows = np.arange(len(yy))
        conf = pp[rows, pred].astype(np.float64)
        correct = (pred == yy).astype(np.float64)
        nll = -np.log(np.clip(pp[rows, yy].astype(np.float64), 1e-12, None))
        b = np.clip(np.ceil(conf * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)
        flat = g * (ECE_BINS + 1) + b
        size = len(codes) * (ECE_BINS + 1)
        t = tallies.reshape(size, 3)
        t[:, 0] += np.bincount(flat, minlength=size)
        t[:, 1] += np.bincount(flat, weights=conf, minlength=size)
        t[:, 2] += np.bincount(flat, weights=correct, minlength=size)
        last = g * (ECE_BINS + 1) + ECE_BINS
        t[:, 0] += np.bincount(last, minlength=size)
        t[:, 1] += np.bincount(last, weights=nll, minlength=size)
    summary = acc.summary()
    for region, racc in regions.items():
        s = racc.summary()
        summary[f"ece_{region}"], summary[f"nll_{region}"] = s["ece"], s["nll"]
        summary[f"share_{region}"] = float(
            np.mean(boundary if region == "boundary" else ~boundary)
        )
    if groups is not None:
        summary["tallies"] = tallies
    return summary


def _ece_nll(tallies):
    """ECE and NLL of summed tallies (..., ECE_BINS + 1, 3)."""
    bins = tallies[..., :ECE_BINS, :]
    n = bins[..., 0].sum(-1)
    ece = np.abs(bins[..., 1] - bins[..., 2]).sum(-1) / n
    nll = tallies[..., ECE_BINS, 1] / tallies[..., ECE_BINS, 0]
    return ece, nll


def bootstrap_ratio(a, b, n_boot, seed=0):
    """Point and 95% percentile interval of ECE(a)/ECE(b) and NLL(a)/NLL(b).

    a, b: per-group tallies of two methods on the same groups (slices); the groups are
    resampled with replacement, the same draw for both methods.
    """
    rng = np.random.default_rng(seed)
    n = len(a)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    ea, na = _ece_nll(np.einsum("bg,gkj->bkj", w, a))
    eb, nb = _ece_nll(np.einsum("bg,gkj->bkj", w, b))
    e0a, n0a = _ece_nll(a.sum(0))
    e0b, n0b = _ece_nll(b.sum(0))
    return {
        "ece": (e0a / e0b, *np.percentile(ea / eb, [2.5, 97.5])),
        "nll": (n0a / n0b, *np.percentile(na / nb, [2.5, 97.5])),
    }


def run_dataset(
    name,
    seeds,
    max_fit_pixels,
    epochs,
    results,
    detection,
    timings,
    fit_pixels=1_000_000,
    method_set="all",
    guards=None,
    tallies=None,
):
    # the same data and network as `sksegcal demo --dataset NAME`: the shipped weights;
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
        model, info = load_demo_network(name, config=SegNetConfig(**settings["net"]))
        Z_cal, Z_sh = predict_logits(model, cal.images), predict_logits(model, shifted.images)
    print(f"[{name}] logits ready ({time.perf_counter() - t0:.0f}s)", flush=True)
    X_cal, y_cal, g_cal = flatten_segmentation(Z_cal, cal.labels)
    X_sh, y_sh, g_sh = flatten_segmentation(Z_sh, shifted.labels)
    slices_cal, slices_sh = cal.slice_index[g_cal], shifted.slice_index[g_sh]
    guards = {} if guards is None else guards
    tallies = {} if tallies is None else tallies
    for seed in seeds:
        # split by slice: an acquisition of a test slice never helps fit the calibrator
        split = split_images(slices_cal, validation_size=0.0, test_size=0.4, random_state=seed)
        fit = ~np.isin(slices_cal, split.test)
        test = ~fit
        # every method fits on the same seeded subsample, so that the C x C baselines
        # (vector, Dirichlet) stay tractable at 117 classes
        fit_rows = np.flatnonzero(fit)
        if len(fit_rows) > fit_pixels:
            fit_rows = np.sort(
                np.random.default_rng(seed).choice(fit_rows, fit_pixels, replace=False)
            )
        fit = np.zeros_like(fit)
        fit[fit_rows] = True
        test_sh = np.isin(slices_sh, split.test)
        cases = {
            f"{name}": (X_cal[test], y_cal[test], slices_cal[test]),
            f"{name} shifted": (X_sh[test_sh], y_sh[test_sh], slices_sh[test_sh]),
        }
        chosen = (
            core_methods(seed, epochs)
            if method_set == "core"
            else methods(seed, max_fit_pixels, epochs)
        )
        for label, est in chosen.items():
            t0 = time.perf_counter()
            if isinstance(est, SelectiveScalingCalibrator):
                est.fit(X_cal[fit], y_cal[fit], groups=slices_cal[fit])
            elif est is not None:
                est.fit(X_cal[fit], y_cal[fit])
            timings[label].append(time.perf_counter() - t0)
            if isinstance(est, SelectiveScalingCalibrator):
                g = est.guard_scores_ or {}
                guards[(name, seed, label)] = {
                    "choice": est.guard_choice_,
                    "t1": est.t1_,
                    "t2": est.t2_,
                    "wins": g.get("wins"),
                    "n_folds": g.get("n_folds"),
                    "mean_improvement": g.get("mean_improvement"),
                }
            for case, (X, y, groups) in cases.items():
                r = evaluate(est, X, y, data.n_classes, groups=groups)
                tallies[(case, seed, label)] = r.pop("tallies")
                results[case][label].append(r)
                if isinstance(est, SelectiveScalingCalibrator):
                    correct = X.argmax(1) == y
                    detection[case][label].append(
                        misprediction_detection_scores(correct, est.predict_correctness(X))
                    )
            extra = ""
            if isinstance(est, SelectiveScalingCalibrator):
                extra = f" guard {est.guard_choice_} t1 {est.t1_:.3g} t2 {est.t2_:.3g}"
            print(
                f"[{name} seed {seed}] {label}: "
                f"ECE {results[name][label][-1]['ece']:.4f} "
                f"shifted {results[name + ' shifted'][label][-1]['ece']:.4f} "
                f"NLL {results[name][label][-1]['nll']:.4f} "
                f"shifted {results[name + ' shifted'][label][-1]['nll']:.4f}"
                f"{extra} ({timings[label][-1]:.1f}s)",
                flush=True,
            )


# --------------------------------------------------------------------------------------
# regimes (issue 13 part 6), spatial variants (issue 14 part 5), perturbed fits (part 6)
# --------------------------------------------------------------------------------------
SPATIAL = "Selective, package default, context=spatial"
LTS = "LocalTemperatureScaling (package default)"
# the search on X with the spatial context columns: the whole default family, LTS on the
# context included; and the same with its shift check (held-out perturbed copies scored)
SEARCH = "CalibratorSearchCV, context=spatial"
SEARCH_SHIFT = "CalibratorSearchCV, context=spatial, shift_check=0 (perturbed copies)"
PERTURBED = " [fit on + perturbed]"  # suffix of the methods fitted on original + perturbed
REGIMES = ("original", "ts-divided", "x0.6", "merged-2", "merged-4")
BOUNDARY_WIDTH = 2  # px: the boundary region of the boundary / interior split


def merge_classes(logits: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Logits (N, C, H, W) of a coarser task: each group's logit is the logsumexp of its own.

    ``groups`` (C,) gives every class its group (0..G-1, every group used); the merged
    softmax is then the sum of the original softmax over each group's classes, so the
    coarse model is the same model asked a coarser question.
    """
    groups = np.asarray(groups)
    n_groups = int(groups.max()) + 1
    if set(np.unique(groups).tolist()) != set(range(n_groups)) or len(groups) != logits.shape[1]:
        raise ValueError("groups must give each of the C classes a group 0..G-1, all used.")
    out = np.empty((logits.shape[0], n_groups, *logits.shape[2:]), dtype=np.float32)
    for g in range(n_groups):
        out[:, g] = logsumexp(logits[:, groups == g].astype(np.float64), axis=1)
    return out


def merge_labels(labels: np.ndarray, groups: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Labels of the coarser task (the ignore index stays)."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, ignore_index, dtype=np.uint8)
    keep = labels != ignore_index
    out[keep] = np.asarray(groups)[labels[keep]]
    return out


def aal_groups(class_names, n_groups: int) -> np.ndarray:
    """Groups of the AAL classes: 2 (background / brain) or 4 (background / left /
    right cerebral hemisphere / cerebellum and vermis), from the AAL region names."""
    groups = np.zeros(len(class_names), dtype=np.int64)
    for i, name in enumerate(class_names):
        if i == 0 or name == "background":
            continue
        if n_groups == 2:
            groups[i] = 1
        elif name.startswith(("Cerebelum", "Vermis")):
            groups[i] = 3
        elif name.endswith("_L"):
            groups[i] = 1
        elif name.endswith("_R"):
            groups[i] = 2
        else:
            raise ValueError(f"AAL region {name!r} is neither left, right nor cerebellar.")
    return groups


def fitted_ts_temperature(
    logits: np.ndarray, labels: np.ndarray, seed: int = 0, n_pixels: int = 300_000
) -> float:
    """The TS temperature of a model on (a seeded subsample of) its calibration pixels."""
    X, y, _ = flatten_segmentation(logits, labels)
    if len(y) > n_pixels:
        rows = np.sort(np.random.default_rng(seed).choice(len(y), n_pixels, replace=False))
        X, y = X[rows], y[rows]
    return float(TemperatureScaling().fit(X, y).temperature_)


def regime_maps(regime, logits, labels, class_names, temperature):
    """(logits, labels, n_classes) of a regime, from the model's logits and labels.

    original: as they are; ts-divided: divided by the model's own TS temperature
    (``temperature``, fitted once on the in-domain calibration pixels: an already
    globally calibrated model); x0.6: times 0.6 (under-confident); merged-2 / merged-4
    (AAL): classes merged by logsumexp (:func:`merge_classes`, :func:`aal_groups`).
    """
    if regime == "original":
        return logits, labels, logits.shape[1]
    if regime == "ts-divided":
        return (logits / np.float32(temperature)).astype(np.float32), labels, logits.shape[1]
    if regime == "x0.6":
        return (logits * np.float32(0.6)).astype(np.float32), labels, logits.shape[1]
    if regime.startswith("merged-"):
        groups = aal_groups(class_names, int(regime.split("-")[1]))
        return merge_classes(logits, groups), merge_labels(labels, groups), int(groups.max()) + 1
    raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}.")


def label_boundary_mask(labels: np.ndarray) -> np.ndarray:
    """The package's boundary band of ground-truth label maps (N, H, W), its defaults.

    ``sksegcal.metrics.boundary_mask`` (pixels within 2 px, Chebyshev, of a pixel with
    another label); before the package had it, a local definition within 2 px of a
    boundary pixel: the same band to within a pixel, with the local one slightly wider.
    """
    try:
        from sksegcal.metrics import boundary_mask
    except ImportError:  # an older package: the local definition
        return _local_boundary_mask(labels)
    return boundary_mask(labels)


def _local_boundary_mask(labels: np.ndarray, width: int = BOUNDARY_WIDTH) -> np.ndarray:
    """Pixels within ``width`` px (Euclidean) of a pixel with another 8-neighbour."""
    out = np.zeros(labels.shape, dtype=bool)
    for i, t in enumerate(labels):
        hi = ndimage.maximum_filter(t, size=3, mode="nearest")
        lo = ndimage.minimum_filter(t, size=3, mode="nearest")
        edge = hi != lo
        if edge.any():
            out[i] = ndimage.distance_transform_edt(~edge) <= width
    return out


# --only keys -> the labels they keep (Uncalibrated, TS and the default always run)
ONLY = {
    "no-guard": (NO_GUARD,),
    "spatial": (SPATIAL,),
    "lts": (LTS,),
    "search": (SEARCH,),
    "search-shift": (SEARCH_SHIFT,),
    "perturbed": ("TS" + PERTURBED, DEFAULT + PERTURBED, SPATIAL + PERTURBED),
}


def spatial_methods(seed: int, memory, perturbed: bool = True, only=None) -> dict:
    """label -> (estimator, reads the context columns, fitted on original + perturbed).

    The third field is "shift" for the search with its shift check: fitted on the
    original images, given their perturbed copies as ``X_perturbed``.

    ``memory``: the package's cache of fitted detectors (``SelectiveScalingCalibrator(
    memory=...)``), shared by the default and its guard=None twin, which then train one
    detector between them (same seed, same rows, same detector; a cache changes no
    figure). ``perturbed``: include the fits on original + perturbed images.
    """
    out = {
        "Uncalibrated": (None, False, False),
        "TS": (TemperatureScaling(), False, False),
        DEFAULT: (SelectiveScalingCalibrator(memory=memory, random_state=seed), False, False),
        NO_GUARD: (
            SelectiveScalingCalibrator(guard=None, memory=memory, random_state=seed),
            False,
            False,
        ),
        SPATIAL: (SelectiveScalingCalibrator(context="spatial", random_state=seed), True, False),
        LTS: (LocalTemperatureScaling(), True, False),
        SEARCH: (CalibratorSearchCV(context="spatial", random_state=seed), True, False),
    }
    if perturbed:
        out.update(
            {
                SEARCH_SHIFT: (
                    CalibratorSearchCV(context="spatial", shift_check=0.0, random_state=seed),
                    True,
                    "shift",
                ),
                "TS" + PERTURBED: (TemperatureScaling(), False, True),
                DEFAULT + PERTURBED: (SelectiveScalingCalibrator(random_state=seed), False, True),
                SPATIAL + PERTURBED: (
                    SelectiveScalingCalibrator(context="spatial", random_state=seed),
                    True,
                    True,
                ),
            }
        )
    if only is not None:
        keep = {"Uncalibrated", "TS", DEFAULT} | {x for k in only for x in ONLY[k]}
        out = {label: v for label, v in out.items() if label in keep}
    return out


def evaluate_regime(estimator, X, y, n_classes, groups, boundary, reads_context):
    """evaluate() plus ECE / NLL on boundary and interior pixels.

    X holds the C logit columns followed by the context columns; estimators that do
    not read the context get the logit columns only.
    """
    Xin = X if reads_context else X[:, :n_classes]
    return evaluate(
        estimator, Xin, y, n_classes, groups=groups, n_logit_columns=n_classes, boundary=boundary
    )


def run_regimes(
    name,
    seeds,
    regimes,
    results,
    detection,
    timings,
    guards,
    tallies,
    fit_pixels,
    lts_pixels,
    perturb_seed=0,
    perturbed_regimes=("original",),
    only=None,
):
    """Every regime of one dataset: the spatial method set, in-domain and shifted.

    The fits on original + perturbed calibration images run on ``perturbed_regimes``
    only (the shift question is about the model as it is).
    """
    import tempfile

    from joblib import Memory

    settings = _DEMO_SETTINGS[(name, False)]
    data = load_dataset(name, random_state=0, cache_dir=cache_dir(), **settings["data"])
    cal, shifted = data.select("calibration"), data.select("shifted")
    t0 = time.perf_counter()
    model, _ = load_demo_network(name, config=SegNetConfig(**settings["net"]))
    Z = {
        "cal": predict_logits(model, cal.images),
        "sh": predict_logits(model, shifted.images),
        # Tomani et al.: the calibration images, perturbed (never the test slices' copies:
        # only the fit slices' rows of these are used below)
        "pert": predict_logits(model, perturb_images(cal.images, random_state=perturb_seed)),
    }
    labels = {"cal": cal.labels, "sh": shifted.labels, "pert": cal.labels}
    slices = {"cal": cal.slice_index, "sh": shifted.slice_index, "pert": cal.slice_index}
    temperature = fitted_ts_temperature(Z["cal"], cal.labels)
    print(
        f"[{name}] logits ready ({time.perf_counter() - t0:.0f}s), model's TS temperature "
        f"{temperature:.4f}",
        flush=True,
    )
    for regime in regimes:
        if regime.startswith("merged") and name != "aal":
            continue
        base = name if regime == "original" else f"{name} [{regime}]"
        t0 = time.perf_counter()
        tables = {}
        for k in Z:
            z, t, n_classes = regime_maps(regime, Z[k], labels[k], data.class_names, temperature)
            X, y, g = flatten_segmentation(z, t, context="spatial")
            tables[k] = (X, y, slices[k][g], label_boundary_mask(t)[t != 255])
        print(f"[{base}] tables ready ({time.perf_counter() - t0:.0f}s)", flush=True)
        Xc, yc, sc, _ = tables["cal"]
        Xp, yp, sp, _ = tables["pert"]
        for seed in seeds:
            split = split_images(sc, validation_size=0.0, test_size=0.4, random_state=seed)
            rng = np.random.default_rng(seed)
            fit_rows = np.flatnonzero(~np.isin(sc, split.test))
            pert_rows = np.flatnonzero(~np.isin(sp, split.test))
            both = np.concatenate([fit_rows, len(yc) + pert_rows])
            fit_rows = np.sort(rng.choice(fit_rows, min(fit_pixels, len(fit_rows)), replace=False))
            both = np.sort(rng.choice(both, min(fit_pixels, len(both)), replace=False))
            # LTS's L-BFGS passes over every fit row at every iteration: a smaller sample
            # of the same rows (its dozen parameters need no more)
            lts_rows = np.sort(rng.choice(fit_rows, min(lts_pixels, len(fit_rows)), replace=False))
            fits = {
                False: (Xc[fit_rows], yc[fit_rows], sc[fit_rows]),
                True: (
                    np.concatenate(
                        [Xc[both[both < len(yc)]], Xp[both[both >= len(yc)] - len(yc)]]
                    ),
                    np.concatenate(
                        [yc[both[both < len(yc)]], yp[both[both >= len(yc)] - len(yc)]]
                    ),
                    # perturbed copies are other images of the same slice: group them
                    # with it, so that the guard's folds never split a slice
                    np.concatenate(
                        [sc[both[both < len(yc)]], sp[both[both >= len(yc)] - len(yc)]]
                    ),
                ),
            }
            cases = {}
            for k, case in (("cal", base), ("sh", base + " shifted")):
                X, y, s, b = tables[k]
                test = np.isin(s, split.test)
                cases[case] = (X[test], y[test], s[test], b[test])
            cache = tempfile.TemporaryDirectory(prefix="quality-detectors-")
            chosen = spatial_methods(
                seed,
                Memory(cache.name, verbose=0),
                perturbed=regime in perturbed_regimes,
                only=only,
            )
            for label, (est, reads_context, perturbed) in chosen.items():
                Xf, yf, gf = fits[perturbed is True]
                if label == LTS:
                    Xf, yf = Xc[lts_rows], yc[lts_rows]
                if not reads_context:
                    Xf = np.ascontiguousarray(Xf[:, :n_classes])
                fit_kw = {}
                if perturbed == "shift":
                    # the perturbed copies of the same fit pixels, row for row (same labels)
                    if not np.array_equal(yp[fit_rows], yf) or not np.array_equal(sp, sc):
                        raise RuntimeError("perturbed rows do not align with the originals")
                    fit_kw["X_perturbed"] = np.ascontiguousarray(Xp[fit_rows][:, : Xf.shape[1]])
                t0 = time.perf_counter()
                if isinstance(est, (SelectiveScalingCalibrator, CalibratorSearchCV)):
                    est.fit(Xf, yf, groups=gf, **fit_kw)
                elif est is not None:
                    est.fit(Xf, yf)
                timings[(base, label)].append(time.perf_counter() - t0)
                if isinstance(est, CalibratorSearchCV):
                    r = est.cv_results_
                    guards[(base, seed, label)] = {
                        "choice": est.best_name_,
                        "choice_without_shift_check": est.choice_without_shift_check_,
                        "supported": ",".join(n for n, ok in zip(r["name"], r["supported"]) if ok),
                        "refit_time": est.refit_time_,
                    }
                if isinstance(est, SelectiveScalingCalibrator):
                    g = getattr(est, "guard_scores_", None) or {}
                    guards[(base, seed, label)] = {
                        "choice": getattr(est, "guard_choice_", None),
                        "t1": getattr(est, "t1_", np.nan),
                        "t2": getattr(est, "t2_", np.nan),
                        "wins": g.get("wins"),
                        "n_folds": g.get("n_folds"),
                        "mean_improvement": g.get("mean_improvement"),
                        # classifier=None: which detector the package's default fitted
                        "detector": _detector_name(est.classifier_),
                    }
                for case, (X, y, s, b) in cases.items():
                    r = evaluate_regime(est, X, y, n_classes, s, b, reads_context)
                    tallies[(case, seed, label)] = r.pop("tallies")
                    results[case][label].append(r)
                    if isinstance(est, SelectiveScalingCalibrator):
                        correct = X[:, :n_classes].argmax(1) == y
                        Xin = X if reads_context else X[:, :n_classes]
                        detection[case][label].append(
                            misprediction_detection_scores(correct, est.predict_correctness(Xin))
                        )
                extra = ""
                if isinstance(est, SelectiveScalingCalibrator):
                    extra = f" guard {getattr(est, 'guard_choice_', None)}"
                if isinstance(est, CalibratorSearchCV):
                    extra = f" chose {est.best_name_}"
                    print(est.summary(), flush=True)
                print(
                    f"[{base} seed {seed}] {label}: ECE "
                    f"{results[base][label][-1]['ece']:.4f} shifted "
                    f"{results[base + ' shifted'][label][-1]['ece']:.4f} NLL "
                    f"{results[base][label][-1]['nll']:.4f}{extra} "
                    f"({timings[(base, label)][-1]:.1f}s)",
                    flush=True,
                )
            cache.cleanup()
        del tables, Xc, Xp


def goals_report(results, cases) -> list:
    """The goals, per method: in-domain never above TS, mean ECE ratios, the shift."""
    lines = [
        "## Goals: the new default and the search against TS",
        "",
        "In-domain: splits (every case, regime and seed) whose ECE / NLL ratio to TS "
        "exceeds 1 + 1e-4, the mean ECE ratio over every in-domain split and over the "
        "original regime only. Shifted: the largest NLL ratio and the mean ECE ratio.",
        "",
        "| method | in-domain splits ECE > TS | NLL > TS | mean ECE ratio, all regimes | "
        "original regime | shifted: NLL ratio max | mean ECE ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in (DEFAULT, NO_GUARD, LTS, SEARCH, SEARCH_SHIFT):
        inside = [c for c in cases if not c.endswith(" shifted") and label in results[c]]
        shifted = [c for c in cases if c.endswith(" shifted") and label in results[c]]
        if not inside:
            continue
        e = np.concatenate([_ratio(results, c, label, "ece") for c in inside])
        n = np.concatenate([_ratio(results, c, label, "nll") for c in inside])
        orig = [c for c in inside if "[" not in c]

        def ratios(which, metric, label=label):
            # a run without the original regime (or without a shifted case) has none
            parts = [_ratio(results, c, label, metric) for c in which]
            return np.concatenate(parts) if parts else np.full(1, np.nan)

        eo = ratios(orig, "ece")
        es, ns = ratios(shifted, "ece"), ratios(shifted, "nll")
        lines.append(
            f"| {label} | {int((e > 1 + 1e-4).sum())} of {len(e)} | "
            f"{int((n > 1 + 1e-4).sum())} of {len(n)} | {e.mean():.3f} | {eo.mean():.3f} | "
            f"{ns.max():.4f} | {es.mean():.3f} |"
        )
    return lines + [""]


def _boot_cell(tallies, case, seed, label, n_boot, ref="TS"):
    bs = bootstrap_ratio(tallies[(case, seed, label)], tallies[(case, seed, ref)], n_boot, seed)
    return bs


def regime_report(results, detection, timings, guards, tallies, seeds, n_boot) -> list:
    """The tables of the regime / spatial / shift run."""
    cases = list(results)
    bases = [c for c in cases if not c.endswith(" shifted")]
    compared = [
        DEFAULT,
        NO_GUARD,
        SPATIAL,
        LTS,
        SEARCH,
        SEARCH_SHIFT,
        "TS" + PERTURBED,
        DEFAULT + PERTURBED,
        SPATIAL + PERTURBED,
    ]
    lines = goals_report(results, cases) + [
        "## Summary: ECE and NLL ratio to TS per case",
        "",
        "Mean over the seeds of each method's ratio to TS fitted on the same split (< 1: "
        "better than TS), [min-max over the seeds]; pooled (95%): the ratio of ECE summed "
        f"over every seed's test slices, {n_boot} bootstrap resamples of the slices. "
        "'>TS': splits whose ECE ratio exceeds 1 / whose NLL ratio exceeds 1.",
        "",
        "| case | method | ECE ratio mean [min-max] | pooled ECE ratio (95%) | "
        "NLL ratio mean [max] | splits >TS (ECE / NLL) |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        for label in [x for x in compared if x in results[case]]:
            e, n = _ratio(results, case, label, "ece"), _ratio(results, case, label, "nll")
            a = np.concatenate([tallies[(case, s, label)] for s in seeds])
            b = np.concatenate([tallies[(case, s, "TS")] for s in seeds])
            bs = bootstrap_ratio(a, b, n_boot, 12345)
            lines.append(
                f"| {case} | {label} | {e.mean():.3f} [{e.min():.2f}-{e.max():.2f}] | "
                f"{bs['ece'][0]:.2f} ({bs['ece'][1]:.2f}-{bs['ece'][2]:.2f}) | "
                f"{n.mean():.4f} [{n.max():.4f}] | "
                f"{int((e > 1 + 1e-9).sum())} / {int((n > 1 + 1e-9).sum())} of {len(e)} |"
            )
    lines += [
        "",
        "## Per seed: ECE ratio to TS with its 95% interval",
        "",
        f"{n_boot} bootstrap resamples of the test slices (both methods on the same "
        "resample). TS ECE: the absolute figure. Guard: the default's choice (selective / ts) "
        "and the folds selective scaling won.",
        "",
        "| case | seed | TS ECE | default | guard | guard=None | spatial | LTS | "
        "default, +perturbed fit | spatial, +perturbed fit | search | search chose | "
        "search, shift check | it chose |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        base = case.replace(" shifted", "")
        for i, seed in enumerate(seeds):
            cells = []
            for label in (
                DEFAULT,
                NO_GUARD,
                SPATIAL,
                LTS,
                DEFAULT + PERTURBED,
                SPATIAL + PERTURBED,
                SEARCH,
                SEARCH_SHIFT,
            ):
                if label not in results[case]:
                    cells.append("-")
                    continue
                bs = _boot_cell(tallies, case, seed, label, n_boot)["ece"]
                cells.append(f"{bs[0]:.2f} ({bs[1]:.2f}-{bs[2]:.2f})")
                if label in (SEARCH, SEARCH_SHIFT):
                    cells.append(guards[(base, seed, label)]["choice"])
            g = guards[(base, seed, DEFAULT)]
            cells.insert(1, f"{g['choice']} {g['wins']}/{g['n_folds']}")
            lines.append(
                f"| {case} | {seed} | {results[case]['TS'][i]['ece']:.4f} | "
                + " | ".join(cells)
                + " |"
            )
    lines += [
        "",
        "## Misprediction detection: per-pixel vs spatial detector (test pixels)",
        "",
        "AUROC of P(correct) (mean ± std over seeds); the detector is fitted even where the "
        "guard falls back to TS.",
        "",
        "| case | default (per pixel) | spatial | default, +perturbed fit | "
        "spatial, +perturbed fit |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        cells = [
            _cell([s["auroc"] for s in detection[case][label]], "{:.3f}")
            if label in detection[case]
            else "-"
            for label in (DEFAULT, SPATIAL, DEFAULT + PERTURBED, SPATIAL + PERTURBED)
        ]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Boundary vs interior ECE (ground-truth label boundary)",
        "",
        "Mean ± std over seeds of the ECE on the test pixels of the boundary band "
        f"({_boundary_definition()}) and on the others; 'vs uncal.': boundary "
        "ECE relative to the uncalibrated model's (the goal: <= 0.5).",
        "",
        "| case | boundary share | method | boundary ECE | interior ECE | vs uncal. |",
        "|---|---|---|---|---|---|",
    ]
    for case in cases:
        share = np.mean([r["share_boundary"] for r in results[case]["Uncalibrated"]])
        for label in ("Uncalibrated", "TS", DEFAULT, SPATIAL, LTS, SPATIAL + PERTURBED):
            if label not in results[case]:
                continue
            rs = results[case][label]
            rel = [
                a["ece_boundary"] / b["ece_boundary"]
                for a, b in zip(rs, results[case]["Uncalibrated"])
            ]
            lines.append(
                f"| {case} | {share:.2f} | {label} | "
                f"{_cell([r['ece_boundary'] for r in rs])} | "
                f"{_cell([r['ece_interior'] for r in rs])} | {_cell(rel, '{:.2f}')} |"
            )
    lines += [
        "",
        "## Absolute ECE and NLL (mean ± std over seeds)",
        "",
        "| case | method | ECE | NLL | accuracy |",
        "|---|---|---|---|---|",
    ]
    for case in cases:
        for label in results[case]:
            rs = results[case][label]
            lines.append(
                f"| {case} | {label} | {_cell([r['ece'] for r in rs])} | "
                f"{_cell([r['nll'] for r in rs])} | "
                f"{_cell([r['accuracy'] for r in rs])} |"
            )
    every = list(dict.fromkeys(label for c in cases for label in results[c]))
    lines += [
        "",
        "## Fit time (seconds, mean over seeds; the shared cores were loaded by other jobs)",
        "",
        "| case | " + " | ".join(every) + " |",
        "|---|" + "---|" * len(every),
    ]
    for base in bases:
        lines.append(
            f"| {base} | "
            + " | ".join(
                f"{np.mean(timings[(base, label)]):.1f}" if label in results[base] else "-"
                for label in every
            )
            + " |"
        )
    lines.append("")
    return lines


def _cell(values, fmt="{:.4f}"):
    values = np.asarray(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(values.mean())} ± {fmt.format(values.std(ddof=1))}"


def _ratio(results, case, label, metric):
    return np.array(
        [a[metric] / b[metric] for a, b in zip(results[case][label], results[case]["TS"])]
    )


def ratio_report(results, guards, tallies, seeds, n_boot) -> list:
    """Per seed and per case: the default's ECE and NLL ratio to TS, the guard, the spread."""
    cases = list(results)
    labels = [x for x in (DEFAULT, NO_GUARD, PAPER) if x in next(iter(results.values()))]
    lines = []
    for case in cases:
        name = case.replace(" shifted", "")
        lines += [
            f"## Per seed: {case}",
            "",
            "ECE and NLL of the default relative to TS (< 1: better than TS); 95% interval: "
            f"{n_boot} bootstrap resamples of the test slices (both methods on the same "
            "resample). Guard: its choice, the folds selective scaling won and the mean "
            "held-out NLL gain over TS (positive: selective better).",
            "",
            "| seed | ECE ratio | 95% interval | NLL ratio | 95% interval | guard | wins | "
            "NLL gain | guard=None: ECE ratio | guard=None: NLL ratio |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i, seed in enumerate(seeds):
            e = _ratio(results, case, DEFAULT, "ece")[i]
            n = _ratio(results, case, DEFAULT, "nll")[i]
            bs = bootstrap_ratio(
                tallies[(case, seed, DEFAULT)], tallies[(case, seed, "TS")], n_boot, seed
            )
            g = guards[(name, seed, DEFAULT)]
            gain = "n/a" if g["mean_improvement"] is None else f"{g['mean_improvement']:+.2e}"
            e0 = _ratio(results, case, NO_GUARD, "ece")[i] if NO_GUARD in labels else np.nan
            n0 = _ratio(results, case, NO_GUARD, "nll")[i] if NO_GUARD in labels else np.nan
            lines.append(
                f"| {seed} | {e:.4f} | {bs['ece'][1]:.2f}-{bs['ece'][2]:.2f} | {n:.4f} | "
                f"{bs['nll'][1]:.4f}-{bs['nll'][2]:.4f} | {g['choice']} | "
                f"{g['wins']}/{g['n_folds']} | {gain} | {e0:.4f} | {n0:.4f} |"
            )
        lines.append("")
    lines += [
        "## Spread over seeds: ratio to TS",
        "",
        "min / median / max and mean over the seeds; pooled: the ratio of ECE (NLL) summed "
        "over every seed's test slices (each seed's slices as separate units) with its "
        f"95% bootstrap interval ({n_boot} resamples).",
        "",
        "| method | case | ECE ratio min / median / max | mean | pooled ECE ratio (95%) | "
        "NLL ratio min / median / max | mean | pooled NLL ratio (95%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        for case in cases:
            e, n = _ratio(results, case, label, "ece"), _ratio(results, case, label, "nll")
            a = np.concatenate([tallies[(case, s, label)] for s in seeds])
            b = np.concatenate([tallies[(case, s, "TS")] for s in seeds])
            bs = bootstrap_ratio(a, b, n_boot, 12345)
            lines.append(
                f"| {label} | {case} | {e.min():.3f} / {np.median(e):.3f} / {e.max():.3f} | "
                f"{e.mean():.3f} | {bs['ece'][0]:.2f} ({bs['ece'][1]:.2f}-{bs['ece'][2]:.2f}) | "
                f"{n.min():.4f} / {np.median(n):.4f} / {n.max():.4f} | {n.mean():.4f} | "
                f"{bs['nll'][0]:.4f} ({bs['nll'][1]:.4f}-{bs['nll'][2]:.4f}) |"
            )
    lines.append("")
    return lines


def markdown(results, detection, timings, args, guards=None, tallies=None, seconds=None) -> str:
    cases = list(results)
    labels = list(next(iter(results.values())))
    lines = [
        "# Quality benchmark: the paper's comparison on our real cases",
        "",
        "Generated by `python benchmarks/quality.py "
        f"--datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))} "
        f"--methods {args.methods} --max-fit-pixels {args.max_fit_pixels} "
        f"--epochs {args.epochs} --fit-pixels {args.fit_pixels} "
        f"--bootstrap {args.bootstrap}`"
        + ("" if seconds is None else f" ({seconds / 60:.1f} min)")
        + ".",
        f"Mean ± standard deviation over {len(args.seeds)} seeds (image-level split of the "
        "calibration slices and every calibrator's randomness); lower is better except "
        "accuracy and mIoU.",
        "",
    ]
    if guards is not None and DEFAULT in labels:
        lines += ratio_report(results, guards, tallies, args.seeds, args.bootstrap)
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
        "## ECE ratio to temperature scaling (mean ± std over seeds)",
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


def _boundary_definition() -> str:
    try:
        from sksegcal.metrics import boundary_mask  # noqa: F401
    except ImportError:
        return f"local: within {BOUNDARY_WIDTH} px, Euclidean, of a label change"
    return "sksegcal.metrics.boundary_mask with its defaults: within 2 px, Chebyshev"


def _detector_name(classifier) -> str:
    steps = getattr(classifier, "steps", None)
    if steps is not None:
        return "Pipeline(" + ", ".join(type(step).__name__ for _, step in steps) + ")"
    return type(classifier).__name__


def _commit() -> str:
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "sksegcal"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes to sksegcal/" if dirty else "")


def _non_default_free_params(estimator) -> str:
    """The estimator's parameters as the package sets them (what a user gets)."""
    params = estimator.get_params(deep=False)
    return ", ".join(
        f"{k}={v!r}"
        for k, v in params.items()
        if k not in ("chunk_size", "memory", "random_state", "ignore_index")
    )


def spatial_markdown(
    results, detection, timings, args, guards, tallies, seconds, commit="unknown"
) -> str:
    lines = [
        "# Quality benchmark: regimes, spatial variants, perturbed fits",
        "",
        "Generated by `python benchmarks/quality.py --methods spatial "
        f"--datasets {' '.join(args.datasets)} --seeds {' '.join(map(str, args.seeds))} "
        f"--regimes {' '.join(args.regimes)} --fit-pixels {args.fit_pixels} "
        f"--lts-pixels {args.lts_pixels}"
        + ("" if args.only is None else f" --only {' '.join(args.only)}")
        + f" --bootstrap {args.bootstrap}` "
        f"({seconds / 60:.1f} min).",
        f"{len(args.seeds)} seeds (image-level split of the calibration slices and every "
        "calibrator's randomness).",
        "",
        f"Package: commit {commit} (at the start of the run); the default's parameters: "
        f"`{_non_default_free_params(SelectiveScalingCalibrator())}`; "
        f"LocalTemperatureScaling: `{_non_default_free_params(LocalTemperatureScaling())}`; "
        f"CalibratorSearchCV: `{_non_default_free_params(CalibratorSearchCV())}`; "
        "the detector the default fitted: "
        + ", ".join(sorted({g["detector"] for (_, _, m), g in guards.items() if m == DEFAULT}))
        + ".",
        "",
    ]
    lines += regime_report(
        results, detection, timings, guards, tallies, args.seeds, args.bootstrap
    )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mni152-tissue"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-fit-pixels", type=int, default=200_000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument(
        "--fit-pixels",
        type=int,
        default=1_000_000,
        help="pixels every method is fitted on (a seeded subsample)",
    )
    parser.add_argument(
        "--methods",
        choices=("core", "all", "spatial"),
        default="core",
        help="core: Uncalibrated, TS, the default, the default with "
        "guard=None, the paper's recipe; all: every variant; spatial: "
        "Uncalibrated, TS, the default (and guard=None), the default "
        "with context='spatial', LocalTemperatureScaling, and TS / "
        "default / spatial fitted on original + perturbed calibration "
        "images, on every --regimes, with boundary / interior ECE",
    )
    parser.add_argument(
        "--regimes",
        nargs="+",
        default=list(REGIMES),
        choices=REGIMES,
        help="with --methods spatial: the model regimes (merged-* on aal)",
    )
    parser.add_argument(
        "--lts-pixels",
        type=int,
        default=50_000,
        help="with --methods spatial: LocalTemperatureScaling's fit sample",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(ONLY),
        default=None,
        help="with --methods spatial: run only these methods beside Uncalibrated, TS and "
        "the default (all when not given)",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples of the test slices for the ratio intervals",
    )
    parser.add_argument("--out", default=None, help="write the Markdown report here")
    parser.add_argument(
        "--json",
        default=None,
        help="write every metric per case, method and seed, and the guard's "
        "choices, here (full precision)",
    )
    args = parser.parse_args(argv)
    results = defaultdict(lambda: defaultdict(list))
    detection = defaultdict(lambda: defaultdict(list))
    timings = defaultdict(list)
    guards, tallies = {}, {}
    start = time.perf_counter()
    commit = _commit()  # the package as imported, not as it may be when the run ends
    if args.methods == "spatial":
        for name in args.datasets:
            run_regimes(
                name,
                args.seeds,
                args.regimes,
                results,
                detection,
                timings,
                guards,
                tallies,
                args.fit_pixels,
                args.lts_pixels,
                only=args.only,
            )
        report = spatial_markdown(
            results,
            detection,
            timings,
            args,
            guards,
            tallies,
            time.perf_counter() - start,
            commit,
        )
    else:
        for name in args.datasets:
            run_dataset(
                name,
                args.seeds,
                args.max_fit_pixels,
                args.epochs,
                results,
                detection,
                timings,
                args.fit_pixels,
                args.methods,
                guards,
                tallies,
            )
        report = markdown(
            results, detection, timings, args, guards, tallies, time.perf_counter() - start
        )
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if args.json:
        import json

        dump = {
            "results": {
                c: {
                    m: [{k: float(v) for k, v in r.items() if np.isscalar(v)} for r in rs]
                    for m, rs in by.items()
                }
                for c, by in results.items()
            },
            "guards": [
                {
                    "dataset": d,
                    "seed": s,
                    "method": m,
                    **{
                        k: (None if v is None else v if isinstance(v, str) else float(v))
                        for k, v in g.items()
                    },
                }
                for (d, s, m), g in guards.items()
            ],
        }
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
