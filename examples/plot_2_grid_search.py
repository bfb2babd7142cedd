"""
Choosing t2 and the classifier by grid search, split by image
=============================================================

:class:`~sksegcal.SelectiveScalingCalibrator` has two kinds of
hyper-parameters: the temperatures (``t1``, ``t2``, fixed or ``"auto"``) and
those of its correctness classifier (reached as ``classifier__<name>``, as in
any scikit-learn meta-estimator). ``GridSearchCV`` tunes both at once. Two
rules matter for segmentation:

* **split by image**: neighbouring pixels are near-copies, so validating on
  pixels of the training images is optimistic. Use
  :func:`~sksegcal.pixels.split_images` with
  :class:`~sklearn.model_selection.PredefinedSplit`, or a group splitter
  such as :class:`~sklearn.model_selection.GroupShuffleSplit` with
  ``groups``;
* ``score`` is the **negative log loss**, so ``scoring=None`` selects by
  calibration (accuracy cannot tell calibrators apart); ECE is available as
  :data:`sksegcal.metrics.ece_scorer`.
"""


# %%
# Data: the same synthetic network as in the other examples
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
X, y, groups = flatten_segmentation(logits, labels, ignore_index=255)

# %%
# Train / validation / test images
# --------------------------------
# ``test_fold`` marks calibrator-train pixels -1, validation pixels 0 and
# test pixels -2: the search sees the first two, the test images stay unseen.
from sklearn.model_selection import PredefinedSplit

split = split_images(groups, validation_size=0.25, test_size=0.25, random_state=0)
fold = split.test_fold(groups)
search_rows = fold > -2
test = fold == -2
cv = PredefinedSplit(fold[search_rows])
print(
    f"images: {len(split.train)} train, {len(split.validation)} validation, {len(split.test)} test"
)

# %%
# The grid
# --------
# The paper's fixed ``t2`` values (2 and 1e10) against a fitted one, and the
# regularisation of the logistic-regression detector. With ``memory=`` the
# detector would be fitted once per classifier setting instead of once per
# temperature candidate (useful with the slower MLP).
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV

from sksegcal import SelectiveScalingCalibrator

calibrator = SelectiveScalingCalibrator(
    LogisticRegression(), features="agnostic", t1="auto", random_state=0
)
grid = {"t2": [2.0, 1e10, "auto"], "classifier__C": [0.01, 1.0]}
search = GridSearchCV(calibrator, grid, cv=cv)  # scoring=None: negative NLL
search.fit(X[search_rows], y[search_rows])

for params, score in zip(search.cv_results_["params"], search.cv_results_["mean_test_score"]):
    print(f"{str(params):45s} validation NLL {-score:.4f}")
print("best:", search.best_params_)

# %%
# The refitted best calibrator on the test images
# -----------------------------------------------
# ``refit=True`` (the default) refits the best setting on train + validation.
from scipy.special import softmax

from sksegcal.metrics import expected_calibration_error, negative_log_likelihood

best = search.best_estimator_
for name, proba in [
    ("uncalibrated", softmax(X[test], axis=1)),
    ("selective (best)", best.predict_proba(X[test])),
]:
    print(
        f"{name:18s} ECE {expected_calibration_error(y[test], proba):.4f}  "
        f"NLL {negative_log_likelihood(y[test], proba):.4f}"
    )

# %%
# The same with a group splitter
# ------------------------------
# ``GroupShuffleSplit`` draws validation images at random; pass ``groups`` to
# ``fit`` so it can. Here the search is scored by ECE instead of NLL.
from sklearn.model_selection import GroupShuffleSplit

from sksegcal.metrics import ece_scorer

search_ece = GridSearchCV(
    calibrator,
    {"t2": [2.0, "auto"]},
    cv=GroupShuffleSplit(n_splits=2, test_size=0.25, random_state=0),
    scoring=ece_scorer,
)
search_ece.fit(X[search_rows], y[search_rows], groups=groups[search_rows])
print("best by ECE:", search_ece.best_params_, f"(ECE {-search_ece.best_score_:.4f})")
