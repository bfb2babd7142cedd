"""Calibration and segmentation metrics that scale to billions of pixels.

The centre of this package is :class:`CalibrationAccumulator`: a fixed-size,
mergeable tally of per-pixel predictions, from which every metric is derived
(top-label ECE / RMS / MCE with equal-width or equal-mass bins, classwise ECE,
static and adaptive calibration error, NLL, multi-class Brier score, pixel
accuracy, mIoU, mean per-image ECE, reliability curve), pooled and, with
``regions``, per pixel region (:func:`boundary_mask` gives the boundary band
of label maps, :func:`boundary_accumulator` the whole boundary study). It is saved without
pickle through :meth:`~CalibrationAccumulator.state_dict` and
:meth:`~CalibrationAccumulator.from_state_dict`.

The one-shot functions (:func:`expected_calibration_error`,
:func:`negative_log_likelihood`, :func:`brier_score`, ...) feed their input
through an accumulator in bounded-memory chunks, so one-shot and streaming
results agree exactly. The scikit-learn scorers (:data:`ece_scorer`,
:data:`nll_scorer`, :data:`brier_scorer`, :func:`get_scorer`) wrap them for
``GridSearchCV``; they ignore pixels whose label is the ignore index (255).

Conventions (see ``docs/metrics.md`` for every formula and where each name
comes from):

* Probabilities are computed on in float32 (float16 / bfloat16 / float64 input
  is converted chunk by chunk, so a float64 0.9 is binned as float32
  0.89999998, as torchmetrics does with float32 input); all tallies are
  float64 (exact for integer counts up to 2**53, far beyond a billion pixels).
* A bin ``b`` of ``n`` equal-width bins holds confidences in
  ``[b / n, (b + 1) / n)``; the last bin also holds a confidence of exactly
  1.0 (torchmetrics instead puts 1.0 in an extra bin of its own).
* The NLL of logits (:meth:`CalibrationAccumulator.update_logits`) is exact,
  ``logsumexp(z / T) - z_y / T``; from probabilities, ``p_y`` is clipped from
  below at the smallest normal number of the input's dtype
  (``np.finfo(dtype).tiny``; :data:`NLL_EPS` for float32).

Layout: ``_inputs`` (argument checks), ``_binning`` (fine grid -> coarse bins
-> calibration errors), ``_counting`` (one chunk -> its tallies, compiled or
NumPy), ``_accumulator``, ``_state`` (the pickle-free state dict), ``_boundary``
(boundary masks and the boundary accumulator),
``_functions`` (one-shot), ``_scorers``, ``_detection`` (misprediction
detection).
"""

from ._accumulator import CalibrationAccumulator
from ._boundary import BOUNDARY_REGIONS, boundary_accumulator, boundary_mask
from ._detection import misprediction_detection_scores
from ._functions import (
    adaptive_calibration_error,
    brier_score,
    calibration_error,
    classwise_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    mean_iou,
    negative_log_likelihood,
    pixel_accuracy,
    reliability_curve,
    rms_calibration_error,
    static_calibration_error,
)
from ._inputs import NLL_EPS
from ._scorers import (
    brier_scorer,
    ece_scorer,
    get_scorer,
    get_scorer_names,
    nll_scorer,
)

# pickled scorers written when ``__module__`` said so name sksegcal.metrics._SegmentationScorer
from ._scorers import _SegmentationScorer  # noqa: F401  # isort: skip

__all__ = [
    "BOUNDARY_REGIONS",
    "NLL_EPS",
    "CalibrationAccumulator",
    "adaptive_calibration_error",
    "boundary_accumulator",
    "boundary_mask",
    "brier_score",
    "brier_scorer",
    "calibration_error",
    "classwise_calibration_error",
    "ece_scorer",
    "expected_calibration_error",
    "get_scorer",
    "get_scorer_names",
    "maximum_calibration_error",
    "mean_iou",
    "misprediction_detection_scores",
    "negative_log_likelihood",
    "nll_scorer",
    "pixel_accuracy",
    "reliability_curve",
    "rms_calibration_error",
    "static_calibration_error",
]

# Pickles and skops files name the module that defines a class or function: its
# ``__module__``, left as Python sets it so that ``inspect.getsource`` finds the code
# (scikit-learn's pickles name its private modules too). Files that name this
# package (sksegcal.metrics.CalibrationAccumulator, written when ``__module__`` said so) load
# through the names imported above. A name that moves stays importable where it was.
