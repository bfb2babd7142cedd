"""The temperature models every calibrator of the family is built from.

Each maps a per-row signal to inverse temperatures ``beta`` (the calibrated
probabilities are ``softmax(beta z)``) and fits its parameters by NLL through
:mod:`._solver`:

- :class:`GlobalTemperature`: one ``beta = 1 / T`` (temperature scaling);
- :class:`TwoTemperatures`: ``1 / t1`` or ``1 / t2`` split at a threshold of
  a score (``kind="hard"``: Meta-Cal, the paper's selective scaling), or
  ``p / t1 + (1 - p) / t2`` blended by a probability (``kind="soft"``);
- :class:`SoftplusTemperature`: ``beta = softplus(w . phi + b)`` over
  standardised inputs ``phi`` (local temperature scaling, generalised
  selective scaling).

A fitted model carries its parameters, the weighted mean NLL it reached
(``nll``) and the solver records (``fits``: ``(parameter names, record)``).
Calibrators keep the parameters as their own fitted attributes and rebuild the
model from them, so that a saved calibrator holds numbers only.
"""

from __future__ import annotations

import numpy as np

from ._solver import (
    SoftplusTemperatureFit,
    fit_inverse_temperatures,
    fit_softplus_temperature,
    nll_derivatives,
    softplus,
    softplus_inverse,
    softplus_nll,
)

__all__ = ["GlobalTemperature", "SoftplusTemperature", "TwoTemperatures"]


def _inverse_bounds(bounds) -> tuple[float, float]:
    """Temperature bounds (low, high) as inverse-temperature bounds."""
    return 1.0 / float(bounds[1]), 1.0 / float(bounds[0])


class GlobalTemperature:
    """One temperature for every row."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.nll, self.fits = None, []

    def inverse_temperatures(self, signal=None):
        """``1 / T`` (a scalar: the same for every row)."""
        return 1.0 / self.temperature

    @classmethod
    def fit(cls, Z, y, *, sample_weight=None, rows=None, bounds=(1e-2, 1e2), start=None,
            chunk_size=65536) -> GlobalTemperature:
        """The NLL-optimal temperature on (some) rows, in ``bounds``."""
        x0 = None if start is None else [1.0 / start.temperature]
        fit = fit_inverse_temperatures(
            Z, y, sample_weight=sample_weight, rows=rows, bounds=_inverse_bounds(bounds),
            x0=x0, chunk_size=chunk_size,
        )
        model = cls(1.0 / float(fit.x[0]))
        model.nll, model.fits = fit.nll, [(["the temperature"], fit)]
        return model


class TwoTemperatures:
    """Two temperatures: split at a threshold of a score, or blended by a probability.

    ``kind="hard"``: ``beta = 1 / t1`` where ``score >= threshold``, else
    ``1 / t2``. ``kind="soft"``: ``beta = p / t1 + (1 - p) / t2`` with ``p``
    in [0, 1] (the threshold is unused).
    """

    def __init__(self, kind: str, t1: float, t2: float, threshold: float = 0.5):
        self.kind, self.t1, self.t2, self.threshold = kind, float(t1), float(t2), float(threshold)
        self.nll, self.fits = None, []

    def inverse_temperatures(self, score) -> np.ndarray:
        score = np.asarray(score, dtype=np.float64)
        if self.kind == "hard":
            return np.where(score >= self.threshold, 1.0 / self.t1, 1.0 / self.t2)
        return score / self.t1 + (1.0 - score) / self.t2

    @classmethod
    def fit(cls, Z, y, score, *, kind, t1="auto", t2="auto", thresholds=(0.5,),
            sample_weight=None, rows=None, bounds=(1e-2, 1e10), start=None,
            chunk_size=65536) -> TwoTemperatures:
        """Fit the "auto" temperatures (and, hard, the best of ``thresholds``) by NLL.

        Soft: ``beta = a p + b (1 - p)`` is linear in ``(a, b) = (1/t1, 1/t2)``,
        so the mean NLL is jointly convex and one bounded Newton solve gives
        both. Hard: the two groups do not interact, one 1-D convex solve each
        per candidate threshold; a group no row reaches takes the other's
        fitted temperature. A fixed temperature is a float. ``start`` (a
        fitted model) warm-starts the solves and fixes the threshold.
        """
        ib = _inverse_bounds(bounds)
        fixed1 = 1.0 if t1 == "auto" else float(t1)
        fixed2 = 1e10 if t2 == "auto" else float(t2)
        p = np.asarray(score, dtype=np.float64)
        common = {"sample_weight": sample_weight, "rows": rows, "chunk_size": chunk_size}
        if kind == "soft":
            threshold = float(thresholds[0])
            names = [n for n, v in (("t1", t1), ("t2", t2)) if v == "auto"]
            if not names:
                beta = p / fixed1 + (1.0 - p) / fixed2
                model = cls(kind, fixed1, fixed2, threshold)
                model.nll = nll_derivatives(Z, y, np.ones(1), basis=beta[:, None], **common)[0]
                return model
            columns = {"t1": p, "t2": 1.0 - p}
            basis = np.column_stack([columns[n] for n in names])
            offset = None
            if t1 != "auto":
                offset = p / fixed1
            elif t2 != "auto":
                offset = (1.0 - p) / fixed2
            x0 = None if start is None else [1.0 / getattr(start, n) for n in names]
            fit = fit_inverse_temperatures(Z, y, basis=basis, offset=offset, bounds=ib, x0=x0,
                                           **common)
            inverse = dict(zip(names, fit.x.tolist()))
            model = cls(kind, 1.0 / inverse["t1"] if "t1" in inverse else fixed1,
                        1.0 / inverse["t2"] if "t2" in inverse else fixed2, threshold)
            model.nll, model.fits = fit.nll, [(names, fit)]
            return model

        in_rows = np.ones(len(p), bool) if rows is None else rows
        weights = np.ones(len(p)) if sample_weight is None else sample_weight
        total_weight = float(weights[in_rows].sum())

        def group(mask, auto, fixed_t, name):
            """(temperature, weighted NLL sum, fit or None) of one group."""
            mass = float(weights[mask].sum())
            if not mask.any() or mass <= 0:
                return None, 0.0, None
            if not auto:
                nll = nll_derivatives(Z, y, np.array([1.0 / fixed_t]), sample_weight=sample_weight,
                                      rows=mask, chunk_size=chunk_size)[0]
                return fixed_t, nll * mass, None
            x0 = None if start is None else [1.0 / getattr(start, name)]
            fit = fit_inverse_temperatures(Z, y, sample_weight=sample_weight, rows=mask,
                                           bounds=ib, x0=x0, chunk_size=chunk_size)
            return 1.0 / fit.x[0], fit.nll * mass, fit

        def fit_split(threshold):
            called = p >= threshold
            ta, nll_a, fit_a = group(in_rows & called, t1 == "auto", fixed1, "t1")
            tb, nll_b, fit_b = group(in_rows & ~called, t2 == "auto", fixed2, "t2")
            ta = (tb if t1 == "auto" else fixed1) if ta is None else ta
            tb = (ta if t2 == "auto" else fixed2) if tb is None else tb
            fits = [(["t1"], fit_a)] * (fit_a is not None) + [(["t2"], fit_b)] * (
                fit_b is not None
            )
            model = cls(kind, ta, tb, threshold)
            model.nll, model.fits = (nll_a + nll_b) / total_weight, fits
            return model

        candidates = [start.threshold] if start is not None else list(thresholds)
        return min((fit_split(float(thr)) for thr in candidates), key=lambda m: m.nll)


class SoftplusTemperature:
    """``beta = softplus(w . phi + b)``, ``phi = (inputs - mean) / scale``.

    ``w = 0`` with ``softplus(b) = 1 / T_TS`` is temperature scaling, the start
    of every fit. ``bounds`` (temperature bounds, optional) clip ``1 / beta``
    at prediction.
    """

    def __init__(self, coef, intercept, mean, scale, bounds=None):
        self.coef = np.asarray(coef, dtype=np.float64)
        self.intercept = float(intercept)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.scale = np.asarray(scale, dtype=np.float64)
        self.bounds = bounds
        self.nll, self.fits, self.overflow = None, [], False

    @property
    def theta(self) -> np.ndarray:
        return np.r_[self.coef, self.intercept]

    def standardise(self, inputs: np.ndarray) -> np.ndarray:
        return (np.asarray(inputs, dtype=np.float64) - self.mean) / self.scale

    def inverse_temperatures_of_phi(self, phi: np.ndarray) -> np.ndarray:
        beta = softplus(phi @ self.coef + self.intercept)
        if self.bounds is not None:
            lo, hi = _inverse_bounds(self.bounds)
            beta = np.clip(beta, lo, hi)
        return beta

    def inverse_temperatures(self, inputs: np.ndarray) -> np.ndarray:
        """``beta`` of unstandardised inputs (n, k)."""
        return self.inverse_temperatures_of_phi(self.standardise(inputs))

    @classmethod
    def fit(cls, Z, y, phi, *, mean, scale, constant=None, sample_weight=None, rows=None,
            l2=1e-4, bounds=(1e-2, 1e10), start=None, tol=1e-9, max_iter=100,
            chunk_size=65536) -> SoftplusTemperature:
        """Fit ``(w, b)`` on standardised ``phi`` (an array or ``phi(part)``) by penalised NLL.

        Trust-region Newton with the exact Hessian, from ``start`` (a fitted
        model) or from temperature scaling on the same rows. Rows outside
        ``rows`` get weight 0. When the NLL of the start overflows (logits near
        the float64 maximum) the model stays at the start (``overflow``).
        """
        weights = np.ones(len(y)) if sample_weight is None else np.asarray(
            sample_weight, dtype=np.float64)
        if rows is not None:
            weights = np.where(rows, weights, 0.0)
        n_inputs = len(mean)
        if start is not None:
            theta0 = start.theta
        else:
            ts = fit_inverse_temperatures(Z, y, sample_weight=sample_weight, rows=rows,
                                          bounds=_inverse_bounds(bounds), chunk_size=chunk_size)
            theta0 = np.zeros(n_inputs + 1)
            theta0[-1] = softplus_inverse(float(ts.x[0]))

        def objective(theta, hessian):
            return softplus_nll(theta, Z, y, phi, sample_weight=weights, l2=l2, hessian=hessian,
                                chunk_size=chunk_size)

        with np.errstate(over="ignore", invalid="ignore"):
            f0, g0, H0 = objective(theta0, True)
        # (a Hessian near the float64 maximum overflows the trust region's norms: refuse it)
        overflow = not (np.isfinite(f0) and np.isfinite(g0).all() and np.all(np.abs(H0) < 1e100))
        if overflow:
            fit = SoftplusTemperatureFit(theta0, float("nan"), 0, True, "overflow: TS kept")
        else:
            fit = fit_softplus_temperature(objective, theta0, constant=constant, method="newton",
                                           max_iter=max_iter, tol=tol)
        model = cls(fit.theta[:-1], fit.theta[-1], mean, scale, bounds)
        model.nll, model.fits, model.overflow = fit.loss, [(["w", "b"], fit)], overflow
        return model
