"""From a fitted calibrator to its module: one builder per calibrator class.

Each calibrator class's ``_torch_module`` hook calls its builder here, and
``calibrator.to_torch()`` returns the module; :func:`to_torch` does the same for
a calibrator inside a scikit-learn ``Pipeline`` or search object.
"""

from __future__ import annotations

from torch import nn

from ._detectors import detector_module
from ._modules import (
    DirichletScalingModule,
    EnsembleTemperatureScalingModule,
    LocalTemperatureScalingModule,
    MetaCalModule,
    SelectiveScalingModule,
    TemperatureScalingModule,
    VectorScalingModule,
)

__all__ = ["to_torch"]


def _common(estimator) -> dict:
    return {"from_probabilities": getattr(estimator, "input_type", "logits") == "probabilities"}


def temperature_scaling_module(est) -> nn.Module:
    return TemperatureScalingModule(est.temperature_, **_common(est))


def vector_scaling_module(est) -> nn.Module:
    return VectorScalingModule(est.coef_, est.intercept_, **_common(est))


def dirichlet_scaling_module(est) -> nn.Module:
    return DirichletScalingModule(est.coef_, est.intercept_, **_common(est))


def ensemble_temperature_scaling_module(est) -> nn.Module:
    return EnsembleTemperatureScalingModule(est.temperature_, est.weights_, **_common(est))


def meta_cal_module(est) -> nn.Module:
    # t1_ below (or at) the entropy threshold, t2_ above it
    return MetaCalModule(est.t1_, est.t2_, est.threshold_, **_common(est))


def selective_scaling_module(est) -> nn.Module:
    generalised = {}
    if est.mode == "generalised":
        generalised = {
            "coef": est.temperature_coef_,
            "intercept": est.temperature_intercept_,
            "mean": est.temperature_mean_,
            "scale": est.temperature_scale_,
        }
    return SelectiveScalingModule(
        detector_module(est.classifier_),
        features=est.features,
        t1=est.t1_,
        t2=est.t2_,
        mode=est.mode,
        threshold=est.threshold_,
        context=est.reads_context == "spatial",
        **generalised,
        **_common(est),
    )


def local_temperature_scaling_module(est) -> nn.Module:
    spatial = est.reads_context == "spatial"
    if est._n_extra_columns() and not spatial:
        raise ValueError(
            f"{type(est).__name__} reads {est._n_extra_columns()} context columns of your own, "
            "which a module cannot compute from the logits; supported: the spatial context "
            "(computed in torch) or no context."
        )
    return LocalTemperatureScalingModule(
        est.temperature_coef_,
        est.temperature_intercept_,
        est.temperature_mean_,
        est.temperature_scale_,
        context=spatial,
        confidence_features=est.confidence_features,
        temperature_bounds=est._bounds(),
    )


def _unwrap(estimator):
    """The fitted calibrator inside a Pipeline (last step), a search or a FrozenEstimator."""
    for _ in range(8):
        if hasattr(estimator, "best_estimator_"):
            estimator = estimator.best_estimator_
        elif hasattr(estimator, "steps"):
            steps = [s for _, s in estimator.steps if s not in (None, "passthrough")]
            if len(steps) != 1:
                raise TypeError(
                    "a Pipeline converts only when the calibrator is its one step: the module "
                    "takes the logits themselves"
                )
            estimator = steps[0]
        elif type(estimator).__name__ == "FrozenEstimator":
            estimator = estimator.estimator
        else:
            return estimator
    return estimator


def to_torch(calibrator) -> nn.Module:
    """The ``nn.Module`` of a fitted calibrator: (N, C, *spatial) logits to its probabilities.

    Parameters
    ----------
    calibrator : fitted calibrator of this package
        Or a fitted ``Pipeline`` ending in one, or a fitted search object
        whose ``best_estimator_`` is one.

    Returns
    -------
    module : CalibratorModule
        In eval mode, its fitted numbers held as buffers.
    """
    estimator = _unwrap(calibrator)
    if not hasattr(estimator, "_torch_module"):
        raise TypeError(
            f"cannot convert {type(estimator).__name__} to torch: it is not a calibrator of "
            "sksegcal (TemperatureScaling, VectorScaling, DirichletScaling, "
            "EnsembleTemperatureScaling, MetaCalScaling, SelectiveScalingCalibrator, "
            "LocalTemperatureScaling, or a Pipeline or search object around one)."
        )
    return estimator.to_torch()
