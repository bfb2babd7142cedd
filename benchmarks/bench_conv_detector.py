"""A small learned convolutional correctness detector over the maps, beside the hand-made one.

    python benchmarks/bench_conv_detector.py                  # MNI152 tissue, seeds 0 1 2
    python benchmarks/bench_conv_detector.py --seeds 0 --max-epochs 20   # a quick look

Issue 14 asks whether a few convolutions over per-pixel feature maps find the errors better
than the six hand-made context features. The case is the demo's: the shipped MNI152 tissue
U-Net (``load_demo_network``) on the embedded data, with the quality benchmark's image-level
split (``split_images(slices, validation_size=0, test_size=0.4, random_state=seed)``, so the
test slices are those of ``benchmarks/quality.py``) and its shifted acquisitions of the test
slices.

Per seed, on the calibrator-train slices:

* ``per-pixel``: ``SelectiveScalingCalibrator(random_state=seed)``'s detector (logits only);
* ``spatial``: ``SelectiveScalingCalibrator(context="spatial", random_state=seed)``'s
  detector (the per-pixel features plus the six context columns);
* ``conv``: a fully convolutional network (torch, CPU, one thread) over 11 maps per image:
  the sorted log-probabilities (3), entropy, margin and the six context maps, standardised;
  three 3x3 convolutions (dilations 1, 2, 4: a 15x15 receptive field) of ``--width`` channels
  and a 1x1 output, trained by the masked binary cross-entropy of "the argmax is the label"
  on 75% of the calibrator-train slices, early-stopped on the other 25% (image-level
  validation), seeded.

Reported: held-out detection AUROC (``sksegcal.metrics.misprediction_detection_scores``) of
each detector, in-domain and shifted, and the ECE ratio to TS of soft selective scaling fed
by each detector's P(correct): the two package calibrators as they are, and for ``conv``
``beta = p / t1 + (1 - p) / t2`` with ``t1, t2`` fitted by NLL on the validation slices
(``sksegcal._base.fit_inverse_temperatures``, as the package's soft mode does on its held-out
rows). TS is fitted on all calibrator-train pixels.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

N_CONTEXT = 6


def feature_maps(z: np.ndarray) -> np.ndarray:
    """(N, C, H, W) logits -> (N, C + 2 + 6, H, W) float32: sorted log-probs, entropy,
    margin (``features_from_logits(..., "agnostic")``) and the spatial context."""
    from sksegcal.context import spatial_context
    from sksegcal.features import features_from_logits

    n, c, h, w = z.shape
    flat = np.ascontiguousarray(np.moveaxis(z, 1, -1).reshape(-1, c))
    base = features_from_logits(flat, "agnostic", top_k=c).reshape(n, h, w, -1)
    base = np.moveaxis(base, -1, 1)
    return np.concatenate([base, spatial_context(z)], axis=1).astype(np.float32)


def make_net(n_in: int, width: int):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(n_in, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=4, dilation=4),
        nn.ReLU(),
        nn.Conv2d(width, 1, 1),
    )


def train_conv(F_tr, t_tr, m_tr, F_va, t_va, m_va, *, seed, width, max_epochs, patience, lr):
    """Full-batch-per-epoch Adam in minibatches of 8 images; the best validation epoch."""
    import torch

    torch.manual_seed(seed)
    net = make_net(F_tr.shape[1], width)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="sum")
    Ft, tt, mt = (torch.from_numpy(a) for a in (F_tr, t_tr, m_tr))
    Fv, tv, mv = (torch.from_numpy(a) for a in (F_va, t_va, m_va))
    rng = np.random.default_rng(seed)
    best, best_state, best_epoch, stale = np.inf, None, 0, 0
    for epoch in range(max_epochs):
        net.train()
        for batch in np.array_split(rng.permutation(len(Ft)), max(1, len(Ft) // 8)):
            b = torch.from_numpy(batch)
            out = net(Ft[b])[:, 0]
            loss = loss_fn(out[mt[b]], tt[b][mt[b]]) / mt[b].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            out = net(Fv)[:, 0]
            val = float(loss_fn(out[mv], tv[mv]) / mv.sum())
        if val < best - 1e-5:
            best, best_epoch, stale = val, epoch, 0
            best_state = {k: v.clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    return net, best, best_epoch, epoch + 1


def predict_conv(net, F):
    import torch

    with torch.no_grad():
        return torch.sigmoid(net(torch.from_numpy(F))[:, 0]).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--max-epochs", type=int, default=150)
    parser.add_argument("--patience", type=int, default=15)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    import torch

    from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
    from sksegcal._segnet import (
        DEMO_SETTINGS,
        SegNetConfig,
        cache_dir,
        load_demo_network,
        predict_logits,
    )
    from sksegcal.calibrators._solver import fit_inverse_temperatures
    from sksegcal.datasets import load_dataset
    from sksegcal.features import softmax
    from sksegcal.metrics import expected_calibration_error, misprediction_detection_scores
    from sksegcal.pixels import flatten_segmentation, split_images

    torch.set_num_threads(1)
    name = "mni152-tissue"
    settings = DEMO_SETTINGS[(name, False)]
    data = load_dataset(name, random_state=0, cache_dir=cache_dir(), **settings["data"])
    cal, shifted = data.select("calibration"), data.select("shifted")
    model, _ = load_demo_network(name, config=SegNetConfig(**settings["net"]))
    Z = {"cal": predict_logits(model, cal.images), "sh": predict_logits(model, shifted.images)}
    labels = {"cal": cal.labels, "sh": shifted.labels}
    slices = {"cal": cal.slice_index, "sh": shifted.slice_index}
    n_classes = Z["cal"].shape[1]
    maps = {k: feature_maps(Z[k]) for k in Z}
    target = {k: (Z[k].argmax(1) == labels[k]).astype(np.float32) for k in Z}
    valid = {k: labels[k] != 255 for k in Z}
    tables = {k: flatten_segmentation(Z[k], labels[k], context="spatial") for k in Z}
    print(
        f"{name}: {n_classes} classes, {len(Z['cal'])} calibration + {len(Z['sh'])} shifted "
        f"images of {Z['cal'].shape[2:]}; {maps['cal'].shape[1]} input maps",
        flush=True,
    )

    def rows_of(k, image_mask):
        """Table rows (flatten_segmentation order) of the images in image_mask."""
        _, _, groups = tables[k]
        return image_mask[groups]

    def ece_ratio(p_fn, p_ts, y):
        return expected_calibration_error(y, p_fn) / expected_calibration_error(y, p_ts)

    results = []
    for seed in args.seeds:
        split = split_images(
            np.unique(slices["cal"]), validation_size=0.0, test_size=0.4, random_state=seed
        )
        fit_slices = np.setdiff1d(np.unique(slices["cal"]), split.test)
        val_slices = np.random.default_rng(seed).choice(
            fit_slices, max(1, len(fit_slices) // 4), replace=False
        )
        img = {
            "train": np.isin(slices["cal"], fit_slices) & ~np.isin(slices["cal"], val_slices),
            "val": np.isin(slices["cal"], val_slices),
            "fit": np.isin(slices["cal"], fit_slices),
            "test": np.isin(slices["cal"], split.test),
            "shifted": np.isin(slices["sh"], split.test),
        }
        # the standardisation of the maps: train images' valid pixels
        Ftr = maps["cal"][img["train"]]
        mtr = valid["cal"][img["train"]]
        mean = np.array([f[mtr].mean() for f in np.moveaxis(Ftr, 1, 0)], np.float32)
        std = np.array([f[mtr].std() for f in np.moveaxis(Ftr, 1, 0)], np.float32) + 1e-6

        def standard(F, mean=mean, std=std):
            return np.ascontiguousarray((F - mean[:, None, None]) / std[:, None, None])

        t0 = time.perf_counter()
        net, val_loss, best_epoch, epochs = train_conv(
            standard(Ftr), target["cal"][img["train"]], mtr,
            standard(maps["cal"][img["val"]]), target["cal"][img["val"]],
            valid["cal"][img["val"]],
            seed=seed, width=args.width, max_epochs=args.max_epochs,
            patience=args.patience, lr=args.lr,
        )  # fmt: skip
        t_conv = time.perf_counter() - t0

        def conv_p(k, image_mask, net=net, standard=standard):
            """P(correct) of the valid pixels, in the tables' row order."""
            p = predict_conv(net, standard(maps[k][image_mask]))
            return p[valid[k][image_mask]]

        X, y, _ = tables["cal"]
        fit_rows = rows_of("cal", img["fit"])
        Xf, yf, gf = X[fit_rows], y[fit_rows], slices["cal"][tables["cal"][2][fit_rows]]
        t0 = time.perf_counter()
        per_pixel = SelectiveScalingCalibrator(random_state=seed).fit(
            np.ascontiguousarray(Xf[:, :n_classes]), yf, groups=gf
        )
        spatial = SelectiveScalingCalibrator(context="spatial", random_state=seed).fit(
            Xf, yf, groups=gf
        )
        t_sel = time.perf_counter() - t0
        ts = TemperatureScaling().fit(np.ascontiguousarray(Xf[:, :n_classes]), yf)

        # soft temperatures from the conv detector's P(correct) on the validation slices
        val_rows = rows_of("cal", img["val"])
        p_val = conv_p("cal", img["val"]).astype(np.float64)
        fit = fit_inverse_temperatures(
            np.ascontiguousarray(X[val_rows, :n_classes]), y[val_rows],
            basis=np.column_stack([p_val, 1.0 - p_val]), bounds=(1e-2, 1e2),
        )  # fmt: skip
        a, b = fit.x
        row = {"seed": seed, "epochs": epochs, "best_epoch": best_epoch + 1,
               "t1": 1 / a, "t2": 1 / b, "conv_s": t_conv, "selective_s": t_sel}  # fmt: skip
        cases = (("in-domain", "cal", img["test"]), ("shifted", "sh", img["shifted"]))
        for case, k, mask in cases:
            Xk, yk, _ = tables[k]
            rows = rows_of(k, mask)
            Xe, ye = Xk[rows], yk[rows]
            Ze = np.ascontiguousarray(Xe[:, :n_classes])
            correct = Ze.argmax(1) == ye
            p_conv = conv_p(k, mask)
            scores = {
                "per-pixel": per_pixel.predict_correctness(Ze),
                "spatial": spatial.predict_correctness(Xe),
                "conv": p_conv,
            }
            for label, s in scores.items():
                row[f"auroc {label} {case}"] = misprediction_detection_scores(correct, s)["auroc"]
            p_ts = ts.predict_proba(Ze)
            beta = (a * p_conv + b * (1.0 - p_conv)).astype(np.float32)
            row[f"ece/ts per-pixel {case}"] = ece_ratio(per_pixel.predict_proba(Ze), p_ts, ye)
            row[f"ece/ts spatial {case}"] = ece_ratio(spatial.predict_proba(Xe), p_ts, ye)
            row[f"ece/ts conv {case}"] = ece_ratio(softmax(Ze * beta[:, None]), p_ts, ye)
            row[f"ece ts {case}"] = expected_calibration_error(ye, p_ts)
        results.append(row)
        print(
            f"seed {seed}: conv {epochs} epochs (best {best_epoch + 1}, val BCE {val_loss:.4f}, "
            f"{t_conv:.0f} s), t1 {1 / a:.3f} t2 {1 / b:.3f}; selective fits {t_sel:.0f} s",
            flush=True,
        )
        for key, v in row.items():
            if key.startswith(("auroc", "ece")):
                print(f"    {key:32s} {v:.4f}", flush=True)

    print("\nmean +- std over seeds", [r["seed"] for r in results])
    for key in results[0]:
        if key.startswith(("auroc", "ece")):
            v = np.array([r[key] for r in results])
            print(f"  {key:32s} {v.mean():.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:.4f}")


if __name__ == "__main__":
    main()
