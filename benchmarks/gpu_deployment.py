"""Prepared CUDA benchmark of the calibrator modules: pixels per second on a GPU.

Run on a machine with a CUDA GPU::

    python benchmarks/gpu_deployment.py                       # 1 x 512 x 512, 19 and 150 classes
    python benchmarks/gpu_deployment.py --batch 4 --out gpu.json

Without CUDA it prints ``SKIP: no CUDA device`` and exits 0.

For 19 and 150 classes, float32 and float16, each calibrator's module (TS,
vector, Dirichlet, ensemble TS, Meta-Cal, selective scaling soft / hard /
generalised / with spatial context / with the paper's MLP, LTS with spatial
context) runs on CUDA logits of ``--batch`` images of ``--size`` x ``--size``:
the median time of ``--repeats`` synchronised runs gives pixels/s. Each module's
float32 CUDA output is checked against its CPU output (max difference and the
share of pixels with the same argmax are printed; a float32 difference above 1e-4
or an argmax share below 0.9999 fails the run, exit status 1). A plain softmax
is timed as the reference. A JSON summary goes to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings

import numpy as np


def fitted_calibrators(c: int) -> dict:
    """Every calibrator fitted on small synthetic maps (the cost does not depend on the fit)."""
    from scipy.ndimage import uniform_filter

    from sksegcal import (
        LocalTemperatureScaling,
        SelectiveScalingCalibrator,
        TemperatureScaling,
        TorchMLPClassifier,
    )
    from sksegcal.pixels import flatten_segmentation
    from sksegcal.scaling import (
        DirichletScaling,
        EnsembleTemperatureScaling,
        MetaCalScaling,
        VectorScaling,
    )

    rng = np.random.default_rng(0)
    size = 48
    labels = (np.add.outer(np.arange(size), np.arange(size)) // 8) % c
    labels = np.stack([np.roll(labels, 3 * i, axis=1) for i in range(6)])
    noise = uniform_filter(rng.normal(size=(6, c, size, size)), size=(1, 1, 3, 3))
    logits = (4.0 * np.moveaxis(np.eye(c)[labels], -1, 1) + 12.0 * noise).astype(np.float32)
    X, y, groups = flatten_segmentation(logits, labels)
    Xc, _, _ = flatten_segmentation(logits, labels, context="spatial")
    made = {
        "ts": (TemperatureScaling(), X),
        "vector": (VectorScaling(max_iter=30), X),
        "dirichlet": (DirichletScaling(max_iter=10), X),
        "ets": (EnsembleTemperatureScaling(), X),
        "metacal": (MetaCalScaling(), X),
        "selective_soft": (SelectiveScalingCalibrator(random_state=0, guard=None), X),
        "selective_hard": (SelectiveScalingCalibrator(mode="hard", random_state=0, guard=None), X),
        "selective_generalised": (
            SelectiveScalingCalibrator(mode="generalised", random_state=0, guard=None),
            X,
        ),
        "selective_context": (
            SelectiveScalingCalibrator(context="spatial", random_state=0, guard=None),
            Xc,
        ),
        "selective_paper_mlp": (
            SelectiveScalingCalibrator(
                TorchMLPClassifier(max_epochs=1, device="cpu", random_state=0),
                features="log_softmax",
                t1=1.0,
                t2=1e10,
                threshold=0.5,
                mode="hard",
                random_state=0,
            ),
            X,
        ),
        "lts_context": (LocalTemperatureScaling(), Xc),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (cal, table) in made.items():
            if hasattr(cal, "guard"):
                cal.fit(table, y, groups=groups)
            else:
                cal.fit(table, y)
            out[name] = cal
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="run every step on the CPU (checks the script)"
    )
    args = parser.parse_args(argv)

    import torch

    if args.cpu_dry_run:
        device, name = torch.device("cpu"), "CPU dry run (not a GPU figure)"
        torch.cuda.synchronize = lambda *a: None
    elif not torch.cuda.is_available():
        print("SKIP: no CUDA device (torch.cuda.is_available() is False); nothing was measured.")
        return 0
    else:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    print(
        f"{name}, torch {torch.__version__}, batch {args.batch} x {args.size}x{args.size}, "
        f"median of {args.repeats}"
    )
    pixels = args.batch * args.size * args.size
    results, ok = [], True

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    for c in args.classes:
        calibrators = fitted_calibrators(c)
        gen = torch.Generator().manual_seed(0)
        cpu_logits = 6.0 * torch.randn(args.batch, c, args.size, args.size, generator=gen)
        cpu_logits = torch.nn.functional.avg_pool2d(cpu_logits, 5, stride=1, padding=2) * 3
        for dtype in (torch.float32, torch.float16):
            logits = cpu_logits.to(device=device, dtype=dtype)
            with torch.inference_mode():
                t = timed(lambda logits=logits: torch.softmax(logits, dim=1))
            print(
                f"C={c:4d} {str(dtype):14s} {'softmax (reference)':24s} "
                f"{pixels / t / 1e6:10.1f} Mpixels/s"
            )
            results.append(
                {
                    "classes": c,
                    "dtype": str(dtype),
                    "module": "softmax",
                    "seconds": t,
                    "pixels_per_second": pixels / t,
                }
            )
            for key, cal in calibrators.items():
                module = cal.to_torch().to(device)
                record = {"classes": c, "dtype": str(dtype), "module": key}
                try:
                    with torch.inference_mode():
                        t = timed(lambda module=module, logits=logits: module(logits))
                        record.update(seconds=t, pixels_per_second=pixels / t)
                        line = f"{pixels / t / 1e6:10.1f} Mpixels/s"
                        if dtype == torch.float32:
                            got = module(logits).cpu()
                            ref = cal.to_torch()(cpu_logits)
                            diff = float((got - ref).abs().max())
                            same = float((got.argmax(1) == ref.argmax(1)).float().mean())
                            record.update(max_diff_vs_cpu=diff, argmax_agreement=same)
                            line += f"  vs CPU: max diff {diff:.2e}, argmax agree {same:.6f}"
                            if not (diff <= 1e-4 and same >= 0.9999):
                                ok = False
                                line += "  FAIL"
                except Exception as error:  # report and go on: one module must not hide others
                    record["error"] = repr(error)
                    line = f"ERROR {error!r}"[:200]
                    if dtype == torch.float32:
                        ok = False
                print(f"C={c:4d} {str(dtype):14s} {key:24s} {line}")
                results.append(record)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "batch": args.batch,
                    "size": args.size,
                    "results": results,
                },
                f,
                indent=1,
            )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
