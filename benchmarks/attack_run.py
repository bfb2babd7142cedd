"""An attack run: hostile and careless inputs against the guards, with totals by severity.

Each *kind* is one way a hostile or careless user can get at the package
(a results folder with crafted split names, a store of probabilities given to a
logit calibrator, two conformal states of different calibrators, NaN written
into a stored image, absurd widths and worker counts, edited model files,
symbolic links, oversized ``.npy`` headers, ...), with a severity: what it
would be if the guard failed. Each kind generates cases (seeded); a case is a
*defect* when the package accepts what it must refuse, refuses with anything
but a ValueError/TypeError that says what was wrong, writes outside its
folder, or crashes. The run prints one row per kind and the totals by severity.

Usage::

    python benchmarks/attack_run.py            # the soak run (a few minutes on 2 cores)
    python benchmarks/attack_run.py --quick    # a few cases per kind (~1 min)
    python benchmarks/attack_run.py --json     # one JSON line at the end

Exit status 1 when any high or medium defect is found.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

C = 3
KINDS: list[tuple[str, str, object]] = []  # (name, severity, generator of cases)


def kind(name: str, severity: str):
    def register(fn):
        KINDS.append((name, severity, fn))
        return fn

    return register


def refused(run, *, match: str | None = None, absent: str | None = None) -> str | None:
    """None when ``run()`` raises a ValueError/TypeError (with ``match``, without ``absent``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run()
    except (ValueError, TypeError) as exc:
        text = str(exc)
        if match is not None and match not in text:
            return f"refused without {match!r}: {text[:160]}"
        if absent is not None and absent in text:
            return f"refused with {absent!r}: {text[:160]}"
        return None
    except MemoryError:
        return "raw MemoryError"
    except Exception as exc:  # anything else is a crash, not a refusal
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return "accepted"


def runs(run) -> str | None:
    """None when ``run()`` completes (warnings allowed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run()
    except MemoryError:
        return "raw MemoryError"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return out if isinstance(out, str) else None


def cli(argv) -> tuple[int, str]:
    """(exit status, stderr) of the command line, in process."""
    from sksegcal.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main([str(a) for a in argv])
    return code, err.getvalue()


@contextlib.contextmanager
def quick_figures():
    """Figures drawn but written as a few bytes: the names are what is attacked."""
    import sksegcal.cli._report as report
    from sksegcal._files import atomic_write_bytes

    real = report._save_figure
    # the real one's atomic write (a link at the name is replaced, not written through)
    report._save_figure = lambda fig, path, dpi: atomic_write_bytes(path, b"png")
    try:
        yield
    finally:
        report._save_figure = real


def make_image(rng, h, w):
    t = rng.integers(0, C, size=(h, w))
    return 3.0 * (np.moveaxis(np.eye(C)[t], -1, 0) + rng.normal(size=(C, h, w))), t


class World:
    """The stores and calibrators the attacks share (built once)."""

    def __init__(self, root: Path):
        from sksegcal import LocalTemperatureScaling, TemperatureScaling
        from sksegcal.store import LogitStore, fit_store, predict_store

        self.root = root
        rng = np.random.default_rng(0)
        self.logits = LogitStore.create(root / "logits", n_classes=C)
        for name in range(10):
            self.logits.add_image(name, *make_image(rng, 6, 7))
        self.logits.make_split(random_state=0)
        self.proba = predict_store(None, self.logits, root / "proba")
        self.mixed = LogitStore.create(root / "mixed", n_classes=C)
        for name in range(12):
            self.mixed.add_image(name, *make_image(rng, 4 + name % 4, 5 + name % 3))
        self.mixed.make_split(random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.ts = fit_store(TemperatureScaling(), self.logits, max_pixels=300, random_state=0)
            self.lts = fit_store(
                LocalTemperatureScaling(max_iter=5), self.mixed, max_pixels=300, random_state=0
            )
        y = rng.integers(0, C, 300)
        self.X = 3 * np.eye(C)[y] + rng.normal(size=(300, C))
        self.y = y
        self.n = 0

    def tmp(self) -> Path:
        self.n += 1
        path = self.root / f"case{self.n}"
        path.mkdir()
        return path

    def copy_store(self, store):
        from sksegcal.store import LogitStore

        dest = self.tmp() / "store"
        shutil.copytree(store.path, dest)
        return LogitStore.open(dest)


# =========================================================================== high
@kind("report file names from a results file", "high")
def _report_names(w: World, rng, n):
    from sksegcal.cli._report import save_results
    from sksegcal.store import evaluate_store

    acc = evaluate_store(w.logits, {"u": None}, images="test")["u"]
    fixed = [
        "x/../../victim/holiday",
        "../a",
        "/tmp/abs",
        "..",
        ".",
        "a\\..\\b",
        "a\x00b",
        "é/ü",
        " ",
        "a" * 600,
        "reliability_x/../../v",
        "~/x",
        "$HOME",
        "a/b/c",
        "-",
    ]
    alphabet = list("./\\ab~$: \x00é")
    names = fixed + ["".join(rng.choice(alphabet, rng.integers(1, 30))) for _ in range(n)]
    for split in names[: max(n, 4)]:

        def case(split=split):
            top = w.tmp()
            results = top / "results"
            results.mkdir()
            for sub in ("reliability_x", "reliability_", "reliability_a"):
                (results / sub).mkdir()
            (top / "victim").mkdir()
            before = {p for p in top.rglob("*")}
            save_results(results, {split: {"u": acc}, "test": {"u": acc}}, {})
            with quick_figures():
                code, err = cli(["report", results, "-q"])
            outside = [p for p in top.rglob("*") if p not in before and results not in p.parents]
            if outside:
                return f"wrote outside its folder: {outside[:2]}"
            if code != 0:
                return f"exit {code}: {err.strip()[:160]}"
            return None

        yield f"split {split[:30]!r}", case


def _wrappers(w: World, est):
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline

    from sksegcal import TemperatureScaling

    search = GridSearchCV(
        TemperatureScaling(input_type=est.input_type), {"chunk_size": [1000, 2000]}, cv=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = w.X if est.input_type == "logits" else _softmax(w.X)
        fitted_search = GridSearchCV(
            TemperatureScaling(input_type=est.input_type), {"chunk_size": [1000]}, cv=2
        ).fit(X, w.y)
    grid_mixed = GridSearchCV(TemperatureScaling(), {"input_type": ["logits", "probabilities"]})
    return {
        "alone": est,
        "pipeline": Pipeline([("cal", est)]),
        "unfitted search": search,
        "fitted search": fitted_search,
        "search over input_type": grid_mixed,
    }


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@kind("store values against the calibrator's input_type", "high")
def _values(w: World, rng, n):
    from sksegcal import TemperatureScaling
    from sksegcal.conformal import ConformalPixelSets, ConformalRiskControl, fit_conformal_store
    from sksegcal.persistence import save
    from sksegcal.store import evaluate_store, fit_store, predict_store

    proba_ts = TemperatureScaling(input_type="probabilities").fit(_softmax(w.X), w.y)
    for store, est in ((w.proba, w.ts), (w.logits, proba_ts)):
        for wrap, cal in _wrappers(w, est).items():
            label = f"{store.values} store, {est.input_type} calibrator ({wrap})"
            fitted = wrap not in ("unfitted search", "search over input_type")
            if fitted:
                yield (
                    f"evaluate_store: {label}",
                    lambda s=store, c=cal: refused(
                        lambda: evaluate_store(s, {"c": c}), match="input_type"
                    ),
                )
                yield (
                    f"predict_store: {label}",
                    lambda s=store, c=cal: refused(
                        lambda: predict_store(c, s, w.tmp() / "out"), match="input_type"
                    ),
                )
                for cls in (ConformalPixelSets, ConformalRiskControl):
                    yield (
                        f"{cls.__name__}: {label}",
                        lambda s=store, c=cal, k=cls: refused(
                            lambda: fit_conformal_store(
                                k(calibrator=c, input_type=s.values), s, images=None
                            ),
                            match="input_type",
                        ),
                    )
            if wrap != "fitted search":
                yield (
                    f"fit_store: {label}",
                    lambda s=store, c=cal: refused(
                        lambda: fit_store(c, s, max_pixels=100), match="input_type"
                    ),
                )
        path = save(est, w.tmp() / "c.skops", format="skops")
        for command in ("evaluate", "conformal"):

            def case(command=command, store=store, path=path):
                code, err = cli(
                    [command, store.path, "-c", path, "-q", "--images", "all", "-o", w.tmp() / "o"]
                )
                return None if code == 1 and "input_type" in err else f"exit {code}: {err[:160]}"

            yield f"CLI {command}: {store.values} store, {est.input_type} calibrator", case


@kind("conformal merge of states from different calibrators", "high")
def _merge(w: World, rng, n):
    import pickle

    from sksegcal import TemperatureScaling
    from sksegcal.conformal import ConformalPixelSets, ConformalRiskControl
    from sksegcal.scaling import VectorScaling

    def ts_at(t):
        ts = pickle.loads(pickle.dumps(w.ts))
        ts.temperature_ = float(t)
        return ts

    vs = VectorScaling().fit(w.X, w.y)
    groups = np.repeat(np.arange(30), 10)
    for _ in range(max(n, 4)):
        t1, t2 = float(np.exp(rng.uniform(-3, 3))), float(np.exp(rng.uniform(-3, 3)))
        pairs = {
            "TS at two temperatures": (ts_at(t1), ts_at(t2)),
            "TS and vector scaling": (ts_at(t1), vs),
            "none and TS": (None, ts_at(t1)),
            "TS and a copy of it": (ts_at(t1), pickle.loads(pickle.dumps(ts_at(t1)))),
            "TS refitted with other settings": (
                ts_at(t1),
                TemperatureScaling(chunk_size=999).fit(w.X, w.y),
            ),
        }
        for label, (a, b) in pairs.items():
            same = label == "TS and a copy of it"
            for cls in (ConformalPixelSets, ConformalRiskControl):

                def case(a=a, b=b, cls=cls, same=same):
                    half = len(w.y) // 2
                    kw = {} if cls is ConformalPixelSets else {"groups": groups[:half]}
                    kw2 = {} if cls is ConformalPixelSets else {"groups": groups[half:]}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        e1 = cls(calibrator=a).fit(w.X[:half], w.y[:half], **kw)
                        e2 = cls(calibrator=b).fit(w.X[half:], w.y[half:], **kw2)
                    if same:
                        return runs(lambda: e1.merge(e2))
                    return refused(lambda: e1.merge(e2), match="calibrator")

                yield f"{cls.__name__}: {label} (T={t1:.3g}, {t2:.3g})", case


# =========================================================================== medium
@kind("conformal command with a context calibrator, images of different sizes", "medium")
def _conformal_cli(w: World, rng, n):
    from sklearn.pipeline import Pipeline

    from sksegcal.persistence import save

    cals = {"lts": w.lts, "pipeline(lts)": Pipeline([("lts", w.lts)])}
    for label, cal in cals.items():
        path = save(cal, w.tmp() / "c.skops", format="skops")
        for store in (w.mixed, w.logits)[: 2 if n > 3 else 1]:

            def case(path=path, store=store):
                out = w.tmp() / "o"
                with quick_figures():
                    code, err = cli(
                        ["conformal", store.path, "-c", path, "-q", "--images", "all", "-o", out]
                    )
                if code != 0:
                    return f"exit {code}: {err.strip()[:160]}"
                if not (out / "set_sizes.png").is_file():
                    return "no set_sizes.png"
                return None

            yield f"{label} on {store.path.name}", case


@kind("NaN or infinite values written into a stored image", "medium")
def _nonfinite(w: World, rng, n):
    from sksegcal import TemperatureScaling
    from sksegcal.conformal import (
        ConformalPixelSets,
        ConformalRiskControl,
        evaluate_conformal_store,
        fit_conformal_store,
    )
    from sksegcal.store import evaluate_store, fit_store, predict_store

    for i in range(max(n, 3)):
        value = [np.nan, np.inf, -np.inf][i % 3]
        store = w.copy_store(w.logits)
        image = int(rng.integers(store.n_images))
        rec = store.record(image)
        file = store.path / "images" / rec["files"]["logits"]["file"]
        z = np.load(file, mmap_mode="r+")
        z[rng.integers(C), rng.integers(rec["height"]), rng.integers(rec["width"])] = value
        z.flush()
        del z
        name = repr(store.image_names[image])
        tag = f"image {name}"
        fitted = ConformalPixelSets().fit(w.X, w.y)
        paths = {
            "evaluate_store": lambda s=store: evaluate_store(
                s, {"u": None, "ts": w.ts}, images=None
            ),
            "fit_store": lambda s=store: fit_store(
                TemperatureScaling(), s, images=None, max_pixels=10**6
            ),
            "predict_store": lambda s=store: predict_store(w.ts, s, w.tmp() / "p"),
            "fit_conformal_store": lambda s=store: fit_conformal_store(
                ConformalRiskControl(), s, images=None
            ),
            "evaluate_conformal_store": lambda s=store, f=fitted: evaluate_conformal_store(
                {"f": f}, s, images=None
            ),
        }
        for label, run in paths.items():
            yield f"{value} in {tag}: {label}", lambda run=run, tag=tag: refused(run, match=tag)

        def via_cli(store=store, tag=tag):
            code, err = cli(
                ["conformal", store.path, "-q", "--images", "all", "-o", w.tmp() / "o"]
            )
            return None if code == 1 and tag in err else f"exit {code}: {err.strip()[:160]}"

        yield f"{value} in {tag}: CLI conformal", via_cli


@kind("labels outside the classes written into a stored image", "medium")
def _labels(w: World, rng, n):
    from sksegcal import TemperatureScaling
    from sksegcal.conformal import ConformalPixelSets, ConformalRiskControl, fit_conformal_store
    from sksegcal.store import evaluate_store, fit_store, predict_store

    for i in range(max(n // 2, 2)):
        value = [3, 7, 254, 100][i % 4]
        store = w.copy_store(w.logits)
        image = int(rng.integers(store.n_images))
        rec = store.record(image)
        file = store.path / "images" / rec["files"]["labels"]["file"]
        t = np.load(file, mmap_mode="r+")
        t[rng.integers(rec["height"]), rng.integers(rec["width"])] = value
        t.flush()
        del t
        tag = f"image {store.image_names[image]!r}"
        paths = {
            "evaluate_store": lambda s=store: evaluate_store(s, {"u": None}, images=None),
            "fit_store": lambda s=store: fit_store(
                TemperatureScaling(), s, images=None, max_pixels=10**6
            ),
            "predict_store": lambda s=store: predict_store(None, s, w.tmp() / "p"),
            "ConformalPixelSets": lambda s=store: fit_conformal_store(
                ConformalPixelSets(), s, images=None
            ),
            "ConformalRiskControl": lambda s=store: fit_conformal_store(
                ConformalRiskControl(), s, images=None
            ),
        }
        for label, run in paths.items():
            yield (
                f"label {value} in {tag}: {label}",
                lambda run=run, tag=tag: refused(run, match=tag),
            )


@kind("links planted in a report folder", "high")
def _report_links(w: World, rng, n):
    from sksegcal.cli._report import save_results
    from sksegcal.store import evaluate_store

    acc = evaluate_store(w.logits, {"u": None}, images="test")["u"]
    for name in ("reliability_test.png", "report.md", "metrics.json", "metrics.csv"):

        def case(name=name):
            top = w.tmp()
            results = top / "results"
            results.mkdir()
            victim = top / "victim.txt"
            victim.write_bytes(b"precious")
            save_results(results, {"test": {"u": acc}}, {})
            (results / name).symlink_to(victim)
            with quick_figures():
                code, err = cli(["report", results, "-q"])
            if victim.read_bytes() != b"precious":
                return f"wrote through the link {name}"
            return None if code in (0, 1) and "Traceback" not in err else f"exit {code}"

        yield f"{name} is a link out", case


@kind("boundary widths far beyond the image", "medium")
def _widths(w: World, rng, n):
    from sksegcal.metrics import boundary_mask
    from sksegcal.store import evaluate_store

    widths = [1, 2, 13, 10**3, 10**6, 10**9, 10**12, 2**62]
    widths += [int(x) for x in rng.integers(1, 2**62, size=n, dtype=np.int64)]
    labels = rng.integers(0, C, size=(2, 9, 11))
    labels[0, :2] = 255
    for width in widths:
        for distance in ("chebyshev", "euclidean"):

            def case(width=width, distance=distance):
                widest = boundary_mask(labels, width=18, distance=distance)
                got = boundary_mask(labels, width=width, distance=distance)
                ref = boundary_mask(labels, width=min(width, 18), distance=distance)
                if not np.array_equal(got, ref if width < 18 else widest):
                    return "mask differs from the widest band"
                return None

            yield f"boundary_mask width {width} {distance}", lambda c=case: runs(c)
        yield (
            f"evaluate_store width {width}",
            lambda width=width: runs(
                lambda: (
                    evaluate_store(w.logits, {"u": None}, images="test", boundary_width=width)
                    and None
                )
            ),
        )
    for width in (0, -1, 1.5, True, "3", float("nan")):
        yield (
            f"boundary_mask width {width!r}",
            lambda width=width: refused(lambda: boundary_mask(labels, width=width)),
        )
    code_case = lambda: (lambda r: None if r[0] == 0 else f"exit {r[0]}: {r[1][:160]}")(  # noqa: E731
        cli(["evaluate", w.logits.path, "-q", "--boundary-width", 10**6, "-o", w.tmp() / "o"])
    )
    yield "CLI evaluate --boundary-width 1000000", code_case


@kind("worker and thread counts beyond the tasks and the machine", "medium")
def _jobs(w: World, rng, n):
    import joblib

    from sksegcal.cli._common import threads
    from sksegcal.conformal import (
        ConformalPixelSets,
        evaluate_conformal_store,
        fit_conformal_store,
    )
    from sksegcal.store import evaluate_store, predict_store

    cpus = os.cpu_count() or 1
    fitted = ConformalPixelSets().fit(w.X, w.y)
    for n_jobs in (1000, 10**6, -1, -2, 2, cpus + 1):
        for backend in ("threading", "loky"):
            paths = {
                "evaluate_store": lambda j, b: evaluate_store(
                    w.logits, {"u": None}, n_jobs=j, backend=b, task_pixels=100
                ),
                "predict_store": lambda j, b: predict_store(
                    None, w.logits, w.tmp() / "p", n_jobs=j, backend=b, task_pixels=100
                ),
                "fit_conformal_store": lambda j, b: fit_conformal_store(
                    ConformalPixelSets(),
                    w.logits,
                    images=None,
                    n_jobs=j,
                    backend=b,
                    task_pixels=100,
                ),
                "evaluate_conformal_store": lambda j, b: evaluate_conformal_store(
                    {"f": fitted}, w.logits, images=None, n_jobs=j, backend=b, task_pixels=100
                ),
            }
            for label, run in paths.items():
                if backend == "loky" and n_jobs not in (1000, -1):
                    continue

                def case(run=run, n_jobs=n_jobs, backend=backend):
                    seen = []
                    real = joblib.Parallel

                    class Spy(real):
                        def __init__(self, n_jobs=None, **kw):
                            seen.append(n_jobs)
                            super().__init__(n_jobs=n_jobs, **kw)

                    joblib.Parallel = Spy
                    try:
                        problem = runs(lambda: run(n_jobs, backend) and None)
                    finally:
                        joblib.Parallel = real
                    if problem:
                        return problem
                    bad = [j for j in seen if j is None or not 1 <= j <= cpus]
                    return f"workers {bad} on {cpus} CPUs" if bad else None

                yield f"{label} n_jobs={n_jobs} {backend}", case
    for n_jobs in (0, 1.5, "8"):
        yield (
            f"evaluate_store n_jobs={n_jobs!r}",
            lambda j=n_jobs: refused(lambda: evaluate_store(w.logits, {"u": None}, n_jobs=j)),
        )
    for n_threads in (10**5, 10**9, cpus + 1):

        def case(n_threads=n_threads):
            import torch

            with threads(n_threads):
                got = torch.get_num_threads()
            return None if got <= cpus else f"{got} torch threads on {cpus} CPUs"

        yield f"threads({n_threads})", case


# =========================================================================== low
@kind("edited fitted values in a model file", "low")
def _fitted(w: World, rng, n):
    import pickle

    from sksegcal.persistence import load, save
    from sksegcal.scaling import DirichletScaling, VectorScaling

    models = {
        "TS": w.ts,
        "LTS": w.lts,
        "vector": VectorScaling().fit(w.X, w.y),
        "dirichlet": DirichletScaling().fit(w.X, w.y),
    }
    for label, model in models.items():
        floats = [
            k
            for k, v in vars(model).items()
            if k.endswith("_")
            and not k.startswith("_")
            and np.asarray(v).dtype.kind == "f"
            and np.asarray(v).size
        ]
        for attr in floats:
            for value in (np.nan, np.inf, -np.inf):

                def case(model=model, attr=attr, value=value):
                    bad = pickle.loads(pickle.dumps(model))
                    a = getattr(bad, attr)
                    if np.ndim(a):
                        a = np.array(a)
                        a.flat[0] = value
                    else:
                        a = value
                    setattr(bad, attr, a)
                    path = save(bad, w.tmp() / "m.skops", format="skops")
                    return refused(lambda: load(path), match=attr)

                yield f"{label}.{attr} = {value}", case
        good = save(model, w.tmp() / "good.skops", format="skops")
        yield f"{label} unedited", lambda good=good: runs(lambda: load(good) and None)
    for value in (0.0, -1.0):

        def neg(value=value):
            bad = pickle.loads(pickle.dumps(w.ts))
            bad.temperature_ = value
            return refused(
                lambda: load(save(bad, w.tmp() / "m.skops", format="skops")), match="temperature_"
            )

        yield f"TS.temperature_ = {value}", neg


@kind("symbolic links inside a store", "low")
def _symlinks(w: World, rng, n):
    from sksegcal.store import LogitStore, evaluate_store

    for target in ("logits", "labels", "record"):

        def case(target=target):
            store = w.copy_store(w.logits)
            rec = store.record(0)
            images = store.path / "images"
            file = (
                (images / rec["files"][target]["file"])
                if target != "record"
                else next(p for p in images.glob("*.json") if p.stem == str(store.image_names[0]))
            )
            outside = store.path.parent / ("outside" + file.suffix)
            file.rename(outside)
            file.symlink_to(outside)
            problems = [
                refused(lambda: LogitStore.open(store.path).verify()),
                refused(
                    lambda: evaluate_store(LogitStore.open(store.path), {"u": None}, images=None)
                ),
            ]
            problems = [p for p in problems if p]
            return "; ".join(problems) or None

        yield f"{target} file is a link", case


@kind("malformed .npy headers in a store", "low")
def _headers(w: World, rng, n):
    from sksegcal.store import evaluate_store

    def header(text: bytes, version=2):
        text += b" " * (-(len(text) + 13) % 64) + b"\n"
        return b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(4, "little") + text

    bodies = {
        "oversized header": header(
            b"{'descr': '<f2', 'fortran_order': False, 'shape': (3, 6, 7), }" + b" " * 20000
        ),
        "object dtype": header(b"{'descr': '|O', 'fortran_order': False, 'shape': (3, 6, 7), }"),
        "fortran order": header(b"{'descr': '<f2', 'fortran_order': True, 'shape': (3, 6, 7), }")
        + b"\x00" * 252,
        "not a dict": header(b"__import__('os')"),
        "bad magic": b"\x93NUMPZ\x01\x00" + b"\x00" * 300,
        "empty": b"",
    }
    for kind_, body in bodies.items():
        for target in ("logits", "labels"):

            def case(body=body, target=target):
                store = w.copy_store(w.logits)
                file = store.path / "images" / store.record(0)["files"][target]["file"]
                file.write_bytes(body)
                problems = [
                    refused(store.verify, absent="allow_pickle"),
                    refused(
                        lambda: evaluate_store(store, {"u": None}, images=None),
                        absent="allow_pickle",
                    ),
                    refused(lambda: store.load_image(0), absent="allow_pickle"),
                ]
                return "; ".join(p for p in problems if p) or None

            yield f"{target}: {kind_}", case


@kind("a reader racing an overwrite", "low")
def _race(w: World, rng, n):
    from sksegcal.store import LogitStore, evaluate_store

    for i in range(max(n // 2, 2)):

        def case():
            store = w.copy_store(w.logits)
            stale = LogitStore.open(store.path)
            image = int(rng.integers(store.n_images))
            name = store.image_names[image]
            rec = store.record(image)
            store.add_image(name, *make_image(rng, rec["height"], rec["width"]), overwrite=True)
            problems = [
                refused(lambda: stale.load_image(image), match="re-open"),
                refused(
                    lambda: evaluate_store(stale, {"u": None}, images=[image]), match="re-open"
                ),
            ]
            return "; ".join(p for p in problems if p) or None

        yield f"overwrite {i}", case


@kind("an output folder that cannot be written", "low")
def _outputs(w: World, rng, n):
    import sksegcal.cli._commands as commands
    import sksegcal.conformal as conformal_api
    import sksegcal.store as store_api

    if not Path("/sys").is_dir():
        return
    target = "/sys/sksegcal-attack"
    runs_ = {
        "evaluate": (["evaluate", w.logits.path, "-q", "-o", target], store_api, "evaluate_store"),
        "conformal": (
            ["conformal", w.logits.path, "-q", "-o", target],
            conformal_api,
            "fit_conformal_store",
        ),
        "fit": (
            ["fit", w.logits.path, "--method", "temperature", "-q", "-o", target + "/c.skops"],
            commands,
            "fit_store",
        ),
        "demo": (["demo", "--quick", "-q", "-o", target], None, None),
        "report": (["report", w.root, "-q", "-o", target], None, None),
    }
    for label, (argv, module, attr) in runs_.items():

        def case(argv=argv, module=module, attr=attr):
            real = getattr(module, attr, None) if module else None

            def no_work(*a, **k):
                raise AssertionError("the work started before the output was checked")

            if module is not None and real is not None:
                setattr(module, attr, no_work)
            try:
                code, err = cli(argv)
            except AssertionError as exc:
                return str(exc)
            finally:
                if module is not None and real is not None:
                    setattr(module, attr, real)
            return None if code == 1 and "not writable" in err else f"exit {code}: {err[:160]}"

        yield label, case


@kind("hostile metadata in a results file", "low")
def _meta(w: World, rng, n):
    from sksegcal.cli._report import save_results
    from sksegcal.store import evaluate_store

    acc = evaluate_store(w.logits, {"u": None}, images="test")["u"]
    values = [
        None,
        5,
        -1.5,
        "text",
        ["a", 1],
        {"a": "b"},
        {"a": [1]},
        {"a": None},
        True,
        float("nan"),
        "../../x",
        {"a": {"b": {"c": 1}}},
    ]
    fields = [
        "timings",
        "calibrators",
        "description",
        "command",
        "dataset",
        "boundary_width",
        "class_names",
    ]
    cases = [(f, v) for f in fields for v in values]
    order = rng.permutation(len(cases))[: max(n * 3, 12)] if n < 20 else range(len(cases))
    for i in order:
        field, value = cases[i]

        def case(field=field, value=value):
            out = w.tmp()
            save_results(out, {"test": {"u": acc}}, {field: value})
            with quick_figures():
                code, err = cli(["report", out, "-q"])
            return None if code == 0 else f"exit {code}: {err.strip()[:160]}"

        yield f"{field} = {value!r}"[:60], case


@kind("hostile conformal states and class indices", "low")
def _states(w: World, rng, n):
    from sksegcal.conformal import (
        ConformalPixelSets,
        ConformalRiskControl,
        ConformalSetAccumulator,
        ImageRiskTally,
        ScoreHistogram,
    )

    h = ScoreHistogram(n_bins=16).update(rng.random(20)).state_dict()
    t = ImageRiskTally(n_bins=8).add_image(rng.integers(0, 9, 10)).state_dict()
    frac, neg, nan = h["counts"].copy(), h["counts"].copy(), h["counts"].copy()
    frac[0] += 0.5
    frac[-1] -= 0.5
    neg[0] -= 1
    neg[1] += 1
    nan[0] = np.nan
    for label, state in {
        "n_bins 16.9": {**h, "n_bins": 16.9},
        "n_bins -16": {**h, "n_bins": -16},
        "n_bins 2**40": {**h, "n_bins": 2**40},
        "n_bins nan": {**h, "n_bins": float("nan")},
        "n_bins True": {**h, "n_bins": True},
        "n 20.5": {**h, "n": 20.5},
        "fractional counts": {**h, "counts": frac},
        "negative counts": {**h, "counts": neg},
        "NaN counts": {**h, "counts": nan},
        "n_bins '16'": {**h, "n_bins": "16"},
    }.items():
        yield (
            f"ScoreHistogram {label}",
            lambda s=state: refused(lambda: ScoreHistogram.from_state_dict(s)),
        )
    for label, state in {
        "n_images 1.5": {**t, "n_images": 1.5},
        "n_images -1": {**t, "n_images": -1},
        "n_bins 8.5": {**t, "n_bins": 8.5},
        "n_bins 2**40": {**t, "n_bins": 2**40},
    }.items():
        yield (
            f"ImageRiskTally {label}",
            lambda s=state: refused(lambda: ImageRiskTally.from_state_dict(s)),
        )
    for counts in ([0.5] * 9, [-1] + [1] * 8, [np.nan] + [1] * 8, [np.inf] + [0] * 8):
        yield (
            f"add_image_histogram {counts[0]}",
            lambda c=counts: refused(
                lambda: ImageRiskTally(n_bins=8).add_image_histogram(np.array(c))
            ),
        )
    for n_bins in (2**40, 2**25, 16.9):
        yield (
            f"ConformalPixelSets(n_bins={n_bins})",
            lambda b=n_bins: refused(lambda: ConformalPixelSets(n_bins=b).fit(w.X, w.y)),
        )
    acc = ConformalSetAccumulator(C)
    acc.update(np.arange(C), np.eye(C, dtype=bool), image_id=0)
    for target in (C, C + 5, -1, -C, 1.5, float("nan"), "0"):
        yield (
            f"summary(target_class={target!r})",
            lambda tc=target: refused(lambda: acc.summary(target_class=tc)),
        )

    def reason(run, needle):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
        text = " ".join(str(c.message) for c in caught)
        return None if needle in text else f"warnings say {text[:160]!r}"

    yield (
        "all calibration pixels ignored",
        lambda: reason(
            lambda: ConformalPixelSets().fit(w.X, np.full(len(w.y), 255)), "ignore_index"
        ),
    )
    yield (
        "FNR class absent",
        lambda: reason(
            lambda: ConformalRiskControl(loss="fnr", target_class=2).fit(
                w.X, np.where(w.y == 2, 0, w.y), np.repeat(np.arange(30), 10)
            ),
            "target_class=2",
        ),
    )

    def two_stores():
        from sksegcal.conformal import fit_conformal_store

        other = w.copy_store(w.logits)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = fit_conformal_store(ConformalRiskControl(), w.logits, images=None)
            b = fit_conformal_store(ConformalRiskControl(), other, images=None)
        return runs(lambda: a.merge(b) and None)

    yield "risk control states of two stores", two_stores


@kind("finite inputs near float32's limit", "low")
def _huge(w: World, rng, n):
    from sksegcal import TorchMLPClassifier
    from sksegcal.pixels import flatten_segmentation

    mlp = TorchMLPClassifier(hidden_layer_sizes=(4,))
    mlp.coefs_ = [
        rng.normal(size=(C, 4)).astype(np.float32),
        rng.normal(size=(4, 2)).astype(np.float32),
    ]
    mlp.intercepts_ = [np.zeros(4, np.float32), np.zeros(2, np.float32)]
    mlp.classes_, mlp.n_features_in_ = np.arange(2), C
    for scale in (1e30, 1e37, 3e38, -3e38):

        def mlp_case(scale=scale):
            x = np.array([[scale, -scale, 1.0]], np.float32)
            p = mlp.predict_proba(x)
            return None if np.isfinite(p).all() else f"probabilities {p.tolist()}"

        yield f"MLP features {scale:g}", lambda c=mlp_case: runs(c)

        def ctx_case(scale=scale):
            z = rng.normal(size=(1, C, 5, 5)).astype(np.float32)
            z[0, 0, 0, 0], z[0, 1, 0, 0] = scale, -scale
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    X, _, _ = flatten_segmentation(z, np.zeros((1, 5, 5), int), context="spatial")
            except ValueError:
                return None
            return None if np.isfinite(X).all() else "NaN or infinite context features"

        yield f"context of logits {scale:g}", lambda c=ctx_case: runs(c)


# =========================================================================== the run
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cases per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="WORD",
        help="leave out the kinds whose name contains any of these words",
    )
    args = parser.parse_args(argv)
    n = 3 if args.quick else 40
    root = Path(tempfile.mkdtemp(prefix="sksegcal-attack-", dir=args.dir))
    t0 = time.perf_counter()
    world = World(root)
    rows, defects = [], []
    for name, severity, generate in KINDS:
        if any(word in name for word in args.skip):
            continue
        rng = np.random.default_rng(args.seed)
        n_cases = found = 0
        try:
            cases = list(generate(world, rng, n))
        except Exception:
            text = traceback.format_exc(limit=3)
            cases = [("building the cases", lambda text=text: text)]
        for label, case in cases:
            n_cases += 1
            try:
                problem = case()
            except Exception as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:160]}"
            if problem:
                found += 1
                defects.append(
                    {"kind": name, "severity": severity, "case": label, "problem": problem}
                )
        rows.append({"kind": name, "severity": severity, "cases": n_cases, "defects": found})
        if not args.json:
            print(f"{severity:<6} {n_cases:>5} cases {found:>4} defects  {name}", flush=True)
    totals = defaultdict(lambda: {"cases": 0, "defects": 0})
    for row in rows:
        totals[row["severity"]]["cases"] += row["cases"]
        totals[row["severity"]]["defects"] += row["defects"]
    seconds = round(time.perf_counter() - t0, 1)
    shutil.rmtree(root, ignore_errors=True)
    report = {
        "seed": args.seed,
        "quick": args.quick,
        "seconds": seconds,
        "kinds": rows,
        "totals": dict(totals),
        "defects": defects,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print()
        for severity in ("high", "medium", "low"):
            t = totals[severity]
            print(f"{severity}: {t['cases']} cases, {t['defects']} defects")
        for d in defects[:40]:
            print(f"  [{d['severity']}] {d['kind']}: {d['case']}: {d['problem']}")
        print(f"{seconds} s")
    bad = totals["high"]["defects"] + totals["medium"]["defects"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
