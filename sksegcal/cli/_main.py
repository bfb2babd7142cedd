"""The ``sksegcal`` argument parser and the dispatch to the commands."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._common import CommandError

_TRUSTED_HELP = (
    "open joblib/pickle files (a calibrator or old results) too: loading a pickle "
    "runs any code it contains, so only for files you made or trust (default: "
    "skops files and sksegcal's own results only)"
)


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (and exit status 2), like the commands' errors."""

    def error(self, message: str):
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _count(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {n}")
        return n

    parse.__name__ = "integer"
    return parse


def _build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..datasets import DATASETS
    from ._calibrate import CLASSIFIERS
    from ._commands import evaluate, extract, fit, report
    from ._conformal import conformal
    from ._demo import demo
    from ._groups import GROUPS_HELP

    parser = _Parser(
        prog="sksegcal",
        description="Calibrate the per-pixel probabilities of segmentation models.",
        epilog="Start with 'sksegcal demo'. Set SKSEGCAL_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"sksegcal {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(p):
        p.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="no progress messages or bars (results are still printed)",
        )

    p = sub.add_parser(
        "demo",
        help="the whole job on the embedded brain-MRI default (no GPU, no internet)",
        description="Load the small U-Net shipped for the MNI152 slices (or train one with "
        "--retrain), calibrate it with "
        "temperature scaling, selective scaling and the calibrator search "
        "(CalibratorSearchCV), evaluate in-domain and under "
        "an acquisition shift, print a table and write a report folder.",
    )
    p.add_argument(
        "--output",
        "-o",
        default="sksegcal-report",
        help="report folder (default: ./sksegcal-report)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the calibration split and the calibrators; the data and the "
        "network are fixed so that the cached network is reused (default: 0)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small, fast version (fewer slices, a tiny network) for smoke tests",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="network cache (default: $SKSEGCAL_CACHE or ~/.cache/sksegcal)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train the network on this machine instead of loading the one shipped "
        "in the package (minutes; the numbers then depend on the machine's "
        "threads and differ from the README's)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="with --retrain: train afresh and do not write the cache",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mni152-tissue",
        help="mni152-tissue (3 classes, from nilearn) or aal (117 classes; needs "
        "'apt-get install mricron-data') (default: mni152-tissue)",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default="default",
        help="correctness classifier of selective scaling (the calibrator "
        "search's candidates keep their own): the calibrator's "
        "default (logistic regression on class-agnostic features), the paper's "
        "MLP with 40 epochs, gradient boosting or logistic regression "
        "(default: default)",
    )
    p.add_argument(
        "--context",
        choices=("none", "spatial"),
        default="none",
        help="what selective scaling's detector reads beside each pixel's "
        "probabilities: nothing, or the spatial context of its neighbourhood "
        "(docs/spatial.md); with spatial, local temperature scaling on that "
        "context also joins the calibrator search's candidates (default: none)",
    )
    p.add_argument(
        "--keep-stores",
        action="store_true",
        help="keep the LogitStores in OUTPUT/stores (default: a temporary folder)",
    )
    p.add_argument(
        "--threads",
        type=_count(0),
        default=1,
        help="CPU threads for torch, BLAS and OpenMP; 1 is the fastest on a busy "
        "2-core machine (default: 1; 0 leaves the libraries' defaults)",
    )
    common(p)
    p.set_defaults(func=demo)

    p = sub.add_parser(
        "extract",
        help="write per-image logits and labels into a LogitStore",
        description="Fill a LogitStore from .npy arrays of any model (--logits/--labels), "
        "or from the demo's network on an embedded dataset. Resumable: images "
        "already in the store are skipped.",
    )
    p.add_argument("--store", required=True, help="store folder (created or resumed)")
    p.add_argument(
        "--config",
        help="an mmsegmentation config: extract its model's logits "
        "over the config's --split set (needs the mmseg extra)",
    )
    p.add_argument("--checkpoint", help="with --config: the model's weights")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="with --config: which dataloader of the config (default: test)",
    )
    p.add_argument(
        "--size",
        type=_count(1),
        nargs=2,
        metavar=("H", "W"),
        help="with --config: store logits at this size (default: each image's own)",
    )
    p.add_argument("--device", default=None, help="with --config: torch device (default: cpu)")
    p.add_argument(
        "--batch-size", type=_count(1), default=1, help="with --config: images per pass"
    )
    p.add_argument(
        "--logits", help="(N, C, H, W) float .npy file of logits ((N, C, D, H, W) for volumes)"
    )
    p.add_argument(
        "--labels", help="(N, H, W) integer .npy file of labels ((N, D, H, W) for volumes)"
    )
    p.add_argument("--class-names", help="comma-separated class names (with --logits)")
    p.add_argument(
        "--ignore-index", type=int, default=255, help="label of unlabelled pixels (default: 255)"
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mni152-tissue",
        help="without --logits: the embedded dataset (default: mni152-tissue)",
    )
    p.add_argument(
        "--subset",
        choices=("calibration", "shifted", "model"),
        default="calibration",
        help="without --logits: which slices (default: calibration)",
    )
    p.add_argument("--quick", action="store_true", help="without --logits: the small version")
    p.add_argument(
        "--retrain",
        action="store_true",
        help="without --logits: train the network instead of the shipped one",
    )
    p.add_argument("--cache-dir", default=None, help="network cache (as in demo)")
    common(p)
    p.set_defaults(func=extract)

    p = sub.add_parser(
        "fit",
        help="fit a calibrator on a store's train/validation images",
        description="Fit selective scaling, temperature scaling, local temperature scaling or "
        "the calibrator search (CalibratorSearchCV: the best of them by "
        "cross-validated per-image NLL, never worse than temperature scaling on "
        "its folds) on the store's calibrator-"
        "train and -validation images (a split by image is made and recorded in "
        "the store if it has none) and save it: a skops file (safe to share and "
        "to load without --trusted) unless --output ends in .joblib or .pkl. "
        "An option marked selective or search sets the estimator parameter of "
        "its name; one left out keeps the estimator's default.",
    )
    p.add_argument("store", help="LogitStore folder")
    p.add_argument(
        "--method",
        choices=("selective", "search", "temperature", "lts"),
        default="selective",
        help="selective scaling (SelectiveScalingCalibrator), the calibrator search "
        "(CalibratorSearchCV: temperature, soft and generalised selective, and "
        "local temperature scaling, compared image by image; it prints what it "
        "chose and the evidence; its shift_check needs perturbed copies of the "
        "images run through your model, which a store of logits does not hold, "
        "so it is for Python: CalibratorSearchCV(shift_check=...)), temperature "
        "scaling, or local temperature "
        "scaling (a temperature per pixel from its spatial context; "
        "docs/spatial.md) (default: selective)",
    )
    p.add_argument(
        "--output",
        "-o",
        default="calibrator.skops",
        help="where to save it: a skops file (default: calibrator.skops), or a "
        "joblib pickle when the name ends in .joblib or .pkl",
    )
    # selective scaling's parameters: an option left out keeps SelectiveScalingCalibrator's
    # own default, so `sksegcal fit STORE` fits SelectiveScalingCalibrator(random_state=SEED)
    p.add_argument(
        "--context",
        choices=("none", "spatial"),
        default=None,
        help="selective and search (parameter context): what the correctness "
        "detector reads beside each pixel's probabilities (selective), or whether "
        "local temperature scaling on the spatial context joins the candidates "
        "(search): nothing, or the spatial context of each pixel's "
        "neighbourhood, computed per image from the store (default: the "
        "estimator's, none)",
    )
    # the search's parameters; shift_check needs perturbed copies of the images run through
    # the model, which a store of logits cannot supply, and allow_label_change only matters
    # with candidates of the user's own: both are for the Python API
    p.add_argument(
        "--cv",
        type=_count(2),
        default=None,
        help="search (parameter cv): folds by image of the cross-validation "
        "(default: the search's, 3)",
    )
    p.add_argument(
        "--max-cv-pixels",
        type=_count(2),
        default=None,
        help="search (parameter max_cv_pixels): pixels of the sample the "
        "cross-validation uses, which bounds its cost; the winner is refitted on "
        "the whole sample (default: the search's, 100000)",
    )
    p.add_argument(
        "--t2",
        nargs="+",
        default=None,
        help="selective (parameter t2): 'auto' or a temperature; several values are "
        "searched, chosen by NLL on the validation images (default: the "
        "calibrator's, auto)",
    )
    p.add_argument(
        "--t1",
        nargs="+",
        default=None,
        help="selective (parameter t1): temperature of pixels called correct, as "
        "--t2 (default: the calibrator's, auto)",
    )
    p.add_argument(
        "--mode",
        choices=("soft", "hard", "generalised"),
        default=None,
        help="selective (parameter mode): how P(correct) sets the temperature "
        "(default: the calibrator's, soft)",
    )
    p.add_argument(
        "--classifier",
        choices=CLASSIFIERS,
        default=None,
        help="selective (parameter classifier): the correctness detector: the "
        "calibrator's default (logistic regression), the paper's MLP with 40 "
        "epochs or gradient boosting; 'logistic' is an old name of 'default' "
        "(default: default)",
    )
    p.add_argument(
        "--features",
        choices=("agnostic", "log_softmax"),
        default=None,
        help="selective (parameter features): what the detector sees: "
        "class-agnostic summaries or the log-probability vector (the paper) "
        "(default: the calibrator's, agnostic)",
    )
    p.add_argument(
        "--max-pixels",
        type=_count(1),
        default=400_000,
        help="pixels sampled for fitting (default: 400000)",
    )
    p.add_argument("--validation-size", type=float, default=0.25)
    p.add_argument("--test-size", type=float, default=0.25)
    p.add_argument("--resplit", action="store_true", help="replace the recorded split")
    p.add_argument("--groups", default=None, metavar="SPEC", help=GROUPS_HELP)
    p.add_argument(
        "--n-classes",
        type=_count(2),
        default=None,
        help="check that the store has this many classes",
    )
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    common(p)
    p.set_defaults(func=fit)

    p = sub.add_parser(
        "evaluate",
        help="calibration metrics of calibrators on a store",
        description="ECE, MCE, NLL, Brier, accuracy and mIoU of the uncalibrated model and of "
        "each calibrator, streamed over the store's images. Writes metrics.json, "
        "metrics.csv and the accumulators (accumulators.json + .npz) for "
        "'sksegcal report'.",
    )
    p.add_argument("store", help="LogitStore folder")
    p.add_argument(
        "--calibrator",
        "-c",
        action="append",
        help="a calibrator saved by 'sksegcal fit' (.skops; a joblib file needs "
        "--trusted); repeat for several. Each is named by its file stem (more "
        "of its path where two stems are the same). One that reads the spatial "
        "context gets it, computed per image from the store",
    )
    p.add_argument("--trusted", action="store_true", help=_TRUSTED_HELP)
    p.add_argument(
        "--images",
        choices=("test", "validation", "train", "all"),
        default="test",
        help="which images (default: the recorded split's test images)",
    )
    p.add_argument(
        "--output",
        "-o",
        default="sksegcal-results",
        help="results folder (default: ./sksegcal-results)",
    )
    p.add_argument("--n-jobs", type=int, default=1, help="parallel workers (default: 1)")
    p.add_argument(
        "--boundary-width",
        type=int,
        default=None,
        metavar="K",
        help="also measure pixels within K px of a label boundary and the interior "
        "separately (sksegcal.metrics.boundary_mask; default: off)",
    )
    common(p)
    p.set_defaults(func=evaluate)

    p = sub.add_parser(
        "report",
        help="reliability diagrams and a Markdown page from 'evaluate' results",
        description="Read an 'sksegcal evaluate' results folder and write reliability diagrams "
        "(PNG), metrics (JSON, CSV) and report.md.",
    )
    p.add_argument("results", help="results folder (or its accumulators.json)")
    p.add_argument(
        "--output", "-o", default=None, help="report folder (default: the results folder)"
    )
    p.add_argument("--trusted", action="store_true", help=_TRUSTED_HELP)
    common(p)
    p.set_defaults(func=report)

    p = sub.add_parser(
        "conformal",
        help="prediction sets and risk control with guarantees, on a store",
        description="Split the chosen images (default: the recorded test images) by image into "
        "conformal-calibration and evaluation images; calibrate pixel-level "
        "prediction sets and image-level conformal risk control (miscoverage, "
        "and a class's false-negative rate with --fnr-class) for the uncalibrated "
        "model and each calibrator; print coverage and set sizes and write "
        "conformal.json, conformal.md and a set-size heat map (set_sizes.png).",
    )
    p.add_argument("store", help="LogitStore folder")
    p.add_argument(
        "--calibrator",
        "-c",
        action="append",
        help="a fitted calibrator (.skops; a joblib file needs --trusted), fitted "
        "on other images than these; repeat for several",
    )
    p.add_argument("--trusted", action="store_true", help=_TRUSTED_HELP)
    p.add_argument(
        "--alpha",
        type=float,
        default=0.1,
        help="miscoverage level / risk bound in (0, 1) (default: 0.1)",
    )
    p.add_argument(
        "--score",
        nargs="+",
        choices=("lac", "aps"),
        default=["lac"],
        help="score functions of the sets (default: lac)",
    )
    p.add_argument(
        "--fnr-class",
        type=_count(0),
        default=None,
        help="also control the per-image false-negative rate of this class index",
    )
    p.add_argument(
        "--guarantee",
        nargs="+",
        choices=("image", "pixel"),
        default=["image"],
        help="what the pixel sets' promise is over: new images (default) or "
        "exchangeable pixels; give both to compare",
    )
    p.add_argument(
        "--margin-class",
        type=_count(0),
        default=None,
        help="also calibrate inner and outer morphological margins around the "
        "predicted mask of this class index",
    )
    p.add_argument(
        "--connectivity",
        type=_count(1),
        default=1,
        help="of the margins' structuring element (default: 1, a cross)",
    )
    p.add_argument(
        "--images",
        choices=("test", "validation", "train", "all"),
        default="test",
        help="images to split into conformal calibration and evaluation "
        "(default: the recorded split's test images)",
    )
    p.add_argument(
        "--calibration-size",
        type=float,
        default=0.5,
        help="fraction of those images used for conformal calibration (default: 0.5)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of that split (default: 0)")
    p.add_argument(
        "--output",
        "-o",
        default="sksegcal-conformal",
        help="results folder (default: ./sksegcal-conformal)",
    )
    p.add_argument("--n-jobs", type=int, default=1, help="parallel workers (default: 1)")
    common(p)
    p.set_defaults(func=conformal)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sksegcal`` command; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    int
        0 on success, 1 on an error the user can fix (reported as one line on
        stderr), 2 on a usage error (one line too), 130 when interrupted. Any
        other exception (a bug in the library, or in an estimator) propagates
        with its traceback.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    debug = os.environ.get("SKSEGCAL_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"sksegcal {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, OSError) as exc:
        # usage errors the command raised itself, and files the system could not read or
        # write, are one line; any other exception is a bug somewhere and keeps its traceback
        if debug or (isinstance(exc, OSError) and not getattr(exc, "filename", None)):
            raise
        message = str(exc)
        if isinstance(exc, OSError) and not isinstance(exc, FileExistsError):
            message = f"{exc.strerror or exc}: {exc.filename}"
        message = " ".join(message.split())  # one line
        print(f"sksegcal {args.command}: error: {message}", file=sys.stderr)
        return 1
