"""Every calibrator of the package as an ``nn.Module`` built from its fitted numbers.

Each module maps logits ``(N, C, *spatial)`` to calibrated probabilities of the
same shape (``forward``) or their logarithm (``log_proba``), in the logits'
dtype, with tensor operations only: no loop over pixels, no NumPy, so they run
on any device, script with ``torch.jit.script`` and export to ONNX. The fitted
numbers are buffers (they move with ``.to(device)`` and round-trip through
``state_dict``), never parameters that an optimiser would train.

The modules are pure functions of those numbers; ``calibrator.to_torch()``
builds the right one from a fitted estimator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import (
    agnostic_features,
    channel_linear,
    channel_view,
    detector_features,
    entropy_from_log_proba,
    floored_log_softmax,
    machine_epsilon,
    spatial_context,
    top_class_first,
)

__all__ = [
    "CalibratorModule",
    "DirichletScalingModule",
    "EnsembleTemperatureScalingModule",
    "LocalTemperatureScalingModule",
    "MetaCalModule",
    "SelectiveScalingModule",
    "SpatialContext",
    "TemperatureScalingModule",
    "VectorScalingModule",
]

# the paper's "uniform" temperature, the default t2 of selective scaling
_UNIFORM_TEMPERATURE = 1e10


def _scalar(value: float) -> Tensor:
    return torch.tensor([float(value)], dtype=torch.float64)


def _vector(values, dtype=torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype).clone()


class CalibratorModule(nn.Module):
    """Base of the calibrator modules: calibrated logits, then a softmax over axis 1.

    Subclasses define :meth:`calibrated_logits`. ``forward`` returns
    probabilities, :meth:`log_proba` log-probabilities. With ``strict=True``
    (the default) the argmax of the output is the class ``predict`` gives (the
    input's argmax for the temperature-based calibrators), as
    ``predict_proba`` guarantees: where rounding ties that class with another,
    its value is raised just above it. ``from_probabilities=True`` takes
    probabilities in (the estimator's ``input_type="probabilities"``).
    """

    # whether the calibration keeps the order of every pixel's logits (a positive
    # temperature does; an affine map of the logits does not)
    _order_preserving = True

    def __init__(self, *, strict: bool = True, from_probabilities: bool = False):
        super().__init__()
        self.strict = bool(strict)
        self.order_preserving = bool(self._order_preserving)
        self.from_probabilities = bool(from_probabilities)

    def _logits(self, x: Tensor) -> Tensor:
        if x.dim() < 2:
            raise ValueError("expected logits of shape (N, C, *spatial)")
        if self.from_probabilities:
            return x.clamp(min=1e-30).log()
        return x

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        """Calibrated logits (up to a constant per pixel) of (N, C, *spatial) logits."""
        raise NotImplementedError

    def _top(self, z: Tensor, scaled: Tensor) -> Tensor:
        if self.order_preserving:
            return z.argmax(dim=1, keepdim=True)
        return scaled.argmax(dim=1, keepdim=True)

    def forward(self, logits: Tensor) -> Tensor:
        z = self._logits(logits)
        scaled = self.calibrated_logits(z)
        proba = torch.softmax(scaled, dim=1)
        if self.strict:
            proba = top_class_first(proba, self._top(z, scaled))
        return proba

    @torch.jit.export
    def log_proba(self, logits: Tensor) -> Tensor:
        """Calibrated log-probabilities (N, C, *spatial)."""
        z = self._logits(logits)
        scaled = self.calibrated_logits(z)
        out = torch.log_softmax(scaled, dim=1)
        if self.strict:
            out = top_class_first(out, self._top(z, scaled))
        return out


# ---------------------------------------------------------------------------
# one or two temperatures
# ---------------------------------------------------------------------------
class TemperatureScalingModule(CalibratorModule):
    """``softmax(logits / T)`` (:class:`~sksegcal.TemperatureScaling`)."""

    def __init__(self, temperature: float, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("inverse_temperature", _scalar(1.0 / float(temperature)))

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        return logits * self.inverse_temperature.to(logits.dtype)


class MetaCalModule(CalibratorModule):
    """Entropy above a threshold: temperature ``t_reject``, else ``T``.

    :class:`~sksegcal.MetaCalScaling`.
    """

    def __init__(self, temperature: float, t_reject: float, entropy_threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("inverse_temperature", _scalar(1.0 / float(temperature)))
        self.register_buffer("inverse_t_reject", _scalar(1.0 / float(t_reject)))
        self.register_buffer("entropy_threshold", _scalar(entropy_threshold))

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        dtype = logits.dtype
        entropy = entropy_from_log_proba(floored_log_softmax(logits)).unsqueeze(1)
        beta = torch.where(
            entropy > self.entropy_threshold.to(dtype),
            self.inverse_t_reject.to(dtype),
            self.inverse_temperature.to(dtype),
        )
        return logits * beta


class EnsembleTemperatureScalingModule(CalibratorModule):
    """``w1 softmax(z / T) + w2 softmax(z) + w3 / C``.

    :class:`~sksegcal.EnsembleTemperatureScaling`.
    """

    def __init__(self, temperature: float, weights, **kwargs):
        super().__init__(**kwargs)
        weights = np.asarray(weights, dtype=np.float64).ravel()
        if weights.shape != (3,):
            raise ValueError(f"weights must hold 3 numbers, got {weights.shape}")
        self.register_buffer("inverse_temperature", _scalar(1.0 / float(temperature)))
        self.register_buffer("weights", _vector(weights))

    def _mixture(self, z: Tensor) -> Tensor:
        dtype = z.dtype
        w = self.weights.to(dtype)
        tempered = torch.softmax(z * self.inverse_temperature.to(dtype), dim=1)
        original = torch.softmax(z, dim=1)
        return tempered * w[0] + original * w[1] + w[2] / float(z.shape[1])

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        return self._mixture(logits).clamp(min=1.1754943508222875e-38).log()

    def forward(self, logits: Tensor) -> Tensor:
        z = self._logits(logits)
        proba = self._mixture(z)
        proba = proba / proba.sum(dim=1, keepdim=True)
        if self.strict:
            proba = top_class_first(proba, z.argmax(dim=1, keepdim=True))
        return proba


# ---------------------------------------------------------------------------
# affine maps of the logits
# ---------------------------------------------------------------------------
class VectorScalingModule(CalibratorModule):
    """``softmax(w * logits + b)``, a weight and a bias per class.

    :class:`~sksegcal.VectorScaling`.
    """

    _order_preserving = False

    def __init__(self, coef, intercept, **kwargs):
        super().__init__(**kwargs)
        self.register_buffer("coef", _vector(np.ravel(coef)))
        self.register_buffer("intercept", _vector(np.ravel(intercept)))

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        nd, dtype = logits.dim(), logits.dtype
        return logits * channel_view(self.coef.to(dtype), nd) + channel_view(
            self.intercept.to(dtype), nd
        )


class DirichletScalingModule(CalibratorModule):
    """``W @ log_softmax(logits) + b`` per pixel (:class:`~sksegcal.DirichletScaling`)."""

    _order_preserving = False

    def __init__(self, coef, intercept, **kwargs):
        super().__init__(**kwargs)
        coef = np.asarray(coef, dtype=np.float64)
        if coef.ndim != 2 or coef.shape[0] != coef.shape[1]:
            raise ValueError(f"coef must be a square (C, C) matrix, got shape {coef.shape}")
        # stored transposed: x @ W^T is the matrix product over the class axis
        self.register_buffer("coef_t", _vector(coef.T.copy()))
        self.register_buffer("intercept", _vector(np.ravel(intercept)))

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        dtype = logits.dtype
        x = floored_log_softmax(logits)
        return channel_linear(x, self.coef_t.to(dtype), self.intercept.to(dtype))


# ---------------------------------------------------------------------------
# a temperature per pixel
# ---------------------------------------------------------------------------
def _softplus(a: Tensor) -> Tensor:
    # log(1 + exp(a)) without overflow and without softplus's linear cut-off
    return torch.clamp(a, min=0.0) + torch.log1p(torch.exp(-a.abs()))


class SpatialContext(nn.Module):
    """The spatial context columns of ``flatten_segmentation(..., context="spatial")``.

    Maps logits (N, C, H, W) to (N, 6, H, W), equal to
    :func:`sksegcal.context.spatial_context` to float rounding.
    """

    def __init__(self, max_distance: float = 16.0):
        super().__init__()
        self.max_distance = float(max_distance)

    def forward(self, logits: Tensor) -> Tensor:
        return spatial_context(logits, self.max_distance)


class SelectiveScalingModule(CalibratorModule):
    """Selective scaling (:class:`~sksegcal.SelectiveScalingCalibrator`) in every mode.

    A detector module maps the pixel's features (and spatial context) to
    P(correct) ``p``; ``mode="soft"`` gives the inverse temperature
    ``p / t1 + (1 - p) / t2``, ``"hard"`` ``1 / t1`` where ``p >= threshold``
    and ``1 / t2`` elsewhere, ``"generalised"``
    ``softplus(((u - mean) / scale) . coef + intercept)`` over the inputs ``u``
    (P(correct), the max log-probability, the entropy, the margin, then the
    context).

    Parameters
    ----------
    detector : nn.Module
        Features (N, F, *spatial) to P(correct) (N, *spatial); see
        :func:`sksegcal.deployment.detector_module`.
    features : {"agnostic", "log_softmax"}
    t1, t2 : float
    mode : {"soft", "hard", "generalised"}
    threshold : float
    context : bool
        Whether the detector (and the generalised temperature) read the spatial
        context, computed from the logits (2-D maps only).
    max_distance : float
        The context's clip of the boundary distance.
    coef, intercept, mean, scale
        The generalised temperature (mode "generalised" only).
    """

    def __init__(
        self,
        detector: nn.Module,
        *,
        features: str = "agnostic",
        t1: float = 1.0,
        t2: float = _UNIFORM_TEMPERATURE,
        mode: str = "soft",
        threshold: float = 0.5,
        context: bool = False,
        max_distance: float = 16.0,
        coef=None,
        intercept: float = 0.0,
        mean=None,
        scale=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if features not in ("agnostic", "log_softmax"):
            raise ValueError(f"features must be 'agnostic' or 'log_softmax', got {features!r}")
        if mode not in ("soft", "hard", "generalised"):
            raise ValueError(f"mode must be 'soft', 'hard' or 'generalised', got {mode!r}")
        self.detector = detector
        self.features = features
        self.mode = mode
        self.context = bool(context)
        self.max_distance = float(max_distance)
        self.register_buffer("inverse_t1", _scalar(1.0 / float(t1)))
        self.register_buffer("inverse_t2", _scalar(1.0 / float(t2)))
        self.register_buffer("threshold", _scalar(threshold))
        n_inputs = 4 + (6 if self.context else 0)
        if mode == "generalised":
            if coef is None:
                raise ValueError("mode='generalised' needs coef, intercept, mean and scale")
            n_inputs = len(np.ravel(coef))
        self.register_buffer("coef", _vector(np.zeros(n_inputs) if coef is None else coef))
        self.register_buffer("intercept", _scalar(intercept))
        self.register_buffer("mean", _vector(np.zeros(n_inputs) if mean is None else mean))
        self.register_buffer("scale", _vector(np.ones(n_inputs) if scale is None else scale))

    def inverse_temperatures(self, logits: Tensor) -> Tensor:
        """``beta`` (N, 1, *spatial) with calibrated logits ``beta * logits``."""
        dtype, nd = logits.dtype, logits.dim()
        features = detector_features(logits, self.features)
        parts = [features]
        extra = torch.zeros(0)
        if self.context:
            extra = spatial_context(logits, self.max_distance)
            parts.append(extra)
        p = self.detector(torch.cat(parts, dim=1)).unsqueeze(1)
        if self.mode == "hard":
            return torch.where(
                p >= self.threshold.to(p.dtype),
                self.inverse_t1.to(dtype),
                self.inverse_t2.to(dtype),
            )
        if self.mode == "soft":
            return p * self.inverse_t1.to(dtype) + (1.0 - p) * self.inverse_t2.to(dtype)
        if self.features == "agnostic":
            agnostic = features
        else:
            agnostic = agnostic_features(logits)
        k = int(agnostic.shape[1]) - 2
        inputs = [p.to(dtype), agnostic.narrow(1, 0, 1), agnostic.narrow(1, k, 2)]
        if self.context:
            inputs.append(extra)
        u = torch.cat(inputs, dim=1)
        phi = (u - channel_view(self.mean.to(dtype), nd)) / channel_view(self.scale.to(dtype), nd)
        a = (phi * channel_view(self.coef.to(dtype), nd)).sum(dim=1, keepdim=True)
        return _softplus(a + self.intercept.to(dtype))

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        return logits * self.inverse_temperatures(logits)


class LocalTemperatureScalingModule(CalibratorModule):
    """Local temperature scaling (:class:`~sksegcal.LocalTemperatureScaling`).

    ``softmax(beta * (z - max z))`` with ``beta = softplus(phi . coef +
    intercept)`` over the standardised inputs: the spatial context (when
    ``context``), then the max log-probability and the entropy (when
    ``confidence_features``); ``beta`` is clipped to ``[1 / high, 1 / low]`` of
    ``temperature_bounds``, then raised where the top two logits are so close
    that a smaller one would round them to a tie.
    """

    def __init__(
        self,
        coef,
        intercept: float,
        mean,
        scale,
        *,
        context: bool = True,
        confidence_features: bool = True,
        temperature_bounds: tuple[float, float] = (0.01, 100.0),
        max_distance: float = 16.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        n_inputs = (6 if context else 0) + (2 if confidence_features else 0)
        if len(np.ravel(coef)) != n_inputs:
            raise ValueError(
                f"coef has {len(np.ravel(coef))} entries; context={context} and "
                f"confidence_features={confidence_features} make {n_inputs} inputs"
            )
        self.context = bool(context)
        self.confidence_features = bool(confidence_features)
        self.max_distance = float(max_distance)
        self.register_buffer("coef", _vector(coef))
        self.register_buffer("intercept", _scalar(intercept))
        self.register_buffer("mean", _vector(mean))
        self.register_buffer("scale", _vector(scale))
        low, high = (float(b) for b in temperature_bounds)
        self.register_buffer("min_beta", _scalar(1.0 / high))
        self.register_buffer("max_beta", _scalar(1.0 / low))

    def inverse_temperatures(self, logits: Tensor) -> Tensor:
        """``beta`` (N, 1, *spatial), caps included."""
        dtype, nd = logits.dtype, logits.dim()
        inputs: list[Tensor] = []
        if self.context:
            inputs.append(spatial_context(logits, self.max_distance))
        if self.confidence_features:
            lp = torch.log_softmax(logits, dim=1).clamp(min=-1e4)
            inputs.append(lp.amax(dim=1, keepdim=True))
            inputs.append(entropy_from_log_proba(lp).unsqueeze(1))
        if len(inputs) > 0:
            u = torch.cat(inputs, dim=1)
            phi = (u - channel_view(self.mean.to(dtype), nd)) / channel_view(
                self.scale.to(dtype), nd
            )
            a = (phi * channel_view(self.coef.to(dtype), nd)).sum(dim=1, keepdim=True)
            a = a + self.intercept.to(dtype)
        else:
            a = self.intercept.to(dtype).expand_as(logits.narrow(1, 0, 1))
        beta = torch.minimum(
            torch.maximum(_softplus(a), self.min_beta.to(dtype)), self.max_beta.to(dtype)
        )
        if int(logits.shape[1]) > 1:
            top2 = logits.topk(2, dim=1).values
            gap = top2.narrow(1, 0, 1) - top2.narrow(1, 1, 1)
            eps = 4.0 * machine_epsilon(dtype)
            positive = gap > 0
            floor = torch.where(
                positive,
                eps / torch.where(positive, gap, torch.ones_like(gap)),
                torch.zeros_like(gap),
            )
            beta = torch.maximum(beta, floor)
        return beta

    def calibrated_logits(self, logits: Tensor) -> Tensor:
        z = logits - logits.amax(dim=1, keepdim=True)
        return z * self.inverse_temperatures(logits)
