"""Bridges to segmentation frameworks (optional extras, imported on demand).

* :mod:`sksegcal.integrations.torch`: any torch segmenter (an ``nn.Module`` or
  callable returning ``(N, C, *spatial)`` logits, 2-D or 3-D): extraction into
  a :class:`~sksegcal.store.LogitStore` or arrays, calibrated inference. Needs
  no extra.
* :mod:`sksegcal.integrations.transformers`: Hugging Face segmenters, through
  their image processor's own post-processing (``pip install
  "sksegcal[transformers]"``).
* :mod:`sksegcal.integrations.mmseg`: mmsegmentation 1.x (``pip install
  "sksegcal[mmseg]"``), the legacy path for mmseg users (its last release is
  1.2.2, of December 2023): model loading, logit extraction into a
  :class:`~sksegcal.store.LogitStore`, calibrated inference, and the
  ``CalibrationMetric`` evaluator (a package, one private module per job).
* ``_extract``: the extraction loop the torch and transformers bridges share.
* :mod:`sksegcal.integrations._mmcv_shim`: the ``mmcv.ops`` stand-in for
  mmcv-lite, installed by the mmseg bridge; it imports neither mmcv's ops nor
  mmseg, so any other OpenMMLab bridge can use it too.

Nothing here is imported by ``import sksegcal`` or by importing this package;
import the subpackage itself.
"""

__all__ = ["mmseg", "torch", "transformers"]
