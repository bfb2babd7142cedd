"""Throughput of TorchMLPClassifier against the machine's own matmul rate and skorch.

For each number of classes C (the input width), on synthetic per-pixel
log-probabilities with correctness labels:

- training pixels/s (``fit`` without validation, all epochs) and inference
  pixels/s (``predict_proba``);
- the useful matmul FLOP rate these imply, as a fraction of the rate that
  ``torch.mm`` alone reaches on the same shapes in the same process (forward;
  forward + both backward products for training): the share of time spent in
  the matmuls that the network needs, the rest being BatchNorm, ReLU, the loss,
  the optimizer, gathering and Python;
- the same module (same initialisation) trained and evaluated by skorch's
  ``NeuralNetClassifier``, as a time ratio skorch / ours.

Prints a Markdown table. Usage::

    python benchmarks/bench_mlp.py                      # 1M pixels, C = 19 and 150
    python benchmarks/bench_mlp.py --pixels 100000      # quick run
    python benchmarks/bench_mlp.py --threads 1 --no-skorch
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from sksegcal.mlp import TorchMLPClassifier, _build_module  # noqa: E402


def make_data(n: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities (n, c) float32 and correctness labels drawn from the confidence."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, c), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        z = rng.standard_normal((m, c), dtype=np.float32) * 2.0
        z[np.arange(m), rng.integers(0, c, m)] += 4.0
        z -= z.max(1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(1, keepdims=True))
        X[s : s + m] = lp
        y[s : s + m] = rng.random(m) < np.exp(lp.max(1))
    return X, y


def layer_shapes(c: int, n_out: int = 2) -> list[tuple[int, int]]:
    widths = [c, c, 2 * c, c, n_out]
    return list(zip(widths[:-1], widths[1:]))


def matmul_rate(shapes, rows: int, n_rows: int, training: bool) -> tuple[float, float]:
    """(useful FLOP per row, FLOP/s of torch.mm alone) for the network's products.

    Runs the bare products over ``n_rows`` rows in blocks of ``rows`` (about as
    long as the work it is compared with, so both see the same machine load).
    Inference: the chain h <- h @ W through the layers (preallocated outputs),
    i.e. the network without bias, ReLU or softmax. Training: the forward
    products, plus h^T @ G (weight gradient) and G @ W^T (input gradient, not
    for the first layer, whose input needs none), on preallocated operands.
    """
    g = torch.Generator().manual_seed(0)
    flop = sum(
        2.0 * a * b * (1 if not training else (2 if i == 0 else 3))
        for i, (a, b) in enumerate(shapes)
    )
    if not training:
        x = torch.randn(rows, shapes[0][0], generator=g)
        ws = [torch.randn(a, b, generator=g) / math.sqrt(a) for a, b in shapes]
        outs = [torch.empty(rows, b) for _, b in shapes]

        def run():
            h = x
            for w, out in zip(ws, outs):
                h = torch.mm(h, w, out=out)

    else:
        ops = []
        for i, (a, b) in enumerate(shapes):
            h = torch.randn(rows, a, generator=g)
            w = torch.randn(a, b, generator=g)
            G = torch.randn(rows, b, generator=g)
            ops.append((h, w, torch.empty(rows, b)))
            ops.append((h.t(), G, torch.empty(a, b)))
            if i > 0:
                ops.append((G, w.t(), torch.empty(rows, a)))

        def run():
            for x_, y_, out in ops:
                torch.mm(x_, y_, out=out)

    run()  # warm-up
    reps = max(1, round(n_rows / rows))
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    dt = time.perf_counter() - t0
    return flop, flop * rows * reps / dt


def _ours(epochs: int, batch_size: int, threads: int, chunk_size: int) -> TorchMLPClassifier:
    return TorchMLPClassifier(
        max_epochs=epochs,
        batch_size=batch_size,
        validation_fraction=None,
        n_iter_no_change=None,
        chunk_size=chunk_size,
        device="cpu",
        n_threads=threads,
        random_state=0,
    )


def _skorch(c: int, epochs: int, batch_size: int):
    from skorch import NeuralNetClassifier

    torch.manual_seed(0)
    module = _build_module(c, (c, 2 * c, c), 2, batch_norm=True, dropout=0.0, identity_init=True)
    return NeuralNetClassifier(
        module,
        criterion=torch.nn.CrossEntropyLoss,
        optimizer=torch.optim.AdamW,
        lr=1e-3,
        optimizer__weight_decay=1e-6,
        batch_size=batch_size,
        max_epochs=epochs,
        train_split=None,
        iterator_train__shuffle=True,
        classes=[0, 1],
        device="cpu",
        verbose=0,
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_one(X, y, c: int, args, threads: int) -> dict:
    """Interleaved rounds; each quantity keeps its best round.

    On a shared machine the load changes within seconds; interleaving the
    matmul reference, our fit/predict and skorch's in every round, each timed
    over seconds of work, gives each the same chances, and the best round is
    the least disturbed one.
    """
    n = len(y)
    bs = args.batch_size or int(min(65536, max(64, math.ceil(n / 32))))
    shapes = layer_shapes(c)
    chunk = min(args.chunk_size, n)
    best = dict.fromkeys(
        ["mm_inf", "mm_tr", "fit", "pred", "sk_fit", "sk_pred"], math.inf
    )  # seconds per unit (rates stored as inverse)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = _ours(1, bs, threads, args.chunk_size)
        ours.fit(X[:20000], y[:20000])  # warm-up
        ours.set_params(max_epochs=args.epochs)
        for r in range(args.repeats):
            ref_rows = min(n, args.reference_rows)
            f_inf, r_inf = matmul_rate(shapes, chunk, ref_rows, training=False)
            f_tr, r_tr = matmul_rate(shapes, bs, ref_rows, training=True)
            best["mm_inf"] = min(best["mm_inf"], 1 / r_inf)
            best["mm_tr"] = min(best["mm_tr"], 1 / r_tr)
            best["fit"] = min(best["fit"], _timed(lambda: ours.fit(X, y)))
            best["pred"] = min(best["pred"], _timed(lambda: ours.predict_proba(X)))
            if not args.no_skorch:
                net = _skorch(c, args.skorch_epochs, bs)
                best["sk_fit"] = min(best["sk_fit"], _timed(lambda net=net: net.fit(X, y)))
                best["sk_pred"] = min(
                    best["sk_pred"], _timed(lambda net=net: net.predict_proba(X))
                )
            print(
                f"# C={c} round {r + 1}: " + ", ".join(f"{k}={v:.3g}" for k, v in best.items()),
                flush=True,
            )
    finally:
        torch.set_num_threads(old)
    assert ours.batch_size_ == bs
    train_pps = n * args.epochs / best["fit"]
    pred_pps = n / best["pred"]
    row = {
        "C": c,
        "batch": bs,
        "train_pps": train_pps,
        "train_gflops": train_pps * f_tr / 1e9,
        "mm_train_gflops": 1 / best["mm_tr"] / 1e9,
        "train_frac": train_pps * f_tr * best["mm_tr"],
        "pred_pps": pred_pps,
        "pred_gflops": pred_pps * f_inf / 1e9,
        "mm_pred_gflops": 1 / best["mm_inf"] / 1e9,
        "pred_frac": pred_pps * f_inf * best["mm_inf"],
        "fit40": 40 * n / train_pps,
    }
    if not args.no_skorch:
        row["skorch_train"] = (best["sk_fit"] / args.skorch_epochs) / (best["fit"] / args.epochs)
        row["skorch_pred"] = best["sk_pred"] / best["pred"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pixels", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    p.add_argument("--epochs", type=int, default=1, help="timed training epochs per fit")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds; best kept")
    p.add_argument("--batch-size", type=int, default=None, help="default: the 'auto' rule")
    p.add_argument("--chunk-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--skorch-epochs", type=int, default=1)
    p.add_argument("--no-skorch", action="store_true")
    p.add_argument(
        "--reference-rows", type=int, default=262144, help="rows for the bare-matmul reference"
    )
    args = p.parse_args(argv)

    threads = args.threads or torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {threads}, load average {load:.1f}, "
        f"{args.pixels:,} pixels, best of {args.repeats} rounds of {args.epochs} epoch(s)",
        flush=True,
    )
    rows = []
    for c in args.classes:
        X, y = make_data(args.pixels, c)
        rows.append(bench_one(X, y, c, args, threads))
        print(f"# C={c} done: {rows[-1]}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average at the end {load:.1f}")

    print()
    head = (
        "| C | batch | train Mpix/s | train GFLOP/s | mm GFLOP/s (train shapes) | train % of mm "
        "| predict Mpix/s | predict GFLOP/s | mm GFLOP/s (predict shapes) | predict % of mm "
        "| est. 40-epoch fit (s) | skorch/ours train time | skorch/ours predict time |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        sk_t = f"{r['skorch_train']:.1f}x" if "skorch_train" in r else "-"
        sk_p = f"{r['skorch_pred']:.1f}x" if "skorch_pred" in r else "-"
        print(
            f"| {r['C']} | {r['batch']} | {r['train_pps'] / 1e6:.3f} | {r['train_gflops']:.1f} "
            f"| {r['mm_train_gflops']:.1f} | {100 * r['train_frac']:.0f}% "
            f"| {r['pred_pps'] / 1e6:.2f} | {r['pred_gflops']:.1f} | {r['mm_pred_gflops']:.1f} "
            f"| {100 * r['pred_frac']:.0f}% | {r['fit40']:.0f} | {sk_t} | {sk_p} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
