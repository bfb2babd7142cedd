"""Benchmark: streaming ECE + NLL + Brier against torchmetrics and a bare softmax pass.

For every class count C and pixel count N, three methods run in fresh
subprocesses over the same chunks (``--chunk`` pixels each):

* ``softmax``: one bare ``torch.softmax(logits, 1).max(1)`` pass (the floor
  any per-pixel metric pays; it is what producing the probabilities costs);
* ``sksegcal``: ``CalibrationAccumulator.update`` on the probabilities, then
  ECE, NLL and Brier (input checks on, the default);
* ``torchmetrics``: ``MulticlassCalibrationError`` (ECE only: torchmetrics
  has no streaming NLL or Brier), which keeps every confidence in memory.

Chunks are generated on the fly from a small pool of pre-drawn chunks (with
fresh labels per chunk), so no method ever sees the whole data set at once
and generation is not timed. Memory is the peak resident set size during the
timed phase above the resident size just before it (Linux ``VmHWM``, reset
through ``/proc/self/clear_refs``), i.e. what the method adds on top of the
chunk it is fed.

Usage::

    python benchmarks/bench_metrics.py            # 2M, 10M, 50M pixels; C = 19, 150
    python benchmarks/bench_metrics.py --quick    # 0.5M, 2M, 5M pixels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

POOL = 2  # distinct pre-drawn chunks cycled through


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(method: str, n_classes: int, n_pixels: int, chunk: int, seed: int = 0) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    logits = [torch.randn(chunk, n_classes, generator=gen) * 4.0 for _ in range(POOL)]
    probs = [torch.softmax(z, dim=1) for z in logits] if method != "softmax" else None
    n_chunks = -(-n_pixels // chunk)
    rng = np.random.default_rng(seed)
    labels = []
    for k in range(POOL):
        # 70% of the labels follow the argmax (a plausible segmentation), 5% ignored
        am = logits[k].argmax(1).numpy()
        y = np.where(rng.random(chunk) < 0.7, am, rng.integers(0, n_classes, chunk))
        y[rng.random(chunk) < 0.05] = 255
        labels.append(y.astype(np.int64))

    if method == "sksegcal":
        from sksegcal.metrics import CalibrationAccumulator

        acc = CalibrationAccumulator(n_classes=n_classes, ignore_index=255)
    elif method == "torchmetrics":
        from torchmetrics.classification import MulticlassCalibrationError

        tm = MulticlassCalibrationError(num_classes=n_classes, n_bins=15, ignore_index=255)
        labels_t = [torch.from_numpy(y) for y in labels]

    import gc

    # One small call first, for every method alike: one-time library set-up (numba
    # loading its compiled kernels, ~45 MB; torch's first kernels) is not what a
    # method adds per pixel. It is reported apart as init_mb.
    gc.collect()
    before_init = _rss_kb("VmRSS")
    if method == "softmax":
        torch.softmax(logits[0][:1000], dim=1).max(dim=1)
    elif method == "sksegcal":
        CalibrationAccumulator(n_classes=n_classes, ignore_index=255).update(
            labels[0][:1000], probs[0][:1000]
        )
    else:
        warm = MulticlassCalibrationError(num_classes=n_classes, n_bins=15, ignore_index=255)
        warm.update(probs[0][:1000], labels_t[0][:1000])
        warm.compute()
        del warm
    gc.collect()
    base = _rss_kb("VmRSS")
    exact_peak = _reset_peak()
    t0 = time.perf_counter()
    seen = 0
    out: dict = {}
    for i in range(n_chunks):
        k = i % POOL
        m = min(chunk, n_pixels - seen)
        seen += m
        if method == "softmax":
            torch.softmax(logits[k][:m], dim=1).max(dim=1)
        elif method == "sksegcal":
            acc.update(labels[k][:m], probs[k][:m])
        else:
            tm.update(probs[k][:m], labels_t[k][:m])
    if method == "sksegcal":
        out = {
            "ece": acc.expected_calibration_error(15),
            "nll": acc.negative_log_likelihood(),
            "brier": acc.brier_score(),
        }
    elif method == "torchmetrics":
        out = {"ece": float(tm.compute())}
    elapsed = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") if exact_peak else _rss_kb("VmRSS")
    return {
        "method": method,
        "C": n_classes,
        "N": n_pixels,
        "time_s": elapsed,
        "extra_peak_mb": max(peak - base, 0) / 1024,
        "init_mb": max(base - before_init, 0) / 1024,
        "peak_exact": exact_peak,
        **out,
    }


def run_one(method: str, c: int, n: int, chunk: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        str(c),
        str(n),
        str(chunk),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{method} C={c} N={n} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="0.5M, 2M, 5M pixels")
    ap.add_argument(
        "--sizes", type=float, nargs="+", default=None, help="pixel counts (default 2e6 1e7 5e7)"
    )
    ap.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    ap.add_argument("--chunk", type=int, default=1 << 18, help="pixels per chunk")
    ap.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads")
    ap.add_argument("--no-torchmetrics", action="store_true")
    ap.add_argument(
        "--worker", nargs=4, metavar=("METHOD", "C", "N", "CHUNK"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.worker:
        m, c, n, ch = args.worker
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(worker(m, int(c), int(n), int(ch))))
        return
    sizes = args.sizes or ([5e5, 2e6, 5e6] if args.quick else [2e6, 1e7, 5e7])
    methods = ["softmax", "sksegcal"] + ([] if args.no_torchmetrics else ["torchmetrics"])
    rows = []
    print(f"chunk={args.chunk} pixels, threads={args.threads}", flush=True)
    hdr = (
        "| C | pixels | softmax+max s | sksegcal s | ratio to softmax | sksegcal extra "
        "peak MB | sksegcal one-time set-up MB | torchmetrics s | torchmetrics extra peak MB "
        "| ECE ours / tm |"
    )
    print(hdr)
    print("|" + "---|" * 10)
    for c in args.classes:
        for n in sizes:
            n = int(n)
            r = {m: run_one(m, c, n, args.chunk, args.threads) for m in methods}
            s, o = r["softmax"], r["sksegcal"]
            t = r.get("torchmetrics")
            tm_cols = (
                f"{t['time_s']:.2f} | {t['extra_peak_mb']:.0f} | {o['ece']:.5f} / {t['ece']:.5f}"
                if t
                else "- | - | -"
            )
            print(
                f"| {c} | {n / 1e6:g}M | {s['time_s']:.2f} | {o['time_s']:.2f} | "
                f"{o['time_s'] / s['time_s']:.2f} | {o['extra_peak_mb']:.1f} | "
                f"{o['init_mb']:.0f} | {tm_cols} |",
                flush=True,
            )
            rows.append(r)
    print("\nraw:", json.dumps(rows))


if __name__ == "__main__":
    main()
