"""Boundary against interior calibration on the demo's test images (issue 14, part 4).

Reads a folder written by ``sksegcal demo --output DIR --keep-stores`` (its two
stores, the split, the fitted temperature scaling and selective scaling), and
evaluates the uncalibrated model, TS and selective scaling with
``evaluate_store(..., boundary_width=k)`` for each band width ``k``, in-domain
and under the acquisition shift. Prints one Markdown table (docs/metrics.md,
"Boundary and interior")::

    for seed in 0 1 2; do
        sksegcal demo --output /tmp/bd$seed --keep-stores --seed $seed --quiet
    done
    python benchmarks/boundary_demo.py /tmp/bd0 /tmp/bd1 /tmp/bd2

With several folders (demo seeds: other splits and calibrators) each figure is
the mean over them, with the range in brackets.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from sksegcal.persistence import load
from sksegcal.store import LogitStore, evaluate_store

METHODS = ("uncalibrated", "temperature scaling", "selective scaling")
COLUMNS = (
    ("boundary", "ece"),
    ("interior", "ece"),
    ("boundary", "nll"),
    ("interior", "nll"),
    ("boundary", "mean_per_image_ece"),
    ("interior", "mean_per_image_ece"),
)


def _shifted_test_ids(store: LogitStore, test_slices) -> np.ndarray:
    keep = set(int(s) for s in test_slices)
    ids = [
        store.image_id(name)
        for name in store.image_names
        if int(re.match(r"z(\d+)-", str(name)).group(1)) in keep
    ]
    return np.sort(np.asarray(ids, dtype=np.int64))


def measure(folder: Path, widths) -> dict:
    """{(split, width, method): region summaries and the pooled ECE}."""
    meta = json.loads((folder / "metrics.json").read_text())
    cal = LogitStore.open(folder / "stores" / "calibration")
    shifted = LogitStore.open(folder / "stores" / "shifted")
    calibrators = {
        "uncalibrated": None,
        "temperature scaling": load(folder / "temperature_scaling.joblib", trusted=True),
        "selective scaling": load(folder / "calibrator.joblib", trusted=True),
    }
    splits = {
        "test": (cal, cal.split.test),
        "shifted-test": (shifted, _shifted_test_ids(shifted, meta["split"]["test_slices"])),
    }
    out = {}
    for split, (store, ids) in splits.items():
        for k in widths:
            accs = evaluate_store(store, calibrators, images=ids, boundary_width=k)
            for method, acc in accs.items():
                pooled = meta["results"][split][method]["ece"]
                # the pooled numbers are the demo's (the regions do not change them)
                assert abs(acc.expected_calibration_error() - pooled) < 1e-12, (split, method)
                out[split, k, method] = {**acc.region_summary(), "pooled_ece": pooled}
    return out


def _cell(values, fmt="{:.4f}") -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return fmt.format(v[0])
    return f"{fmt.format(v.mean())} [{fmt.format(v.min())}, {fmt.format(v.max())}]"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--widths", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args(argv)
    runs = [measure(f, args.widths) for f in args.folders]
    head = ["split", "k", "method", "boundary px"]
    head += [f"{r} {'per-image ECE' if m.startswith('mean') else m.upper()}" for r, m in COLUMNS]
    head += ["boundary ECE / uncal."]
    print("| " + " | ".join(head) + " |")
    print("|---|---:|---|" + "---:|" * (len(head) - 3))
    for split, k, method in runs[0]:
        rows = [run[split, k, method] for run in runs]
        base = [run[split, k, "uncalibrated"]["boundary"]["ece"] for run in runs]
        share = [
            r["boundary"]["n_pixels"] / (r["boundary"]["n_pixels"] + r["interior"]["n_pixels"])
            for r in rows
        ]
        cells = [split, str(k), method, _cell([100 * s for s in share], "{:.1f}%")]
        cells += [_cell([r[region][key] for r in rows]) for region, key in COLUMNS]
        cells.append(_cell([r["boundary"]["ece"] / b for r, b in zip(rows, base)], "{:.2f}x"))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
