"""Conformal prediction sets and risk control for segmentation, in bounded memory.

Calibrated probabilities are right on average; conformal methods turn them
into promises that hold on new data, from a calibration split of images:

* :class:`ConformalPixelSets`: prediction sets per pixel (LAC or APS
  scores) at miscoverage ``alpha``. By default (``guarantee="image"``) the
  mean coverage of a new image is at least ``1 - alpha`` over exchangeable
  *images*; ``guarantee="pixel"`` is split conformal over exchangeable
  pixels, which pixels of whole images are not (``docs/conformal.md``).
* :class:`ConformalRiskControl`: conformal risk control (Angelopoulos et al.
  2022) with a per-image loss (the fraction of pixels not covered, or the
  false-negative rate of one class), guaranteed in expectation over
  exchangeable *images*.
* :class:`ConformalMargins`: inner and outer masks around one class's
  predicted mask (erosions and dilations, 2-D or N-D) that hold the truth
  between them on a new image with probability at least ``1 - alpha``.

Both take the inputs of our calibrators (logits or probabilities, an
optional fitted calibrator in front, ``ignore_index``) and keep their
calibration scores in a fixed-size, mergeable state: a :class:`ScoreHistogram`
or an :class:`ImageRiskTally` on a grid of ``2**16`` levels whose rounding
only ever adds coverage. :func:`fit_conformal_store` and
:func:`evaluate_conformal_store` run them over a
:class:`~sksegcal.store.LogitStore` one image at a time, in parallel with
joblib; :class:`ConformalSetAccumulator` tallies coverage, set sizes and
per-image risks.

Layout: ``_scores`` (score functions and levels), ``_histogram`` (the score
histogram, the conformal rank), ``_risk`` (the per-image loss tally and the
CRC threshold), ``_base`` (inputs, probabilities, sets), ``_sets`` and
``_risk_control`` (the two estimators), ``_metrics`` (the set accumulator),
``_margins`` (morphological margins of one class's mask), ``_store`` (the
store path).
"""

from ._histogram import ScoreHistogram, conformal_rank
from ._margins import ConformalMargins, MarginAccumulator
from ._metrics import ConformalSetAccumulator
from ._risk import ImageRiskTally
from ._risk_control import ConformalRiskControl
from ._scores import SCORES, aps_scores, lac_scores
from ._sets import ConformalPixelSets
from ._store import evaluate_conformal_store, fit_conformal_store

__all__ = [
    "SCORES",
    "ConformalMargins",
    "ConformalPixelSets",
    "ConformalRiskControl",
    "ConformalSetAccumulator",
    "ImageRiskTally",
    "MarginAccumulator",
    "ScoreHistogram",
    "aps_scores",
    "conformal_rank",
    "evaluate_conformal_store",
    "fit_conformal_store",
    "lac_scores",
]

# Pickles and skops files name the module that defines a class or function: its
# ``__module__``, left as Python sets it so that ``inspect.getsource`` finds the code
# (scikit-learn's pickles name its private modules too). Files that name this
# package (sksegcal.conformal.ConformalPixelSets, written when ``__module__`` said so) load
# through the names imported above. A name that moves stays importable where it was.
