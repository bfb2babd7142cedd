"""Correctness detectors as tensor operations on per-pixel feature maps.

A selective calibrator's detector is a scikit-learn estimator; at deployment
it is a module from a feature map ``(N, F, *spatial)`` to P(correct)
``(N, *spatial)``. Two are converted: the default
``make_pipeline(StandardScaler(), LogisticRegression())`` (and a bare
``LogisticRegression``) and the paper's :class:`~sksegcal.TorchMLPClassifier`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ._functional import channel_linear, channel_view

__all__ = [
    "ConstantDetector",
    "LogisticDetector",
    "MLPDetector",
    "SUPPORTED_DETECTORS",
    "detector_module",
]

SUPPORTED_DETECTORS = (
    "make_pipeline(StandardScaler(), LogisticRegression()) (the default detector), "
    "LogisticRegression, TorchMLPClassifier"
)


def _buffer(values, dtype=torch.float64) -> Tensor:
    # float64, cast to the logits' dtype at use: float64 logits keep every digit
    return torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype).clone()


class LogisticDetector(nn.Module):
    """``sigmoid(((f - mean) / scale) . coef + intercept)`` per pixel.

    Parameters
    ----------
    coef : array-like of shape (F,)
    intercept : float
    mean, scale : array-like of shape (F,), optional
        The standardisation in front (a ``StandardScaler``'s ``mean_`` and
        ``scale_``); none by default.
    positive : bool, default=True
        Whether P(correct) is the sigmoid of the decision (the correct class
        is the estimator's second class) or its complement.
    """

    def __init__(self, coef, intercept, mean=None, scale=None, positive: bool = True):
        super().__init__()
        n = len(np.ravel(coef))
        self.register_buffer("coef", _buffer(np.ravel(coef)))
        self.register_buffer("intercept", _buffer([float(np.ravel(intercept)[0])]))
        self.register_buffer("mean", _buffer(np.zeros(n) if mean is None else mean))
        self.register_buffer("scale", _buffer(np.ones(n) if scale is None else scale))
        self.positive = bool(positive)

    def forward(self, features: Tensor) -> Tensor:
        dtype = features.dtype
        nd = features.dim()
        phi = (features - channel_view(self.mean.to(dtype), nd)) / channel_view(
            self.scale.to(dtype), nd
        )
        decision = (phi * channel_view(self.coef.to(dtype), nd)).sum(dim=1)
        decision = decision + self.intercept.to(dtype)
        if not self.positive:
            decision = -decision
        return torch.sigmoid(decision)


class _FixedLinear(nn.Module):
    """``x @ weight + bias`` over the channel axis, weight (in, out) held as a buffer."""

    def __init__(self, weight, bias):
        super().__init__()
        self.register_buffer("weight", _buffer(weight))
        self.register_buffer("bias", _buffer(bias))

    def forward(self, x: Tensor) -> Tensor:
        return channel_linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class MLPDetector(nn.Module):
    """The paper's correctness MLP with BatchNorm folded in: Linear, ReLU, ..., Linear, softmax.

    ``weights`` are the (in, out) matrices and ``biases`` the vectors of
    :class:`~sksegcal.TorchMLPClassifier`'s ``coefs_`` and ``intercepts_``;
    ``positive_index`` the output column of the correct class.
    """

    def __init__(self, weights, biases, positive_index: int = 1):
        super().__init__()
        if len(weights) != len(biases) or not weights:
            raise ValueError("weights and biases must be non-empty lists of the same length")
        layers = [_FixedLinear(w, b) for w, b in zip(weights, biases)]
        self.hidden = nn.ModuleList(layers[:-1])
        self.output = layers[-1]
        self.positive_index = int(positive_index)

    def forward(self, features: Tensor) -> Tensor:
        h = features
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return torch.softmax(self.output(h), dim=1).select(1, self.positive_index)


class ConstantDetector(nn.Module):
    """P(correct) the same for every pixel (a detector fitted on one correctness class)."""

    def __init__(self, p_correct: float):
        super().__init__()
        self.register_buffer("p_correct", _buffer([p_correct]))

    def forward(self, features: Tensor) -> Tensor:
        shape = [features.shape[0]] + list(features.shape[2:])
        return self.p_correct.to(features.dtype).expand(shape)


def _positive_column(classes) -> int:
    classes = np.asarray(classes)
    hits = np.flatnonzero(classes == 1)
    if len(classes) != 2 or len(hits) != 1:
        raise ValueError(
            f"the detector must be a binary classifier of correctness with classes [0, 1], "
            f"got classes_ {classes.tolist()}"
        )
    return int(hits[0])


def _logistic(estimator, mean=None, scale=None) -> LogisticDetector:
    coef = np.asarray(estimator.coef_)
    if coef.shape[0] != 1:
        raise ValueError(
            f"the logistic detector must be binary (coef_ of shape (1, F)), got {coef.shape}"
        )
    positive = _positive_column(estimator.classes_) == 1
    return LogisticDetector(coef[0], estimator.intercept_, mean, scale, positive=positive)


def _unsupported(detector) -> TypeError:
    return TypeError(
        f"cannot convert the correctness detector {type(detector).__name__} to torch; "
        f"supported: {SUPPORTED_DETECTORS}. Refit the calibrator with one of them to deploy it "
        "as a module, or apply its predict_proba on the CPU."
    )


def detector_module(detector) -> nn.Module:
    """The tensor module equal to a fitted detector's P(correct) (its ``classes_ == 1`` column).

    Parameters
    ----------
    detector : fitted estimator
        ``make_pipeline(StandardScaler(), LogisticRegression())``, a
        ``LogisticRegression``, or a :class:`~sksegcal.TorchMLPClassifier`.

    Returns
    -------
    module : torch.nn.Module
        Maps features (N, F, *spatial) to P(correct) (N, *spatial).

    Raises
    ------
    TypeError
        For any other detector, naming the supported ones.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from ..mlp import TorchMLPClassifier

    if hasattr(detector, "p_correct") and type(detector).__name__ == "_ConstantCorrectness":
        return ConstantDetector(detector.p_correct)
    if isinstance(detector, LogisticRegression):
        return _logistic(detector)
    if isinstance(detector, TorchMLPClassifier):
        positive = _positive_column(detector.classes_)
        return MLPDetector(list(detector.coefs_), list(detector.intercepts_), positive)
    if isinstance(detector, Pipeline):
        steps = [step for _, step in detector.steps if step not in (None, "passthrough")]
        if (
            len(steps) == 2
            and isinstance(steps[0], StandardScaler)
            and isinstance(steps[1], LogisticRegression)
        ):
            scaler = steps[0]
            n = len(np.ravel(steps[1].coef_))
            mean = np.zeros(n) if getattr(scaler, "mean_", None) is None else scaler.mean_
            scale = np.ones(n) if getattr(scaler, "scale_", None) is None else scaler.scale_
            return _logistic(steps[1], mean, scale)
        if len(steps) == 1:
            return detector_module(steps[0])
    raise _unsupported(detector)
