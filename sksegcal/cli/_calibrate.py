"""Fitting and saving calibrators: shared by ``sksegcal fit`` and ``sksegcal demo``."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from ._common import CommandError, fmt_t

CLASSIFIERS = ("default", "mlp", "hgb", "logistic")


def parse_temperature(value: str, option: str = "--t2"):
    """A grid value of ``--t1`` / ``--t2``: ``"auto"`` or a positive number."""
    if value == "auto":
        return "auto"
    try:
        t = float(value)
    except ValueError:
        raise CommandError(f"{option} takes 'auto' or positive numbers, got {value!r}.") \
            from None
    if not t > 0:
        raise CommandError(f"{option} must be positive, got {value!r}.")
    return t


def make_classifier(name: str, seed: int, quick: bool):
    """The correctness classifier of selective scaling (None: the calibrator's default)."""
    if name == "default":
        return None
    if name == "mlp":
        from ..mlp import TorchMLPClassifier

        # the paper's MLP; fewer epochs when quick
        return TorchMLPClassifier(max_epochs=5 if quick else 40, random_state=seed)
    if name == "hgb":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=30 if quick else 200,
                                              early_stopping=False, random_state=seed)
    if name == "logistic":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=500)
    raise CommandError(f"unknown classifier {name!r}; choose default, mlp, hgb or logistic.")


def fit_selective(store, split, *, max_pixels, seed, quick, classifier, t2_grid,
                  t1_grid=(1.0,), features="agnostic", context=None):
    """SelectiveScalingCalibrator with t1/t2 chosen on the validation images (PredefinedSplit).

    The grid search scores each candidate by NLL on the calibrator-validation
    images and refits the best one on train + validation. A joblib cache lets
    the candidates share fitted correctness classifiers, and metadata routing
    passes the image ids on to ``fit`` so that "auto" temperatures are fitted
    on held-out whole images, not on pixels of images the classifier saw. With
    ``context="spatial"`` the sampled rows carry their pixels' spatial context
    columns (computed per image from the store) and the detector reads them.

    Returns the fitted calibrator and the search (None for a single candidate).
    """
    import sklearn
    from joblib import Memory
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    from ..selective import SelectiveScalingCalibrator
    from ..store import _sample_table

    ids = np.concatenate([split.train, split.validation])
    X, y, groups = _sample_table(store, max_pixels, context=context, images=ids,
                                 random_state=seed)
    fold = split.test_fold(groups)
    grid = {"t1": list(t1_grid), "t2": list(t2_grid)}
    with tempfile.TemporaryDirectory(prefix="sksegcal-memory-") as cache:
        base = SelectiveScalingCalibrator(
            make_classifier(classifier, seed, quick), features=features, context=context,
            random_state=seed, memory=Memory(cache, verbose=0))
        if len(grid["t1"]) == 1 and len(grid["t2"]) == 1:
            best = base.set_params(t1=grid["t1"][0], t2=grid["t2"][0], memory=None)
            return best.fit(X, y, groups=groups), None
        with sklearn.config_context(enable_metadata_routing=True):
            base.set_fit_request(groups=True, sample_weight=False)
            search = GridSearchCV(base, grid, cv=PredefinedSplit(fold), refit=True,
                                  error_score="raise")
            search.fit(X, y, groups=groups)
        best = search.best_estimator_
    # the cache folder is gone: keep the fitted calibrator free of a dangling Memory
    best.set_params(memory=None)
    # and of the search's routing request (set_fit_request above): it served the search
    # only, and its objects point back at each other, which skops cannot write (recursion)
    vars(best).pop("_metadata_request", None)
    return best, search


def fit_local_temperature(store, fit_ids, *, max_pixels, seed):
    """LocalTemperatureScaling on a sample of the fit images, with their spatial context."""
    from ..local_scaling import LocalTemperatureScaling
    from ..store import fit_store

    return fit_store(LocalTemperatureScaling(), store, images=fit_ids, max_pixels=max_pixels,
                     random_state=seed)


def local_temperature_info(lts) -> dict:
    """What to print and record about a fitted LocalTemperatureScaling."""
    return {"TS temperature (start)": round(float(lts.ts_temperature_), 4),
            "inputs": len(lts.input_names_), "L-BFGS iterations": int(lts.n_iter_),
            "converged": bool(lts.converged_)}


def selective_info(selective, search) -> dict:
    """What to print and record about a fitted selective-scaling calibrator."""
    info = {}
    if search is not None:
        params = search.cv_results_["params"]
        nll = [round(-float(s), 4) for s in search.cv_results_["mean_test_score"]]
        info["validation NLL"] = {f"t1={fmt_t(p['t1'])} t2={fmt_t(p['t2'])}": v
                                  for p, v in zip(params, nll)}
        info["chosen"] = f"t1={fmt_t(search.best_params_['t1'])} " \
                         f"t2={fmt_t(search.best_params_['t2'])}"
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
        info["guard"] = (f"kept {'selective scaling' if choice == 'selective' else 'TS'}: "
                         f"held-out NLL better than TS in {scores['wins']} of "
                         f"{scores['n_folds']} folds by {scores['by']}, mean "
                         f"{scores['mean_improvement']:+.5f}"
                         + (f", t = {scores['t_statistic']:.2f}" if "t_statistic" in scores
                            else ""))
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
        raise CommandError(f"writing {path} (a skops file) needs the skops package: "
                           "pip install skops, or save to a .joblib file.") from None
    return "skops"


def save_calibrator(estimator, path, fmt: str | None = None) -> Path:
    """Write a fitted calibrator atomically in ``fmt`` (default: from the suffix)."""
    from .._files import atomic_write_via_path
    from ..persistence import save

    fmt = output_format(path) if fmt is None else fmt
    return atomic_write_via_path(path, lambda tmp: save(estimator, tmp, format=fmt))
