"""Per-pixel inverse temperatures ``beta = softplus(w . phi + b)``: the streamed NLL and its fit.

Both :class:`~sksegcal.LocalTemperatureScaling` (``phi``: spatial context and
confidence) and the generalised mode of
:class:`~sksegcal.SelectiveScalingCalibrator` (``phi``: the detector's
P(correct), confidence summaries and optionally the spatial context) fit this
one model: the calibrated probabilities are ``softmax(beta_i z_i)``, the loss
is the weighted mean NLL plus ``l2 / 2 |w|^2`` (the intercept ``b`` is not
penalised), and ``phi`` is standardised first (weighted mean 0, variance 1;
a constant input gets weight 0 and stays there), so that ``w = 0`` with
``softplus(b) = 1 / T_TS`` is exactly temperature scaling, the start of every
fit.

For one row, ``NLL(beta) = logsumexp(beta z) - beta z_y`` has
``d/dbeta = E_q[z] - z_y`` and ``d2/dbeta2 = Var_q[z]`` with ``q = softmax(beta
z)``; through ``beta = softplus(a)``, ``a = theta . [phi, 1]``:
``dNLL/da = d1 s`` and ``d2NLL/da2 = d2 s^2 + d1 s (1 - s)`` (``s = sigmoid(a)``),
so the gradient and the exact Hessian in ``theta`` cost one pass over the
logits together. The NLL is convex in ``beta`` but softplus makes it not
jointly convex in ``theta``: the Hessian can be indefinite, which a
trust-region Newton method handles (from the TS start it took 5 passes on the
test problems, where L-BFGS took 8-40).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import minimize

__all__ = [
    "SoftplusTemperatureFit",
    "fit_softplus_temperature",
    "sigmoid",
    "softplus",
    "softplus_inverse",
    "softplus_nll",
    "standardisation",
]

# float64 working block of the NLL passes: about 512 kB per (rows, C) array, as in _base
_BLOCK_ELEMENTS = 1 << 16


def softplus(a: np.ndarray) -> np.ndarray:
    """``log(1 + exp(a))`` without overflow."""
    return np.logaddexp(0.0, a)


def sigmoid(a: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-a))`` without overflow (the derivative of softplus)."""
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def softplus_inverse(b: float) -> float:
    """The ``a`` with ``softplus(a) == b`` (``b > 0``)."""
    return float(b + np.log(-np.expm1(-b)))


def standardisation(
    inputs: Callable[[slice], np.ndarray],
    n: int,
    n_inputs: int,
    weights: np.ndarray,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted mean and scale of the inputs, streamed; and which inputs are constant.

    ``inputs(part)`` gives the (rows, n_inputs) unstandardised inputs of the
    rows ``part``. A constant input (or one that varies by rounding only) gets
    scale 1 and is flagged: it is exactly 0 after centring up to rounding, and
    its weight is held at 0.
    """
    total = float(weights.sum())
    s1, s2 = np.zeros(n_inputs), np.zeros(n_inputs)
    # sums of the inputs minus the first row's (shifted data): a constant input then sums
    # to exactly 0, and a large offset does not cancel the variance away
    shift = None
    for start in range(0, n, chunk_size):
        part = slice(start, min(start + chunk_size, n))
        u = np.asarray(inputs(part), dtype=np.float64)
        if shift is None:
            shift = u[0].copy() if len(u) else np.zeros(n_inputs)
        u = u - shift
        s1 += weights[part] @ u
        s2 += weights[part] @ (u * u)
    if shift is None:
        shift = np.zeros(n_inputs)
    centred = s1 / total
    mean = shift + centred
    var = np.maximum(s2 / total - centred**2, 0.0)
    scale = np.sqrt(var)
    constant = scale <= 1e-12 * np.maximum(1.0, np.abs(mean))
    return mean, np.where(constant, 1.0, scale), constant


def softplus_nll(
    theta: np.ndarray,
    Z: np.ndarray,
    y: np.ndarray,
    phi: np.ndarray | Callable[[slice], np.ndarray],
    *,
    sample_weight: np.ndarray | None = None,
    l2: float = 0.0,
    hessian: bool = False,
    chunk_size: int = 65536,
) -> tuple[float, np.ndarray, np.ndarray | None]:
    """Penalised weighted mean NLL of ``softmax(softplus(phi . w + b) z)``, gradient, Hessian.

    Parameters
    ----------
    theta : ndarray of shape (k + 1,)
        ``w`` then ``b``.
    Z : ndarray of shape (n, C)
        Logits (any float dtype; streamed in float64 blocks, shifted by
        their row maximum so that ``beta z <= 0``).
    y : ndarray of shape (n,)
        Labels.
    phi : ndarray of shape (n, k), or a callable ``phi(part) -> (rows, k)``
        Standardised inputs (a callable computes them per block).
    sample_weight : ndarray of shape (n,), optional
    l2 : float
        Ridge on ``w``.
    hessian : bool
        Also return the exact Hessian (else None).

    Returns
    -------
    loss, gradient, Hessian or None
    """
    theta = np.asarray(theta, dtype=np.float64)
    coef, intercept = theta[:-1], theta[-1]
    n = Z.shape[0]
    total = float(n) if sample_weight is None else float(np.sum(sample_weight))
    if not total > 0:
        raise ValueError("The rows to fit a temperature on have total weight 0.")
    k1 = theta.shape[0]
    loss, grad = 0.0, np.zeros(k1)
    H = np.zeros((k1, k1)) if hessian else None
    rows_per_block = max(1, min(chunk_size, _BLOCK_ELEMENTS // max(Z.shape[1], 1)))
    for start in range(0, n, rows_per_block):
        part = slice(start, min(start + rows_per_block, n))
        z = np.array(Z[part], dtype=np.float64)
        z -= z.max(axis=1, keepdims=True)
        r = np.arange(z.shape[0])
        zy = z[r, y[part]]
        p = phi(part) if callable(phi) else phi[part]
        a = p @ coef + intercept
        beta = softplus(a)
        s = sigmoid(a)
        e = z * beta[:, None]
        np.exp(e, out=e)
        S = e.sum(axis=1)
        np.multiply(e, z, out=e)
        m1 = e.sum(axis=1) / S
        w = np.full(z.shape[0], 1.0 / total)
        if sample_weight is not None:
            w *= sample_weight[part]
        d1 = m1 - zy
        loss += float(w @ (np.log(S) - beta * zy))
        ga = w * d1 * s
        grad[:-1] += ga @ p
        grad[-1] += ga.sum()
        if hessian:
            np.multiply(e, z, out=e)
            d2 = np.maximum(e.sum(axis=1) / S - m1 * m1, 0.0)
            h = w * (d2 * s * s + d1 * s * (1.0 - s))
            P = np.column_stack([p, np.ones(len(a))])
            H += (P * h[:, None]).T @ P
    loss += 0.5 * l2 * float(coef @ coef)
    grad[:-1] += l2 * coef
    if hessian:
        H[np.arange(k1 - 1), np.arange(k1 - 1)] += l2
    return loss, grad, H


class SoftplusTemperatureFit:
    """The result of :func:`fit_softplus_temperature`: ``theta``, loss, iterations, convergence."""

    def __init__(self, theta, loss, n_iter, converged, message):
        self.theta, self.loss, self.n_iter = theta, loss, n_iter
        self.converged, self.message = converged, message

    def __repr__(self) -> str:
        return (
            f"SoftplusTemperatureFit(theta={self.theta.tolist()}, loss={self.loss:.6g}, "
            f"n_iter={self.n_iter}, converged={self.converged})"
        )


def fit_softplus_temperature(
    objective: Callable[[np.ndarray, bool], tuple[float, np.ndarray, np.ndarray | None]],
    theta0: np.ndarray,
    *,
    constant: np.ndarray | None = None,
    method: str = "newton",
    max_iter: int = 100,
    tol: float = 1e-9,
) -> SoftplusTemperatureFit:
    """Minimise ``objective(theta, hessian) -> (loss, grad, H or None)`` from ``theta0``.

    ``constant`` flags inputs whose weight stays 0 (their gradient is zeroed).
    ``method="newton"``: scipy's trust-region Newton with the exact Hessian
    (``trust-exact``; indefinite Hessians are fine), stopping when the
    gradient norm is below ``tol``: a few passes from the TS start.
    ``method="lbfgs"``: L-BFGS-B with the analytic gradient (``gtol=tol``).
    """
    held = np.zeros(len(theta0), bool)
    if constant is not None:
        held[:-1] = constant
    cache: dict = {}

    def evaluate(theta, need_h):
        key = theta.tobytes()
        if key not in cache or (need_h and cache[key][2] is None):
            f, g, H = objective(theta, need_h)
            g = np.where(held, 0.0, g)
            if H is not None:
                H = H.copy()
                H[held, :] = 0.0
                H[:, held] = 0.0
                H[held, held] = 1.0
            cache.clear()
            cache[key] = (f, g, H)
        return cache[key]

    theta0 = np.where(held, 0.0, np.asarray(theta0, dtype=np.float64))
    if method == "newton":
        result = minimize(
            lambda t: evaluate(t, True)[:2],
            theta0,
            jac=True,
            hess=lambda t: evaluate(t, True)[2],
            method="trust-exact",
            options={"maxiter": max_iter, "gtol": tol},
        )
    elif method == "lbfgs":
        result = minimize(
            lambda t: evaluate(t, False)[:2],
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15},
        )
    else:
        raise ValueError(f"method must be 'newton' or 'lbfgs', got {method!r}.")
    theta = np.where(held, 0.0, result.x)
    converged = bool(result.success)
    if not converged and int(result.nit) < max_iter:
        # a stop short of max_iter because no step predicts an improvement any more (the
        # trust region, or L-BFGS's line search, failed): at a minimum whose gradient is
        # rounding noise that is convergence; the fit counts as converged when the gradient
        # is below sqrt(tol)
        gradient = np.asarray(evaluate(np.asarray(result.x, dtype=np.float64), False)[1])
        converged = bool(np.linalg.norm(gradient) <= np.sqrt(tol))
    return SoftplusTemperatureFit(
        theta, float(result.fun), int(result.nit), converged, str(result.message)
    )
