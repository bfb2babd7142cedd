"""What every part of the mmseg bridge shares: the mmcv shim, the stack check, constants.

Imported first by the package: it installs the ``mmcv.ops`` stand-in (see
:mod:`sksegcal.integrations._mmcv_shim`) before anything can import
``mmseg.models``, and turns a missing mmsegmentation stack into one
ImportError that says what to install. It imports nothing else of the
package; every other module of the bridge may import it.
"""

from __future__ import annotations

from .._mmcv_shim import install as _install_mmcv_shim

# Before anything imports mmseg.models: mmcv-lite has no compiled ops.
_install_mmcv_shim()

try:
    import mmseg  # noqa: F401
    import torch  # noqa: F401
    from mmengine.evaluator import BaseMetric  # noqa: F401
    from mmengine.logging import print_log
    from mmseg.registry import METRICS  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "sksegcal.integrations.mmseg needs mmsegmentation 1.x and its stack; install them "
        'with pip install "sksegcal[mmseg]" (mmsegmentation==1.2.2, mmengine==0.10.7, '
        f"mmcv-lite==2.1.0, ftfy, regex). The import failed with: {exc}"
    ) from exc

__all__ = ["CHUNK_PIXELS", "IGNORE_INDEX", "PROBA_FLAG", "log"]

#: Label of unlabelled pixels in mmsegmentation (``reduce_zero_label`` maps 0 to it).
IGNORE_INDEX = 255
# Rows of the (pixels, classes) table handed to a calibrator or the accumulator
# at once: bounds the temporaries to a few tens of MB per image.
CHUNK_PIXELS = 262_144
# metainfo key set on the data samples of a calibrated model
PROBA_FLAG = "seg_logits_are_probabilities"


def log(message: str, level: int | None = None) -> None:
    """A line in mmengine's current logger (the runner's, or mmengine's default)."""
    if level is None:
        print_log(message, logger="current")
    else:
        print_log(message, logger="current", level=level)
