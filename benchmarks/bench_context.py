"""Spatial context: its cost beside one softmax pass, and what it buys on the MNI152 demo.

    python benchmarks/bench_context.py speed            # context vs softmax, C = 19, 42, 150
    python benchmarks/bench_context.py mni152 [--quick] # detector AUROC, LTS vs TS

``speed`` times ``spatial_context`` (on the numba path and on the NumPy fallback) and
``sksegcal.features.softmax`` side by side in one process, on the same logits (16 images of
128x128 by default), interleaved, best of ``--repeat``, one thread each (``--threads`` gives
torch's softmax more), in CPU time of the process (``--clock wall`` for wall time).
``--baseline FILE`` times another copy of the module beside it (and checks that it gives the
same features). The logits are smooth random maps, so that the predicted classes form regions.

``mni152`` uses the demo's shipped U-Net (``load_demo_network``) on the embedded MNI152
tissue data: the "calibration" images are split by slice into two halves (fit / test).
It reports the AUROC of a HistGradientBoostingClassifier correctness detector on per-pixel
features (sorted top-5 log-probabilities, entropy, margin) against the same plus the six
context columns, and the ECE / NLL of TS and LocalTemperatureScaling on the held-out half
and on the shifted acquisitions of the same held-out slices.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _smooth_logits(n, c, h, w, seed=0):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c, h, w)).astype(np.float32)
    z = ndimage.uniform_filter(z, size=(1, 1, 9, 9)) * 12.0
    return np.ascontiguousarray(z, dtype=np.float32)


def _load_baseline(path: str, numba: bool):
    """Another copy of sksegcal/context.py as a module of the package, on one path.

    A copy that reads ``HAVE_NUMBA`` when it is imported (as the one before the
    compiled window kernels did) keeps the path it was imported on.
    """
    import importlib.util

    from sksegcal import _kernels

    name = f"sksegcal._context_baseline_{'numba' if numba else 'numpy'}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    saved, _kernels.HAVE_NUMBA = _kernels.HAVE_NUMBA, numba and _kernels.HAVE_NUMBA
    try:
        spec.loader.exec_module(module)
    finally:
        _kernels.HAVE_NUMBA = saved
    return module


def speed(
    n_images: int,
    size: int,
    repeat: int,
    classes: tuple[int, ...],
    threads: int,
    baseline: str | None = None,
    clock: str = "cpu",
) -> None:
    import torch

    from sksegcal import _kernels
    from sksegcal.context import spatial_context
    from sksegcal.features import softmax

    # spatial_context runs on one thread; so does the softmax it is compared with,
    # unless --threads says otherwise
    torch.set_num_threads(threads)
    have_numba = _kernels.HAVE_NUMBA
    paths = ["numba", "numpy"] if have_numba else ["numpy"]
    baselines = {}
    if baseline is not None:
        for path in paths:
            baselines[f"baseline[{path}]"] = _load_baseline(baseline, path == "numba")

    def context(path, z):
        if path in baselines:
            module = baselines[path]
            _kernels.HAVE_NUMBA = path == "baseline[numba]"
            try:
                return module.spatial_context(z)
            finally:
                _kernels.HAVE_NUMBA = have_numba
        _kernels.HAVE_NUMBA = path == "numba"
        try:
            return spatial_context(z)
        finally:
            _kernels.HAVE_NUMBA = have_numba

    paths = paths + list(baselines)

    # CPU time of the process (all its threads): on a shared machine a process waiting
    # for a core does not count, which wall time would add at random
    now = time.process_time if clock == "cpu" else time.perf_counter
    print(
        f"{n_images} images of {size}x{size}, best of {repeat}, torch threads {threads}, "
        f"{clock} time"
    )
    for c in classes:
        z = _smooth_logits(n_images, c, size, size)
        out = np.empty_like(z)
        for path in paths:
            context(path, z[:1])  # compile (or load) the numba kernels outside the timing
            if path in baselines:  # and check that the copy computes the same features
                np.testing.assert_array_equal(context(path, z[:2]), spatial_context(z[:2]))
        times = {name: np.inf for name in ["softmax", *paths]}
        for _ in range(repeat):  # interleaved, so that a change of load hits all alike
            t0 = now()
            softmax(z, out=out)
            times["softmax"] = min(times["softmax"], now() - t0)
            for path in paths:
                t0 = now()
                context(path, z)
                times[path] = min(times[path], now() - t0)
        print(f"C={c:4d}: softmax {times['softmax'] * 1e3:7.1f} ms")
        for path in paths:
            ratio = times[path] / times["softmax"]
            print(f"        {path:16s} {times[path] * 1e3:7.1f} ms, ratio to softmax {ratio:5.2f}")


def mni152(quick: bool) -> None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from sksegcal import TemperatureScaling
    from sksegcal._segnet import load_demo_network, predict_logits
    from sksegcal.datasets import load_dataset
    from sksegcal.features import features_from_logits
    from sksegcal.local_scaling import LocalTemperatureScaling
    from sksegcal.metrics import expected_calibration_error
    from sksegcal.pixels import flatten_segmentation

    data = load_dataset("mni152-tissue")
    model, _ = load_demo_network("mni152-tissue", quick=quick)
    cal, shifted = data.select("calibration"), data.select("shifted")
    slices = np.unique(cal.slice_index)
    fit_slices = slices[::2]
    t0 = time.perf_counter()
    z_cal = predict_logits(model, cal.images)
    z_shift = predict_logits(model, shifted.images)
    print(f"logits {z_cal.shape} + {z_shift.shape} in {time.perf_counter() - t0:.1f} s")

    def table(z, labels):
        X, y, _ = flatten_segmentation(z, labels, context="spatial")
        return X, y

    fit = np.isin(cal.slice_index, fit_slices)
    X_fit, y_fit = table(z_cal[fit], cal.labels[fit])
    X_test, y_test = table(z_cal[~fit], cal.labels[~fit])
    held = ~np.isin(shifted.slice_index, fit_slices)
    X_shift, y_shift = table(z_shift[held], shifted.labels[held])
    n_classes = z_cal.shape[1]
    print(
        f"{n_classes} classes; fit {len(y_fit)} px, test {len(y_test)} px, "
        f"shifted {len(y_shift)} px"
    )

    # correctness detector: per-pixel features vs per-pixel + context
    def detector_inputs(X, with_context):
        base = features_from_logits(np.ascontiguousarray(X[:, :n_classes]), "agnostic")
        return np.hstack([base, X[:, n_classes:]]) if with_context else base

    rng = np.random.default_rng(0)
    sub = rng.choice(len(y_fit), size=min(200_000, len(y_fit)), replace=False)
    correct_fit = X_fit[:, :n_classes].argmax(1) == y_fit
    for name, X_eval, y_eval in (("test", X_test, y_test), ("shifted", X_shift, y_shift)):
        correct = X_eval[:, :n_classes].argmax(1) == y_eval
        for with_context in (False, True):
            clf = HistGradientBoostingClassifier(random_state=0)
            clf.fit(detector_inputs(X_fit[sub], with_context), correct_fit[sub])
            score = clf.predict_proba(detector_inputs(X_eval, with_context))[:, 1]
            label = "per-pixel + context" if with_context else "per-pixel"
            print(f"detector AUROC ({name}, {label}): {roc_auc_score(correct, score):.4f}")

    ts = TemperatureScaling().fit(X_fit[:, :n_classes], y_fit)
    t0 = time.perf_counter()
    lts = LocalTemperatureScaling().fit(X_fit, y_fit)
    print(
        f"TS T={ts.temperature_:.3f}; LTS fit {time.perf_counter() - t0:.1f} s, "
        f"{lts.n_iter_} iterations, converged {lts.converged_}"
    )
    print("coef", dict(zip(lts.input_names_, np.round(lts.coef_, 3))))
    for name, X, y in (("test", X_test, y_test), ("shifted", X_shift, y_shift)):
        p0 = np.exp(X[:, :n_classes] - X[:, :n_classes].max(1, keepdims=True))
        p0 /= p0.sum(1, keepdims=True)
        rows = [
            ("uncalibrated", p0),
            ("TS", ts.predict_proba(X[:, :n_classes])),
            ("LTS", lts.predict_proba(X)),
        ]
        for label, p in rows:
            nll = -np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-30)))
            ece = expected_calibration_error(y, p)
            print(f"{name:8s} {label:13s} ECE {ece:.4f}  NLL {nll:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--images", type=int, default=16)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--repeat", type=int, default=7)
    s.add_argument("--classes", type=int, nargs="+", default=[19, 42, 150])
    s.add_argument("--threads", type=int, default=1, help="torch threads of the softmax")
    s.add_argument(
        "--baseline",
        help="another copy of sksegcal/context.py to time beside this one, e.g. "
        "git show 0f783a1:sksegcal/context.py > /tmp/context_before.py",
    )
    s.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    m = sub.add_parser("mni152")
    m.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.what == "speed":
        speed(
            args.images,
            args.size,
            args.repeat,
            tuple(args.classes),
            args.threads,
            args.baseline,
            args.clock,
        )
    else:
        mni152(args.quick)


if __name__ == "__main__":
    main()
