"""
Reliability diagrams
====================

A reliability diagram bins pixels by their confidence (the top-class
probability) and plots, per bin, how often the predicted class was right. A
calibrated model lies on the diagonal; an over-confident one below it.
:mod:`sksegcal.plotting` draws them from
:class:`~sksegcal.metrics.CalibrationAccumulator` tallies, so the same plot
works for a few thousand pixels or for a whole evaluation set fed in chunks.

This example calibrates with the paper's correctness network,
:class:`~sksegcal.TorchMLPClassifier`, trained for only 3 epochs to stay fast.
"""


# %%
# Data and an image-level split
import numpy as np
from scipy.ndimage import gaussian_filter


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


from sksegcal.pixels import flatten_segmentation, split_images

logits, labels = make_images()
split = split_images(len(logits), validation_size=0.0, test_size=0.3, random_state=0)
X, y, groups = flatten_segmentation(logits[split.train], labels[split.train])

# %%
# Two calibrators
# ---------------
# A detector trained this briefly is rarely sure a pixel is wrong, so a fixed
# threshold of 0.5 would flag almost nothing: ``threshold="auto"`` picks the
# split by held-out NLL, and the class-agnostic features help it.
from sksegcal import SelectiveScalingCalibrator, TemperatureScaling, TorchMLPClassifier

ts = TemperatureScaling().fit(X, y)
mlp = TorchMLPClassifier(max_epochs=3, learning_rate=1e-2, n_threads=1, random_state=0)
selective = SelectiveScalingCalibrator(
    mlp, features="agnostic", t1="auto", threshold="auto", random_state=0
)
selective.fit(X, y, groups=groups)
print(f"TS: T={ts.temperature_:.3f};  selective: t1={selective.t1_:.3f}, t2={selective.t2_:.3g}")

# %%
# Accumulate the test images, map by map
# --------------------------------------
# :func:`~sksegcal.pixels.predict_proba_maps` applies a calibrator to logit
# maps (N, C, H, W); an accumulator takes label maps (N, H, W) with their
# ignored pixels and probability maps directly, one chunk at a time.
from scipy.special import softmax

from sksegcal.metrics import CalibrationAccumulator
from sksegcal.pixels import predict_proba_maps

n_classes = logits.shape[1]
accumulators = {
    name: CalibrationAccumulator(n_classes, ignore_index=255, classwise=True)
    for name in ("uncalibrated", "temperature scaling", "selective scaling")
}
for i in split.test:  # one image at a time, as one would stream a test set
    z, lab = logits[i : i + 1], labels[i : i + 1]
    accumulators["uncalibrated"].update(lab, softmax(z, axis=1))
    accumulators["temperature scaling"].update(lab, predict_proba_maps(ts, z))
    accumulators["selective scaling"].update(lab, predict_proba_maps(selective, z))

for name, acc in accumulators.items():
    s = acc.summary()
    print(f"{name:20s} ECE {s['ece']:.4f}  NLL {s['nll']:.4f}  accuracy {s['accuracy']:.4f}")

# %%
# The reliability diagrams
# ------------------------
# One column per model: accuracy per confidence bin (the gap to the bin's
# mean confidence shaded), and the number of pixels per bin below (log
# scale: segmentation confidences pile up near 1).
from sksegcal.plotting import plot_classwise_reliability, plot_reliability_diagram

fig = plot_reliability_diagram(accumulators, n_bins=15, title="Test images")

# %%
# Per class
# ---------
# With ``classwise=True`` the accumulator also keeps per-class tallies:
# for each class k, the observed frequency of k against the predicted
# probability of k.
fig_classes = plot_classwise_reliability(
    accumulators["selective scaling"],
    class_names=["road", "car", "sky", "tree"],
    title="Selective scaling, per class",
)
