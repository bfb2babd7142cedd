"""``sksegcal demo``: the whole job on the embedded default.

Data (:mod:`sksegcal.datasets`) -> the demo's segmentation network
(:func:`_demo_network`: the one shipped in the package, or trained with
``--retrain``) -> its logits on held-out and shifted slices in two
:class:`~sksegcal.store.LogitStore` -> a split by slice -> temperature scaling
and selective scaling (its default: both temperatures fitted on held-out
images, the cross-fitted guard against losing to TS) and the calibrator search
(:class:`~sksegcal.CalibratorSearchCV` with its defaults: the family's best by
per-image NLL) -> evaluation on the test images in and out of domain -> a
report folder (:mod:`._report`). With
``--context spatial`` the detector of selective scaling also reads each pixel's
spatial context, computed per image by the store engine; by default nothing of
it is computed and the demo prints what the README shows.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .._progress import progress
from ._calibrate import make_classifier, save_calibrator, search_info, selective_info
from ._common import UNCALIBRATED, CommandError, check_output_dir, fmt_value, say, threads
from ._report import format_table, summaries, write_metrics, write_report

TS = "temperature scaling"
SELECTIVE = "selective scaling"
SEARCH = "calibrator search"
# the search's fit sample in the demo (CalibratorSearchCV's own max_cv_pixels default)
SEARCH_PIXELS = 100_000
QUICK_CV_PIXELS = 20_000
_SUBSETS = ("calibration", "shifted")
# the report's boundary band: pixels within 2 px of another label (the paper's ablation)
BOUNDARY_WIDTH = 2
# the correctness classifier's input in the demo: the calibrator's default. The
# class-agnostic summary (sorted top-5 log-probabilities, entropy, margin) detected
# mispredictions better than the full log-probability vector on the real cases and
# kept that under the shift (docs/quality.md); at AAL's 117 classes it also trains in
# seconds instead of minutes.
_FEATURES = "agnostic"


def demo(args) -> int:
    """The ``demo`` command."""
    output = check_output_dir(args.output)  # before anything is loaded or trained
    store_root = output / "stores" if args.keep_stores else None
    if store_root is not None:
        for subset in _SUBSETS:
            path = store_root / subset
            if path.exists() and not _is_demo_store(path):
                raise CommandError(
                    f"{path} exists and is not a store an earlier demo wrote; "
                    "choose another --output."
                )
    # the temporary folder (stores unless --keep-stores) goes away even on errors
    with (
        threads(args.threads or None),
        tempfile.TemporaryDirectory(prefix="sksegcal-demo-") as workdir,
    ):
        return _run_demo(args, output, store_root or Path(workdir))


def demo_data(args):
    """The embedded dataset of ``args.dataset`` at the demo's settings."""
    # the demo's settings live with the network, so that the script that made the shipped
    # weights and the demo read the same ones; imported here: ``--help`` needs no torch
    from .._segnet import DEMO_SETTINGS
    from ..datasets import load_dataset

    settings = DEMO_SETTINGS[(args.dataset, args.quick)]
    try:
        return load_dataset(
            args.dataset, random_state=0, cache_dir=_data_cache(args), **settings["data"]
        )
    except (FileNotFoundError, ImportError) as exc:  # data or a package to install
        raise CommandError(str(exc)) from None


def _demo_network(args, data):
    """The demo's segmentation network for ``data``: (model, info).

    By default the network shipped in the package (trained once with the demo's
    settings, see :func:`sksegcal._segnet.load_demo_network`): every machine
    computes the same logits, so the demo prints the README's numbers. With
    ``--retrain`` a U-Net is trained on the model slices (cached in
    ``--cache-dir``; ``--no-cache`` writes nothing); its numbers then depend on
    the machine's threads. ``info`` holds ``shipped``, ``cached``, ``path``,
    ``config``, ``train_seconds`` and ``losses``. This is the one place the demo
    and ``extract --dataset`` get their network from.
    """
    from .._segnet import DEMO_SETTINGS, SegNetConfig, load_demo_network, load_or_train

    config = SegNetConfig(**DEMO_SETTINGS[(args.dataset, args.quick)]["net"])
    if not getattr(args, "retrain", False):
        return load_demo_network(args.dataset, quick=args.quick, config=config)
    train = data.select("model")
    with progress(
        total=config.epochs, enabled=not args.quiet, desc="training", unit="epoch"
    ) as bar:

        def on_epoch(epoch, loss):
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.4f}")

        model, info = load_or_train(
            args.dataset,
            train.images,
            train.labels,
            data.n_classes,
            config,
            cache=args.cache_dir,
            use_cache=not getattr(args, "no_cache", False),
            progress=on_epoch,
        )
    return model, {**info, "shipped": False}


def _demo_stores(args, data, model, net_info, store_root: Path) -> dict:
    """{subset: (LogitStore, data part)}: the network's logits of the held-out slices."""
    from .. import __version__
    from .._segnet import predict_logits
    from ..store import LogitStore

    stores = {}
    for subset in _SUBSETS:
        part = data.select(subset)
        path = store_root / subset
        if path.exists():  # an earlier demo's store (checked before the run): rebuild it
            shutil.rmtree(path)
        store = LogitStore.create(
            path,
            n_classes=data.n_classes,
            class_names=data.class_names,
            source={
                "dataset": args.dataset,
                "subset": subset,
                "model": "sksegcal._segnet.UNet",
                "net": net_info["config"],
                "sksegcal": __version__,
            },
        )
        for start in progress(
            range(0, len(part), 16), enabled=not args.quiet, desc=f"{subset} logits", unit="batch"
        ):
            logits = predict_logits(model, part.images[start : start + 16])
            for k, z in enumerate(logits):
                i = start + k
                store.add_image(_image_name(part, i), z, part.labels[i])
        stores[subset] = (store, part)
    return stores


def _selective_maps(selective, logits) -> dict:
    """The detector's P(correct) and the per-pixel temperature, as (N, H, W) maps."""
    from ..context import estimator_context, image_rows

    n, c, h, w = logits.shape
    context = estimator_context(selective, where="the demo")
    X = np.concatenate([image_rows(z, context) for z in logits]).astype(np.float32, copy=False)
    return {
        "p_correct": selective.predict_correctness(X).reshape(n, h, w),
        "temperature": selective.temperatures(X).reshape(n, h, w),
    }


def _examples(model, selective, data, cal_part, shifted_part, test_rows) -> dict:
    """The example figure's maps: three in-domain test slices, then the first under the shift.

    The shifted row shows the same slice as the first in-domain row, so the two
    rows differ only by the acquisition, where the network's errors are.
    """
    from .._segnet import predict_logits
    from ..features import softmax
    from ..pixels import predict_proba_maps

    slices = cal_part.slice_index[test_rows]
    shifted_row = np.flatnonzero(shifted_part.slice_index == slices[0])[:1]
    images = np.concatenate([cal_part.images[test_rows], shifted_part.images[shifted_row]])
    labels = np.concatenate([cal_part.labels[test_rows], shifted_part.labels[shifted_row]])
    row_labels = [f"in-domain, slice {z}" for z in slices]
    row_labels += [f"shifted, slice {z}" for z in shifted_part.slice_index[shifted_row]]
    logits = predict_logits(model, images)
    probs = {UNCALIBRATED: softmax(logits), SELECTIVE: predict_proba_maps(selective, logits)}
    out = {
        "images": images,
        "labels": labels,
        "class_names": data.class_names,
        "probs": probs,
        "rows": len(images),
        "row_labels": row_labels,
        "note": fallback_note(selective),
    }
    out.update(_selective_maps(selective, logits))
    return out


def fallback_note(selective) -> str | None:
    """What the example figure says when the guard kept TS: its panels then show that TS."""
    if getattr(selective, "guard_choice_", None) != "ts":
        return None
    return (
        f"The guard kept temperature scaling (T = {selective.t1_:.3g} on every pixel) "
        "over selective scaling: the 'selective scaling' maps show that TS."
    )


def _image_name(part, i: int) -> str:
    return f"z{part.slice_index[i]:03d}-{i:04d}"


def _ids_of(store, part, slices) -> np.ndarray:
    """Store image ids of the images of ``part`` whose slice is in ``slices``."""
    keep = set(np.asarray(slices).tolist())
    names = [_image_name(part, i) for i in range(len(part)) if part.slice_index[i] in keep]
    return np.sort([store.image_id(n) for n in names]).astype(np.int64)


def _run_demo(args, output: Path, store_root: Path) -> int:
    from .. import __version__
    from ..calibrators._search import CalibratorSearchCV
    from ..pixels import ImageSplit, split_images
    from ..scaling import TemperatureScaling
    from ..selective import SelectiveScalingCalibrator
    from ..store import evaluate_store, fit_store

    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    say(args, f"[1/6] loading the {args.dataset} data")
    t0 = time.perf_counter()
    data = demo_data(args)
    timings["data"] = time.perf_counter() - t0

    say(args, "[2/6] segmentation network (a small U-Net)")
    t0 = time.perf_counter()
    model, net_info = _demo_network(args, data)
    if net_info.get("shipped"):
        say(
            args,
            f"      the network shipped in the package ({net_info['name']}, "
            "sksegcal demo --retrain trains one)",
        )
    elif net_info["cached"]:
        say(args, f"      loaded from {net_info['path']}")
    else:
        say(
            args,
            f"      trained in {net_info['train_seconds']:.0f} s"
            + (f", cached at {net_info['path']}" if net_info["path"] else ""),
        )
    timings["network"] = time.perf_counter() - t0

    say(args, "[3/6] logits of the held-out slices into LogitStores")
    t0 = time.perf_counter()
    stores = _demo_stores(args, data, model, net_info, store_root)
    timings["logits"] = time.perf_counter() - t0

    say(args, "[4/6] image-level split: calibrator train / validation / test, by slice")
    cal_store, cal_part = stores["calibration"]
    # split by slice: several acquisitions of one slice must land in the same part
    slice_split = split_images(
        cal_part.slice_index, validation_size=0.25, test_size=0.25, random_state=args.seed
    )
    split = ImageSplit(*(_ids_of(cal_store, cal_part, s) for s in slice_split))
    cal_store.split = split
    shifted_store, shifted_part = stores["shifted"]
    shifted_test = _ids_of(shifted_store, shifted_part, slice_split.test)
    fit_ids = np.concatenate([split.train, split.validation])

    say(args, "[5/6] fitting temperature scaling, selective scaling and the calibrator search")
    t0 = time.perf_counter()
    max_pixels = 60_000 if args.quick else 400_000
    ts = fit_store(
        TemperatureScaling(),
        cal_store,
        images=fit_ids,
        max_pixels=max_pixels,
        random_state=args.seed,
    )
    # the recommended default (README, docs/quality.md): both temperatures fitted on held-out
    # images, with the cross-fitted guard against losing to TS
    selective = SelectiveScalingCalibrator(
        make_classifier(args.classifier, args.seed, args.quick),
        features=_FEATURES,
        context=_context(args),
        random_state=args.seed,
    )
    selective = fit_store(
        selective, cal_store, images=fit_ids, max_pixels=max_pixels, random_state=args.seed
    )
    timings["calibrators"] = time.perf_counter() - t0
    # what the docs recommend for a model of your own: the family's best by per-image NLL,
    # with its defaults (its candidates' detectors are their own, not --classifier's). On a
    # sample of SEARCH_PIXELS pixels of the same images: the rows its cross-validation uses
    # by default, so that the search costs the demo seconds, not a refit on 400,000 pixels
    # (--quick, a smoke test, also cross-validates on fewer)
    t0 = time.perf_counter()
    search = CalibratorSearchCV(context=_context(args), random_state=args.seed)
    if args.quick:
        search.set_params(max_cv_pixels=QUICK_CV_PIXELS)
    search = fit_store(
        search,
        cal_store,
        images=fit_ids,
        max_pixels=min(max_pixels, SEARCH_PIXELS),
        random_state=args.seed,
    )
    timings["search"] = time.perf_counter() - t0

    say(args, "[6/6] evaluating on the test slices, in-domain and shifted")
    t0 = time.perf_counter()
    calibrators = {UNCALIBRATED: None, TS: ts, SELECTIVE: selective, SEARCH: search}
    accumulators = {
        "test": evaluate_store(
            cal_store, calibrators, images=split.test, boundary_width=BOUNDARY_WIDTH
        ),
        "shifted-test": evaluate_store(
            shifted_store, calibrators, images=shifted_test, boundary_width=BOUNDARY_WIDTH
        ),
    }
    timings["evaluation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    save_calibrator(selective, output / "calibrator.joblib", "joblib")
    save_calibrator(ts, output / "temperature_scaling.joblib", "joblib")
    save_calibrator(search, output / "search.joblib", "joblib")
    # three test slices with the most tissue, one acquisition each: the interesting ones
    test_rows = np.flatnonzero(np.isin(cal_part.slice_index, slice_split.test))
    _, first = np.unique(cal_part.slice_index[test_rows], return_index=True)
    test_rows = test_rows[first]
    tissue = (cal_part.labels[test_rows] > 0).sum(axis=(1, 2))
    test_rows = np.sort(test_rows[np.argsort(-tissue, kind="stable")[:3]])
    examples = _examples(model, selective, data, cal_part, shifted_part, test_rows)
    calibrator_info = {
        TS: {"temperature": round(float(ts.temperature_), 4)},
        SELECTIVE: selective_info(selective, None),
        SEARCH: search_info(search),
    }
    counts = {
        "test": f"{len(split.test)} images of {len(slice_split.test)} slices",
        "shifted-test": f"{len(shifted_test)} images of {len(slice_split.test)} slices",
    }
    command = (
        "sksegcal demo"
        + (" --quick" if args.quick else "")
        + (f" --dataset {args.dataset}" if args.dataset != "mni152-tissue" else "")
        + (f" --seed {args.seed}" if args.seed else "")
        + (f" --context {args.context}" if _context(args) else "")
    )
    meta = {
        "dataset": args.dataset,
        "description": data.description,
        "command": command,
        "sksegcal": __version__,
        "seed": args.seed,
        "quick": args.quick,
        "network": {
            "shipped": bool(net_info.get("shipped")),
            "cached": net_info["cached"],
            "config": net_info["config"],
            "train_seconds": round(net_info["train_seconds"], 1),
            "final_train_loss": (round(net_info["losses"][-1], 4) if net_info["losses"] else None),
        },
        "split": {
            "train_images": len(split.train),
            "validation_images": len(split.validation),
            "test_images": len(split.test),
            "shifted_test_images": len(shifted_test),
            "test_slices": slice_split.test.tolist(),
        },
        "calibrators": calibrator_info,
        "roles": {
            UNCALIBRATED: "uncalibrated",
            TS: "temperature",
            SELECTIVE: "selective",
            SEARCH: "search",
        },
        "boundary_width": BOUNDARY_WIDTH,
        "timings": timings,
    }
    results = summaries(accumulators)
    written = write_report(output, accumulators, meta, examples=examples)
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    # rewrite with the final timings (the report step's own time included)
    write_metrics(output, results, meta)
    _rewrite_timings(output / "report.md", timings)

    print(
        f"sksegcal demo: {args.dataset} ({data.n_classes} classes), seed {args.seed}"
        + (", quick" if args.quick else "")
    )
    print(f"temperature scaling: T = {ts.temperature_:.3f}")
    for name, title in ((SELECTIVE, "selective scaling"), (SEARCH, "calibrator search")):
        print(f"{title}:")
        for key, value in calibrator_info[name].items():
            if isinstance(value, dict):
                print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in value.items()))
            else:
                print(f"  {key}: {fmt_value(value)}")
    print()
    print(format_table(results, extra=counts))
    print()
    print("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    print(
        f"report: {output}/ ({', '.join(written)}, calibrator.joblib, "
        "temperature_scaling.joblib, search.joblib)"
    )
    print()
    print(RECOMMENDATION)
    return 0


# the demo's closing lines: what to use on a model of your own
RECOMMENDATION = (
    "On your own model: CalibratorSearchCV chooses among temperature, selective and local\n"
    "temperature scaling by per-image NLL on your calibration images, and keeps temperature\n"
    "scaling unless another is better with support:\n"
    "  sksegcal fit STORE --method search -o calibrator.skops\n"
    "  CalibratorSearchCV(random_state=0).fit(X, y, groups=groups)   # in Python"
)


def _rewrite_timings(path: Path, timings: dict) -> None:
    """report.md's timings section with the final timings (the report's own and the total)."""
    from .._files import atomic_write_bytes

    lines = path.read_text().split("\n")
    head = "## Timings (seconds)"
    if head not in lines:
        return
    start = lines.index(head) + 2
    end = start
    while end < len(lines) and lines[end].startswith("- "):
        end += 1
    lines[start:end] = [f"- {k}: {v:.1f}" for k, v in timings.items()]
    atomic_write_bytes(path, "\n".join(lines).encode())


def _context(args) -> str | None:
    """The spatial context selective scaling reads (``--context``; None by default)."""
    context = getattr(args, "context", "none")
    return None if context == "none" else context


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
    from .._segnet import cache_dir

    return cache_dir(args.cache_dir)
