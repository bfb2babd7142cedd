"""
Save a calibrator, load it in a separate evaluation script
==========================================================

A calibrator is fitted once and applied elsewhere: in an evaluation script,
in mmsegmentation inference, on another machine. :mod:`sksegcal.persistence`
saves it in two formats:

* ``format="joblib"``: a pickle. Fast and general, but loading a pickle runs
  whatever code it contains, so :func:`~sksegcal.persistence.load` opens one
  only with ``trusted=True``: use it for your own files;
* ``format="skops"``: a pickle-free :mod:`skops.io` archive whose types are
  checked before anything is built: use it for files you share or receive.

Both record the library versions and warn when loaded under other ones. Here
a training step saves the calibrator and a **separate Python process**
evaluates it, as a real evaluation script would.
"""


# %%
# Training step: fit and save
# ---------------------------
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter
from sklearn.linear_model import LogisticRegression

from sksegcal import SelectiveScalingCalibrator
from sksegcal.persistence import save
from sksegcal.pixels import flatten_segmentation, split_images


def make_images(n_images=40, n_classes=4, size=24, seed=0):
    rng = np.random.default_rng(seed)
    fields = gaussian_filter(rng.normal(size=(n_images, n_classes, size, size)), (0, 0, 3, 3))
    labels = fields.argmax(axis=1)
    onehot = np.moveaxis(np.eye(n_classes)[labels], -1, 1)
    logits = 6.0 * onehot + 1.5 * rng.normal(size=onehot.shape)
    hard = rng.random(labels.shape) < rng.uniform(0.05, 0.3, size=(n_images, 1, 1))
    wrong = (labels + rng.integers(1, n_classes, size=labels.shape)) % n_classes
    hard_logits = 4.0 * onehot + 7.0 * np.moveaxis(np.eye(n_classes)[wrong], -1, 1)
    logits = np.where(hard[:, None], hard_logits + rng.normal(size=onehot.shape), logits)
    labels[:, :2, :] = 255
    return logits.astype(np.float32), labels.astype(np.uint8)


logits, labels = make_images()
split = split_images(len(logits), validation_size=0.0, test_size=0.3, random_state=0)
X, y, groups = flatten_segmentation(logits[split.train], labels[split.train])
calibrator = SelectiveScalingCalibrator(
    LogisticRegression(), features="agnostic", t1="auto", random_state=0
).fit(X, y, groups=groups)

workdir = Path(tempfile.mkdtemp(prefix="sksegcal-example-"))
save(calibrator, workdir / "calibrator.joblib")  # for ourselves
save(calibrator, workdir / "calibrator.skops", format="skops")  # to share
np.save(workdir / "test_logits.npy", logits[split.test])
np.save(workdir / "test_labels.npy", labels[split.test])
print(sorted(p.name for p in workdir.iterdir()))

# %%
# Evaluation step: a separate script
# -----------------------------------
# It knows nothing of the training code: it loads the calibrator and the test
# maps, applies it map by map and reports calibration metrics. The skops file
# loads without ``trusted``; the joblib one needs ``trusted=True``.
EVALUATE = """
import sys
from pathlib import Path

import numpy as np

from sksegcal.metrics import CalibrationAccumulator
from sksegcal.persistence import load
from sksegcal.pixels import predict_proba_maps

workdir = Path(sys.argv[1])
logits = np.load(workdir / "test_logits.npy")
labels = np.load(workdir / "test_labels.npy")

safe = load(workdir / "calibrator.skops")                     # no code runs while loading
mine = load(workdir / "calibrator.joblib", trusted=True)      # a pickle we made ourselves
try:
    load(workdir / "calibrator.joblib")
except ValueError as exc:
    print("refused without trusted=True:", str(exc)[:60], "...")

acc = CalibrationAccumulator(logits.shape[1], ignore_index=255)
for z, lab in zip(logits, labels):
    proba = predict_proba_maps(safe, z[None])
    assert np.array_equal(proba, predict_proba_maps(mine, z[None]))
    acc.update(lab[None], proba)
summary = acc.summary()
print(f"{type(safe).__name__}: t1={safe.t1_:.3f} t2={safe.t2_:.3g}")
print(f"test images: {len(logits)}, ECE {summary['ece']:.4f}, NLL {summary['nll']:.4f}")
"""
script = workdir / "evaluate.py"
script.write_text(EVALUATE)
result = subprocess.run(
    [sys.executable, str(script), str(workdir)], capture_output=True, text=True, check=True
)
print(result.stdout)

# %%
# A file that is not a calibrator
# -------------------------------
# ``load`` checks what it read: anything but a sksegcal calibrator (or a
# Pipeline / search ending in one) is a ``TypeError`` naming the type found;
# a file in neither format is a ``ValueError``.
from sksegcal.persistence import load

(workdir / "notes.txt").write_text("not a calibrator")
try:
    load(workdir / "notes.txt")
except ValueError as exc:
    print(exc)

# %%
# Clean up
import shutil

shutil.rmtree(workdir)
