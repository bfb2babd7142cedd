"""The paper's per-pixel correctness MLP as a scikit-learn classifier.

:class:`TorchMLPClassifier` is a small fully connected network trained with
PyTorch behind the scikit-learn API (``fit`` / ``predict_proba`` /
``get_params``), made for tables of millions of rows with few features, such
as the per-pixel log-probabilities that selective scaling feeds to its
misprediction detector (Wang et al., CVPR 2023).

Design in brief (see ``docs/mlp.md``):

- training is a tight loop over tensors made once per ``fit``: one
  ``randperm`` per epoch, ``index_select`` per mini-batch, no ``Dataset`` or
  ``DataLoader``;
- inference folds every BatchNorm into the linear layer before it, so
  ``predict_proba`` is ``addmm`` + in-place ReLU per layer, run over
  ``chunk_size`` rows at a time (bounded memory);
- every fitted attribute is a numpy array or a Python number: a pickle holds
  no torch tensor and no device, so a model trained on a GPU loads and
  predicts in a CPU-only process.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_is_fitted,
    check_random_state,
    column_or_1d,
    validate_data,
)
from torch import nn

from ._progress import progress

__all__ = ["TorchMLPClassifier"]

# batch_size="auto": about this many optimizer steps per epoch, within these bounds
_AUTO_STEPS_PER_EPOCH = 32
_AUTO_MIN_BATCH = 64
_AUTO_MAX_BATCH = 65536

_NOT_WRITABLE_MSG = "The given NumPy array is not writable"


# --------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count inside the block, restore it after."""
    if n_threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n_threads))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _resolve_device(device: str, *, strict: bool) -> torch.device:
    """A usable torch device from the ``device`` parameter.

    ``strict`` (fit): a device that does not exist or is not available raises.
    Not strict (predict): an unavailable accelerator falls back to the CPU with
    a warning, so a model saved with ``device='cuda'`` still predicts on a
    CPU-only machine.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device string. Use 'auto' (CUDA when "
            "available, else CPU), 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as exc:
        if strict:
            raise ValueError(
                f"device={device!r} is not available in this process ({exc}). Use "
                "device='auto' to take CUDA when present and the CPU otherwise."
            ) from exc
        warnings.warn(
            f"device={device!r} is not available in this process; predicting on the CPU. "
            "Set device='auto' or 'cpu' to silence this warning.",
            RuntimeWarning,
            stacklevel=3,
        )
        return torch.device("cpu")
    return dev


def _as_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Zero-copy on the CPU where possible; we never write into the result."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE_MSG, category=UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device)


def _build_module(
    n_in: int,
    widths: Sequence[int],
    n_out: int,
    *,
    batch_norm: bool,
    dropout: float,
    identity_init: bool,
) -> nn.Sequential:
    """The unfolded network: [Linear -> (BN) -> ReLU -> (Dropout)] * k -> Linear.

    With BatchNorm the hidden Linear layers carry no bias: BN subtracts the
    batch (training) or running (inference) mean, which cancels any bias
    exactly, so the function class is the paper's and the work is smaller.
    """
    layers: list[nn.Module] = []
    d = n_in
    for i, w in enumerate(widths):
        lin = nn.Linear(d, w, bias=not batch_norm)
        if i == 0 and identity_init:
            with torch.no_grad():
                nn.init.eye_(lin.weight)
                if lin.bias is not None:
                    lin.bias.zero_()
        layers.append(lin)
        if batch_norm:
            layers.append(nn.BatchNorm1d(w))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        d = w
    layers.append(nn.Linear(d, n_out))
    return nn.Sequential(*layers)


def _fold_module(module: nn.Sequential) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inference parameters with every BatchNorm folded into its Linear layer.

    Returns ``[(W_t, b), ...]`` with ``W_t`` of shape (in, out), float32, on the
    module's device, such that the module's eval-mode output is
    ``relu(... relu(x @ W_t0 + b0) ...) @ W_tk + bk``. Folding is computed in
    float64: for BN(y) = (y - mean) * gamma / sqrt(var + eps) + beta after
    y = x W^T + b, W' = W * s[:, None] and b' = (b - mean) * s + beta with
    s = gamma / sqrt(var + eps).
    """
    mods = list(module)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Linear):
            continue
        w = m.weight.detach().double()
        b = (
            m.bias.detach().double()
            if m.bias is not None
            else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        )
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if isinstance(nxt, nn.BatchNorm1d):
            s = nxt.weight.detach().double() / torch.sqrt(
                nxt.running_var.detach().double() + nxt.eps
            )
            w = w * s[:, None]
            b = (b - nxt.running_mean.detach().double()) * s + nxt.bias.detach().double()
        out.append((w.t().float().contiguous(), b.float().contiguous()))
    return out


def _forward_folded(h: torch.Tensor, params: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """Logits of the folded network: addmm, then in-place ReLU between layers."""
    last = len(params) - 1
    for i, (w_t, b) in enumerate(params):
        h = torch.addmm(b, h, w_t)
        if i < last:
            h.clamp_(min=0)
    return h


def _stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/validation indices.

    Each class sends ``round(fraction * n_c)`` of its rows to validation, but
    always keeps at least one row for training, so every class is trained on
    (a class with a single row is never validated on).
    """
    perm = rng.permutation(y.shape[0])
    order = perm[np.argsort(y[perm], kind="stable")]
    counts = np.bincount(y)
    val_parts, train_parts = [], []
    start = 0
    for c in counts:
        rows = order[start : start + c]
        n_val = min(int(round(fraction * c)), max(c - 1, 0))
        val_parts.append(rows[:n_val])
        train_parts.append(rows[n_val:])
        start += c
    train = np.sort(np.concatenate(train_parts))
    val = np.sort(np.concatenate(val_parts))
    return train, val


# --------------------------------------------------------------------------- estimator
class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """Multi-layer perceptron classifier trained with PyTorch, fast on many rows.

    By default this is the misprediction detector of selective scaling (Wang,
    Gong and Wang, CVPR 2023): with ``d = n_features``,
    ``Linear(d, d)`` initialised to the identity -> BatchNorm -> ReLU ->
    ``Linear(d, 2d)`` -> BatchNorm -> ReLU -> ``Linear(2d, d)`` -> BatchNorm ->
    ReLU -> ``Linear(d, n_classes)``, trained with softmax cross-entropy and
    AdamW. Any number of classes works; the binary case uses two outputs.

    Parameters
    ----------
    hidden_layer_sizes : sequence of int or float, default=(1.0, 2.0, 1.0)
        Width of each hidden layer. A float is a multiple of the number of
        input features (rounded, at least 1); an int is an absolute width. An
        empty sequence gives a linear (multinomial logistic) model.
    identity_init : bool, default=True
        Initialise the first hidden layer's weight to the identity (a
        rectangular identity when its width differs from the input's), as the
        paper does. Other layers use PyTorch's default initialisation.
    batch_norm : bool, default=True
        BatchNorm after each hidden Linear layer. At inference it is folded
        into the Linear layer, so it costs nothing there.
    dropout : float, default=0.0
        Dropout probability after each hidden ReLU, in [0, 1).
    learning_rate : float, default=1e-3
        AdamW learning rate.
    weight_decay : float, default=1e-6
        AdamW (decoupled) weight decay.
    max_epochs : int, default=40
        Maximum number of passes over the training rows.
    batch_size : int or "auto", default="auto"
        Rows per mini-batch. ``"auto"`` takes about 32 optimizer steps per
        epoch, ``clip(ceil(n_train / 32), 64, 65536)``: 65,536 rows from about
        2M training rows on (the paper used about 125,000), and still about
        1,300 AdamW steps in 40 epochs on smaller tables (about the paper's
        count). CPU throughput per row is flat from a few thousand rows per
        batch on (``docs/mlp.md``). Each epoch is cut into ``ceil(n_train / batch_size)``
        batches of equal size (within one row), so no tiny last batch upsets
        BatchNorm.
    class_weight : dict, "balanced", "paper" or None, default=None
        Weights multiplying each class's loss.

        - ``None``: all classes weigh 1 (probabilities estimate the true
          frequencies; what a calibrator usually wants).
        - ``"balanced"``: ``n_samples / (n_classes * weighted_count(c))``.
        - a dict ``{label: weight}``; labels left out weigh 1.
        - ``"paper"``: the paper's recipe for correctness labels, weight 2 on
          ``classes_[0]`` and 1 on ``classes_[1]``. With ``y`` = 1 for a
          correct pixel and 0 for a mispredicted one, the mispredicted pixels
          count twice (the reference code duplicates them). Binary ``y`` only.

        Class and sample weights multiply; the product is normalised to mean
        1 over the training rows, so weights change the balance between rows
        and not the step size.
    validation_fraction : float or None, default=0.1
        Fraction of the training rows held out (stratified by class, seeded by
        ``random_state``) to select the best epoch and to stop early. Ignored
        when ``eval_set`` is passed to :meth:`fit`. ``None``: no validation,
        the last epoch's weights are kept.
    n_iter_no_change : int or None, default=10
        Stop when the validation loss has not improved by more than ``tol``
        for this many epochs. ``None`` trains all ``max_epochs`` (the best
        epoch is still restored). Has no effect without a validation set.
    tol : float, default=1e-4
        Minimum decrease of the validation loss that resets the patience
        counter. The best epoch itself is the exact argmin of the loss.
    chunk_size : int, default=8192
        Rows per block in :meth:`predict_proba` and in the validation loss;
        bounds the extra memory to a few ``chunk_size x width`` arrays. The
        default keeps a block's activations in a CPU core's L2 cache for
        input widths up to about 150.
    device : str, default="auto"
        Torch device for fit and predict: ``"auto"`` (CUDA when available,
        else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``... ``fit`` raises on a
        device that is not available; prediction falls back to the CPU with
        a warning, so a model fitted with ``device="cuda"`` still predicts in
        a CPU-only process.
    n_threads : int or None, default=None
        Torch intra-op threads during ``fit`` and ``predict_proba``
        (``torch.set_num_threads``, restored afterwards). ``None`` keeps
        torch's current setting.
    random_state : int, RandomState instance or None, default=None
        Seeds the validation split, the weight initialisation, the shuffling
        and dropout. With an int, two fits on the CPU give identical weights
        (with the same thread count); CUDA kernels are not bitwise
        deterministic. The global torch RNG is left untouched.
    verbose : int, default=0
        ``>= 1``: a progress bar over epochs with the losses (tqdm, when
        installed and stderr is a terminal), else one line per epoch on
        stderr.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Sorted class labels seen in ``fit``.
    n_features_in_ : int
        Number of features seen in ``fit``.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen in ``fit``, when ``X`` has string column names.
    hidden_layer_sizes_ : tuple of int
        The resolved hidden widths.
    coefs_ : list of ndarray
        Inference weights, BatchNorm folded in: ``coefs_[i]`` has shape
        (in_width, out_width), float32.
    intercepts_ : list of ndarray
        Inference biases, BatchNorm folded in, float32.
    state_dict_ : dict of str to ndarray
        The trained (unfolded) network's ``state_dict`` as numpy arrays
        (BatchNorm running statistics included); :meth:`get_module` rebuilds
        the ``torch.nn.Module`` from it.
    class_weight_ : ndarray of shape (n_classes,)
        Class weights used in training (before normalisation).
    train_loss_ : list of float
        Mean (weighted) training loss of each epoch, measured in training mode
        while the epoch ran.
    validation_loss_ : list of float or None
        Weighted cross-entropy of the validation rows after each epoch
        (inference mode); ``None`` without a validation set.
    best_epoch_ : int
        1-based epoch whose weights were kept: the argmin of
        ``validation_loss_``, or the last epoch without validation.
    n_iter_ : int
        Number of epochs run (fewer than ``max_epochs`` after early stopping).
    batch_size_ : int
        Rows per mini-batch actually used.
    device_ : str
        Device the model was trained on (information only; not used to
        predict).

    See Also
    --------
    sklearn.neural_network.MLPClassifier : scikit-learn's own MLP (NumPy,
        no BatchNorm; much slower on millions of rows).

    Notes
    -----
    ``sample_weight`` rows with weight 0 are removed before training, so
    zero weights are exactly equivalent to dropping rows. BatchNorm's batch
    statistics count rows, not weights, so an integer weight k is not exactly
    k repeated rows (it is with ``batch_norm=False`` and full batches).

    References
    ----------
    Wang, D., Gong, B., Wang, L. "On Calibrating Semantic Segmentation Models:
    Analyses and An Algorithm", CVPR 2023.

    Examples
    --------
    >>> import numpy as np
    >>> from sksegcal.mlp import TorchMLPClassifier
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(1000, 4)).astype(np.float32)
    >>> y = (X[:, 0] + X[:, 1] > 0).astype(int)
    >>> clf = TorchMLPClassifier(max_epochs=5, learning_rate=1e-2, random_state=0)
    >>> clf = clf.fit(X, y)
    >>> clf.classes_
    array([0, 1])
    >>> proba = clf.predict_proba(X[:5])
    >>> proba.shape
    (5, 2)
    >>> bool(np.allclose(proba.sum(axis=1), 1.0))
    True
    >>> float(clf.score(X, y)) > 0.9
    True
    """

    _parameter_constraints: dict = {
        "hidden_layer_sizes": ["array-like"],
        "identity_init": ["boolean"],
        "batch_norm": ["boolean"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "max_epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "class_weight": [dict, StrOptions({"balanced", "paper"}), None],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
        "n_iter_no_change": [Interval(Integral, 1, None, closed="left"), None],
        "tol": [Interval(Real, 0, None, closed="left")],
        "chunk_size": [Interval(Integral, 1, None, closed="left")],
        "device": [str],
        "n_threads": [Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int | float] = (1.0, 2.0, 1.0),
        *,
        identity_init: bool = True,
        batch_norm: bool = True,
        dropout: float = 0.0,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-6,
        max_epochs: int = 40,
        batch_size: int | str = "auto",
        class_weight: dict | str | None = None,
        validation_fraction: float | None = 0.1,
        n_iter_no_change: int | None = 10,
        tol: float = 1e-4,
        chunk_size: int = 8192,
        device: str = "auto",
        n_threads: int | None = None,
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.identity_init = identity_init
        self.batch_norm = batch_norm
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.chunk_size = chunk_size
        self.device = device
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = False
        # CUDA kernels (atomics in the backward pass) are not bitwise reproducible
        tags.non_deterministic = self.device != "cpu" and (
            self.device != "auto" or torch.cuda.is_available()
        )
        return tags

    # ------------------------------------------------------------------ checks
    def _resolve_widths(self, n_features: int) -> tuple[int, ...]:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
            sizes = list(np.asarray(sizes).ravel()) if np.ndim(sizes) else [sizes]
        widths = []
        for s in sizes:
            if isinstance(s, (bool, np.bool_)) or not isinstance(s, (Integral, Real)):
                raise TypeError(
                    f"hidden_layer_sizes must hold ints (widths) or floats (multiples of "
                    f"n_features), got {s!r} in {self.hidden_layer_sizes!r}."
                )
            if not s > 0:
                raise ValueError(
                    f"hidden_layer_sizes must be positive, got {s!r} in "
                    f"{self.hidden_layer_sizes!r}."
                )
            if isinstance(s, Integral):
                widths.append(int(s))
            else:
                widths.append(max(1, int(round(float(s) * n_features))))
        return tuple(widths)

    def _class_weights(
        self, classes: np.ndarray, y_enc: np.ndarray, sw: np.ndarray | None
    ) -> np.ndarray:
        k = len(classes)
        cw = self.class_weight
        if cw is None:
            return np.ones(k)
        if isinstance(cw, str) and cw == "balanced":
            counts = np.bincount(y_enc, weights=sw, minlength=k)
            with np.errstate(divide="ignore"):
                out = np.where(counts > 0, counts.sum() / (k * counts), 0.0)
            return out
        if isinstance(cw, str) and cw == "paper":
            if k != 2:
                raise ValueError(
                    f"class_weight='paper' weighs the mispredicted class (classes_[0]) 2 "
                    f"for binary correctness labels, but y has {k} classes. Pass a dict "
                    "or 'balanced' for multi-class targets."
                )
            return np.array([2.0, 1.0])
        out = np.ones(k)
        lookup = {c: i for i, c in enumerate(classes.tolist())}
        unknown = [key for key in cw if key not in lookup]
        if unknown:
            raise ValueError(
                f"class_weight has labels {unknown!r} that are not in y's classes "
                f"{classes.tolist()!r}."
            )
        for key, value in cw.items():
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"class_weight[{key!r}] must be a finite number >= 0.")
            out[lookup[key]] = float(value)
        return out

    # ------------------------------------------------------------------ fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        eval_set: tuple | None = None,
    ) -> TorchMLPClassifier:
        """Train the network.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training features (for selective scaling, per-pixel
            log-probabilities). float32 input is used without a copy on the
            CPU.
        y : array-like of shape (n_samples,)
            Class labels (any hashable, sortable labels).
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative row weights; rows of weight 0 are dropped.
        eval_set : tuple (X_val, y_val) or (X_val, y_val, sample_weight_val), default=None
            Explicit validation rows for best-epoch selection and early
            stopping; replaces ``validation_fraction``. Labels must be among
            ``y``'s classes.

        Returns
        -------
        self : TorchMLPClassifier
            The fitted classifier.
        """
        X, y = validate_data(self, X, y, dtype=(np.float32, np.float64))
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 classes to train, but y contains "
                f"only one class: {classes.tolist()!r}. For selective scaling this means "
                "every pixel is correct (or every pixel is wrong); check the labels."
            )
        y_enc = y_enc.astype(np.int64, copy=False)
        n_features = X.shape[1]
        widths = self._resolve_widths(n_features)

        sw = None
        if sample_weight is not None:
            sw = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
            if np.all(sw == sw[0]):
                sw = None  # uniform weights are no weights (bit-identical to None)
        cw = self._class_weights(classes, y_enc, sw)
        w = cw[y_enc] if sw is None else sw * cw[y_enc]
        weighted = not np.all(w == w[0])

        rs = check_random_state(self.random_state)
        split_rs = np.random.RandomState(rs.randint(np.iinfo(np.int32).max))
        torch_seed = int(rs.randint(np.iinfo(np.int32).max))

        # rows that take part: non-zero weight
        rows = np.flatnonzero(w > 0) if weighted else np.arange(len(y_enc))
        if len(np.unique(y_enc[rows])) < 2:
            raise ValueError(
                "After removing the rows whose sample_weight x class_weight is 0, y "
                "contains only one class; a classifier needs at least 2 classes."
            )

        X_val = y_val = w_val = None
        if eval_set is not None:
            X_val, y_val, w_val = self._check_eval_set(eval_set, classes, cw)
            train_rows = rows
            val_rows = None
        elif self.validation_fraction is not None:
            tr, va = _stratified_split(y_enc[rows], float(self.validation_fraction), split_rs)
            train_rows, val_rows = rows[tr], rows[va]
            if len(val_rows) == 0:
                warnings.warn(
                    f"validation_fraction={self.validation_fraction} leaves no validation "
                    f"row out of {len(rows)}; training without validation (last epoch "
                    "kept). Pass more rows, a larger fraction or an eval_set.",
                    UserWarning,
                    stacklevel=3,
                )
                val_rows = None
        else:
            train_rows, val_rows = rows, None

        n_train = len(train_rows)
        if self.batch_size == "auto":
            batch_size = int(
                min(
                    _AUTO_MAX_BATCH,
                    max(_AUTO_MIN_BATCH, math.ceil(n_train / _AUTO_STEPS_PER_EPOCH)),
                )
            )
        else:
            batch_size = int(self.batch_size)
        if self.batch_norm and min(batch_size, n_train) < 2:
            raise ValueError(
                f"batch_norm=True needs at least 2 rows per mini-batch, but batch_size="
                f"{batch_size} and {n_train} training rows. Use a larger batch_size or "
                "batch_norm=False."
            )

        device = _resolve_device(self.device, strict=True)
        with _torch_threads(self.n_threads):
            self._fit_torch(
                X,
                y_enc,
                w if weighted else None,
                train_rows,
                val_rows,
                (X_val, y_val, w_val),
                n_out=len(classes),
                widths=widths,
                batch_size=batch_size,
                device=device,
                seed=torch_seed,
            )
        self.classes_ = classes
        self.hidden_layer_sizes_ = widths
        self.class_weight_ = cw
        self.batch_size_ = batch_size
        self.device_ = str(device)
        return self

    def _check_eval_set(self, eval_set, classes, cw):
        if not isinstance(eval_set, (tuple, list)) or len(eval_set) not in (2, 3):
            raise ValueError(
                "eval_set must be a tuple (X_val, y_val) or (X_val, y_val, sample_weight_val)."
            )
        X_val, y_val = eval_set[0], eval_set[1]
        X_val = validate_data(self, X_val, reset=False, dtype=(np.float32, np.float64))
        y_val = column_or_1d(y_val, warn=True)
        if len(y_val) != X_val.shape[0]:
            raise ValueError(
                f"eval_set: X_val has {X_val.shape[0]} rows but y_val has {len(y_val)}."
            )
        idx = np.searchsorted(classes, y_val)
        idx = np.clip(idx, 0, len(classes) - 1)
        bad = classes[idx] != y_val
        if np.any(bad):
            raise ValueError(
                f"eval_set: y_val has labels {np.unique(y_val[bad])[:5].tolist()!r} that are "
                f"not among the training classes {classes.tolist()!r}."
            )
        w_val = cw[idx]
        if len(eval_set) == 3 and eval_set[2] is not None:
            w_val = w_val * _check_sample_weight(
                eval_set[2], X_val, dtype=np.float64, ensure_non_negative=True
            )
        if not np.sum(w_val) > 0:
            raise ValueError("eval_set: the validation rows have total weight 0.")
        return X_val, idx.astype(np.int64), w_val

    def _fit_torch(
        self,
        X: np.ndarray,
        y_enc: np.ndarray,
        w: np.ndarray | None,
        train_rows: np.ndarray,
        val_rows: np.ndarray | None,
        eval_data: tuple,
        *,
        n_out: int,
        widths: tuple[int, ...],
        batch_size: int,
        device: torch.device,
        seed: int,
    ) -> None:
        n_features = X.shape[1]
        # one float32 copy of the table on the device (none on the CPU for float32 X)
        Xt = _as_tensor(X.astype(np.float32, copy=False), device)
        yt = torch.from_numpy(y_enc).to(device)
        binary = n_out == 2
        ytf = yt.to(torch.float32) if binary else None
        wt = None
        if w is not None:
            w_train = w[train_rows]
            wt = torch.from_numpy((w / w_train.mean()).astype(np.float32)).to(device)
        train_idx = torch.from_numpy(train_rows.astype(np.int64)).to(device)
        n_train = len(train_rows)
        n_batches = max(1, math.ceil(n_train / batch_size))

        # validation rows: either indices into X or a separate table
        val = None
        if val_rows is not None:
            val_idx = torch.from_numpy(val_rows.astype(np.int64)).to(device)
            w_v = (
                torch.from_numpy(w[val_rows].astype(np.float64)).to(device)
                if w is not None
                else None
            )
            val = (Xt, yt, val_idx, w_v)
        elif eval_data[0] is not None:
            Xv, yv, wv = eval_data
            Xvt = _as_tensor(Xv.astype(np.float32, copy=False), device)
            val = (
                Xvt,
                torch.from_numpy(yv).to(device),
                None,
                torch.from_numpy(wv.astype(np.float64)).to(device),
            )

        fork_devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork_devices, device_type=device.type):
            torch.manual_seed(seed)
            module = _build_module(
                n_features,
                widths,
                n_out,
                batch_norm=bool(self.batch_norm),
                dropout=float(self.dropout),
                identity_init=bool(self.identity_init),
            ).to(device)
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            opt = torch.optim.AdamW(
                module.parameters(),
                lr=float(self.learning_rate),
                weight_decay=float(self.weight_decay),
                fused=True,
            )
            train_loss: list[float] = []
            val_loss: list[float] | None = [] if val is not None else None
            best_loss, best_epoch, best_state = math.inf, 0, None
            patience_ref, bad_epochs = math.inf, 0
            epochs = progress(
                range(int(self.max_epochs)),
                desc="TorchMLPClassifier",
                unit="epoch",
                enabled=bool(self.verbose),
            )
            # a bar only on a terminal (with tqdm); elsewhere verbose prints a line per epoch
            bar = bool(self.verbose) and not getattr(epochs, "disable", True)
            for epoch in epochs:
                module.train()
                perm = train_idx.index_select(
                    0, torch.randperm(n_train, generator=gen, device=device)
                )
                total = torch.zeros((), dtype=torch.float64, device=device)
                for idx in torch.tensor_split(perm, n_batches):
                    xb = Xt.index_select(0, idx)
                    logits = module(xb)
                    if binary:
                        # softmax CE on 2 logits == logistic loss on their difference;
                        # several times cheaper than log_softmax over a width-2 dim
                        loss = F.binary_cross_entropy_with_logits(
                            logits[:, 1] - logits[:, 0],
                            ytf.index_select(0, idx),
                            weight=None if wt is None else wt.index_select(0, idx),
                        )
                    elif wt is None:
                        loss = F.cross_entropy(logits, yt.index_select(0, idx))
                    else:
                        ce = F.cross_entropy(logits, yt.index_select(0, idx), reduction="none")
                        loss = (ce * wt.index_select(0, idx)).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * idx.shape[0]
                train_loss.append(float(total) / n_train)
                msg = {"train_loss": f"{train_loss[-1]:.5f}"}
                if val is not None:
                    module.eval()
                    vl = self._validation_loss(module, val)
                    val_loss.append(vl)
                    msg["val_loss"] = f"{vl:.5f}"
                    if vl < best_loss:
                        best_loss, best_epoch = vl, epoch + 1
                        best_state = {
                            k: v.detach().clone() for k, v in module.state_dict().items()
                        }
                    if vl < patience_ref - self.tol:
                        patience_ref, bad_epochs = vl, 0
                    else:
                        bad_epochs += 1
                if bar:
                    epochs.set_postfix(msg)
                elif self.verbose:
                    print(
                        f"epoch {epoch + 1}/{self.max_epochs} "
                        + " ".join(f"{k}={v}" for k, v in msg.items()),
                        file=sys.stderr,
                        flush=True,
                    )
                if (
                    val is not None
                    and self.n_iter_no_change is not None
                    and bad_epochs >= self.n_iter_no_change
                ):
                    break
            epochs.close()
        n_iter = len(train_loss)
        if best_state is not None:
            module.load_state_dict(best_state)
        else:
            best_epoch = n_iter
        module.eval()
        params = _fold_module(module)

        self.n_features_in_ = n_features
        self.state_dict_ = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
        self.coefs_ = [wt_.cpu().numpy() for wt_, _ in params]
        self.intercepts_ = [b.cpu().numpy() for _, b in params]
        self.train_loss_ = train_loss
        self.validation_loss_ = val_loss
        self.best_epoch_ = int(best_epoch)
        self.n_iter_ = int(n_iter)
        self._module_config = {
            "n_in": n_features,
            "widths": tuple(widths),
            "n_out": n_out,
            "batch_norm": bool(self.batch_norm),
            "dropout": float(self.dropout),
        }

    def _validation_loss(self, module: nn.Sequential, val: tuple) -> float:
        Xv, yv, idx, wv = val
        n = Xv.shape[0] if idx is None else idx.shape[0]
        chunk = int(self.chunk_size)
        total = torch.zeros((), dtype=torch.float64, device=Xv.device)
        with torch.inference_mode():
            params = _fold_module(module)
            for start in range(0, n, chunk):
                if idx is None:
                    xb, yb = Xv[start : start + chunk], yv[start : start + chunk]
                else:
                    sel = idx[start : start + chunk]
                    xb, yb = Xv.index_select(0, sel), yv.index_select(0, sel)
                ce = F.cross_entropy(_forward_folded(xb, params), yb, reduction="none")
                if wv is None:
                    total += ce.sum(dtype=torch.float64)
                else:
                    total += (ce.double() * wv[start : start + chunk]).sum()
            denom = float(n) if wv is None else float(wv.sum())
        return float(total) / denom

    # ------------------------------------------------------------------ predict
    def _logits(self, X: Any, reduce) -> np.ndarray:
        """Run the folded network over ``X`` in chunks; ``reduce(logits)`` -> numpy rows."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float32, np.float64))
        out = None
        with _torch_threads(self.n_threads), torch.inference_mode():
            device = _resolve_device(self.device, strict=False)
            params = [
                (_as_tensor(w, device), _as_tensor(b, device))
                for w, b in zip(self.coefs_, self.intercepts_)
            ]
            n, chunk = X.shape[0], int(self.chunk_size)
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                xb = _as_tensor(X[start:stop].astype(np.float32, copy=False), device)
                res = reduce(_forward_folded(xb, params)).cpu().numpy()
                bad = ~np.isfinite(res).reshape(len(res), -1).all(axis=1)
                if bad.any():  # finite inputs that overflow float32 (|x| near 3e38): float64
                    x64 = _as_tensor(X[start:stop][bad].astype(np.float64), device)
                    p64 = [(w.double(), b.double()) for w, b in params]
                    res[bad] = reduce(_forward_folded(x64, p64)).cpu().numpy()
                if out is None:
                    out = np.empty((n,) + res.shape[1:], dtype=res.dtype)
                out[start:stop] = res
        return out

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities, computed ``chunk_size`` rows at a time.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes), float64
            Softmax of the network's outputs; columns follow ``classes_``.
        """
        return self._logits(X, lambda z: torch.softmax(z.double(), dim=1))

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log of :meth:`predict_proba`, computed with a log-softmax.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows.

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes), float64
            Log-probabilities; columns follow ``classes_``.
        """
        return self._logits(X, lambda z: torch.log_softmax(z.double(), dim=1))

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Labels from ``classes_``.
        """
        index = self._logits(X, lambda z: z.argmax(dim=1))
        return self.classes_[index]

    # ------------------------------------------------------------------ torch access
    def get_module(self) -> nn.Sequential:
        """The trained, unfolded network as a ``torch.nn.Sequential`` (CPU, eval mode).

        A fresh module each call, built from ``state_dict_``; use it for
        inspection, fine-tuning or export. Its eval-mode output equals
        :meth:`predict_proba`'s logits up to float32 rounding.

        Returns
        -------
        module : torch.nn.Sequential
            The network with BatchNorm layers (not folded).
        """
        check_is_fitted(self)
        cfg = self._module_config
        module = _build_module(
            cfg["n_in"],
            cfg["widths"],
            cfg["n_out"],
            batch_norm=cfg["batch_norm"],
            dropout=cfg["dropout"],
            identity_init=False,
        )
        module.load_state_dict(
            {k: torch.from_numpy(np.array(v)) for k, v in self.state_dict_.items()}
        )
        return module.eval()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        """Pickle state: every torch tensor converted to a CPU numpy array.

        Fitted attributes are numpy already; this also guards attributes a
        user or subclass may add, so a pickle never holds a torch tensor or a
        device and loads in a process without CUDA.
        """
        state = super().__getstate__()
        return {k: _to_numpy_tree(v) for k, v in state.items()}


def _to_numpy_tree(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, dict):
        return {k: _to_numpy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy_tree(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_numpy_tree(v) for v in value)
    return value
