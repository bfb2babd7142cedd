"""The subcommands for your own data: extract, fit, evaluate, report."""

from __future__ import annotations

import time

import numpy as np

from .._progress import progress
from .._safety import check_input_type
from ..pixels import _check_context_calibrator
from ._calibrate import (
    fit_selective,
    local_temperature_info,
    make_classifier,
    output_format,
    parse_temperature,
    save_calibrator,
    search_info,
    selective_info,
)
from ._common import (
    UNCALIBRATED,
    CommandError,
    calibrator_names,
    check_output_dir,
    check_output_file,
    fmt_value,
    image_ids,
    load_calibrator,
    load_npy,
    need_file,
    open_store,
    say,
)
from ._groups import store_groups
from ._report import format_table, load_results, save_results, summaries, write_metrics

# what must match when `extract` resumes a store (not the sksegcal version)
_EXTRACT_SOURCE_KEYS = ("logits", "labels", "dataset", "subset", "net")


# --------------------------------------------------------------------------- extract
def extract(args) -> int:
    """``extract``: a store from .npy arrays, an mmseg config, or the demo's network."""
    from ..store import LogitStore

    if args.config is not None:
        return _extract_mmseg(args)
    if args.logits is not None:
        if args.labels is None:
            raise CommandError("--logits needs --labels (an (N, H, W) integer .npy file).")
        logits = load_npy(
            args.logits,
            "the logits file",
            "(N, C, H, W) float logits, or (N, C, D, H, W) for volumes",
        )
        labels = load_npy(
            args.labels, "the labels file", "(N, H, W) integer labels, or (N, D, H, W) for volumes"
        )
        if logits.ndim not in (4, 5):
            raise CommandError(
                f"{args.logits} must hold (N, C, H, W) logits or (N, C, D, H, W) "
                f"volumes, got shape {logits.shape}."
            )
        if labels.shape != (logits.shape[0],) + logits.shape[2:]:
            raise CommandError(
                f"{args.labels} has shape {labels.shape} but the logits need "
                f"{(logits.shape[0],) + logits.shape[2:]} (N, *spatial)."
            )
        class_names = args.class_names.split(",") if args.class_names else None
        source = {"logits": str(args.logits), "labels": str(args.labels)}
        n_classes = logits.shape[1]
        names = list(range(len(logits)))

        def get(i):
            return np.asarray(logits[i], dtype=np.float32), np.asarray(labels[i])
    else:
        from .. import __version__
        from .._segnet import predict_logits
        from ._demo import _demo_network, demo_data

        data = demo_data(args)
        model, net_info = _demo_network(args, data)
        part = data.select(args.subset)
        class_names = list(data.class_names)
        n_classes = data.n_classes
        source = {
            "dataset": args.dataset,
            "subset": args.subset,
            "sksegcal": __version__,
            "net": net_info["config"],
        }
        names = [f"z{part.slice_index[i]:03d}-{i:04d}" for i in range(len(part))]

        def get(i):
            return predict_logits(model, part.images[i : i + 1])[0], part.labels[i]

    try:  # a store of another model or data, or arrays the store refuses: the user's to fix
        store = LogitStore.create(
            args.store,
            n_classes=n_classes,
            class_names=class_names,
            ignore_index=args.ignore_index,
            source=source,
            exist_ok=True,
            match_source=_EXTRACT_SOURCE_KEYS,
        )
        todo = store.missing(names)  # resumable: images already written are skipped
        position = {name: i for i, name in enumerate(names)}
        for name in progress(todo, enabled=not args.quiet, desc="extract", unit="image"):
            z, t = get(position[name])
            store.add_image(name, z, t)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    print(
        f"{args.store}: {len(store.refresh())} images, {n_classes} classes, "
        f"{store.n_pixels:,} labelled pixels ({len(todo)} written now)"
    )
    return 0


def _extract_mmseg(args) -> int:
    """``extract --config``: an mmsegmentation model over its own test (or val) set."""
    try:
        from ..integrations.mmseg import extract_logits
    except ImportError as exc:
        raise CommandError(
            f"--config needs mmsegmentation ({exc}); install it with "
            "pip install -c constraints.txt 'sksegcal[mmseg]'."
        ) from None
    need_file(args.config, "the mmsegmentation config")
    if args.checkpoint is not None:
        need_file(args.checkpoint, "the checkpoint")
    store = extract_logits(
        args.config,
        args.split,
        args.store,
        checkpoint=args.checkpoint,
        device=args.device,
        size=tuple(args.size) if args.size else None,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(
        f"{args.store}: {store.n_images} images, {store.n_classes} classes, "
        f"{store.n_pixels:,} labelled pixels"
    )
    return 0


# --------------------------------------------------------------------------- fit
# what each --method fits, and the options of `fit` that set one of its parameters (of the
# same name, through set_params; an option left out sets nothing, so the estimator keeps
# its own default: `sksegcal fit STORE` fits SelectiveScalingCalibrator(random_state=seed))
METHOD_OPTIONS = {
    "selective": ("t1", "t2", "classifier", "features", "context", "mode"),
    "search": ("context", "cv", "max_cv_pixels"),
    "temperature": (),
    "lts": (),
}
_METHOD_NAMES = {
    "selective": "selective scaling",
    "search": "the calibrator search",
    "temperature": "temperature scaling",
    "lts": "local temperature scaling",
}


def make_estimator(method: str, seed: int):
    """The estimator ``--method`` fits, every parameter at its default but the seed."""
    from ..calibrators._search import CalibratorSearchCV
    from ..local_scaling import LocalTemperatureScaling
    from ..scaling import TemperatureScaling
    from ..selective import SelectiveScalingCalibrator

    if method == "selective":
        return SelectiveScalingCalibrator(random_state=seed)
    if method == "search":
        return CalibratorSearchCV(random_state=seed)
    if method == "lts":
        return LocalTemperatureScaling()
    return TemperatureScaling()


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_options(args) -> tuple[dict, dict]:
    """The parameters the options set on ``--method``'s estimator, and the grid of t1/t2.

    An option that sets no parameter of that estimator is an error that names the
    methods it belongs to. ``--t1`` / ``--t2`` given several values form a grid
    searched on the validation images (selective scaling only).
    """
    method = args.method
    foreign = {}
    for other, names in METHOD_OPTIONS.items():
        for name in names:
            if name not in METHOD_OPTIONS[method] and getattr(args, name, None) is not None:
                foreign.setdefault(name, []).append(other)
    if foreign:
        problems = [
            f"{_option(name)} sets a parameter of "
            + " or of ".join(f"{_METHOD_NAMES[m]} (--method {m})" for m in owners)
            for name, owners in foreign.items()
        ]
        raise CommandError(
            "; ".join(problems)
            + f"; --method {method} has none of them"
            + (
                " (--method lts always reads the spatial context, --method temperature never)"
                if "context" in foreign and method in ("lts", "temperature")
                else ""
            )
            + "."
        )
    params, grid = {}, {}
    for name in ("t1", "t2"):
        values = getattr(args, name, None)
        if values:
            values = [parse_temperature(v, f"--{name}") for v in values]
            if len(values) == 1:
                params[name] = values[0]
            else:
                grid[name] = values
    if getattr(args, "classifier", None) is not None:
        params["classifier"] = make_classifier(args.classifier, args.seed, quick=False)
    if getattr(args, "context", None) is not None:
        params["context"] = None if args.context == "none" else args.context
    for name in ("features", "mode", "cv", "max_cv_pixels"):
        if getattr(args, name, None) is not None:
            params[name] = getattr(args, name)
    return params, grid


def fit(args) -> int:
    """``fit``: the estimator of ``--method`` on the train + validation images."""
    from ..store import fit_store

    # check the arguments and the output before anything is fitted or written into the store
    params, grid = method_options(args)
    estimator = make_estimator(args.method, args.seed).set_params(**params)
    output = check_output_file(args.output)
    fmt = output_format(output)
    store = open_store(args.store, n_classes=args.n_classes)
    split = store.split
    if split is None or args.resplit:
        split = store.make_split(
            validation_size=args.validation_size,
            test_size=args.test_size,
            random_state=args.seed,
            groups=store_groups(store, getattr(args, "groups", None)),
        )
        say(
            args,
            f"recorded a split of {store.n_images} images: {len(split.train)} train / "
            f"{len(split.validation)} validation / {len(split.test)} test",
        )
    fit_ids = np.concatenate([split.train, split.validation])
    sample = {"images": fit_ids, "max_pixels": args.max_pixels, "random_state": args.seed}
    t0 = time.perf_counter()
    summary = None
    if args.method == "selective":
        est, search = fit_selective(
            estimator, store, split, grid=grid, max_pixels=args.max_pixels, seed=args.seed
        )
        info = selective_info(est, search)
    else:
        est = fit_store(estimator, store, **sample)
        if args.method == "temperature":
            info = {"temperature": round(float(est.temperature_), 4)}
        elif args.method == "lts":
            info = local_temperature_info(est)
        else:
            info, summary = search_info(est), est.summary()
    output.parent.mkdir(parents=True, exist_ok=True)
    save_calibrator(est, output, fmt)
    print(
        f"{args.method}: "
        + ", ".join(f"{k} = {fmt_value(v)}" for k, v in info.items())
        + f" ({time.perf_counter() - t0:.1f} s); saved to {output} ({fmt})"
    )
    if summary is not None:  # what the search chose, and every candidate's evidence
        print(summary)
    return 0


# --------------------------------------------------------------------------- evaluate
def method_role(estimator) -> str:
    """What the report compares a method as: its class, not the name a user gave it."""
    from ..scaling import TemperatureScaling
    from ..selective import SelectiveScalingCalibrator

    if estimator is None:
        return "uncalibrated"
    best = getattr(estimator, "best_estimator_", None)  # a fitted search: its best
    if best is not None:
        return method_role(best)
    steps = getattr(estimator, "steps", None)  # a Pipeline: its final step
    if isinstance(steps, list) and steps:
        return method_role(steps[-1][1])
    if isinstance(estimator, SelectiveScalingCalibrator):
        return "selective"
    if isinstance(estimator, TemperatureScaling):
        return "temperature"
    return type(estimator).__name__


def evaluate(args) -> int:
    """``evaluate``: metrics of the uncalibrated model and each calibrator on a store."""
    from ..store import evaluate_store

    if args.boundary_width is not None and args.boundary_width < 1:
        raise CommandError(
            f"--boundary-width must be a whole number of pixels >= 1, got {args.boundary_width}"
        )
    output = check_output_dir(args.output)  # before the (long) evaluation
    store = open_store(args.store)
    paths = args.calibrator or []
    names = calibrator_names(paths)
    calibrators = {UNCALIBRATED: None}
    for name, path in zip(names, paths):
        est = load_calibrator(path, trusted=args.trusted)
        try:
            check_input_type(est, store.values, what=f"the calibrator {path}", where=store.path)
            # the class count, and the context it reads (evaluate_store computes that per image)
            _check_context_calibrator(
                est,
                store.n_classes,
                what=f"the calibrator {path}",
                where=f"the store {store.path}",
                path="sksegcal evaluate",
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        calibrators[name] = est
    ids = image_ids(store, args.images)
    split_name = args.images if args.images != "all" else "all images"
    say(args, f"evaluating {len(calibrators)} methods on {len(ids)} images of {store.path}")
    accumulators = {
        split_name: evaluate_store(
            store, calibrators, images=ids, n_jobs=args.n_jobs, boundary_width=args.boundary_width
        )
    }
    meta = {
        "store": str(store.path),
        "images": args.images,
        "calibrators": {name: str(p) for name, p in zip(names, paths)},
        "roles": {name: method_role(est) for name, est in calibrators.items()},
        "dataset": store.source.get("dataset", str(store.path)),
        "class_names": list(store.class_names) if store.class_names else None,
        "boundary_width": args.boundary_width,
    }
    results = summaries(accumulators)
    output.mkdir(parents=True, exist_ok=True)
    written = write_metrics(output, results, meta) + save_results(output, accumulators, meta)
    print(format_table(results))
    print(
        f"\nwritten: {output}/ ({', '.join(written)}); make figures with: sksegcal report {output}"
    )
    return 0


# --------------------------------------------------------------------------- report
def report(args) -> int:
    """``report``: figures, metrics and report.md from ``evaluate`` results."""
    from ._report import write_report

    output = check_output_dir(args.output) if args.output else None
    accumulators, meta, path = load_results(args.results, trusted=args.trusted)
    output = output or path.parent
    output.mkdir(parents=True, exist_ok=True)
    written = write_report(output, accumulators, meta)
    print(format_table(summaries(accumulators)))
    print(f"\nreport: {output}/ ({', '.join(written)})")
    return 0
