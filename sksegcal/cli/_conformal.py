"""``sksegcal conformal``: prediction sets and risk control on a store, with a report.

The chosen images (by default the recorded split's test images, which no
calibrator was fitted on) are split once more, by image and seeded, into
conformal-calibration and evaluation images. For the uncalibrated model and
each calibrator given, it calibrates prediction sets (per score and
``--guarantee``), the image-level risk control of the miscoverage fraction
and, with ``--fnr-class``, of one class's false-negative rate, and with
``--margin-class`` inner and outer morphological margins of one class's
predicted mask, all over the store one image at a time; then evaluates them
on the evaluation images and writes ``conformal.json``, ``conformal.md`` and
``set_sizes.png``.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .._files import atomic_write_bytes, atomic_write_json
from .._safety import check_calibrator_columns, check_input_type, estimator_context
from ._common import (
    UNCALIBRATED,
    CommandError,
    calibrator_names,
    check_output_dir,
    image_ids,
    load_calibrator,
    open_store,
    say,
)

_N_MAP_IMAGES = 4  # evaluation images shown in the set-size heat map


def _procedures(args, store, calibrator):
    """{(procedure, score): unfitted estimator} for one calibrator."""
    from ..conformal import ConformalMargins, ConformalPixelSets, ConformalRiskControl

    common = {
        "alpha": args.alpha,
        "calibrator": calibrator,
        "input_type": store.values,
        "ignore_index": store.ignore_index,
        "random_state": args.seed,
    }
    out = {}
    guarantees = getattr(args, "guarantee", None) or ["image"]
    for score in args.score:
        for guarantee in guarantees:
            name = "pixel sets" if guarantee == "image" else "pixel sets (pixel)"
            out[(name, score)] = ConformalPixelSets(
                conformity_score=score, guarantee=guarantee, **common
            )
        out[("CRC miscoverage", score)] = ConformalRiskControl(conformity_score=score, **common)
        if args.fnr_class is not None:
            out[(f"CRC FNR class {args.fnr_class}", score)] = ConformalRiskControl(
                conformity_score=score, loss="fnr", target_class=args.fnr_class, **common
            )
    if getattr(args, "margin_class", None) is not None:
        out[(f"margins class {args.margin_class}", "morphological")] = ConformalMargins(
            alpha=args.alpha,
            target_class=args.margin_class,
            connectivity=args.connectivity,
            calibrator=calibrator,
            input_type=store.values,
            ignore_index=store.ignore_index,
        )
    return out


def _split(ids: np.ndarray, size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 < size < 1:
        raise CommandError(f"--calibration-size must be in (0, 1), got {size}.")
    n_cal = int(round(size * len(ids)))
    if n_cal < 1 or n_cal >= len(ids):
        raise CommandError(
            f"{len(ids)} images cannot be split into conformal-calibration and evaluation "
            f"images at --calibration-size {size}; give more images (--images) or another size."
        )
    perm = np.random.default_rng(seed).permutation(ids)
    return np.sort(perm[:n_cal]), np.sort(perm[n_cal:])


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


_COLUMNS = (
    ("method", "method"),
    ("procedure", "procedure"),
    ("score", "score"),
    ("threshold", "threshold"),
    ("coverage", "pixel coverage"),
    ("mean_image_coverage", "mean image coverage"),
    ("mean_set_size", "mean set size"),
    ("empty_fraction", "empty sets"),
    ("mean_image_fnr", "mean image FNR"),
)
_MARGIN_COLUMNS = (
    ("method", "method"),
    ("procedure", "procedure"),
    ("inner_margin", "erosions"),
    ("outer_margin", "dilations"),
    ("both", "images inner within truth within outer"),
    ("outer_covers", "truth within outer"),
    ("inner_inside", "inner within truth"),
    ("mean_outer_fnr", "mean outer FNR"),
    ("mean_inner_area", "inner area"),
    ("mean_predicted_area", "predicted area"),
    ("mean_outer_area", "outer area"),
)


def _table(rows: list[dict], *, markdown: bool, columns=_COLUMNS) -> str:
    cells = [[_fmt(r.get(key)) for key, _ in columns] for r in rows]
    heads = [head for _, head in columns]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(heads)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*heads)] + [fmt.format(*c) for c in cells])


def _size_map(store, image_id: int, est) -> np.ndarray:
    """The set sizes of one stored image ((H, W), or (D, H, W) for a volume)."""
    context = estimator_context(est.calibrator) if est.calibrator is not None else None
    info = store.image_info(image_id)
    n = int(np.prod(info.shape))
    # every pixel in one table: the rows every other path gives the calibrator
    ((X, _),) = store.iter_tables(image_id, n, context=context, ignored="keep")
    return est.predict_set_size(X).reshape(info.shape)


def _heat_map(output, store, pixel_sets: dict, ids) -> str | None:
    """set_sizes.png: set sizes of a few evaluation images, one row per method."""
    try:
        from ..plotting import plot_set_size_maps
    except ImportError:  # pragma: no cover - matplotlib is optional
        return None
    from ._report import _save_figure

    shown = ids[:_N_MAP_IMAGES]
    # one image at a time (the stored images may differ in size), with the context columns
    # of a calibrator that reads them: the rows every other path gives it
    sizes = {
        name: [_size_map(store, int(i), est) for i in shown] for name, est in pixel_sets.items()
    }
    try:
        fig = plot_set_size_maps(
            sizes,
            n_classes=store.n_classes,
            titles=[str(store.image_names[int(i)]) for i in shown],
        )
    except ImportError:
        return None
    # which procedure the maps show: the sets of every row share score, alpha and guarantee
    est = next(iter(pixel_sets.values()))
    fig.suptitle(
        f"Conformal prediction-set sizes: {est.conformity_score.upper()} score, "
        f"alpha = {est.alpha:g}, coverage over {est.guarantee}s"
        + (" (image-level guarantee)" if est.guarantee == "image" else " (exchangeable pixels)"),
        fontsize=9,
    )
    _save_figure(fig, output / "set_sizes.png", dpi=110)
    return "set_sizes.png"


def conformal(args) -> int:
    """The ``conformal`` command."""
    from ..conformal import evaluate_conformal_store, fit_conformal_store

    output = check_output_dir(args.output)  # before any work
    if not 0 < args.alpha < 1:
        raise CommandError(f"--alpha must be in (0, 1), got {args.alpha}.")
    store = open_store(args.store)
    for option, value in (("--fnr-class", args.fnr_class), ("--margin-class", args.margin_class)):
        if value is not None and not 0 <= value < store.n_classes:
            raise CommandError(
                f"{option} {value} is not a class of the store (0 .. {store.n_classes - 1})."
            )
    paths = args.calibrator or []
    calibrators = {UNCALIBRATED: None}
    for name, path in zip(calibrator_names(paths), paths):
        est = load_calibrator(path, trusted=args.trusted)
        try:
            check_calibrator_columns(
                est,
                store.n_classes,
                what=f"the calibrator {path}",
                where=f"the store {store.path}",
                path="sksegcal conformal",
            )
            check_input_type(est, store.values, what=f"the calibrator {path}", where=store.path)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        calibrators[name] = est
    cal_ids, test_ids = _split(image_ids(store, args.images), args.calibration_size, args.seed)
    say(
        args,
        f"conformal calibration on {len(cal_ids)} images, evaluation on {len(test_ids)} "
        f"images of {store.path} (alpha = {args.alpha})",
    )
    t0 = time.perf_counter()
    fitted = {}
    for method, calibrator in calibrators.items():
        for (procedure, score), est in _procedures(args, store, calibrator).items():
            fitted[(method, procedure, score)] = fit_conformal_store(
                est, store, images=cal_ids, n_jobs=args.n_jobs
            )
    keys = list(fitted)
    names = {key: " / ".join(key) for key in keys}
    accs = evaluate_conformal_store(
        {names[k]: fitted[k] for k in keys}, store, images=test_ids, n_jobs=args.n_jobs
    )
    rows, margin_rows = [], []
    for key in keys:
        est, acc = fitted[key], accs[names[key]]
        if key[2] == "morphological":
            margin_rows.append(
                {
                    "method": key[0],
                    "procedure": key[1],
                    "inner_margin": float(est.inner_margin_),
                    "outer_margin": float(est.outer_margin_),
                    "n_calibration": int(est.n_calibration_),
                    **acc.summary(),
                }
            )
            continue
        target = getattr(est, "target_class", None)
        s = acc.summary(target_class=target)
        rows.append(
            {
                "method": key[0],
                "procedure": key[1],
                "score": key[2],
                "threshold": float(est.threshold_),
                "n_calibration": int(est.n_calibration_),
                "per_class_coverage": acc.per_class_coverage().tolist(),
                **s,
            }
        )
    pixel_sets = {k[0]: fitted[k] for k in keys if k[1] == "pixel sets" and k[2] == args.score[0]}
    output.mkdir(parents=True, exist_ok=True)
    written = []
    meta = {
        "store": str(store.path),
        "images": args.images,
        "alpha": args.alpha,
        "seed": args.seed,
        "calibration_images": cal_ids.tolist(),
        "evaluation_images": test_ids.tolist(),
        "calibrators": {n: str(p) for n, p in zip(calibrator_names(paths), paths)},
        "class_names": list(store.class_names) if store.class_names else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(
        output / "conformal.json", {"meta": meta, "results": rows, "margins": margin_rows}
    )
    written.append("conformal.json")
    figure = _heat_map(output, store, pixel_sets, test_ids)
    md = [
        "# Conformal prediction sets and risk control",
        "",
        f"Store `{store.path}`; {len(cal_ids)} conformal-calibration images, {len(test_ids)} "
        f"evaluation images ({args.images} images split with seed {args.seed}); "
        f"alpha = {args.alpha} (target coverage {1 - args.alpha:g}).",
        "",
        "- *pixel sets*: the mean coverage of a new image is at least 1 - alpha, over "
        "exchangeable images; *pixel sets (pixel)*: split conformal over pixels, which "
        "assumes exchangeable pixels (pixels of whole images are not).",
        "- *margins*: the predicted mask of the class eroded / dilated so that the truth lies "
        "between them on a new image with probability at least 1 - alpha.",
        "- *CRC*: conformal risk control over images: the mean per-image loss (miscoverage "
        "fraction, or the class's false-negative rate) is at most alpha in expectation over "
        "exchangeable images.",
        "",
        _table(rows, markdown=True),
        "",
    ]
    if margin_rows:
        md += [_table(margin_rows, markdown=True, columns=_MARGIN_COLUMNS), ""]
    if figure is not None:
        md += [f"![set sizes]({figure})", ""]
        written.append(figure)
    atomic_write_bytes(output / "conformal.md", "\n".join(md).encode())
    written.append("conformal.md")
    print(_table(rows, markdown=False))
    if margin_rows:
        print()
        print(_table(margin_rows, markdown=False, columns=_MARGIN_COLUMNS))
    print(f"\nwritten: {output}/ ({', '.join(written)})")
    return 0
