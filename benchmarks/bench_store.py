"""Out-of-core evaluation over a LogitStore: time and peak memory.

Builds (or reuses) a synthetic store of ``--pixels`` pixels with ``--classes``
classes at 512 x 1024 per image, then runs every phase in a fresh Python
process so that each peak RSS is that phase's own:

- ``read-raw``: read every byte of the store once (``readinto``);
- ``read-table``: read the store once as a float32 pixel table (``iter_chunks``);
- ``eval-uncal-ts``: uncalibrated and temperature-scaled metrics in one pass;
- ``eval-selective``: selective scaling (MLP correctness classifier) metrics;
- ``ratio``: read-table and uncalibrated + TS evaluation (numba on the logits
  path, numba on the probability-table path, NumPy only) alternated in one
  process, so that the ratios are not at the mercy of a noisy machine.

Calibrators are fitted on a sample of the recorded train split (the fit time
is reported apart: it reads only the sampled images' rows it keeps).

Usage::

    python benchmarks/bench_store.py                    # 50M pixels, C=19
    python benchmarks/bench_store.py --pixels 2000000   # quick run
    python benchmarks/bench_store.py --dir /data/bench --keep --n-jobs 1 2

``--cold`` drops the OS page cache before every timed phase (root on Linux), so
that the store comes off the disk, as a store larger than memory would.

Prints a markdown table; docs/store.md records one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HEIGHT, WIDTH = 512, 1024


def synthetic_image(seed: int, n_classes: int, height: int, width: int):
    """Over-confident logits: blocky ground truth, ~15% wrong pixels, 5% ignored."""
    rng = np.random.default_rng(seed)

    def blocks(values, size):
        coarse = values((height // size + 1, width // size + 1))
        return np.repeat(np.repeat(coarse, size, 0), size, 1)[:height, :width]

    labels = blocks(lambda s: rng.integers(0, n_classes, s), 32)
    pred = labels.copy()
    wrong = blocks(lambda s: rng.random(s) < 0.15, 8)
    pred[wrong] = rng.integers(0, n_classes, int(wrong.sum()))
    logits = rng.standard_normal((n_classes, height, width), dtype=np.float32)
    margin = (2.0 + 4.0 * rng.random((height, width), dtype=np.float32))[None]
    np.put_along_axis(logits, pred[None], np.take_along_axis(logits, pred[None], 0) + margin, 0)
    labels = labels.astype(np.uint8)
    labels[blocks(lambda s: rng.random(s) < 0.05, 16)] = 255
    return logits, labels


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def drop_page_cache(args) -> None:
    """With --cold, empty the OS page cache so that the store comes off the disk."""
    if not args.cold:
        return
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        raise SystemExit(f"--cold needs root on Linux to drop the page cache: {exc}") from None


# ----------------------------------------------------------------------------- phases
def phase_build(args):
    from sksegcal.store import LogitStore

    # 512 x 1024 images; quick runs use 5 smaller ones so that the split has all parts
    n_images = max(5, round(args.pixels / (HEIGHT * WIDTH)))
    height = min(HEIGHT, max(8, int(math.sqrt(args.pixels / n_images / 2))))
    width = 2 * height
    store = LogitStore.create(
        args.dir,
        n_classes=args.classes,
        source={"model": "synthetic", "generator": "benchmarks/bench_store.py"},
        exist_ok=True,
    )
    t0 = time.perf_counter()
    for i in store.missing(range(n_images)):
        store.add_image(i, *synthetic_image(i, args.classes, height, width))
    seconds = time.perf_counter() - t0
    if store.split is None:
        store.make_split(validation_size=0.2, test_size=0.2, random_state=0)
    return {"seconds": seconds, "n_images": len(store), "n_pixels": store.n_pixels}


def phase_read_raw(args):
    from sksegcal.store import LogitStore

    store = LogitStore.open(args.dir)
    buf = bytearray(1 << 24)
    drop_page_cache(args)
    total = 0
    t0 = time.perf_counter()
    for i in range(len(store)):
        for info in store.record(i)["files"].values():
            with open(store.path / "images" / info["file"], "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def phase_read_table(args):
    from sksegcal.store import LogitStore

    store = LogitStore.open(args.dir)
    for _ in store.iter_chunks(args.chunk_pixels, images=[0]):  # warm up, as the others
        pass
    drop_page_cache(args)
    n = 0
    t0 = time.perf_counter()
    for _, y, _ in store.iter_chunks(args.chunk_pixels):
        n += len(y)
    return {"seconds": time.perf_counter() - t0, "n_pixels": n}


def phase_fit(args):
    import joblib

    from sksegcal.store import LogitStore, fit_store

    store = LogitStore.open(args.dir)
    out = {}
    t0 = time.perf_counter()
    from sksegcal.scaling import TemperatureScaling

    ts = fit_store(TemperatureScaling(), store, max_pixels=1_000_000, random_state=0)
    out["ts_fit_seconds"] = time.perf_counter() - t0
    out["temperature"] = float(ts.temperature_)
    joblib.dump(ts, Path(args.dir) / "ts.joblib")
    if args.skip_selective:
        return out
    from sksegcal.selective import SelectiveScalingCalibrator

    t0 = time.perf_counter()
    sel = fit_store(
        SelectiveScalingCalibrator(random_state=0),
        store,
        max_pixels=args.selective_fit_pixels,
        random_state=0,
    )
    out["selective_fit_seconds"] = time.perf_counter() - t0
    joblib.dump(sel, Path(args.dir) / "selective.joblib")
    return out


def _evaluate(args, names):
    import joblib

    from sksegcal.store import LogitStore, evaluate_store

    store = LogitStore.open(args.dir)
    calibrators = {}
    for name in names:
        path = Path(args.dir) / f"{name}.joblib"
        calibrators[name] = None if name == "uncalibrated" else joblib.load(path)
    # warm up: lazy imports and first-call costs (numba's compiled-code cache) are not the
    # store's; with n_jobs > 1 this also starts the workers, which then import torch once
    evaluate_store(
        store, calibrators, images=[0, 1], chunk_pixels=1000, task_pixels=1, n_jobs=args.n_jobs[0]
    )
    drop_page_cache(args)
    t0 = time.perf_counter()
    accs, timings = evaluate_store(
        store,
        calibrators,
        n_jobs=args.n_jobs[0],
        chunk_pixels=args.chunk_pixels,
        accumulator_params={"check_input": not args.no_check_input},
        return_timings=True,
    )
    seconds = time.perf_counter() - t0
    workers_rss = 0.0
    if args.n_jobs[0] != 1:
        # the loky workers are still up: ask each for its own peak RSS
        from joblib import Parallel, delayed

        workers_rss = max(
            Parallel(n_jobs=args.n_jobs[0])(delayed(peak_rss_mb)() for _ in range(8))
        )
    return {
        "seconds": seconds,
        "workers_peak_rss_mb": workers_rss,
        "timings": timings,
        "metrics": {name: acc.summary() for name, acc in accs.items()},
    }


def phase_ratio(args):
    """read-table and evaluation variants alternated in one process: ratios, not times."""
    import joblib

    from sksegcal import _kernels
    from sksegcal.store import LogitStore, evaluate_store
    from sksegcal.store import _engine as store_module  # where evaluate_store looks it up

    store = LogitStore.open(args.dir)
    calibrators = {"uncalibrated": None, "ts": joblib.load(Path(args.dir) / "ts.joblib")}
    have_numba = _kernels.HAVE_NUMBA
    fused = store_module._softmax_temperatures

    def read():
        for _ in store.iter_chunks(args.chunk_pixels):
            pass

    def evaluate(compiled=True, logits_path=True):
        _kernels.HAVE_NUMBA = have_numba and compiled
        store_module._softmax_temperatures = fused if logits_path else (lambda *a: None)
        try:
            evaluate_store(store, calibrators, chunk_pixels=args.chunk_pixels)
        finally:
            _kernels.HAVE_NUMBA = have_numba
            store_module._softmax_temperatures = fused

    variants = {
        "read-table": read,
        "eval (numba: logits path)": evaluate,
        "eval (numba: probability-table path)": lambda: evaluate(logits_path=False),
        "eval (NumPy only: probability table)": lambda: evaluate(compiled=False),
    }
    evaluate_store(store, calibrators, images=[0])  # warm up: compilation, imports
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            drop_page_cache(args)
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {"seconds": seconds, "numba": have_numba}


PHASES = {
    "build": phase_build,
    "read-raw": phase_read_raw,
    "read-table": phase_read_table,
    "fit": phase_fit,
    "eval-uncal-ts": lambda args: _evaluate(args, ["uncalibrated", "ts"]),
    "eval-selective": lambda args: _evaluate(args, ["selective"]),
    "ratio": phase_ratio,
}


def run_phase(args, phase, n_jobs=1):
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        phase,
        "--dir",
        str(args.dir),
        "--pixels",
        str(args.pixels),
        "--classes",
        str(args.classes),
        "--selective-fit-pixels",
        str(args.selective_fit_pixels),
        "--n-jobs",
        str(n_jobs),
    ]
    cmd += ["--chunk-pixels", str(args.chunk_pixels)] if args.chunk_pixels else []
    cmd += ["--skip-selective"] if args.skip_selective else []
    cmd += ["--repeats", str(args.repeats)]
    cmd += ["--cold"] if args.cold else []
    cmd += ["--threads", str(args.threads)]
    cmd += ["--no-check-input"] if args.no_check_input else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"phase {phase} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pixels", type=int, default=50_000_000)
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--dir", type=Path, default=None, help="store directory (reused)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary store")
    parser.add_argument("--chunk-pixels", type=int, default=None, help="default: 4M // C")
    parser.add_argument("--selective-fit-pixels", type=int, default=200_000)
    parser.add_argument("--n-jobs", type=int, nargs="+", default=[1])
    parser.add_argument("--skip-selective", action="store_true")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of the side-by-side ratio phase"
    )
    parser.add_argument(
        "--no-check-input",
        action="store_true",
        help="CalibrationAccumulator(check_input=False): skip its probability checks",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per process (default 1: one core per process; 0: torch's default)",
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each timed read or evaluation (root, Linux)",
    )
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # child process: one phase, one JSON line
        if args.threads:
            import torch

            # torch's casts and softmax would otherwise take a second core that the
            # single-threaded NumPy/numba parts do not: one core per process, as
            # n_jobs counts them (loky caps each worker's threads the same way)
            torch.set_num_threads(args.threads)
        result = PHASES[args.phase](args)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    tmp = None
    if args.dir is None:
        tmp = tempfile.mkdtemp(prefix="bench_store_")
        args.dir = Path(tmp) / "store"
    try:
        results = {}
        for phase in ("build", "read-raw", "read-table", "fit"):
            results[phase] = run_phase(args, phase)
            print(f"# {phase}: {json.dumps(results[phase])}", file=sys.stderr)
        results["ratio"] = run_phase(args, "ratio")
        print(f"# ratio: {json.dumps(results['ratio'])}", file=sys.stderr)
        evals = ["eval-uncal-ts"] + ([] if args.skip_selective else ["eval-selective"])
        for phase in evals:
            for n_jobs in args.n_jobs:
                key = f"{phase} (n_jobs={n_jobs})"
                results[key] = run_phase(args, phase, n_jobs)
                print(f"# {key}: {json.dumps(results[key])}", file=sys.stderr)
        report(args, results)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def report(args, results):
    build, raw, table = results["build"], results["read-raw"], results["read-table"]
    n_pix = build["n_pixels"]
    gb = raw["bytes"] / 1e9
    print(
        f"\nStore: {build['n_images']} images, {n_pix / 1e6:.1f}M labelled pixels, "
        f"C={args.classes}, {gb:.2f} GB; written in {build['seconds']:.1f} s "
        f"(skipped when reused). Fit: {json.dumps(results['fit'])}\n"
    )
    print("| phase | wall s | vs read-table | Mpix/s | peak RSS MB (main / worker) | split (s) |")
    print("|---|---|---|---|---|---|")
    base = table["seconds"]
    for key, r in results.items():
        if key in ("build", "fit", "ratio"):
            continue
        split = ""
        workers = f" / {r['workers_peak_rss_mb']:.0f}" if r.get("workers_peak_rss_mb") else ""
        if "timings" in r:
            split = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
        print(
            f"| {key} | {r['seconds']:.1f} | {r['seconds'] / base:.2f}x | "
            f"{n_pix / r['seconds'] / 1e6:.1f} | {r['peak_rss_mb']:.0f}{workers} | {split} |"
        )
    ratio = results["ratio"]["seconds"]
    print(
        f"\nSide by side in one process, {args.repeats} alternating rounds "
        f"(numba: {results['ratio']['numba']}); median seconds and median of the "
        "per-round ratios to read-table:\n"
    )
    print("| variant | median s | vs read-table (median, range) |")
    print("|---|---|---|")
    base_rounds = ratio["read-table"]
    for name, rounds in ratio.items():
        ratios = sorted(t / b for t, b in zip(rounds, base_rounds))
        print(
            f"| {name} | {sorted(rounds)[len(rounds) // 2]:.2f} | "
            f"{ratios[len(ratios) // 2]:.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
        )
    for key, r in results.items():
        for name, m in r.get("metrics", {}).items():
            print(
                f"- {name}: ECE {m['ece']:.4f}, NLL {m['nll']:.4f}, Brier {m['brier']:.4f}, "
                f"accuracy {m['accuracy']:.4f}, mIoU {m['miou']:.4f}  ({key})"
            )
    print(f"\nPage cache: {'dropped before each timed phase' if args.cold else 'warm'}; "
          f"torch threads per process: {args.threads or 'default'}")
    print(f"Command: python benchmarks/bench_store.py {' '.join(sys.argv[1:])}")
    print(f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
