"""
Calibrators in scikit-learn pipelines
=====================================

Every sksegcal calibrator is a scikit-learn classifier on the *pixel table*
(one row of logits per pixel), so it composes like any other estimator:

* the correctness classifier of :class:`~sksegcal.SelectiveScalingCalibrator`
  can be any classifier, a :class:`~sklearn.pipeline.Pipeline` included;
* a calibrator can be the last step of a ``Pipeline`` whose first steps
  prepare the network's output (here: probabilities turned into
  log-probabilities);
* ``cross_val_score`` with a group splitter evaluates it image by image.
"""


# %%
# Synthetic segmentation outputs
# ------------------------------
# 40 images of 24x24 pixels, 4 classes. The "network" is over-confident, and
# on a share of hard pixels it is confidently wrong with the true class as a
# strong runner-up. The top two rows of each image are unlabelled (255).
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


logits, labels = make_images()
print("logits", logits.shape, "labels", labels.shape)

# %%
# The pixel table and an image-level split
# ----------------------------------------
# :func:`~sksegcal.pixels.flatten_segmentation` drops the unlabelled pixels
# and returns the image id of every pixel (``groups``);
# :func:`~sksegcal.pixels.split_images` splits the *images*, never the pixels.
from sksegcal.pixels import flatten_segmentation, split_images

X, y, groups = flatten_segmentation(logits, labels, ignore_index=255)
split = split_images(groups, validation_size=0.0, test_size=0.3, random_state=0)
train, _, test = split.masks(groups)
print(f"{X.shape[0]} pixels; {len(split.train)} calibration images, {len(split.test)} test")

# %%
# A Pipeline as the correctness classifier
# ----------------------------------------
# ``features="agnostic"`` gives the classifier class-agnostic inputs (sorted
# top log-probabilities, entropy, margin); a standardising step in front of a
# logistic regression is a typical small detector.
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sksegcal import SelectiveScalingCalibrator, TemperatureScaling
from sksegcal.metrics import expected_calibration_error, negative_log_likelihood

detector = make_pipeline(StandardScaler(), LogisticRegression())
selective = SelectiveScalingCalibrator(
    detector, features="agnostic", t1="auto", t2="auto", random_state=0
)
selective.fit(X[train], y[train], groups=groups[train])
print(f"t1={selective.t1_:.3g}  t2={selective.t2_:.3g}  AUROC={selective.detection_auroc_:.3f}")

# %%
# A calibrator at the end of a Pipeline
# -------------------------------------
# Some networks only export probabilities. A ``FunctionTransformer`` turns
# them into log-probabilities, which are logits up to a per-pixel constant;
# the calibrator after it is unchanged (the same could be had with
# ``input_type="probabilities"``).
from scipy.special import softmax
from sklearn.preprocessing import FunctionTransformer

P = softmax(X, axis=1)
to_log = FunctionTransformer(lambda p: np.log(np.clip(p, 1e-30, None)).astype(np.float32))
ts_pipe = make_pipeline(to_log, TemperatureScaling()).fit(P[train], y[train])
print(f"temperature fitted through the pipeline: {ts_pipe[-1].temperature_:.3f}")
direct = TemperatureScaling().fit(X[train], y[train])
print(f"temperature fitted on the logits:        {direct.temperature_:.3f}")

# %%
# Compare on the test images
# --------------------------
# Calibration never changes the predicted class (the accuracy is the same);
# it changes the confidence. Lower ECE and NLL are better.
rows = {
    "uncalibrated": softmax(X[test], axis=1),
    "temperature scaling (pipeline)": ts_pipe.predict_proba(P[test]),
    "selective scaling": selective.predict_proba(X[test]),
}
print(f"{'':32s} {'ECE':>7s} {'NLL':>7s}")
for name, proba in rows.items():
    ece = expected_calibration_error(y[test], proba)
    nll = negative_log_likelihood(y[test], proba)
    print(f"{name:32s} {ece:7.4f} {nll:7.4f}")
assert (selective.predict(X[test]) == X[test].argmax(axis=1)).all()

# %%
# Cross-validation by image
# -------------------------
# ``score`` is the negative log loss, so ``cross_val_score`` ranks calibrators
# by calibration. ``GroupKFold`` keeps every image's pixels in one fold.
from sklearn.model_selection import GroupKFold, cross_val_score

scores = cross_val_score(selective, X, y, groups=groups, cv=GroupKFold(n_splits=3))
print("negative NLL per fold:", np.round(scores, 4))
