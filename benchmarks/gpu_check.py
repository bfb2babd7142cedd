"""Prepared CUDA check of TorchMLPClassifier: train, predict, move to a CPU-only process.

Run on a machine with a CUDA GPU::

    python benchmarks/gpu_check.py                  # 1M pixels, C = 19 and 150, 5 epochs
    python benchmarks/gpu_check.py --pixels 200000 --epochs 2 --out results.json

Without CUDA it prints ``SKIP`` and exits 0. For each C it

1. fits with ``device="cuda"`` (timed, throughput in pixels/s) and checks the
   fitted attributes hold no torch tensor;
2. predicts on the GPU (timed) and on the CPU (``set_params(device="cpu")``)
   and checks they agree to 1e-5;
3. ``joblib.dump``s the GPU-trained model (its ``device`` parameter still
   ``"cuda"``), loads it in a fresh process with ``CUDA_VISIBLE_DEVICES=""``
   (no GPU visible), predicts there (CPU fallback, with a warning) and checks
   the result equals this process's CPU prediction exactly;
4. fits a second time with the same seed and reports how far the two GPU
   fits differ (CUDA kernels are not bitwise deterministic; reported, not
   required).

Exit status 0 when every check passed, 1 otherwise. A JSON summary goes to
``--out`` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import pickletools
import subprocess
import sys
import tempfile
import textwrap
import time

import joblib
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from bench_mlp import make_data  # noqa: E402

from sksegcal.mlp import TorchMLPClassifier  # noqa: E402


def _torch_names_in_pickle(obj) -> list[str]:
    data = pickle.dumps(obj)
    return [
        a for _, a, _ in pickletools.genops(data) if isinstance(a, str) and a.startswith("torch")
    ]


def _cpu_only_predict(model_path: str, x_path: str, out_path: str) -> tuple[bool, str]:
    script = textwrap.dedent(
        f"""
        import warnings, joblib, numpy as np, torch
        assert not torch.cuda.is_available(), "CUDA visible in the CPU-only process"
        clf = joblib.load({model_path!r})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            np.save({out_path!r}, clf.predict_proba(np.load({x_path!r})))
        """
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    return res.returncode == 0, res.stderr[-2000:]


def check_one(c: int, n: int, epochs: int, tmp: str, device: str = "cuda") -> dict:
    X, y = make_data(n, c)
    X_eval = X[: min(n, 100_000)]
    result: dict = {"C": c, "pixels": n, "epochs": epochs, "checks": {}}
    params = dict(
        max_epochs=epochs, n_iter_no_change=None, device=device, random_state=0, verbose=0
    )
    # warm-up: CUDA context, kernels
    TorchMLPClassifier(**{**params, "max_epochs": 1}).fit(X[:50_000], y[:50_000])

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    clf = TorchMLPClassifier(**params).fit(X, y)
    t_fit = time.perf_counter() - t0
    n_train = n - int(round(0.1 * n))
    result["fit_s"] = t_fit
    result["train_pixels_per_s"] = n_train * clf.n_iter_ / t_fit
    result["batch_size"] = clf.batch_size_
    result["device_"] = clf.device_
    result["checks"]["trained_on_requested_device"] = clf.device_.startswith(device)
    result["checks"]["no_torch_in_pickle"] = not _torch_names_in_pickle(clf)

    clf.predict_proba(X[:10_000])
    t0 = time.perf_counter()
    p_gpu = clf.predict_proba(X)
    t_pred = time.perf_counter() - t0
    result["predict_pixels_per_s"] = n / t_pred
    result["predict_s"] = t_pred

    clf.set_params(device="cpu")
    t0 = time.perf_counter()
    p_cpu = clf.predict_proba(X_eval)
    result["cpu_predict_pixels_per_s"] = len(X_eval) / (time.perf_counter() - t0)
    diff = float(np.abs(p_cpu - p_gpu[: len(X_eval)]).max())
    result["max_abs_diff_gpu_vs_cpu_predict"] = diff
    result["checks"]["gpu_cpu_predict_agree_1e-5"] = diff < 1e-5

    # the model as saved from the GPU session: device parameter still "cuda"
    clf.set_params(device=device)
    model_path = os.path.join(tmp, f"mlp_c{c}.joblib")
    x_path = os.path.join(tmp, f"x_c{c}.npy")
    out_path = os.path.join(tmp, f"p_c{c}.npy")
    joblib.dump(clf, model_path)
    np.save(x_path, X_eval)
    ok, err = _cpu_only_predict(model_path, x_path, out_path)
    result["checks"]["cpu_only_process_loads_and_predicts"] = ok
    if ok:
        same = bool(np.array_equal(np.load(out_path), p_cpu))
        result["checks"]["cpu_only_process_identical_to_cpu_predict"] = same
    else:
        result["cpu_only_error"] = err

    clf2 = TorchMLPClassifier(**params).fit(X, y)
    result["same_seed_max_weight_diff_on_gpu"] = float(
        max(np.abs(a - b).max() for a, b in zip(clf.coefs_, clf2.coefs_))
    )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="CUDA check of TorchMLPClassifier")
    p.add_argument("--pixels", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, nargs="+", default=[19, 150])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default=None, help="write a JSON summary here")
    p.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="run every step with device='cpu' (tests this script without a GPU)",
    )
    args = p.parse_args(argv)

    device = "cpu" if args.dry_run_cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device in this process; nothing to check.")
        return 0
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU dry run"
    print(f"# {name}, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.classes:
            r = check_one(c, args.pixels, args.epochs, tmp, device)
            results.append(r)
            print(json.dumps(r, indent=1), flush=True)
    print()
    print("| C | pixels | batch | fit s | train Mpix/s | predict Mpix/s | all checks |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['C']} | {r['pixels']} | {r['batch_size']} | {r['fit_s']:.1f} "
            f"| {r['train_pixels_per_s'] / 1e6:.2f} | {r['predict_pixels_per_s'] / 1e6:.1f} "
            f"| {all(r['checks'].values())} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    failed = [(r["C"], k) for r in results for k, v in r["checks"].items() if not v]
    if failed:
        print("FAILED:", failed)
        return 1
    print("OK: all checks passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
