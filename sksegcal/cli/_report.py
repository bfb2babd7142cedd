"""The report: tables, metrics files, figures, report.md, and the saved evaluation results.

Every file goes through :mod:`sksegcal._files` (written to a temporary name,
then renamed): a reader never sees half a file.

The results of ``sksegcal evaluate`` that ``sksegcal report`` reads back are
``accumulators.json`` (an index: the metadata and, per split and method, the
accumulator's scalar state) beside ``accumulators.npz`` (its arrays), read
with ``allow_pickle=False``: no pickle, so a results folder from anyone is safe
to open. Older versions wrote ``accumulators.joblib`` (a pickle), which is
opened only with ``--trusted``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np

from .._files import atomic_write_bytes, atomic_write_via_path
from .._safety import file_slug, inside
from ._common import UNCALIBRATED, CommandError, fmt_value, need_file

METRICS = ("ece", "mce", "nll", "brier", "accuracy", "miou")
HEADERS = {
    "ece": "ECE",
    "mce": "MCE",
    "nll": "NLL",
    "brier": "Brier",
    "accuracy": "accuracy",
    "miou": "mIoU",
}
SPLIT_NAMES = {"test": "test (in-domain)", "shifted-test": "shifted test (acquisition shift)"}

RESULTS_INDEX = "accumulators.json"
RESULTS_ARRAYS = "accumulators.npz"
LEGACY_RESULTS = "accumulators.joblib"
_RESULTS_FORMAT = "sksegcal.evaluate-results"
_RESULTS_VERSION = 1


# the per-region numbers of accumulators with regions (boundary / interior), as
# "<region>_<key>" entries of the summaries (metrics.json, metrics.csv)
REGION_KEYS = ("n_pixels", "ece", "nll", "brier", "accuracy", "mean_per_image_ece")


# --------------------------------------------------------------------------- tables
def _summary(acc) -> dict:
    out = {k: int(v) if k.endswith("n_pixels") else float(v) for k, v in acc.summary().items()}
    if getattr(acc, "regions", None) is not None:
        for region, s in acc.region_summary().items():
            out.update(
                {
                    f"{region}_{k}": int(s[k])
                    if k == "n_pixels"
                    else float(s.get(k, float("nan")))
                    for k in REGION_KEYS
                }
            )
    return out


def summaries(accumulators: dict) -> dict:
    """{split: {method: summary dict}} from {split: {method: CalibrationAccumulator}}.

    Accumulators with regions (``evaluate_store(..., boundary_width=k)``) add
    ``"<region>_<key>"`` entries (``boundary_ece``, ``interior_nll``, ...; keys
    of :data:`REGION_KEYS`) beside the pooled ones; the printed table
    (:func:`format_table`) shows the pooled ones only.
    """
    return {
        split: {name: _summary(acc) for name, acc in accs.items()}
        for split, accs in accumulators.items()
    }


def format_table(results: dict, *, extra: dict | None = None) -> str:
    """Plain-text tables, one per evaluated split, methods as rows."""
    lines = []
    width = max(len(m) for split in results.values() for m in split) + 2
    for split, methods in results.items():
        first = next(iter(methods.values()))
        head = f"{SPLIT_NAMES.get(split, split)}: {int(first['n_pixels']):,} pixels"
        if extra and split in extra:
            head += f", {extra[split]}"
        lines.append(head)
        lines.append("method".ljust(width) + "".join(f"{HEADERS[k]:>10}" for k in METRICS))
        for name, summary in methods.items():
            lines.append(name.ljust(width) + "".join(f"{summary[k]:>10.4f}" for k in METRICS))
        lines.append("")
    return "\n".join(lines).rstrip()


def _markdown_table(methods: dict) -> str:
    rows = [
        "| method | " + " | ".join(HEADERS[k] for k in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for name, s in methods.items():
        rows.append(f"| {name} | " + " | ".join(f"{s[k]:.4f}" for k in METRICS) + " |")
    return "\n".join(rows)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (Path, tuple)):
        return str(obj) if isinstance(obj, Path) else list(obj)
    return repr(obj)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()


def write_metrics(output: Path, results: dict, meta: dict) -> list[str]:
    """metrics.json (metadata + every summary) and metrics.csv (one row per split and method)."""
    atomic_write_bytes(output / "metrics.json", _json_bytes({**meta, "results": results}))
    keys = sorted(
        {k for methods in results.values() for s in methods.values() for k in s},
        key=lambda k: (k not in METRICS, METRICS.index(k) if k in METRICS else 0, k),
    )
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["split", "method", *keys])
    for split, methods in results.items():
        for name, s in methods.items():
            writer.writerow([split, name, *(s.get(k, "") for k in keys)])
    atomic_write_bytes(output / "metrics.csv", text.getvalue().encode())
    return ["metrics.json", "metrics.csv"]


# --------------------------------------------------------------------------- report
_PREDICTION_NOTE = (
    "ECE and MCE: top-label, 15 equal-width bins. Accuracy and mIoU score each method's "
    "predicted class: for the uncalibrated model and every temperature-based calibrator "
    "(temperature scaling, selective scaling) that is the network's own argmax, so their "
    "accuracy and mIoU are the network's; vector and Dirichlet scaling can change the "
    "predicted class and are scored with their own."
)


def write_report(output: Path, accumulators: dict, meta: dict, *, examples=None) -> list[str]:
    """Reliability diagrams (PNG), metrics (JSON, CSV) and a Markdown page; returns file names."""
    results = summaries(accumulators)
    written = write_metrics(output, results, meta)
    figures = {}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots_note = "matplotlib is not installed (pip install 'sksegcal[plots]'): no figures."
    else:
        from ..plotting import plot_reliability_diagram

        plots_note = ""
        for i, (split, accs) in enumerate(accumulators.items()):
            # the split comes from a results file: the name is a slug, unique, kept inside
            name = f"reliability_{file_slug(split, str(i))}.png"
            if name in written:
                name = f"reliability_{i}.png"
            fig = plot_reliability_diagram(
                accs, title=f"{meta.get('dataset', '')} - {SPLIT_NAMES.get(split, split)}"
            )
            _save_figure(fig, inside(output, name), dpi=150)
            figures[split] = name
            written.append(name)
        if examples is not None:
            from ..plotting import plot_segmentation_examples

            _save_figure(plot_segmentation_examples(**examples), output / "examples.png", dpi=110)
            written.append("examples.png")
    md = [f"# sksegcal calibration report: {meta.get('dataset', 'your data')}", ""]
    if meta.get("description"):
        md += [meta["description"], ""]
    if meta.get("command"):
        md += ["Made by:", "", f"    {meta['command']}", ""]
    for split, methods in results.items():
        first = next(iter(methods.values()))
        md += [
            f"## {SPLIT_NAMES.get(split, split)}",
            "",
            f"{int(first['n_pixels']):,} pixels. {_PREDICTION_NOTE}",
            "",
            _markdown_table(methods),
            "",
        ]
        if split in figures:
            md += [f"![reliability diagrams]({figures[split]})", ""]
        md += _worse_notes(accumulators.get(split, {}), methods, method_roles(meta))
    md += _boundary_section(results, meta)
    if "examples.png" in written:
        md += ["## Example slices", "", "![examples](examples.png)", ""]
        md += _example_notes(**examples)
    if meta.get("calibrators"):
        md += ["## Calibrators", ""]
        for name, info in meta["calibrators"].items():
            if isinstance(info, dict):
                info = ", ".join(f"{k} = {fmt_value(v)}" for k, v in info.items())
            md += [f"- **{name}**: {info}"]
        md += [""]
    if meta.get("timings"):
        md += ["## Timings (seconds)", ""]
        md += [f"- {k}: {v:.1f}" for k, v in meta["timings"].items()] + [""]
    if plots_note:
        md += [plots_note, ""]
    atomic_write_bytes(output / "report.md", "\n".join(md).encode())
    written.append("report.md")
    return written


def _boundary_section(results: dict, meta: dict) -> list[str]:
    """Boundary against interior, per split (when the accumulators tallied the two regions)."""
    splits = {
        split: methods
        for split, methods in results.items()
        if all("boundary_ece" in s for s in methods.values())
    }
    if not splits:
        return []
    width = meta.get("boundary_width")
    band = f"within {width} px" if width is not None else "near"
    md = [
        "## Boundary and interior",
        "",
        f"Boundary pixels: labelled pixels {band} (Chebyshev distance) of a pixel with "
        "another label (`sksegcal.metrics.boundary_mask`; ignored pixels and the image "
        "border are no label change); interior: the other labelled pixels. ECE: 15 "
        "equal-width bins pooled over the region's pixels; per-image ECE: the mean over "
        "images of each image's ECE on its pixels of the region (the paper's measure). "
        "'vs uncal.': the boundary ECE relative to the uncalibrated model's.",
        "",
    ]
    cols = [
        ("boundary_ece", "boundary ECE"),
        ("interior_ece", "interior ECE"),
        ("boundary_nll", "boundary NLL"),
        ("interior_nll", "interior NLL"),
        ("boundary_mean_per_image_ece", "boundary per-image ECE"),
        ("interior_mean_per_image_ece", "interior per-image ECE"),
    ]
    for split, methods in splits.items():
        first = next(iter(methods.values()))
        nb, ni = int(first["boundary_n_pixels"]), int(first["interior_n_pixels"])
        base = _find_method(methods, "uncalibrated", method_roles(meta))
        md += [
            f"### {SPLIT_NAMES.get(split, split)}",
            "",
            f"{nb:,} boundary pixels ({_pct(nb, nb + ni)}), {ni:,} interior pixels.",
            "",
            "| method | " + " | ".join(h for _, h in cols) + " | vs uncal. |",
            "|---|" + "---:|" * (len(cols) + 1),
        ]
        for name, s in methods.items():
            ratio = (
                "n/a"
                if base is None or not methods[base]["boundary_ece"] > 0
                else f"{s['boundary_ece'] / methods[base]['boundary_ece']:.2f}x"
            )
            md.append(
                f"| {name} | " + " | ".join(f"{s[k]:.4f}" for k, _ in cols) + f" | {ratio} |"
            )
        md.append("")
    return md


def _save_figure(fig, path: Path, *, dpi: int) -> None:
    try:
        atomic_write_via_path(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    finally:
        with contextlib.suppress(Exception):
            import matplotlib.pyplot as plt

            plt.close(fig)


IGNORE_INDEX = 255
FLAG_BELOW = 0.5  # a pixel is "flagged" by the detector when its P(correct) is below this
# a method is "worse" on a metric when it differs by more than this (relative, at least 1e-6)
WORSE_TOL = 1e-6
_LOWER_IS_BETTER = {
    "ece": True,
    "mce": True,
    "nll": True,
    "brier": True,
    "accuracy": False,
    "miou": False,
}


def _pct(part, whole) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def _example_notes(
    *, images, labels, probs, class_names, p_correct=None, temperature=None, rows=3, **figure_only
) -> list[str]:
    """One sentence per map of the example figure, with its numbers on the example slices."""
    n = min(rows, len(images))
    first = next(iter(probs.values()))
    labels = np.asarray(labels[:n])
    valid = labels != IGNORE_INDEX
    errors = (first[:n].argmax(axis=1) != labels) & valid
    n_valid, n_err = int(valid.sum()), int(errors.sum())
    where = f"the {n} example slices"
    lines = [
        f"- **Errors**: pixels where the network's argmax differs from the label (red; ignored "
        f"pixels grey): {n_err:,} of the {n_valid:,} labelled pixels of {where} "
        f"({_pct(n_err, n_valid)}).",
    ]
    flagged = None
    if p_correct is not None:
        flagged = (np.asarray(p_correct[:n]) < FLAG_BELOW) & valid
        n_flag = int(flagged.sum())
        n_flag_err = int((flagged & errors).sum())
        lines.append(
            f"- **Detector P(correct)**: the correctness detector's probability that the "
            f"network is right, pixel by pixel (red: likely wrong). It flags (P(correct) < "
            f"{FLAG_BELOW:g}) {n_flag:,} pixels ({_pct(n_flag, n_valid)} of {where}); "
            f"{_pct(n_flag_err, n_flag)} of the flagged pixels are errors of the network, "
            f"against {_pct(n_err, n_valid)} of all pixels, and the flagged pixels hold "
            f"{_pct(n_flag_err, n_err)} of the errors."
        )
    if temperature is not None:
        t = np.asarray(temperature[:n], dtype=np.float64)
        sentence = (
            "- **Temperature**: the temperature T = 1/beta that selective scaling divides "
            "each pixel's logits by (log colour scale; T > 1 softens, T < 1 sharpens); "
            f"median T {np.median(t[valid]):.3g} over the labelled pixels of {where}"
        )
        if flagged is not None and flagged.any() and (valid & ~flagged).any():
            sentence += (
                f", {np.median(t[flagged]):.3g} on the flagged pixels and "
                f"{np.median(t[valid & ~flagged]):.3g} on the others"
            )
        lines.append(sentence + ".")
    return lines + [""]


def method_roles(meta: dict) -> dict:
    """What each method is ("uncalibrated", "selective", "temperature", ...), by its name.

    The commands that write results record it (``meta["roles"]``); the
    uncalibrated model is always named ``UNCALIBRATED``.
    """
    return {UNCALIBRATED: "uncalibrated", **(meta.get("roles") or {})}


def _find_method(methods, role: str, roles: dict):
    """The method whose recorded role is ``role`` (names are the user's: never read them)."""
    return next((m for m in methods if roles.get(m) == role), None)


def _worse(metric: str, sel: float, ts: float) -> bool:
    diff = (sel - ts) if _LOWER_IS_BETTER[metric] else (ts - sel)
    return diff > WORSE_TOL * max(1.0, abs(ts))


def worse_metrics(methods: dict, roles: dict) -> list[str]:
    """The metrics of one split where selective scaling is worse than temperature scaling."""
    sel, ts = (_find_method(methods, r, roles) for r in ("selective", "temperature"))
    if sel is None or ts is None:
        return []
    return [k for k in METRICS if _worse(k, methods[sel][k], methods[ts][k])]


def _bin_text(curve, b: int) -> str:
    lo, hi = curve.bin_edges[b], curve.bin_edges[b + 1]
    return f"[{lo:.3f}, {hi:.3f})"


def _worse_notes(accs: dict, methods: dict, roles: dict, n_bins: int = 15) -> list[str]:
    """A paragraph per metric where selective scaling is worse than temperature scaling."""
    worse = worse_metrics(methods, roles)
    if not worse:
        return []
    sel, ts = (_find_method(methods, r, roles) for r in ("selective", "temperature"))
    lines = []
    for k in worse:
        a, b = methods[sel][k], methods[ts][k]
        head = (
            f"**Why {sel}'s {HEADERS[k]} is worse than {ts}'s here.** {HEADERS[k]} "
            f"{a:.4f} against {b:.4f} ({a - b:+.4f})."
        )
        have_bins = sel in accs and ts in accs and k in ("ece", "mce")
        if have_bins:
            cs, ct = (accs[m].reliability_curve(n_bins) for m in (sel, ts))
            gs = np.where(cs.count > 0, np.abs(cs.accuracy - cs.confidence), 0.0)
            gt = np.where(ct.count > 0, np.abs(ct.accuracy - ct.confidence), 0.0)
            total = float(cs.count.sum())
        if k == "mce" and have_bins:
            i, j = int(np.argmax(gs)), int(np.argmax(gt))
            text = (
                f"MCE is the largest |accuracy - confidence| over the {n_bins} confidence bins, "
                f"whatever the bin holds. For {sel} it is bin {_bin_text(cs, i)}: "
                f"{cs.count[i]:,.0f} pixels ({_pct(cs.count[i], total)} of {total:,.0f}), "
                f"accuracy {cs.accuracy[i]:.3f} against mean confidence "
                f"{cs.confidence[i]:.3f}, a gap of {gs[i]:.4f}. "
            )
            if i == j:
                text += (
                    f"It is also {ts}'s largest gap, {gt[j]:.4f}, on {ct.count[j]:,.0f} "
                    "pixels there."
                )
            else:
                text += (
                    f"The same bin holds {ct.count[i]:,.0f} pixels under {ts} (gap "
                    f"{gt[i]:.4f}); {ts}'s largest gap is in bin {_bin_text(ct, j)}: "
                    f"{ct.count[j]:,.0f} pixels ({_pct(ct.count[j], total)}), gap "
                    f"{gt[j]:.4f}."
                )
            text += (
                " So the worse MCE rests on a bin of "
                f"{_pct(cs.count[i], total)} of the pixels; ECE weights every bin by "
                f"its pixels (here {methods[sel]['ece']:.4f} for {sel} against "
                f"{methods[ts]['ece']:.4f})."
            )
        elif k == "ece" and have_bins:
            contrib = (cs.count * gs - ct.count * gt) / total
            i = int(np.argmax(contrib))
            text = (
                f"ECE is the pixel-weighted mean of |accuracy - confidence| over the {n_bins} "
                f"bins. The bin adding most to the difference is {_bin_text(cs, i)} "
                f"(+{contrib[i]:.4f}): {cs.count[i]:,.0f} pixels with a gap of {gs[i]:.4f} "
                f"under {sel}, against {ct.count[i]:,.0f} pixels with a gap of {gt[i]:.4f} "
                f"under {ts}."
            )
        else:
            text = (
                f"{HEADERS[k]} is a mean over all pixels and does not split into confidence "
                "bins; the reliability diagrams above show where the two calibrations differ."
            )
        lines += [head + " " + text, ""]
    return lines


# --------------------------------------------------------------------------- saved results
def save_results(output: Path, accumulators: dict, meta: dict) -> list[str]:
    """Write {split: {method: accumulator}} and ``meta`` as accumulators.json + .npz."""
    arrays, entries = {}, []
    for split, accs in accumulators.items():
        for method, acc in accs.items():
            prefix = f"a{len(entries)}"
            values, refs = {}, {}
            for key, value in acc.state_dict().items():
                if isinstance(value, np.ndarray):
                    refs[key] = f"{prefix}.{key}"
                    arrays[refs[key]] = value
                elif isinstance(value, np.generic):
                    values[key] = value.item()
                elif value is None or isinstance(value, (str, int, float, bool)):
                    values[key] = value
                else:
                    raise TypeError(
                        f"accumulator state {key!r} is a {type(value).__name__}; "
                        "expected arrays, str, int, float, bool or None."
                    )
            entries.append({"split": split, "method": method, "values": values, "arrays": refs})
    atomic_write_via_path(output / RESULTS_ARRAYS, lambda tmp: np.savez(tmp, **arrays))
    index = {
        "format": _RESULTS_FORMAT,
        "version": _RESULTS_VERSION,
        "arrays": RESULTS_ARRAYS,
        "meta": meta,
        "accumulators": entries,
    }
    # the index last: a folder with an index always has the arrays it names
    atomic_write_bytes(output / RESULTS_INDEX, _json_bytes(index))
    return [RESULTS_INDEX, RESULTS_ARRAYS]


def results_path(results) -> Path:
    """The results file of ``sksegcal report RESULTS`` (a folder or one of its files)."""
    results = Path(results)
    if not results.is_dir():
        return need_file(results, "the evaluation results")
    for name in (RESULTS_INDEX, LEGACY_RESULTS):
        if (results / name).is_file():
            return results / name
    raise CommandError(
        f"the evaluation results {results / RESULTS_INDEX} do not exist; "
        f"write them with 'sksegcal evaluate STORE -o {results}'."
    )


def load_results(results, *, trusted: bool = False) -> tuple[dict, dict, Path]:
    """({split: {method: accumulator}}, meta, the file read) of an evaluate results folder."""
    path = results_path(results)
    if path.suffix == ".json":
        return (*_load_index(path), path)
    from ..persistence import detect_format

    try:
        is_pickle = detect_format(path) == "joblib"
    except ValueError:
        is_pickle = False
    if not is_pickle:
        raise CommandError(
            f"{path} is not an 'sksegcal evaluate' result (expected its {RESULTS_INDEX})."
        )
    if not trusted:
        raise CommandError(
            f"{path} is an 'sksegcal evaluate' result of an older version, a joblib/pickle "
            "file, and loading a pickle runs any code it contains: pass --trusted if you made "
            "it or trust its source, or rerun 'sksegcal evaluate' (it now writes "
            f"{RESULTS_INDEX} + {RESULTS_ARRAYS})."
        )
    import joblib

    try:
        saved = joblib.load(path)
        accumulators, meta = saved["accumulators"], saved["meta"]
    except Exception as exc:  # unpickling garbage can raise nearly anything
        raise CommandError(
            f"{path} is not an 'sksegcal evaluate' result ({type(exc).__name__}: {exc})."
        ) from None
    return accumulators, meta, path


def _load_index(path: Path) -> tuple[dict, dict]:
    def bad(why: str):
        return CommandError(f"{path} is not a readable 'sksegcal evaluate' result: {why}.")

    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != _RESULTS_FORMAT:
        raise bad(f'no "format": "{_RESULTS_FORMAT}" entry')
    if index.get("version") != _RESULTS_VERSION:
        raise bad(f"version {index.get('version')!r}, this sksegcal reads {_RESULTS_VERSION}")
    arrays_name = str(index.get("arrays", RESULTS_ARRAYS))
    arrays_path = path.parent / Path(arrays_name).name  # only a file beside the index
    if not arrays_path.is_file():
        raise bad(f"its arrays {arrays_path} do not exist")
    from ..metrics import CalibrationAccumulator

    accumulators: dict = {}
    try:
        with np.load(arrays_path, allow_pickle=False) as arrays:
            for entry in index["accumulators"]:
                state = dict(entry["values"])
                state.update({key: arrays[ref] for key, ref in entry["arrays"].items()})
                accumulators.setdefault(str(entry["split"]), {})[str(entry["method"])] = (
                    CalibrationAccumulator.from_state_dict(state)
                )
    except CommandError:
        raise
    except Exception as exc:  # a corrupt archive or a state that does not validate
        raise bad(f"{type(exc).__name__}: {exc}") from None
    if not accumulators:
        raise bad("it holds no accumulators")
    return accumulators, _clean_meta(index.get("meta"))


_META_TEXT = ("dataset", "description", "command")


def _clean_meta(meta) -> dict:
    """The metadata of a results file, with every field the report reads of its expected type.

    A results folder may come from anyone: fields of another type (a list
    where a dict of timings belongs, a number as the description) are
    dropped, so the report is written from what remains.
    """
    if not isinstance(meta, dict):
        return {}
    out = {k: v for k, v in meta.items() if isinstance(k, str)}
    for key in _META_TEXT:
        if key in out and not isinstance(out[key], str):
            del out[key]
    timings = out.get("timings")
    if timings is not None:
        out["timings"] = (
            {
                str(k): float(v)
                for k, v in timings.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if isinstance(timings, dict)
            else {}
        )
    calibrators = out.get("calibrators")
    if calibrators is not None:
        out["calibrators"] = (
            {str(k): v for k, v in calibrators.items() if isinstance(v, (str, dict))}
            if isinstance(calibrators, dict)
            else {}
        )
    width = out.get("boundary_width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int)):
        del out["boundary_width"]
    return out
