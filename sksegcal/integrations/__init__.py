"""Bridges to segmentation frameworks (optional extras, imported on demand).

* :mod:`sksegcal.integrations.mmseg`: mmsegmentation 1.x (``pip install
  "sksegcal[mmseg]"``): model loading, logit extraction into a
  :class:`~sksegcal.store.LogitStore`, calibrated inference, and the
  ``CalibrationMetric`` evaluator (a package, one private module per job).
* :mod:`sksegcal.integrations._mmcv_shim`: the ``mmcv.ops`` stand-in for
  mmcv-lite, installed by the mmseg bridge; it imports neither mmcv's ops nor
  mmseg, so any other OpenMMLab bridge can use it too.

Nothing here is imported by ``import sksegcal`` or by importing this package;
import the subpackage itself.
"""

__all__ = ["mmseg"]
