"""The ``sksegcal`` command: extract, fit, evaluate, report, and the demo.

``sksegcal demo`` is the whole job on the embedded default (see
:mod:`sksegcal.datasets`): a small U-Net (trained once, cached), its logits on
held-out and shifted slices, a :class:`~sksegcal.store.LogitStore`, an
image-level split, temperature scaling and selective scaling (t2 chosen by a
grid search on the calibrator-validation images), evaluation on the test
images in and out of domain, and a report folder.

The other subcommands are the same steps for your own data::

    sksegcal extract --logits logits.npy --labels labels.npy --store my-store
    sksegcal fit my-store --method selective --output selective.joblib
    sksegcal fit my-store --method temperature --output ts.joblib
    sksegcal evaluate my-store --calibrator ts.joblib --calibrator selective.joblib \\
        --output results
    sksegcal report results

Errors the user can fix (a missing file, a store with another class count, a
corrupt store) end the command with exit status 1 and one line on stderr;
``SKSEGCAL_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main"]

_METRICS = ("ece", "mce", "nll", "brier", "accuracy", "miou")
_HEADERS = {"ece": "ECE", "mce": "MCE", "nll": "NLL", "brier": "Brier", "accuracy": "accuracy",
            "miou": "mIoU"}
# what must match when `extract` resumes a store (not the sksegcal version)
_EXTRACT_SOURCE_KEYS = ("logits", "labels", "dataset", "subset", "net")
_UNCALIBRATED = "uncalibrated"
_TS = "temperature scaling"
_SELECTIVE = "selective scaling"
_SPLIT_NAMES = {"test": "test (in-domain)", "shifted-test": "shifted test (acquisition shift)"}

# Training settings of the demo's network per dataset; "quick" is for tests and smoke runs.
# The full settings train to a small training loss on one acquisition of each model slice,
# so the network overfits a little and is over-confident, as trained segmentation nets are.
_DEMO_SETTINGS = {
    ("mni152-tissue", False): {
        # 150 epochs: the training loss falls to 0.04 and the network ends over-confident on
        # held-out slices (temperature about 1.3 in-domain, 2 under the shift); at 60 epochs it
        # was nearly calibrated (1.06), unlike the segmentation networks users bring
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 2,
                 "n_shifted_acquisitions": 2},
        "net": {"width": 16, "epochs": 150},
    },
    ("aal", False): {
        # atlas regions are defined by position more than by intensity: a 5-level U-Net sees
        # the whole slice (a 3-level one reached an mIoU of 0.01, this one about 0.1-0.2)
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 2,
                 "n_shifted_acquisitions": 2},
        "net": {"width": 12, "depth": 5, "epochs": 100},
    },
    ("mni152-tissue", True): {
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 1,
                 "n_shifted_acquisitions": 1, "slice_step": 3},
        "net": {"width": 8, "epochs": 15},
    },
    ("aal", True): {
        "data": {"n_model_acquisitions": 1, "n_calibration_acquisitions": 1,
                 "n_shifted_acquisitions": 1, "slice_step": 3},
        "net": {"width": 8, "epochs": 15},
    },
}


class CommandError(Exception):
    """An error the user can fix; reported as one line, exit status 1."""


# --------------------------------------------------------------------------- helpers
def _progress(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar when tqdm is installed and stderr is a terminal, else the iterable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the demo extra)
        return _NoBar(iterable)
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, pipes)
    return tqdm(iterable, disable=None if enabled else True, file=sys.stderr, **kwargs)


class _NoBar:
    def __init__(self, iterable=None):
        self.iterable = iterable

    def __iter__(self):
        return iter(self.iterable)

    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _say(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr, flush=True)


def _need_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"{what} {path} does not exist (or is not a file).")
    return path


def _open_store(path, *, n_classes: int | None = None):
    from .store import LogitStore

    path = Path(path)
    if not path.exists():
        raise CommandError(f"the store {path} does not exist; create it with 'sksegcal extract'.")
    return LogitStore.open(path, n_classes=n_classes)


def _load_calibrator(path):
    import joblib

    path = _need_file(path, "the calibrator")
    try:
        obj = joblib.load(path)
    except Exception as exc:  # unpickling garbage can raise nearly anything
        raise CommandError(f"cannot load the calibrator {path}: {exc!r}") from None
    if not hasattr(obj, "predict_proba"):
        raise CommandError(f"{path} holds a {type(obj).__name__}, not a calibrator "
                           "(no predict_proba); save one with 'sksegcal fit'.")
    return obj


def _image_ids(store, images: str) -> np.ndarray:
    """Store image ids of 'all', 'train', 'validation', 'test' (the recorded split)."""
    if images == "all":
        return np.arange(store.n_images)
    split = store.split
    if split is None:
        raise CommandError(
            f"the store {store.path} has no recorded split, so there is no {images!r} part; "
            "run 'sksegcal fit' (which records one) or pass --images all."
        )
    return np.asarray(getattr(split, images))


def _format_table(results: dict, *, extra: dict | None = None) -> str:
    """Plain-text tables, one per evaluated split, methods as rows."""
    lines = []
    width = max(len(m) for split in results.values() for m in split) + 2
    for split, methods in results.items():
        first = next(iter(methods.values()))
        head = f"{_SPLIT_NAMES.get(split, split)}: {int(first['n_pixels']):,} pixels"
        if extra and split in extra:
            head += f", {extra[split]}"
        lines.append(head)
        lines.append("method".ljust(width) + "".join(f"{_HEADERS[k]:>10}" for k in _METRICS))
        for name, summary in methods.items():
            lines.append(name.ljust(width) + "".join(f"{summary[k]:>10.4f}" for k in _METRICS))
        lines.append("")
    return "\n".join(lines).rstrip()


def _markdown_table(methods: dict) -> str:
    rows = ["| method | " + " | ".join(_HEADERS[k] for k in _METRICS) + " |",
            "|---|" + "---:|" * len(_METRICS)]
    for name, s in methods.items():
        rows.append(f"| {name} | " + " | ".join(f"{s[k]:.4f}" for k in _METRICS) + " |")
    return "\n".join(rows)


def _summaries(accumulators: dict) -> dict:
    """{split: {method: summary dict}} from {split: {method: CalibrationAccumulator}}."""
    return {split: {name: {k: float(v) for k, v in acc.summary().items()}
                    for name, acc in accs.items()}
            for split, accs in accumulators.items()}


def _write_metrics(output: Path, summaries: dict, meta: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "metrics.json", "w") as f:
        json.dump({**meta, "results": summaries}, f, indent=2, default=_json_default)
    keys = sorted({k for methods in summaries.values() for s in methods.values() for k in s},
                  key=lambda k: (k not in _METRICS, _METRICS.index(k) if k in _METRICS else 0, k))
    with open(output / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "method", *keys])
        for split, methods in summaries.items():
            for name, s in methods.items():
                writer.writerow([split, name, *(s.get(k, "") for k in keys)])


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _write_report(output: Path, accumulators: dict, meta: dict, *, examples=None) -> list[str]:
    """Reliability diagrams (PNG), metrics (JSON, CSV) and a Markdown page; returns file names."""
    summaries = _summaries(accumulators)
    _write_metrics(output, summaries, meta)
    written = ["metrics.json", "metrics.csv"]
    figures = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots_note = "matplotlib is not installed (pip install 'sksegcal[plots]'): no figures."
    else:
        from .plotting import plot_reliability_diagram

        plots_note = ""
        for split, accs in accumulators.items():
            name = f"reliability_{split}.png"
            fig = plot_reliability_diagram(
                accs, title=f"{meta.get('dataset', '')} - {_SPLIT_NAMES.get(split, split)}",
                path=output / name)
            _close(fig)
            figures[split] = name
            written.append(name)
        if examples is not None:
            _plot_examples(output / "examples.png", **examples)
            written.append("examples.png")
    md = [f"# sksegcal calibration report: {meta.get('dataset', 'your data')}", ""]
    if meta.get("description"):
        md += [meta["description"], ""]
    if meta.get("command"):
        md += ["Made by:", "", f"    {meta['command']}", ""]
    for split, methods in summaries.items():
        first = next(iter(methods.values()))
        md += [f"## {_SPLIT_NAMES.get(split, split)}", "",
               f"{int(first['n_pixels']):,} pixels. ECE and MCE: top-label, 15 equal-width "
               "bins. A temperature never changes a pixel's argmax, so accuracy and mIoU are "
               "the network's (unless t2 = 1e10 makes rows exactly uniform: the metrics, "
               "taking the argmax of the calibrated probabilities, then see class 0).",
               "", _markdown_table(methods), ""]
        if split in figures:
            md += [f"![reliability diagrams]({figures[split]})", ""]
    if examples is not None and "examples.png" in written:
        md += ["## Example slices", "", "![examples](examples.png)", ""]
    if meta.get("calibrators"):
        md += ["## Calibrators", ""]
        for name, info in meta["calibrators"].items():
            if isinstance(info, dict):
                info = ", ".join(f"{k} = {_fmt_value(v)}" for k, v in info.items())
            md += [f"- **{name}**: {info}"]
        md += [""]
    if meta.get("timings"):
        md += ["## Timings (seconds)", ""]
        md += [f"- {k}: {v:.1f}" for k, v in meta["timings"].items()] + [""]
    if plots_note:
        md += [plots_note, ""]
    (output / "report.md").write_text("\n".join(md))
    written.append("report.md")
    return written


def _close(fig) -> None:
    with contextlib.suppress(Exception):
        import matplotlib.pyplot as plt

        plt.close(fig)


def _plot_examples(path, *, images, labels, probs, class_names, rows=3):
    """A few test slices: image, labels, prediction, confidence before and after calibration."""
    from matplotlib.figure import Figure

    n = min(rows, len(images))
    cols = ["image", "labels", "prediction"] + [f"confidence: {m}" for m in probs]
    fig = Figure(figsize=(2.2 * len(cols), 2.4 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, len(cols), squeeze=False)
    n_classes = len(class_names)
    cmap = "tab20" if n_classes > 10 else "viridis"
    first = next(iter(probs.values()))
    for r in range(n):
        pred = first[r].argmax(axis=0)
        panels = [(images[r, 0], "gray", None), (labels[r], cmap, (0, n_classes - 1)),
                  (pred, cmap, (0, n_classes - 1))]
        panels += [(p[r].max(axis=0), "magma", (1.0 / n_classes, 1.0)) for p in probs.values()]
        for c, (img, cm, lim) in enumerate(panels):
            ax = axes[r, c]
            im = ax.imshow(img, cmap=cm, interpolation="nearest",
                           **({} if lim is None else {"vmin": lim[0], "vmax": lim[1]}))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            if r == n - 1 and c >= 3:
                fig.colorbar(im, ax=ax, orientation="horizontal", fraction=0.05, pad=0.02)
    fig.savefig(path, dpi=110)


@contextlib.contextmanager
def _threads(n: int | None):
    """Limit BLAS/OpenMP and torch threads to ``n`` (None: leave them alone).

    On a small shared machine, OpenMP spin-waiting makes 2 threads several
    times slower than 1 (gradient boosting: 24 s instead of 4 s on a loaded
    2-core machine), so the demo defaults to one thread.
    """
    if n is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- demo
def _demo(args) -> int:
    # the temporary folder (stores unless --keep-stores) goes away even on errors
    with _threads(args.threads or None), \
            tempfile.TemporaryDirectory(prefix="sksegcal-demo-") as workdir:
        return _run_demo(args, Path(workdir))


def _run_demo(args, workdir: Path) -> int:
    import joblib

    from . import __version__
    from ._segnet import SegNetConfig, load_or_train, predict_logits
    from .datasets import load_dataset
    from .pixels import ImageSplit, split_images
    from .scaling import TemperatureScaling
    from .store import LogitStore, evaluate_store, fit_store

    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    settings = _DEMO_SETTINGS[(args.dataset, args.quick)]
    output = Path(args.output)

    _say(args, f"[1/6] loading the {args.dataset} data")
    t0 = time.perf_counter()
    data = load_dataset(args.dataset, random_state=0, cache_dir=_data_cache(args),
                        **settings["data"])
    timings["data"] = time.perf_counter() - t0

    _say(args, "[2/6] segmentation network (a small U-Net; trained once, then cached)")
    t0 = time.perf_counter()
    train = data.select("model")
    config = SegNetConfig(**settings["net"])
    bar = _progress(total=config.epochs, enabled=not args.quiet, desc="training", unit="epoch")

    def on_epoch(epoch, loss):
        bar.update(1)
        bar.set_postfix_str(f"loss {loss:.4f}")

    model, net_info = load_or_train(
        args.dataset, train.images, train.labels, data.n_classes, config,
        cache=args.cache_dir, use_cache=not args.no_cache, progress=on_epoch)
    bar.close()
    _say(args, "      " + (f"loaded from {net_info['path']}" if net_info["cached"] else
                         f"trained in {net_info['train_seconds']:.0f} s"
                         + (f", cached at {net_info['path']}" if net_info["path"] else "")))
    timings["network"] = time.perf_counter() - t0

    _say(args, "[3/6] logits of the held-out slices into LogitStores")
    t0 = time.perf_counter()
    store_root = output / "stores" if args.keep_stores else workdir
    stores = {}
    for subset in ("calibration", "shifted"):
        part = data.select(subset)
        path = store_root / subset
        if path.exists():
            if not _is_demo_store(path):
                raise CommandError(f"{path} exists and is not a store an earlier demo wrote; "
                                   "choose another --output.")
            import shutil

            shutil.rmtree(path)  # an earlier demo's store: rebuild it
        store = LogitStore.create(
            path, n_classes=data.n_classes, class_names=data.class_names,
            source={"dataset": args.dataset, "subset": subset, "model": "sksegcal._segnet.UNet",
                    "net": net_info["config"], "sksegcal": __version__})
        for start in _progress(range(0, len(part), 16), enabled=not args.quiet,
                               desc=f"{subset} logits", unit="batch"):
            logits = predict_logits(model, part.images[start:start + 16])
            for k, z in enumerate(logits):
                i = start + k
                name = f"z{part.slice_index[i]:03d}-{i:04d}"
                store.add_image(name, z, part.labels[i])
        stores[subset] = (store, part)
    timings["logits"] = time.perf_counter() - t0

    _say(args, "[4/6] image-level split: calibrator train / validation / test, by slice")
    cal_store, cal_part = stores["calibration"]
    # split by slice: several acquisitions of one slice must land in the same part
    slice_split = split_images(cal_part.slice_index, validation_size=0.25, test_size=0.25,
                               random_state=args.seed)

    def ids_of(store, part, slices):
        names = [f"z{part.slice_index[i]:03d}-{i:04d}" for i in range(len(part))
                 if part.slice_index[i] in set(slices.tolist())]
        return np.sort([store.image_id(n) for n in names]).astype(np.int64)

    split = ImageSplit(*(ids_of(cal_store, cal_part, s) for s in slice_split))
    cal_store.split = split
    shifted_store, shifted_part = stores["shifted"]
    shifted_test = ids_of(shifted_store, shifted_part, slice_split.test)
    fit_ids = np.concatenate([split.train, split.validation])

    _say(args, "[5/6] fitting temperature scaling and selective scaling")
    t0 = time.perf_counter()
    max_pixels = 60_000 if args.quick else 400_000
    ts = fit_store(TemperatureScaling(), cal_store, images=fit_ids, max_pixels=max_pixels,
                   random_state=args.seed)
    selective, search = _fit_selective(
        cal_store, split, max_pixels=max_pixels, seed=args.seed, quick=args.quick,
        classifier=args.classifier, t2_grid=["auto", 2.0, 1e10], t1_grid=[1.0, "auto"],
        features=_features_for(data.n_classes))
    timings["calibrators"] = time.perf_counter() - t0

    _say(args, "[6/6] evaluating on the test slices, in-domain and shifted")
    t0 = time.perf_counter()
    calibrators = {_UNCALIBRATED: None, _TS: ts, _SELECTIVE: selective}
    accumulators = {
        "test": evaluate_store(cal_store, calibrators, images=split.test),
        "shifted-test": evaluate_store(shifted_store, calibrators, images=shifted_test),
    }
    timings["evaluation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    joblib.dump(selective, output / "calibrator.joblib")
    joblib.dump(ts, output / "temperature_scaling.joblib")
    # three test slices with the most tissue, one acquisition each: the interesting ones
    test_rows = np.flatnonzero(np.isin(cal_part.slice_index, slice_split.test))
    _, first = np.unique(cal_part.slice_index[test_rows], return_index=True)
    test_rows = test_rows[first]
    tissue = (cal_part.labels[test_rows] > 0).sum(axis=(1, 2))
    test_rows = np.sort(test_rows[np.argsort(-tissue, kind="stable")[:3]])
    example_logits = predict_logits(model, cal_part.images[test_rows])
    from .features import softmax
    from .pixels import predict_proba_maps

    examples = {
        "images": cal_part.images[test_rows], "labels": cal_part.labels[test_rows],
        "class_names": data.class_names,
        "probs": {_UNCALIBRATED: softmax(example_logits),
                  _SELECTIVE: predict_proba_maps(selective, example_logits)},
    }
    calibrator_info = {
        _TS: {"temperature": round(float(ts.temperature_), 4)},
        _SELECTIVE: _selective_info(selective, search),
    }
    counts = {
        "test": f"{len(split.test)} images of {len(slice_split.test)} slices",
        "shifted-test": f"{len(shifted_test)} images of {len(slice_split.test)} slices",
    }
    command = "sksegcal demo" + (" --quick" if args.quick else "") + (
        f" --dataset {args.dataset}" if args.dataset != "mni152-tissue" else "") + (
        f" --seed {args.seed}" if args.seed else "")
    meta = {
        "dataset": args.dataset,
        "description": data.description,
        "command": command,
        "sksegcal": __version__,
        "seed": args.seed,
        "quick": args.quick,
        "network": {"cached": net_info["cached"], "config": net_info["config"],
                    "train_seconds": round(net_info["train_seconds"], 1),
                    "final_train_loss": (round(net_info["losses"][-1], 4)
                                         if net_info["losses"] else None)},
        "split": {"train_images": len(split.train), "validation_images": len(split.validation),
                  "test_images": len(split.test), "shifted_test_images": len(shifted_test),
                  "test_slices": slice_split.test.tolist()},
        "calibrators": calibrator_info,
        "timings": timings,
    }
    written = _write_report(output, accumulators, meta, examples=examples)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    # rewrite with the final timings (the report step's own time included)
    _write_metrics(output, _summaries(accumulators), meta)

    print(f"sksegcal demo: {args.dataset} ({data.n_classes} classes), seed {args.seed}"
          + (", quick" if args.quick else ""))
    print(f"temperature scaling: T = {ts.temperature_:.3f}")
    print("selective scaling:")
    for key, value in calibrator_info[_SELECTIVE].items():
        if isinstance(value, dict):
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
        else:
            print(f"  {key}: {value}")
    print()
    print(_format_table(_summaries(accumulators), extra=counts))
    print()
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(f"report: {output}/ ({', '.join(written)}, calibrator.joblib, "
          "temperature_scaling.joblib)")
    return 0


def _is_demo_store(path: Path) -> bool:
    """Whether ``path`` holds a LogitStore written by ``sksegcal demo`` (safe to replace)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        return manifest["format"] == "sksegcal.LogitStore" and "subset" in manifest["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _data_cache(args):
    """The dataset cache: the network cache folder, unless caching is off."""
    if getattr(args, "no_cache", False):
        return None
    from ._segnet import cache_dir

    return cache_dir(args.cache_dir)


def _features_for(n_classes: int) -> str:
    """What the correctness classifier sees in the demo: the calibrator's default.

    The class-agnostic summary (sorted top-5 log-probabilities, entropy, margin)
    detected mispredictions better than the full log-probability vector on the
    real cases and kept that under the shift (docs/quality.md); at AAL's 117
    classes it also trains in seconds instead of minutes.
    """
    return "agnostic"


def _make_classifier(name: str, seed: int, quick: bool):
    """The correctness classifier of selective scaling (None: the calibrator's default)."""
    if name == "default":
        return None
    if name == "mlp":
        from .mlp import TorchMLPClassifier

        # the paper's MLP; fewer epochs when quick
        return TorchMLPClassifier(max_epochs=5 if quick else 40, random_state=seed)
    if name == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=30 if quick else 200,
                                              early_stopping=False, random_state=seed)
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=500)
    raise CommandError(f"unknown classifier {name!r}; choose default, mlp, hgb or logistic.")


def _fit_selective(store, split, *, max_pixels, seed, quick, classifier, t2_grid,
                   t1_grid=(1.0,), features="agnostic"):
    """SelectiveScalingCalibrator with t1/t2 chosen on the validation images (PredefinedSplit).

    The grid search scores each candidate by NLL on the calibrator-validation
    images and refits the best one on train + validation. A joblib cache lets
    the candidates share fitted correctness classifiers, and metadata routing
    passes the image ids on to ``fit`` so that "auto" temperatures are fitted
    on held-out whole images, not on pixels of images the classifier saw.
    """
    import sklearn
    from joblib import Memory
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    from .selective import SelectiveScalingCalibrator

    ids = np.concatenate([split.train, split.validation])
    X, y, groups = store.sample(max_pixels, images=ids, random_state=seed)
    fold = split.test_fold(groups)
    grid = {"t1": list(t1_grid), "t2": list(t2_grid)}
    with tempfile.TemporaryDirectory(prefix="sksegcal-memory-") as cache:
        base = SelectiveScalingCalibrator(
            _make_classifier(classifier, seed, quick), features=features, random_state=seed,
            memory=Memory(cache, verbose=0))
        if len(grid["t1"]) == 1 and len(grid["t2"]) == 1:
            best = base.set_params(t1=grid["t1"][0], t2=grid["t2"][0], memory=None)
            return best.fit(X, y, groups=groups), None
        with sklearn.config_context(enable_metadata_routing=True):
            base.set_fit_request(groups=True, sample_weight=False)
            search = GridSearchCV(base, grid, cv=PredefinedSplit(fold), refit=True,
                                  error_score="raise")
            search.fit(X, y, groups=groups)
        best = search.best_estimator_
    # the cache folder is gone: keep the fitted calibrator free of a dangling Memory
    best.set_params(memory=None)
    return best, search


def _selective_info(selective, search) -> dict:
    info = {}
    if search is not None:
        params = search.cv_results_["params"]
        nll = [round(-float(s), 4) for s in search.cv_results_["mean_test_score"]]
        info["validation NLL"] = {f"t1={_fmt_t(p['t1'])} t2={_fmt_t(p['t2'])}": v
                                  for p, v in zip(params, nll)}
        info["chosen"] = f"t1={_fmt_t(search.best_params_['t1'])} " \
                         f"t2={_fmt_t(search.best_params_['t2'])}"
    info["features"] = selective.features
    info["mode"] = selective.mode
    if selective.mode == "hard" and hasattr(selective, "threshold_"):
        info["threshold"] = round(float(selective.threshold_), 4)
    info["t1"] = round(float(selective.t1_), 4)
    info["t2"] = _fmt_t(float(selective.t2_))
    auroc = getattr(selective, "detection_auroc_", None)
    if auroc is not None:
        info["misprediction AUROC"] = round(float(auroc), 4)
    return info


def _fmt_value(value) -> str:
    if isinstance(value, dict):
        return "(" + ", ".join(f"{k}: {v}" for k, v in value.items()) + ")"
    return str(value)


def _fmt_t(value):
    if isinstance(value, str):
        return value
    return f"{value:.3g}" if value < 1e6 else f"{value:.0e}"


# --------------------------------------------------------------------------- extract
def _extract_mmseg(args) -> int:
    """``extract --config``: an mmsegmentation model over its own test (or val) set."""
    try:
        from .integrations.mmseg import extract_logits
    except ImportError as exc:
        raise CommandError(
            f"--config needs mmsegmentation ({exc}); install it with "
            "pip install -c constraints.txt 'sksegcal[mmseg]'."
        ) from None
    _need_file(args.config, "the mmsegmentation config")
    if args.checkpoint is not None:
        _need_file(args.checkpoint, "the checkpoint")
    store = extract_logits(
        args.config, args.split, args.store, checkpoint=args.checkpoint, device=args.device,
        size=tuple(args.size) if args.size else None, batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(f"{args.store}: {store.n_images} images, {store.n_classes} classes, "
          f"{store.n_pixels:,} labelled pixels")
    return 0


def _extract(args) -> int:
    from .store import LogitStore

    if args.config is not None:
        return _extract_mmseg(args)
    if args.logits is not None:
        if args.labels is None:
            raise CommandError("--logits needs --labels (an (N, H, W) integer .npy file).")
        logits = np.load(_need_file(args.logits, "the logits file"), mmap_mode="r")
        labels = np.load(_need_file(args.labels, "the labels file"), mmap_mode="r")
        if logits.ndim != 4:
            raise CommandError(f"{args.logits} must hold (N, C, H, W) logits, got shape "
                               f"{logits.shape}.")
        if labels.shape != (logits.shape[0],) + logits.shape[2:]:
            raise CommandError(f"{args.labels} has shape {labels.shape} but the logits need "
                               f"{(logits.shape[0],) + logits.shape[2:]} (N, H, W).")
        class_names = args.class_names.split(",") if args.class_names else None
        source = {"logits": str(args.logits), "labels": str(args.labels)}
        n_classes = logits.shape[1]
        names = list(range(len(logits)))
        get = lambda i: (np.asarray(logits[i], dtype=np.float32), np.asarray(labels[i]))  # noqa: E731
    else:
        from . import __version__
        from ._segnet import SegNetConfig, load_or_train, predict_logits
        from .datasets import load_dataset

        settings = _DEMO_SETTINGS[(args.dataset, args.quick)]
        data = load_dataset(args.dataset, random_state=0, cache_dir=_data_cache(args),
                            **settings["data"])
        train = data.select("model")
        config = SegNetConfig(**settings["net"])
        bar = _progress(total=config.epochs, enabled=not args.quiet, desc="training",
                        unit="epoch")
        model, net_info = load_or_train(args.dataset, train.images, train.labels,
                                        data.n_classes, config, cache=args.cache_dir,
                                        progress=lambda e, loss: bar.update(1))
        bar.close()
        part = data.select(args.subset)
        class_names = list(data.class_names)
        n_classes = data.n_classes
        source = {"dataset": args.dataset, "subset": args.subset, "sksegcal": __version__,
                  "net": net_info["config"]}
        names = [f"z{part.slice_index[i]:03d}-{i:04d}" for i in range(len(part))]

        def get(i):
            return predict_logits(model, part.images[i:i + 1])[0], part.labels[i]

    store = LogitStore.create(args.store, n_classes=n_classes, class_names=class_names,
                              ignore_index=args.ignore_index, source=source, exist_ok=True,
                              match_source=_EXTRACT_SOURCE_KEYS)
    todo = store.missing(names)  # resumable: images already written are skipped
    position = {name: i for i, name in enumerate(names)}
    for name in _progress(todo, enabled=not args.quiet, desc="extract", unit="image"):
        z, t = get(position[name])
        store.add_image(name, z, t)
    print(f"{args.store}: {len(store.refresh())} images, {n_classes} classes, "
          f"{store.n_pixels:,} labelled pixels ({len(todo)} written now)")
    return 0


# --------------------------------------------------------------------------- fit
def _fit(args) -> int:
    import joblib

    from .scaling import TemperatureScaling
    from .store import fit_store

    # parse before anything is written into the store
    grid = [_parse_t2(v) for v in args.t2]
    t1_grid = [_parse_t2(v, "--t1") for v in args.t1]
    store = _open_store(args.store, n_classes=args.n_classes)
    split = store.split
    if split is None or args.resplit:
        split = store.make_split(validation_size=args.validation_size,
                                 test_size=args.test_size, random_state=args.seed)
        _say(args, f"recorded a split of {store.n_images} images: {len(split.train)} train / "
                   f"{len(split.validation)} validation / {len(split.test)} test")
    fit_ids = np.concatenate([split.train, split.validation])
    t0 = time.perf_counter()
    if args.method == "temperature":
        est = fit_store(TemperatureScaling(), store, images=fit_ids, max_pixels=args.max_pixels,
                        random_state=args.seed)
        info = {"temperature": round(float(est.temperature_), 4)}
    else:
        est, search = _fit_selective(store, split, max_pixels=args.max_pixels, seed=args.seed,
                                     quick=False, classifier=args.classifier, t2_grid=grid,
                                     t1_grid=t1_grid, features=args.features)
        info = _selective_info(est, search)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(est, output)
    print(f"{args.method}: " + ", ".join(f"{k} = {_fmt_value(v)}" for k, v in info.items())
          + f" ({time.perf_counter() - t0:.1f} s); saved to {output}")
    return 0


def _parse_t2(value: str, option: str = "--t2"):
    if value == "auto":
        return "auto"
    try:
        t = float(value)
    except ValueError:
        raise CommandError(f"{option} takes 'auto' or positive numbers, got {value!r}.") \
            from None
    if not t > 0:
        raise CommandError(f"{option} must be positive, got {value!r}.")
    return t


# --------------------------------------------------------------------------- evaluate
def _evaluate(args) -> int:
    import joblib

    from .store import evaluate_store

    store = _open_store(args.store)
    calibrators = {_UNCALIBRATED: None}
    for path in args.calibrator or []:
        est = _load_calibrator(path)
        n_features = getattr(est, "n_features_in_", None)
        if n_features is not None and n_features != store.n_classes:
            raise CommandError(
                f"the calibrator {path} was fitted on {n_features} classes but the store "
                f"{store.path} has {store.n_classes}; fit it on logits of the same model.")
        calibrators[Path(path).stem] = est
    ids = _image_ids(store, args.images)
    split_name = args.images if args.images != "all" else "all images"
    _say(args, f"evaluating {len(calibrators)} methods on {len(ids)} images of {store.path}")
    accumulators = {split_name: evaluate_store(store, calibrators, images=ids,
                                               n_jobs=args.n_jobs)}
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    meta = {"store": str(store.path), "images": args.images,
            "calibrators": {name: str(p) for name, p in
                            zip(list(calibrators)[1:], args.calibrator or [])},
            "dataset": store.source.get("dataset", str(store.path)),
            "class_names": store.class_names}
    _write_metrics(output, _summaries(accumulators), meta)
    joblib.dump({"accumulators": accumulators, "meta": meta}, output / "accumulators.joblib")
    print(_format_table(_summaries(accumulators)))
    print(f"\nwritten: {output}/metrics.json, metrics.csv, accumulators.joblib "
          f"(make figures with: sksegcal report {output})")
    return 0


# --------------------------------------------------------------------------- report
def _report(args) -> int:
    import joblib

    results = Path(args.results)
    path = results / "accumulators.joblib" if results.is_dir() else results
    path = _need_file(path, "the evaluation results")
    try:
        saved = joblib.load(path)
        accumulators, meta = saved["accumulators"], saved["meta"]
    except Exception as exc:  # unpickling garbage can raise nearly anything
        raise CommandError(f"{path} is not an 'sksegcal evaluate' result: {exc!r}") from None
    output = Path(args.output) if args.output else path.parent
    written = _write_report(output, accumulators, meta)
    print(_format_table(_summaries(accumulators)))
    print(f"\nreport: {output}/ ({', '.join(written)})")
    return 0


# --------------------------------------------------------------------------- parser
def _build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="sksegcal",
        description="Calibrate the per-pixel probabilities of segmentation models.",
        epilog="Start with 'sksegcal demo'. Set SKSEGCAL_DEBUG=1 for tracebacks.")
    parser.add_argument("--version", action="version", version=f"sksegcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p):
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no progress messages or bars (results are still printed)")

    from .datasets import DATASETS

    p = sub.add_parser(
        "demo", help="the whole job on the embedded brain-MRI default (no GPU, no internet)",
        description="Train (once; cached) a small U-Net on MNI152 slices, calibrate it with "
                    "temperature scaling and selective scaling, evaluate in-domain and under "
                    "an acquisition shift, print a table and write a report folder.")
    p.add_argument("--output", "-o", default="sksegcal-report",
                   help="report folder (default: ./sksegcal-report)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration split and the calibrators; the data and the "
                        "network are fixed so that the cached network is reused (default: 0)")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast version (fewer slices, a tiny network) for smoke tests")
    p.add_argument("--cache-dir", default=None,
                   help="network cache (default: $SKSEGCAL_CACHE or ~/.cache/sksegcal)")
    p.add_argument("--no-cache", action="store_true",
                   help="train the network afresh and do not write the cache")
    p.add_argument("--dataset", choices=DATASETS, default="mni152-tissue",
                   help="mni152-tissue (3 classes, from nilearn) or aal (117 classes; needs "
                        "'apt-get install mricron-data') (default: mni152-tissue)")
    p.add_argument("--classifier", choices=("default", "mlp", "hgb", "logistic"),
                   default="default",
                   help="correctness classifier of selective scaling: the calibrator's "
                        "default (the paper's MLP on class-agnostic features), the MLP with "
                        "40 epochs, gradient boosting or logistic regression (default: default)")
    p.add_argument("--keep-stores", action="store_true",
                   help="keep the LogitStores in OUTPUT/stores (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch, BLAS and OpenMP; 1 is the fastest on a busy "
                        "2-core machine (default: 1; 0 leaves the libraries' defaults)")
    common(p)
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "extract", help="write per-image logits and labels into a LogitStore",
        description="Fill a LogitStore from .npy arrays of any model (--logits/--labels), "
                    "or from the demo's network on an embedded dataset. Resumable: images "
                    "already in the store are skipped.")
    p.add_argument("--store", required=True, help="store folder (created or resumed)")
    p.add_argument("--config", help="an mmsegmentation config: extract its model's logits "
                   "over the config's --split set (needs the mmseg extra)")
    p.add_argument("--checkpoint", help="with --config: the model's weights")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="with --config: which dataloader of the config (default: test)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="with --config: store logits at this size (default: each image's own)")
    p.add_argument("--device", default=None, help="with --config: torch device (default: cpu)")
    p.add_argument("--batch-size", type=int, default=1, help="with --config: images per pass")
    p.add_argument("--logits", help="(N, C, H, W) float .npy file of logits")
    p.add_argument("--labels", help="(N, H, W) integer .npy file of labels")
    p.add_argument("--class-names", help="comma-separated class names (with --logits)")
    p.add_argument("--ignore-index", type=int, default=255,
                   help="label of unlabelled pixels (default: 255)")
    p.add_argument("--dataset", choices=DATASETS, default="mni152-tissue",
                   help="without --logits: the embedded dataset (default: mni152-tissue)")
    p.add_argument("--subset", choices=("calibration", "shifted", "model"),
                   default="calibration", help="without --logits: which slices "
                                                "(default: calibration)")
    p.add_argument("--quick", action="store_true", help="without --logits: the small version")
    p.add_argument("--cache-dir", default=None, help="network cache (as in demo)")
    common(p)
    p.set_defaults(func=_extract)

    p = sub.add_parser(
        "fit", help="fit a calibrator on a store's train/validation images",
        description="Fit temperature scaling or selective scaling on the store's calibrator-"
                    "train and -validation images (a split by image is made and recorded in "
                    "the store if it has none) and save it with joblib.")
    p.add_argument("store", help="LogitStore folder")
    p.add_argument("--method", choices=("selective", "temperature"), default="selective",
                   help="default: selective")
    p.add_argument("--output", "-o", default="calibrator.joblib",
                   help="where to save it (default: calibrator.joblib)")
    p.add_argument("--t2", nargs="+", default=["auto", "2", "1e10"],
                   help="selective: t2 candidates, chosen by NLL on the validation images "
                        "(default: auto 2 1e10)")
    p.add_argument("--t1", nargs="+", default=["1"],
                   help="selective: t1 candidates (temperature of pixels called correct), "
                        "searched together with --t2 (default: 1)")
    p.add_argument("--classifier", choices=("default", "mlp", "hgb", "logistic"),
                   default="default",
                   help="selective: correctness classifier: SelectiveScalingCalibrator's "
                        "default (the paper's MLP), the MLP with 40 epochs, gradient boosting "
                        "or logistic regression (default: default)")
    p.add_argument("--features", choices=("agnostic", "log_softmax"), default="agnostic",
                   help="selective: what the classifier sees: class-agnostic summaries (the "
                        "calibrator's default) or the log-probability vector (the paper) "
                        "(default: agnostic)")
    p.add_argument("--max-pixels", type=int, default=400_000,
                   help="pixels sampled for fitting (default: 400000)")
    p.add_argument("--validation-size", type=float, default=0.25)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--resplit", action="store_true", help="replace the recorded split")
    p.add_argument("--n-classes", type=int, default=None,
                   help="check that the store has this many classes")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    common(p)
    p.set_defaults(func=_fit)

    p = sub.add_parser(
        "evaluate", help="calibration metrics of calibrators on a store",
        description="ECE, MCE, NLL, Brier, accuracy and mIoU of the uncalibrated model and of "
                    "each calibrator, streamed over the store's images.")
    p.add_argument("store", help="LogitStore folder")
    p.add_argument("--calibrator", "-c", action="append",
                   help="a joblib-saved calibrator (repeat for several)")
    p.add_argument("--images", choices=("test", "validation", "train", "all"), default="test",
                   help="which images (default: the recorded split's test images)")
    p.add_argument("--output", "-o", default="sksegcal-results",
                   help="results folder (default: ./sksegcal-results)")
    p.add_argument("--n-jobs", type=int, default=1, help="parallel workers (default: 1)")
    common(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "report", help="reliability diagrams and a Markdown page from 'evaluate' results",
        description="Read an 'sksegcal evaluate' results folder and write reliability diagrams "
                    "(PNG), metrics (JSON, CSV) and report.md.")
    p.add_argument("results", help="results folder (or its accumulators.joblib)")
    p.add_argument("--output", "-o", default=None,
                   help="report folder (default: the results folder)")
    common(p)
    p.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sksegcal`` command; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 1 on an error the user can fix (reported as one line on
        stderr), 2 on a usage error, 130 when interrupted.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = os.environ.get("SKSEGCAL_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"sksegcal {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, KeyError, ImportError) as exc:
        if debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if isinstance(exc, OSError) and getattr(exc, "filename", None) and not isinstance(
                exc, FileExistsError):
            message = f"{exc.strerror or exc}: {exc.filename}"
        message = " ".join(str(message).split())  # one line
        print(f"sksegcal {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
