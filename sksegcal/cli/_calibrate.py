"""Fitting and saving calibrators: shared by ``sksegcal fit`` and ``sksegcal demo``."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
from sklearn.model_selection import GroupKFold

from ._common import CommandError, fmt_t

# "logistic" is the old name of "default" (kept for a release)
CLASSIFIERS = ("default", "mlp", "hgb", "logistic")


def parse_temperature(value: str, option: str = "--t2"):
    """A grid value of ``--t1`` / ``--t2``: ``"auto"`` or a positive number."""
    if value == "auto":
        return "auto"
    try:
        t = float(value)
    except ValueError:
        raise CommandError(f"{option} takes 'auto' or positive numbers, got {value!r}.") from None
    if not t > 0:
        raise CommandError(f"{option} must be positive, got {value!r}.")
    return t


def make_classifier(name: str, seed: int, quick: bool):
    """The correctness classifier of selective scaling (None: the calibrator's default)."""
    if name == "logistic":
        # the default detector is a logistic regression already (on standardised features)
        warnings.warn(
            "--classifier logistic is --classifier default (the calibrator's own logistic "
            "regression); the name 'logistic' will be removed in a future release.",
            FutureWarning,
            stacklevel=2,
        )
        return None
    if name == "default":
        return None
    if name == "mlp":
        from ..mlp import TorchMLPClassifier

        # the paper's MLP; fewer epochs when quick
        return TorchMLPClassifier(max_epochs=5 if quick else 40, random_state=seed)
    if name == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(
            max_iter=30 if quick else 200, early_stopping=False, random_state=seed
        )
    raise CommandError(f"unknown classifier {name!r}; choose default, mlp or hgb.")


class ValidationImages(GroupKFold):
    """One split: the calibrator-validation images held out, the rest trained on.

    It reads the sample's image ids (``groups``, routed to it by scikit-learn's
    metadata routing), so that a search scores every candidate on whole
    held-out images.
    """

    def __init__(self, validation=()):
        self.validation = validation

    def get_n_splits(self, X=None, y=None, groups=None) -> int:
        return 1

    def split(self, X, y=None, groups=None):
        held = np.isin(np.asarray(groups), np.asarray(self.validation))
        yield np.flatnonzero(~held), np.flatnonzero(held)


def fit_selective(estimator, store, split, *, grid=None, max_pixels: int, seed: int):
    """Fit selective scaling on the train + validation images through :func:`fit_store`.

    Without a ``grid`` the estimator is fitted as it is. With one (several
    values of a parameter), a search scores each candidate by NLL on the
    calibrator-validation images and refits the best on train + validation; a
    joblib cache lets the candidates share fitted correctness classifiers.

    Returns the fitted calibrator and the search (None without a grid).
    """
    from joblib import Memory
    from sklearn.model_selection import GridSearchCV

    from ..store import fit_store

    ids = np.concatenate([split.train, split.validation])
    sample = {"images": ids, "max_pixels": max_pixels, "random_state": seed}
    if not grid:
        return fit_store(estimator, store, **sample), None
    with tempfile.TemporaryDirectory(prefix="sksegcal-memory-") as cache:
        estimator.set_params(memory=Memory(cache, verbose=0))
        search = GridSearchCV(
            estimator,
            grid,
            cv=ValidationImages(split.validation),
            refit=True,
            error_score="raise",
        )
        fit_store(search, store, **sample)
        best = search.best_estimator_
    # the cache folder is gone: keep the fitted calibrator free of a dangling Memory
    best.set_params(memory=None)
    return best, search


def local_temperature_info(lts) -> dict:
    """What to print and record about a fitted LocalTemperatureScaling."""
    return {
        "TS temperature (start)": round(float(lts.ts_temperature_), 4),
        "inputs": len(lts.input_names_),
        "L-BFGS iterations": int(lts.n_iter_),
        "converged": bool(lts.converged_),
    }


def search_info(search) -> dict:
    """What to print and record about a fitted CalibratorSearchCV: the choice and its evidence.

    ``evidence`` is one line: the winner's mean held-out NLL per image against TS's,
    with the paired t statistic (``summary()`` has every candidate's).
    """
    r = search.cv_results_
    best, n_images = search.best_index_, int(np.sum(~np.isnan(search.image_nll_[0])))
    where = f"{n_images} held-out images in {search.n_splits_} folds"
    if best == 0:  # TS: say which candidate came closest and why it was not kept
        others = [i for i in range(1, len(r["name"])) if r["error"][i] is None]
        closest = max(others, key=lambda i: r["t_statistic"][i], default=None)
        evidence = f"no candidate beat TS with support over {where}" + (
            f" (closest: {r['name'][closest]}, gain {r['mean_improvement'][closest]:+.5f} "
            f"nats per image, t = {r['t_statistic'][closest]:.2f})"
            if closest is not None
            else ""
        )
    else:
        evidence = (
            f"NLL per image {r['mean_image_nll'][best]:.5f} against TS's "
            f"{r['mean_image_nll'][0]:.5f} over {where} (gain {r['mean_improvement'][best]:+.5f}, "
            f"paired t = {r['t_statistic'][best]:.2f}, p = {r['p_value'][best]:.2g})"
        )
    return {
        "chosen": f"{search.best_name_} ({type(search.best_estimator_).__name__})",
        "evidence": evidence,
    }


def selective_info(selective, search) -> dict:
    """What to print and record about a fitted selective-scaling calibrator."""
    info = {}
    if search is not None:
        params = search.cv_results_["params"]
        nll = [round(-float(s), 4) for s in search.cv_results_["mean_test_score"]]
        info["validation NLL"] = {
            " ".join(f"{k}={fmt_t(v)}" for k, v in sorted(p.items())): v
            for p, v in zip(params, nll)
        }
        info["chosen"] = " ".join(
            f"{k}={fmt_t(v)}" for k, v in sorted(search.best_params_.items())
        )
    info["features"] = selective.features
    if selective.context is not None:  # (the default prints as it always has)
        info["context"] = selective.context
    info["mode"] = selective.mode
    if selective.mode == "hard" and hasattr(selective, "threshold_"):
        info["threshold"] = round(float(selective.threshold_), 4)
    info["t1"] = round(float(selective.t1_), 4)
    info["t2"] = float(f"{float(selective.t2_):.4g}")  # a number in metrics.json, as t1
    auroc = getattr(selective, "detection_auroc_", None)
    if auroc is not None:
        info["misprediction AUROC"] = round(float(auroc), 4)
    choice = getattr(selective, "guard_choice_", None)
    if choice is not None:  # what the cross-fitted guard against losing to TS decided
        scores = selective.guard_scores_
        # the guard compares image by image; calibrators saved before it compared folds
        units = scores.get("n_units", scores["n_folds"])
        what = {"image": "images", "rows": "row blocks"}.get(scores["by"], scores["by"])
        if "n_units" not in scores:
            what = f"folds by {scores['by']}"
        kept = {
            "selective": "selective scaling",
            "shrunk": "a blend of selective scaling and TS "
            f"(lambda = {scores.get('shrinkage', 0.0):.2f})",
        }.get(choice, "TS")
        info["guard"] = (
            f"kept {kept}: "
            f"out-of-fold NLL better than TS on {scores['wins']} of {units} {what}, mean "
            f"{scores['mean_improvement']:+.5f}"
            + (f", t = {scores['t_statistic']:.2f}" if "t_statistic" in scores else "")
        )
    return info


def output_format(path) -> str:
    """The format a calibrator is saved in, from the file name: joblib or else skops.

    ``.joblib``, ``.pkl`` and ``.pickle`` ask for a pickle; every other name gets
    skops, the format ``evaluate`` and ``conformal`` load without ``--trusted``.
    Checked before fitting, so that a missing skops package fails at once.
    """
    if Path(path).suffix.lower() in (".joblib", ".pkl", ".pickle"):
        return "joblib"
    try:
        import skops.io  # noqa: F401
    except ImportError:
        raise CommandError(
            f"writing {path} (a skops file) needs the skops package: "
            "pip install skops, or save to a .joblib file."
        ) from None
    return "skops"


def save_calibrator(estimator, path, fmt: str | None = None) -> Path:
    """Write a fitted calibrator atomically in ``fmt`` (default: from the suffix)."""
    from .._files import atomic_write_via_path
    from ..persistence import save

    fmt = output_format(path) if fmt is None else fmt
    return atomic_write_via_path(path, lambda tmp: save(estimator, tmp, format=fmt))
