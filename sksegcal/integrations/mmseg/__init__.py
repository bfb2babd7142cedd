"""mmsegmentation 1.x integration: logit extraction, calibrated inference, evaluation.

Importing this module (it needs the ``mmseg`` extra: ``pip install
"sksegcal[mmseg]"``)

* installs a small ``mmcv.ops`` stand-in when mmcv's compiled operators are
  missing (``mmcv-lite``; see :mod:`sksegcal.integrations._mmcv_shim`), so
  that mmsegmentation imports and runs on CPU;
* registers :class:`CalibrationMetric` in mmsegmentation's ``METRICS``
  registry, so that an mmseg config can say::

      custom_imports = dict(imports=["sksegcal.integrations.mmseg"],
                            allow_failed_imports=False)
      test_evaluator = [dict(type="IoUMetric", iou_metrics=["mIoU"]),
                        dict(type="CalibrationMetric", n_bins=15)]

The three jobs:

* :func:`extract_logits`: run a model over a dataset (the config's test
  dataloader, a dataset config or object, image/label file pairs, or arrays)
  and write every image's logits and labels into a
  :class:`~sksegcal.store.LogitStore`, resumably, in batches, at full
  resolution or a chosen size.
* :func:`calibrate_model`: make a model's ``seg_logits`` calibrated
  probabilities from a fitted (or saved) calibrator, with ``pred_sem_seg``
  unchanged; works with ``inference_model`` and mmseg's own test loop.
  :func:`uncalibrate_model` undoes it. A saved calibrator loads through
  :func:`sksegcal.persistence.load`: a skops file safely, a pickle only with
  ``trusted=True``.
* :class:`CalibrationMetric`: an mmengine metric streaming ECE, MCE, NLL,
  Brier score (and more) through a
  :class:`~sksegcal.metrics.CalibrationAccumulator`.

:func:`load_model` and :func:`shipped_config` build models from the configs
that ship inside the mmsegmentation wheel (SyncBN turned into BN so that they
run on CPU).

One private module per job, each importing only what it needs:
``_common`` (the shim, the stack check, constants), ``_loading``,
``_calibrators`` (loading a saved calibrator under the trust policy),
``_inference``, ``_extraction`` and ``_evaluator``. This ``__init__`` is the
public face: it re-exports the names below and registers the metric, once.
"""

from __future__ import annotations

# first: installs the mmcv.ops stand-in and checks the mmseg stack
from ._common import IGNORE_INDEX  # isort: skip
from mmseg.registry import METRICS

from ._evaluator import CalibrationMetric
from ._extraction import extract_logits
from ._inference import calibrate_model, uncalibrate_model
from ._loading import load_model, shipped_config

__all__ = [
    "IGNORE_INDEX",
    "CalibrationMetric",
    "calibrate_model",
    "extract_logits",
    "load_model",
    "shipped_config",
    "uncalibrate_model",
]

# Pickles and skops files name the module that defines a class or function: its
# ``__module__``, left as Python sets it so that ``inspect.getsource`` finds the code
# (scikit-learn's pickles name its private modules too). Files that name this
# package (sksegcal.integrations.mmseg.CalibrationMetric, written when ``__module__`` said so) load
# through the names imported above. A name that moves stays importable where it was.

# The one registration, when this package is first imported (configs name the package in
# custom_imports). force=True lets importlib.reload re-register the reloaded class.
METRICS.register_module(name="CalibrationMetric", module=CalibrationMetric, force=True)
