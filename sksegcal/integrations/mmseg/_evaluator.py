"""The evaluator metric: calibration numbers from mmengine's (distributed) test loop.

:class:`CalibrationMetric` streams each image into a
:class:`~sksegcal.metrics.CalibrationAccumulator` and merges the
accumulators of all processes, keeping exactly the images that mmengine keeps
for per-sample metrics such as mmseg's ``IoUMetric`` (a distributed sampler
pads the dataset with repeated images; those are left out). It is registered
in mmseg's ``METRICS`` by the package's ``__init__``, not here. Imports
:mod:`._common` and :mod:`._calibrators`, the metrics lazily.
"""

from __future__ import annotations

import logging
import numbers
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from mmengine.dist import all_gather_object, get_dist_info
from mmengine.evaluator import BaseMetric

from ...context import iter_image_rows
from ._calibrators import calibrator_context, check_calibrator_classes, load_calibrator
from ._common import CHUNK_PIXELS, IGNORE_INDEX, PROBA_FLAG, log

__all__ = ["CalibrationMetric"]

# summary() key -> reported metric name (distinct from IoUMetric's aAcc / mIoU / mAcc,
# because an Evaluator refuses two metrics reporting the same name)
_METRIC_NAMES = {
    "ece": "ECE",
    "ece_equal_mass": "ECE_equal_mass",
    "rmsce": "RMSCE",
    "mce": "MCE",
    "nll": "NLL",
    "brier": "Brier",
    "mean_per_image_ece": "mean_image_ECE",
    "classwise_ece": "classwise_ECE",
    "sce": "SCE",
    "ace": "ACE",
    "accuracy": "pixel_accuracy",
    "miou": "mIoU_of_probs",
    "n_pixels": "n_pixels",
}
_DEFAULT_METRICS = ("ece", "mce", "rmsce", "nll", "brier", "mean_per_image_ece")


class CalibrationMetric(BaseMetric):
    """Calibration of per-pixel probabilities as an mmengine/mmseg evaluator metric.

    Streams each test image's probabilities into one
    :class:`~sksegcal.metrics.CalibrationAccumulator` (memory fixed whatever
    the dataset size; images are not kept), merges the accumulators of all
    processes in distributed testing, and reports ECE, MCE, RMS calibration
    error, NLL, Brier score and the mean per-image ECE (by default). In
    distributed testing the numbers are those of one process over the same
    images: the repeats a distributed sampler adds to even out the processes
    are left out, as mmengine leaves them out of per-sample metrics. Use it
    beside mmseg's ``IoUMetric``::

        custom_imports = dict(imports=["sksegcal.integrations.mmseg"],
                              allow_failed_imports=False)
        test_evaluator = [dict(type="IoUMetric", iou_metrics=["mIoU"]),
                          dict(type="CalibrationMetric", n_bins=15)]

    Probabilities are the softmax of the model's ``seg_logits``, or, if the
    model was calibrated with :func:`calibrate_model`, its ``seg_logits``
    as they are; with ``calibrator`` given, that calibrator's
    ``predict_proba`` of the logits (evaluate a saved calibrator without
    touching the model).

    Parameters
    ----------
    n_bins : int, default=15
        Equal-width confidence bins of ECE / MCE / RMSCE.
    ignore_index : int, default=255
        Label of unlabelled pixels, left out of every metric.
    metrics : sequence of str or "all", default=("ece", "mce", "rmsce", "nll", "brier", \
"mean_per_image_ece")
        Which numbers to report, by the keys of
        :meth:`CalibrationAccumulator.summary
        <sksegcal.metrics.CalibrationAccumulator.summary>`. They are
        reported as ECE, MCE, RMSCE, NLL, Brier, mean_image_ECE,
        ECE_equal_mass, classwise_ECE, SCE, ACE, pixel_accuracy,
        mIoU_of_probs and n_pixels.
    classwise : bool, default=False
        Keep per-class tallies (needed for classwise_ece, sce, ace).
    calibrator : estimator, str or path-like, optional
        Apply this calibrator (or the one saved at this path with
        :func:`sksegcal.persistence.save`) to the logits before measuring.
        One that reads the spatial context (``SelectiveScalingCalibrator(
        context="spatial")``, ``LocalTemperatureScaling()``) gets each
        pixel's context columns after its logits, computed per image from
        ``seg_logits`` as ``flatten_segmentation(..., context="spatial")``
        computes them.
    trusted : None, True or iterable of str, default=None
        For a ``calibrator`` path, what you vouch for (as in
        :func:`sksegcal.persistence.load`): ``None`` loads a skops file
        safely and refuses a joblib/pickle file (unpickling runs any code it
        holds); ``True`` opens a pickle you made or trust.
    values : {"auto", "logits", "probabilities"}, default="auto"
        What ``seg_logits`` holds; "auto" trusts the flag set by
        :func:`calibrate_model` and otherwise assumes logits.
    n_base_bins : int, default=3600
        Resolution of the accumulator's confidence grid.
    chunk_pixels : int, default=262144
        Pixels converted at once (bounds the memory per image).
    collect_device : str, default="cpu"
        Where the per-process accumulators are gathered (mmengine).
    prefix : str, optional
        Prefix of the reported names (``prefix/ECE``); mmengine convention.

    Attributes
    ----------
    accumulator_ : CalibrationAccumulator or None
        The tallies of the images processed since the last evaluation (this
        process only; in distributed testing without its latest image, held
        apart until :meth:`evaluate` knows whether it is a sampler's repeat).
    last_accumulator_ : CalibrationAccumulator or None
        The merged tallies behind the last reported numbers (main process),
        e.g. for ``reliability_curve()`` or plotting.
    """

    default_prefix = None

    def __init__(
        self,
        n_bins: int = 15,
        ignore_index: int = IGNORE_INDEX,
        metrics: Sequence[str] | str = _DEFAULT_METRICS,
        classwise: bool = False,
        calibrator=None,
        values: str = "auto",
        n_base_bins: int = 3600,
        chunk_pixels: int = CHUNK_PIXELS,
        collect_device: str = "cpu",
        prefix: str | None = None,
        trusted: bool | Iterable[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix, **kwargs)
        if not isinstance(n_bins, numbers.Integral) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer; got {n_bins!r}.")
        metrics = (
            list(_METRIC_NAMES)
            if metrics == "all"
            else [metrics]
            if isinstance(metrics, str)
            else list(metrics)
        )
        unknown = [m for m in metrics if m not in _METRIC_NAMES]
        if unknown:
            raise ValueError(
                f"Unknown metrics {unknown}; choose from {sorted(_METRIC_NAMES)} or 'all'."
            )
        needs_classwise = {"classwise_ece", "sce", "ace"} & set(metrics)
        if needs_classwise and not classwise and metrics != list(_METRIC_NAMES):
            raise ValueError(f"metrics {sorted(needs_classwise)} need classwise=True.")
        if values not in ("auto", "logits", "probabilities"):
            raise ValueError(
                f"values must be 'auto', 'logits' or 'probabilities'; got {values!r}."
            )
        self.n_bins = int(n_bins)
        self.ignore_index = ignore_index
        self.metrics = metrics
        self.classwise = bool(classwise)
        self.calibrator = None if calibrator is None else load_calibrator(calibrator, trusted)
        # what the calibrator reads beside the logits; a context of the user's own fails here
        self._context = calibrator_context(self.calibrator, "CalibrationMetric")
        self.values = values
        self.n_base_bins = int(n_base_bins)
        self.chunk_pixels = int(chunk_pixels)
        self.accumulator_ = None
        self.last_accumulator_ = None
        # distributed: the latest image's tallies, apart until evaluate() (it may be a repeat)
        self._held = None
        self._n_seen = 0
        self._uid = uuid.uuid4().hex

    def _new_accumulator(self, n_classes: int):
        from ...metrics import CalibrationAccumulator

        return CalibrationAccumulator(
            n_classes,
            ignore_index=self.ignore_index,
            n_base_bins=self.n_base_bins,
            classwise=self.classwise,
            per_image_n_bins=self.n_bins,
        )

    def _accumulator(self, n_classes: int):
        """The accumulator the next image goes into (after the checks of its class count)."""
        known = self.accumulator_ if self.accumulator_ is not None else self._held
        if known is None:
            if self.calibrator is not None:
                check_calibrator_classes(self.calibrator, n_classes, "CalibrationMetric")
        elif known.n_classes != n_classes:
            raise ValueError(
                f"seg_logits with {n_classes} classes after images with {known.n_classes}."
            )
        if get_dist_info()[1] == 1:
            if self.accumulator_ is None:
                self.accumulator_ = self._new_accumulator(n_classes)
            return self.accumulator_
        # distributed: every image apart until the next one comes, so that the last one of
        # this process can still be left out if it is a repeat added by the sampler
        self._fold_held()
        self._held = self._new_accumulator(n_classes)
        return self._held

    def _fold_held(self) -> None:
        if self._held is None:
            return
        if self.accumulator_ is None:
            self.accumulator_ = self._held
        else:
            self.accumulator_.merge(self._held)
        self._held = None

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        """Add the pixels of a batch of predictions to the accumulator."""
        for sample in data_samples:
            if not isinstance(sample, Mapping):  # a SegDataSample given directly
                sample = sample.to_dict()
            if "seg_logits" not in sample:
                raise KeyError(
                    "CalibrationMetric needs seg_logits in the predictions (mmseg 1.x "
                    "segmentors put them there); this data sample has none."
                )
            logits = sample["seg_logits"]["data"]
            if logits.dim() != 3 or logits.shape[0] < 2:
                raise ValueError(
                    f"seg_logits must be (C, H, W) with C >= 2; got {tuple(logits.shape)} "
                    "(sigmoid binary heads are not supported)."
                )
            if "gt_sem_seg" not in sample:
                raise KeyError(
                    "CalibrationMetric needs gt_sem_seg in the data samples: put "
                    "dict(type='LoadAnnotations') in the test pipeline (before PackSegInputs)."
                )
            label = sample["gt_sem_seg"]["data"].squeeze(0)
            c = logits.shape[0]
            if tuple(label.shape) != tuple(logits.shape[1:]):
                raise ValueError(
                    f"gt_sem_seg {tuple(label.shape)} and seg_logits {tuple(logits.shape[1:])} "
                    "differ in size."
                )
            is_proba = self.values == "probabilities" or (
                self.values == "auto" and bool(sample.get(PROBA_FLAG, False))
            )
            if is_proba and self.calibrator is not None:
                raise ValueError(
                    "The model's seg_logits are already calibrated probabilities; give "
                    "CalibrationMetric a calibrator or calibrate the model, not both."
                )
            acc = self._accumulator(c)
            y = label.reshape(-1).cpu().numpy()
            # img_path identifies an image across processes; otherwise a per-instance id
            image_id = sample.get("img_path") or f"{self._uid}-{self._n_seen}"
            self._n_seen += 1
            if self.calibrator is not None:
                # the calibrator's rows: logits, then the context it reads (of the whole image)
                w = int(logits.shape[2])
                rows_of = iter_image_rows(logits, self._context, chunk_pixels=self.chunk_pixels)
                for rows, X in rows_of:
                    p = self.calibrator.predict_proba(X)
                    acc.update(y[rows.start * w : rows.stop * w], p, image_id=image_id)
                continue
            table = logits.detach().float().permute(1, 2, 0).reshape(-1, c)
            for start in range(0, table.shape[0], self.chunk_pixels):
                stop = start + self.chunk_pixels
                x = table[start:stop]
                p = x.cpu().numpy() if is_proba else torch.softmax(x, dim=1).cpu().numpy()
                acc.update(y[start:stop], p, image_id=image_id)

    def evaluate(self, size: int) -> dict:
        """Gather the accumulators of all processes and compute the metrics.

        Parameters
        ----------
        size : int
            The dataset's length. In distributed testing the images a process
            saw beyond it (a sampler's repeats, which mmengine's result
            gathering cuts off for per-sample metrics) are left out.
        """
        rank, world_size = get_dist_info()
        try:
            if world_size > 1:
                self._drop_repeats(size, rank, world_size)
            # One accumulator (or None) per process; mmengine's gathering keeps the first
            # `size` items of its per-process lists, so ask for world_size of them.
            self.results = [self.accumulator_]
            return super().evaluate(world_size)
        finally:
            self.accumulator_ = None
            self._held = None
            self._n_seen = 0

    def _drop_repeats(self, size: int, rank: int, world_size: int) -> None:
        """Fold in or leave out the held image, as mmengine's collect_results would keep it.

        mmengine interleaves the processes' per-sample results (process 0's
        first, process 1's first, ..., then the seconds) and keeps the first
        ``size``: what lies beyond is the sampler's padding. Every process
        computes from all processes' image counts which of its own images
        fall beyond; with mmengine's samplers that is at most its last one.
        """
        counts = [int(n) for n in all_gather_object(self._n_seen)]
        dropped = [n - _n_kept(counts, r, size) for r, n in enumerate(counts)]
        if max(dropped) > 1:  # the same on every process: all raise, none waits
            raise ValueError(
                f"CalibrationMetric: the processes saw {counts} images of a {size}-image "
                f"dataset, so {sum(dropped)} of them lie beyond the dataset and would be "
                "cut off (at most one per process can be left out, as a sampler's repeats). "
                "Use mmengine's DefaultSampler(shuffle=False) in the test dataloader."
            )
        if dropped[rank]:
            self._held = None
        else:
            self._fold_held()

    def compute_metrics(self, results: list) -> dict[str, float]:
        """Merge the gathered accumulators and read the chosen metrics."""
        accs = [a for a in results if a is not None]
        if not accs or sum(a.n_pixels_ for a in accs) == 0:
            log("CalibrationMetric saw no labelled pixel; its metrics are NaN.", logging.WARNING)
            return {_METRIC_NAMES[m]: float("nan") for m in self.metrics}
        merged = accs[0].copy()
        for other in accs[1:]:
            merged.merge(other)
        self.last_accumulator_ = merged
        summary = merged.summary(self.n_bins)
        out = {_METRIC_NAMES[m]: float(summary[m]) for m in self.metrics if m in summary}
        text = ", ".join(f"{k}={v:.4f}" for k, v in out.items())
        log(f"CalibrationMetric over {merged.n_pixels_} pixels ({self.n_bins} bins): {text}")
        return out


def _n_kept(counts: Sequence[int], rank: int, size: int) -> int:
    """How many of process ``rank``'s results mmengine's collect_results keeps.

    Its k-th result lands at position ``sum(min(n, k) for n in counts)`` plus
    the number of earlier processes that have a k-th result too; positions
    from ``size`` on are cut off.
    """
    kept = 0
    for k in range(counts[rank]):
        position = sum(min(n, k) for n in counts) + sum(n > k for n in counts[:rank])
        if position >= size:
            break
        kept += 1
    return kept
