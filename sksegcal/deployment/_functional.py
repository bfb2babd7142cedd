"""Tensor functions shared by the calibrator modules: the class axis is axis 1.

Every function takes logits of shape ``(N, C, *spatial)`` and works in their
dtype, with no loop over pixels, so that it scripts, traces and exports to
ONNX. They compute the same numbers as the NumPy code of the fitted
estimators (``sksegcal.features``, ``sksegcal.calibrators``) to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Log-probabilities are floored at -1e4 wherever they feed a model (as LOG_PROBA_FLOOR in
# sksegcal.calibrators): exp(-1e4) is 0 in every float format, and 0 * log 0 stays 0, not NaN.
# The number is written out where it is used: TorchScript cannot read a module-level float.


def machine_epsilon(dtype: torch.dtype) -> float:
    """The spacing of the floats just above 1 in ``dtype`` (what ``torch.finfo().eps`` gives)."""
    if dtype == torch.float16:
        return 2.0**-10
    if dtype == torch.bfloat16:
        return 2.0**-7
    if dtype == torch.float64:
        return 2.0**-52
    return 2.0**-23


def channel_view(values: Tensor, ndim: int) -> Tensor:
    """A (C,) vector shaped ``(1, C, 1, ...)`` to broadcast against (N, C, *spatial)."""
    shape = [1, -1]
    for _ in range(ndim - 2):
        shape.append(1)
    return values.view(shape)


def channel_linear(x: Tensor, weight_t: Tensor, bias: Tensor) -> Tensor:
    """``x @ weight_t + bias`` over the channel axis of ``x`` (N, F, *spatial) -> (N, O, ...)."""
    last = x.dim() - 1  # a positive axis: the TorchScript-based ONNX exporter needs one
    return torch.matmul(x.movedim(1, last), weight_t).add(bias).movedim(last, 1)


def top_class_first(proba: Tensor, top: Tensor) -> Tensor:
    """Make class ``top`` (N, 1, *spatial) the first maximum of ``proba`` along axis 1.

    Where rounding tied (or reordered) the class a temperature cannot move with
    another, its value is raised just above the row's maximum (by a relative
    machine epsilon), as ``predict_proba`` does, so the argmax is the same.
    """
    eps = machine_epsilon(proba.dtype)
    best, first = proba.max(dim=1, keepdim=True)
    current = proba.gather(1, top)
    # best + |best| eps, not best * (1 + eps): graph optimisers drop a product with 1 + eps
    raised = best + best.abs() * eps
    value = torch.where(first == top, current, raised)
    if proba.requires_grad:
        # a softmax's backward reads its output: leave it intact when gradients flow
        return proba.scatter(1, top, value)
    # in place: proba is the fresh output of a softmax (a copy would be one more pass)
    return proba.scatter_(1, top, value)


def floored_log_softmax(z: Tensor) -> Tensor:
    return torch.log_softmax(z, dim=1).clamp(min=-1e4)


def entropy_from_log_proba(lp: Tensor) -> Tensor:
    """Entropy (nats) over axis 1 of floored log-probabilities, shape (N, *spatial)."""
    return -(lp.exp() * lp).sum(dim=1)


def agnostic_features(z: Tensor, top_k: int = 5) -> Tensor:
    """The class-agnostic detector features of ``sksegcal.features`` (N, k + 2, *spatial).

    The ``k = min(top_k, C)`` largest log-probabilities in decreasing order, the
    entropy and the margin ``p1 - p2``, each floored at ``-1e4`` as the
    selective calibrator floors them.
    """
    lp = floored_log_softmax(z)
    k = min(top_k, int(z.shape[1]))
    top = lp.topk(k, dim=1).values
    entropy = entropy_from_log_proba(lp).unsqueeze(1)
    if k >= 2:
        p_top = top.narrow(1, 0, 2).exp()
        margin = p_top.narrow(1, 0, 1) - p_top.narrow(1, 1, 1)
    else:
        margin = top.narrow(1, 0, 1).exp()
    return torch.cat([top, entropy, margin], dim=1).clamp(min=-1e4)


def detector_features(z: Tensor, kind: str, top_k: int = 5) -> Tensor:
    """What a selective calibrator's detector reads: ``"agnostic"`` or ``"log_softmax"``."""
    if kind == "log_softmax":
        return floored_log_softmax(z)
    return agnostic_features(z, top_k)


# ---------------------------------------------------------------------------
# spatial context (sksegcal.context) in tensor operations
# ---------------------------------------------------------------------------
def _window_counts(n: int, radius: int, like: Tensor) -> Tensor:
    """How many of the positions i - r .. i + r lie inside [0, n), for each i."""
    i = torch.arange(n, device=like.device)
    return (i + radius).clamp(max=n - 1) - (i - radius).clamp(min=0) + 1


def _in_image(h: int, w: int, radius: int, like: Tensor) -> Tensor:
    """In-image pixels of each pixel's (2r+1)^2 window, itself included, (H, W) in like's dtype."""
    rows = _window_counts(h, radius, like).to(like.dtype)
    cols = _window_counts(w, radius, like).to(like.dtype)
    return rows.unsqueeze(1) * cols.unsqueeze(0)


def _disagreement(pred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Shares of the 3x3 and 7x7 in-image neighbours of another class, and the boundary.

    ``pred`` (N, 1, H, W) holds class indices as floats; the outside is padded with
    -1, a value no class has, so it never counts as "the same". Each window is
    unfolded into one axis and compared with its centre in one operation (a short
    graph to script and export), the centre itself subtracted.
    """
    n, h, w = pred.shape[0], pred.shape[2], pred.shape[3]
    padded = F.pad(pred, [3, 3, 3, 3], value=-1.0)
    centre = pred.reshape(n, 1, -1)
    same_large = (F.unfold(padded, 7) == centre).sum(dim=1, keepdim=True).to(pred.dtype) - 1.0
    inner = padded[:, :, 2:-2, 2:-2]
    same_small = (F.unfold(inner, 3) == centre).sum(dim=1, keepdim=True).to(pred.dtype) - 1.0
    neighbours_small = _in_image(h, w, 1, pred) - 1.0
    neighbours_large = _in_image(h, w, 3, pred) - 1.0
    differ_small = neighbours_small - same_small.view(n, 1, h, w)
    differ_large = neighbours_large - same_large.view(n, 1, h, w)
    share_small = torch.where(
        neighbours_small > 0,
        differ_small / neighbours_small.clamp(min=1.0),
        torch.zeros_like(differ_small),
    )
    share_large = torch.where(
        neighbours_large > 0,
        differ_large / neighbours_large.clamp(min=1.0),
        torch.zeros_like(differ_large),
    )
    return share_small, share_large, differ_small > 0


def _boundary_distance(boundary: Tensor, max_distance: float) -> Tensor:
    """Euclidean distance to the nearest boundary pixel, clipped at ``max_distance``.

    A boundary pixel within the clip lies within ``R = int(max_distance)`` rows and
    columns: per column the distance ``g`` to the nearest boundary pixel, capped at
    ``R + 1``, then per row the least ``dx^2 + g^2`` over ``|dx| <= R``: the exact
    squared distance where it is within the clip, something larger elsewhere (the
    bounded search of ``sksegcal.context``, as two unfolded windows).
    """
    n, h, w = boundary.shape[0], boundary.shape[2], boundary.shape[3]
    radius = int(max_distance)
    cap = float(radius + 1)
    b = boundary.to(torch.float32)
    offsets = torch.arange(-radius, radius + 1, device=b.device).to(torch.float32)
    offsets = offsets.view(1, -1, 1)
    cols = F.unfold(F.pad(b, [0, 0, radius, radius], value=0.0), (2 * radius + 1, 1))
    g = torch.where(cols > 0, offsets.abs(), torch.full_like(cols, cap))
    g = g.amin(dim=1, keepdim=True)
    g2 = (g * g).view(n, 1, h, w)
    rows = F.unfold(F.pad(g2, [radius, radius, 0, 0], value=cap * cap), (1, 2 * radius + 1))
    d2 = (rows + offsets * offsets).amin(dim=1, keepdim=True).view(n, 1, h, w)
    return torch.sqrt(d2).clamp(max=max_distance)


def spatial_context(z: Tensor, max_distance: float = 16.0) -> Tensor:
    """``sksegcal.context.spatial_context`` of (N, C, H, W) logits, as (N, 6, H, W) tensors.

    Columns in the order of ``sksegcal.context.CONTEXT_FEATURES``: the shares of
    the 3x3 and 7x7 neighbours with another predicted class, the distance to the
    nearest predicted boundary (clipped), the mean and maximum entropy and the
    mean top-2 margin over the 5x5 window, every window cut at the image edge.
    """
    if z.dim() != 4:
        raise ValueError("spatial context needs logits of shape (N, C, H, W)")
    n_classes = int(z.shape[1])
    t1, pred = z.max(dim=1, keepdim=True)
    if n_classes >= 2:
        t2 = z.topk(2, dim=1).values.narrow(1, 1, 1)
    else:
        t2 = torch.full_like(t1, float("-inf"))
    d = z - t1
    e = d.exp()
    total = e.sum(dim=1, keepdim=True)
    weighted = (e * d).sum(dim=1, keepdim=True)
    entropy = total.log() - weighted / total
    margin = (1.0 - (t2 - t1).exp()) / total
    share_small, share_large, boundary = _disagreement(pred.to(z.dtype))
    distance = _boundary_distance(boundary, max_distance).to(z.dtype)
    entropy_mean = F.avg_pool2d(entropy, 5, stride=1, padding=2, count_include_pad=False)
    entropy_max = F.max_pool2d(entropy, 5, stride=1, padding=2)
    margin_mean = F.avg_pool2d(margin, 5, stride=1, padding=2, count_include_pad=False)
    return torch.cat(
        [share_small, share_large, distance, entropy_mean, entropy_max, margin_mean], dim=1
    )
