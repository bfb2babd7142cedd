"""Bridges to segmentation frameworks (optional extras, imported on demand).

* :mod:`sksegcal.integrations.mmseg`: mmsegmentation 1.x (``pip install
  "sksegcal[mmseg]"``): logit extraction into a
  :class:`~sksegcal.store.LogitStore`, calibrated inference, and the
  ``CalibrationMetric`` evaluator.

Nothing here is imported by ``import sksegcal`` or by importing this package;
import the submodule itself.
"""

__all__ = ["mmseg"]
