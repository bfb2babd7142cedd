"""The one solver of every temperature in the calibrators: streamed NLL, Newton fits.

For a row ``z`` with label ``y`` and inverse temperature ``beta``,
``NLL(beta) = logsumexp(beta z) - beta z_y`` is convex in ``beta``, with
``d/dbeta NLL = E_q[z] - z_y`` and ``d2/dbeta2 NLL = Var_q[z]``,
``q = softmax(beta z)``. One streamed pass over the logits (float64 blocks of
:data:`BLOCK_ELEMENTS` entries, shifted by their row maximum so that
``beta z <= 0``) gives the NLL and both derivatives; every model of the
family maps its parameters to ``beta`` and chains them:

- ``beta`` affine in the parameters (one temperature; two temperatures, hard
  or soft): the mean NLL is convex and :func:`fit_inverse_temperatures` (a
  bounded Newton iteration) finds its minimum in a handful of passes;
- ``beta = softplus(theta . [phi, 1])`` (the softplus-linear model):
  :func:`softplus_nll` chains ``dNLL/da = d1 s``, ``d2NLL/da2 = d2 s^2 + d1 s
  (1 - s)`` (``s = sigmoid(a)``); the Hessian can be indefinite, which
  :func:`fit_softplus_temperature` (trust-region Newton) handles.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
from scipy.optimize import minimize

from .._validation import check_finite

__all__ = [
    "BLOCK_ELEMENTS",
    "TEMPERATURE_RTOL",
    "SoftplusTemperatureFit",
    "TemperatureFit",
    "fit_inverse_temperatures",
    "fit_softplus_temperature",
    "fit_temperature",
    "iter_chunks",
    "nll_at_inverse_temperature",
    "nll_derivatives",
    "row_nll",
    "sigmoid",
    "softplus",
    "softplus_inverse",
    "softplus_nll",
    "standardisation",
    "warn_fit",
]

#: relative tolerance on each inverse temperature (hence on each temperature)
TEMPERATURE_RTOL = 1e-10
#: float64 working block of every NLL pass: about 512 kB per (rows, C) array, so that the
#: dozen passes over a block run in cache (8 MB blocks made an evaluation 5x slower)
BLOCK_ELEMENTS = 1 << 16
# no inverse temperature falls by more than this factor in one Newton iteration
_MAX_RATIO = 8.0


def iter_chunks(n: int, chunk_size: int) -> Iterator[slice]:
    """Consecutive slices of ``range(n)`` of at most ``chunk_size`` rows."""
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def block_rows(n_classes: int, chunk_size: int) -> int:
    """Rows of one working block of the NLL passes."""
    return max(1, min(chunk_size, BLOCK_ELEMENTS // max(n_classes, 1)))


def _blocks(Z, y, rows=None, scale=1.0, chunk_size=65536):
    """``(part, sel, z, zy)`` per block: float64 logits shifted by their row maximum.

    ``sel`` is the block's share of the boolean mask ``rows`` (None without
    one); ``z`` holds the selected rows divided by ``scale``.
    """
    for part in iter_chunks(Z.shape[0], block_rows(Z.shape[1], chunk_size)):
        sel = None if rows is None else rows[part]
        if sel is not None and not sel.any():
            continue
        z = np.array(Z[part] if sel is None else Z[part][sel], dtype=np.float64)
        yy = y[part] if sel is None else y[part][sel]
        if scale != 1.0:
            z *= 1.0 / scale
        z -= z.max(axis=1, keepdims=True)
        yield part, sel, z, z[np.arange(z.shape[0]), yy]


def _block_terms(z, zy, beta, second: bool = True):
    """Per-row NLL, its first and (optionally) second derivative in ``beta``."""
    e = np.multiply(z, beta[:, None])
    np.exp(e, out=e)
    S = e.sum(axis=1)
    np.multiply(e, z, out=e)
    m1 = e.sum(axis=1) / S
    loss = np.log(S) - beta * zy
    d1 = m1 - zy
    if not second:
        return loss, d1, None
    np.multiply(e, z, out=e)
    return loss, d1, np.maximum(e.sum(axis=1) / S - m1 * m1, 0.0)


def _pick(values, part, sel):
    return values[part] if sel is None else values[part][sel]


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


class TemperatureFit:
    """The result of :func:`fit_inverse_temperatures`.

    Attributes
    ----------
    x : ndarray of shape (k,)
        The fitted parameters (inverse temperatures).
    nll : float
        Weighted mean NLL at ``x``.
    n_iter : int
        Newton iterations taken.
    converged : bool
        Whether the tolerance was met (or every parameter rests on a bound
        with the NLL still falling beyond it) within ``max_iter``.
    at_bound : list of tuple (int, str)
        Parameters that rest on a bound the NLL would cross: ``(index,
        "lower" | "upper")`` in terms of ``x`` (a lower bound on an inverse
        temperature is an upper bound on the temperature).
    gradient : ndarray of shape (k,)
        Gradient of the mean NLL at ``x``.
    """

    def __init__(self, x, nll, n_iter, converged, at_bound, gradient):
        self.x, self.nll, self.n_iter = x, nll, n_iter
        self.converged, self.at_bound, self.gradient = converged, at_bound, gradient

    def __repr__(self) -> str:
        return (
            f"TemperatureFit(x={self.x.tolist()}, nll={self.nll:.6g}, n_iter={self.n_iter}, "
            f"converged={self.converged}, at_bound={self.at_bound})"
        )




def nll_derivatives(
    Z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
    *,
    basis: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    scale: float = 1.0,
    chunk_size: int = 65536,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Weighted mean NLL of ``softmax(beta_i z_i)``, its gradient and Hessian in ``x``.

    ``beta_i = offset_i + basis_i . x`` (``basis`` of shape (n, k)); without
    ``basis``, ``beta_i = x[0]`` for every row. ``rows`` (a boolean mask)
    restricts the sum to some rows. The logits are streamed in float64 blocks,
    shifted by their row maximum and divided by ``scale``; every sum is a
    float64 accumulator, divided by the total weight as it goes so that huge
    losses do not overflow the sum.
    """
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[0]
    w_all = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if rows is None:
        total = float(Z.shape[0]) if w_all is None else float(w_all.sum())
    else:
        total = float(rows.sum()) if w_all is None else float(w_all[rows].sum())
    if not total > 0:
        raise ValueError("The rows to fit a temperature on have total weight 0.")
    f, g, H = 0.0, np.zeros(k), np.zeros((k, k))
    for part, sel, z, zy in _blocks(Z, y, rows, scale, chunk_size):
        if basis is None:
            beta, B = np.full(z.shape[0], x[0]), None
        else:
            B = _pick(basis, part, sel)
            beta = B @ x
            if offset is not None:
                beta += _pick(offset, part, sel)
        loss, d1, d2 = _block_terms(z, zy, beta)
        w = np.full(z.shape[0], 1.0 / total)
        if w_all is not None:
            w *= _pick(w_all, part, sel)
        f += float(w @ loss)
        if B is None:
            g[0] += float(w @ d1)
            H[0, 0] += float(w @ d2)
        else:
            g += (w * d1) @ B
            H += (B * (w * d2)[:, None]).T @ B
    return f, g, H


def row_nll(
    Z: np.ndarray, y: np.ndarray, beta: float | np.ndarray, *, chunk_size: int = 65536
) -> np.ndarray:
    """The NLL of every row of ``softmax(beta * Z)`` (float64, shape (n,)).

    ``beta`` is a scalar or one inverse temperature per row. The per-row
    losses are what per-image comparisons sum.
    """
    out = np.empty(Z.shape[0])
    per_row = np.ndim(beta) > 0
    for part, _, z, zy in _blocks(Z, y, None, 1.0, chunk_size):
        b = np.asarray(beta, dtype=np.float64)[part] if per_row else np.full(len(z), beta)
        out[part] = _block_terms(z, zy, b, second=False)[0]
    return out


# relative to the NLL (or absolute below 1 nat), changes nothing representable
_NEGLIGIBLE_DECREASE = 1e-15


def fit_inverse_temperatures(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    basis: np.ndarray | None = None,
    offset: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    bounds: tuple[float, float] = (1e-2, 1e2),
    x0=None,
    rtol: float = TEMPERATURE_RTOL,
    max_iter: int = 100,
    chunk_size: int = 65536,
) -> TemperatureFit:
    """Minimise the mean NLL over inverse temperatures in a box: bounded Newton.

    ``beta_i = offset_i + basis_i . x`` as in :func:`nll_derivatives`, each
    ``x_j`` in ``bounds`` (inverse temperatures). The NLL is convex in ``x``.
    Each iteration minimises the quadratic model (analytic gradient and
    Hessian) exactly over the box intersected with a one-sided trust region
    (no parameter falls by more than a factor of 8), then backtracks along
    that step (Armijo). It stops when the next step moves no parameter by
    more than ``rtol`` relative to its value (about the distance to the
    minimum: Newton converges quadratically), or when every parameter rests
    on a bound the NLL would cross. One pass over the data per iteration;
    typically 4-8 from ``x0`` (default 1, i.e. T = 1), 1-3 from a warm start.
    """
    check_finite(Z, where="logits")
    k = 1 if basis is None else basis.shape[1]
    lo = np.full(k, float(bounds[0]))
    hi = np.full(k, float(bounds[1]))
    x = np.clip(np.ones(k) if x0 is None else np.asarray(x0, dtype=np.float64), lo, hi)
    scale = 1.0

    def evaluate(point):
        # in the scaled problem, beta' = beta * scale on z / scale: the offset scales too
        return nll_derivatives(
            Z, y, point, basis=basis,
            offset=offset if offset is None or scale == 1.0 else offset * scale,
            sample_weight=sample_weight, rows=rows, scale=scale, chunk_size=chunk_size,
        )

    with np.errstate(over="ignore", invalid="ignore"):
        f, g, H = evaluate(x)
    if not (np.isfinite(f) and np.isfinite(g).all() and np.isfinite(H).all()):
        # logits near the top of float64: fit on z / scale (a power of two, exact) and
        # beta * scale, the same NLL at every point
        span = max(
            (float(np.max(Z[p], initial=0.0)) - float(np.min(Z[p], initial=0.0)))
            for p in iter_chunks(Z.shape[0], chunk_size)
        )
        scale = float(2.0 ** np.ceil(np.log2(max(span, 1.0))))
        lo, hi, x = lo * scale, hi * scale, x * scale
        with np.errstate(over="ignore", invalid="ignore"):
            f, g, H = evaluate(x)
        if not (np.isfinite(f) and np.isfinite(g).all()):
            raise ValueError(
                f"The NLL of these logits overflows float64 (largest row span {span:.3g}): "
                "no temperature can be fitted. Divide the logits by a constant (the "
                "temperature absorbs it) or check the model's output."
            )

    def held(point, grad):
        return ((point <= lo) & (grad > 0)) | ((point >= hi) & (grad < 0))

    converged, n_iter = False, 0
    while n_iter < max_iter:
        n_iter += 1
        if not (~held(x, g)).any():
            converged = True
            break
        # the Newton step of the box-constrained quadratic model; the box is the bounds and a
        # one-sided trust region: no inverse temperature falls by more than a factor of
        # _MAX_RATIO per iteration (far from the minimum an over-confident model's NLL has
        # little curvature and a full Newton step overshoots to the bound); rises are left
        # to the line search (the NLL grows at most linearly there)
        step = _box_newton_step(g, H, np.maximum(lo, x / _MAX_RATIO) - x, hi - x)
        if np.all(np.abs(step) <= rtol * np.abs(x)):
            # the next step is below the tolerance: x is the minimum to within it (Newton
            # converges quadratically, so the step is about the remaining distance)
            converged = True
            break
        if abs(float(g @ step)) <= _NEGLIGIBLE_DECREASE * max(abs(float(f)), 1.0):
            # the step would lower the mean NLL by less than its rounding (e.g. a group of
            # pixels all correct, whose NLL still falls towards 0 as beta grows, with a
            # gradient of 1e-45): no representable progress is left
            converged = True
            break
        accepted, t = False, 1.0
        pg = np.where(held(x, g), 0.0, g)
        while t > 1e-12:
            trial = np.clip(x + t * step, lo, hi)
            with np.errstate(over="ignore", invalid="ignore"):
                f_new, g_new, H_new = evaluate(trial)
            if np.isfinite(f_new) and (
                f_new <= f + 1e-4 * t * (g @ step)
                # near the minimum the decrease of f drowns in its rounding: a full step
                # that shrinks the (projected) gradient is then the better test
                or (t == 1.0 and np.all(np.isfinite(g_new))
                    and np.linalg.norm(np.where(held(trial, g_new), 0.0, g_new))
                    < np.linalg.norm(pg))
            ):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            # no decrease is representable any more: x is the minimum to rounding
            converged = True
            break
        moved = np.abs(trial - x)
        x, f, g, H = trial, f_new, g_new, H_new
        if np.all(moved <= rtol * np.abs(x)):
            converged = True
            break
    at_bound = [
        (j, "lower" if x[j] <= lo[j] else "upper") for j in np.flatnonzero(held(x, g))
    ]
    return TemperatureFit(x / scale, float(f), n_iter, converged, at_bound, g * scale)


def _box_newton_step(g, H, lo, hi) -> np.ndarray:
    """The minimiser of ``g.s + s.H.s / 2`` over the box ``lo <= s <= hi`` (``lo <= 0 <= hi``).

    Exact for the one or two parameters of a temperature fit: every choice of
    each parameter at its lower bound, its upper bound or free is tried (3^k
    faces), the free ones solved on their face, and the best feasible point
    kept. ``H`` is positive semi-definite, so that point is the box minimum.
    """
    k = len(g)
    best, best_q = np.zeros(k), 0.0
    for pattern in np.ndindex(*(3,) * k):
        state = np.array(pattern)
        s = np.where(state == 1, lo, np.where(state == 2, hi, 0.0))
        free = state == 0
        if free.any():
            rhs = -(g[free] + H[np.ix_(free, ~free)] @ s[~free])
            Hf = H[np.ix_(free, free)]
            if not np.all(np.isfinite(Hf)) or np.linalg.det(Hf) <= 1e-300 * max(
                np.abs(Hf).max(), 1.0
            ):
                continue
            s[free] = np.linalg.solve(Hf, rhs)
        if np.any(s < lo - 1e-15 * np.abs(lo)) or np.any(s > hi + 1e-15 * np.abs(hi)):
            continue
        s = np.clip(s, lo, hi)
        q = g @ s + 0.5 * s @ H @ s
        if np.isfinite(q) and q < best_q:
            best, best_q = s, q
    if best_q == 0.0 and np.any(g != 0):
        # a singular quadratic model: a scaled gradient step, clipped to the box
        diag = np.diag(H)
        best = np.clip(-g / np.where(diag > 0, diag, 1.0), lo, hi)
    return best


def warn_fit(fit: TemperatureFit, names, bounds, *, owner: str, stacklevel: int = 3) -> None:
    """A ConvergenceWarning naming each temperature left on a bound, or the failed fit.

    ``names`` names each parameter (a temperature, e.g. "t2"); ``bounds`` are
    the *temperature* bounds (low, high).
    """
    from sklearn.exceptions import ConvergenceWarning

    for j, side in fit.at_bound:
        # a lower bound on the inverse temperature is the upper bound on the temperature
        which, value = ("upper", bounds[1]) if side == "lower" else ("lower", bounds[0])
        what = (
            "the NLL keeps falling towards flatter probabilities"
            if which == "upper"
            else "the NLL keeps falling towards sharper probabilities"
        )
        warnings.warn(
            f"{owner}: {names[j]} stopped at the {which} end of its range ({value:g}): "
            f"{what} beyond it, so the fitted value is the bound, not the NLL minimum. "
            + (
                "The logits carry little information about the labels (for the pixels "
                "concerned); widen the range if that is expected."
                if which == "upper"
                else "Widen the range if that is expected."
            ),
            ConvergenceWarning,
            stacklevel=stacklevel,
        )
    if not fit.converged:
        warnings.warn(
            f"{owner}: the temperature fit did not converge in {fit.n_iter} Newton "
            f"iterations (gradient {fit.gradient.tolist()}); the temperatures are the last "
            "iterate.",
            ConvergenceWarning,
            stacklevel=stacklevel,
        )


def nll_at_inverse_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    beta: float | np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    chunk_size: int = 65536,
) -> float:
    """Weighted mean NLL of ``softmax(beta * Z)`` for labels ``y``, in float64 chunks.

    ``beta`` is a scalar or a per-row array of inverse temperatures.
    """
    if np.ndim(beta) == 0:
        return nll_derivatives(
            Z, y, np.array([float(beta)]), sample_weight=sample_weight, chunk_size=chunk_size
        )[0]
    basis = np.asarray(beta, dtype=np.float64)[:, None]
    return nll_derivatives(
        Z, y, np.ones(1), basis=basis, sample_weight=sample_weight, chunk_size=chunk_size
    )[0]


def fit_temperature(
    Z: np.ndarray,
    y: np.ndarray,
    *,
    sample_weight: np.ndarray | None = None,
    bounds: tuple[float, float] = (1e-2, 1e10),
    rows: np.ndarray | None = None,
    chunk_size: int = 65536,
) -> tuple[float, TemperatureFit]:
    """The temperature T minimising the NLL of ``softmax(Z / T)``, and the fit's record.

    Newton on ``1/T`` in ``[1/high, 1/low]`` (:func:`fit_inverse_temperatures`),
    to a relative precision of ``TEMPERATURE_RTOL``. ``bounds`` may reach
    1e10, where the rows are uniform: that is the optimum when the logits
    carry no information about the labels.
    """
    fit = fit_inverse_temperatures(
        Z, y, sample_weight=sample_weight, rows=rows,
        bounds=(1.0 / bounds[1], 1.0 / bounds[0]), chunk_size=chunk_size,
    )
    return float(1.0 / fit.x[0]), fit



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
    total = float(Z.shape[0]) if sample_weight is None else float(np.sum(sample_weight))
    if not total > 0:
        raise ValueError("The rows to fit a temperature on have total weight 0.")
    k1 = theta.shape[0]
    loss, grad = 0.0, np.zeros(k1)
    H = np.zeros((k1, k1)) if hessian else None
    for part, _, z, zy in _blocks(Z, y, None, 1.0, chunk_size):
        p = phi(part) if callable(phi) else phi[part]
        a = p @ coef + intercept
        beta = softplus(a)
        s = sigmoid(a)
        rows_loss, d1, d2 = _block_terms(z, zy, beta, second=hessian)
        w = np.full(z.shape[0], 1.0 / total)
        if sample_weight is not None:
            w *= sample_weight[part]
        loss += float(w @ rows_loss)
        ga = w * d1 * s
        grad[:-1] += ga @ p
        grad[-1] += ga.sum()
        if hessian:
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
