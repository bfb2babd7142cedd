import functools
import os
from pathlib import Path

# One BLAS thread for the tests and the processes they start. The tests fit small
# problems (L-BFGS on a few thousand rows); there OpenBLAS's worker threads cost more than
# they give, and on a busy 2-core machine they made a logistic-regression fit about 25
# times slower (2 s against 0.08 s). Set before numpy loads its BLAS; an explicit
# setting in the environment wins.
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_logits(n=4000, n_classes=4, *, scale=4.0, noise=1.0, seed=0, dtype=np.float32):
    """Over-confident logits with a known accuracy below one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    X = scale * (np.eye(n_classes)[y] + noise * rng.normal(size=(n, n_classes)))
    return X.astype(dtype), y


@functools.lru_cache(maxsize=8)
def _context_pool(n_classes: int) -> np.ndarray:
    """The spatial context rows of four random 64x64 maps of 16x16 regions (read-only)."""
    from sksegcal.context import image_rows

    rng = np.random.default_rng(12345)
    rows = []
    for _ in range(4):
        regions = rng.integers(0, n_classes, size=(4, 4)).repeat(16, 0).repeat(16, 1)
        onehot = np.moveaxis(np.eye(n_classes)[regions], -1, 0)
        z = 3.0 * (onehot + 0.4 * rng.normal(size=(n_classes, 64, 64)))
        rows.append(image_rows(z.astype(np.float32), "spatial")[:, n_classes:])
    pool = np.concatenate(rows)
    pool.flags.writeable = False
    return pool


def real_context_rows(n, n_classes, *, seed=0):
    """n rows of real spatial context (float32), drawn at random from the pixels of maps.

    Real rows, so in range and consistent (the calibrators check both), but drawn
    independently of any table's logits and labels: context that carries no signal.
    ``n_classes`` bounds the entropies (log C): give the C of the table they join.
    """
    pool = _context_pool(int(n_classes))
    return pool[np.random.default_rng(seed).integers(0, len(pool), size=n)]


def uniform_context(n, n_classes, *, seed=0):
    """n rows of spatial context columns, each independent uniform noise in its range.

    The relations real context keeps (the calibrators check them) hold: ``disagree_3x3``
    is 0 in every row (interior pixels, so ``boundary_distance`` may be anything from 1 to
    the clip and ``disagree_7x7`` anything in [0, 1]), and the window mean of the entropy
    is drawn below log(C) / 2, its maximum above. Independent columns: no column carries
    a signal, and none stands in for another.
    """
    from sksegcal.context import CONTEXT_FEATURES

    rng = np.random.default_rng(seed)
    half = np.log(n_classes) / 2
    columns = {
        "disagree_3x3": np.zeros(n),
        "disagree_7x7": rng.random(n),
        "boundary_distance": rng.uniform(1.0, 16.0, n),
        "entropy_mean_5x5": rng.uniform(0.0, half, n),
        "entropy_max_5x5": rng.uniform(half, 2 * half, n),
        "margin_mean_5x5": rng.random(n),
    }
    return np.column_stack([columns[name] for name in CONTEXT_FEATURES]).astype(np.float32)


def two_populations(n=12_000, seed=0):
    """Clean confident pixels, a visible population of confident-looking errors, image ids.

    30 % of the pixels are wrong with a confident-looking logit row of another shape;
    the image ids are blocks of 400 consecutive rows.
    """
    rng = np.random.default_rng(seed)
    c = 5
    y = rng.integers(0, c, n)
    bad = rng.random(n) < 0.3
    X = 8.0 * np.eye(c)[y] + rng.normal(size=(n, c))
    shown = np.where(bad, rng.integers(0, c, n), y)  # bad pixels point at a random class
    X[bad] = 3.0 * np.eye(c)[shown[bad]] + 0.3 * rng.normal(size=(bad.sum(), c))
    groups = np.repeat(np.arange(n // 400), 400)
    return X.astype(np.float32), y, groups


@pytest.fixture
def out_of_fold_scores(monkeypatch):
    """A dict whose "p" is the last out-of-fold P(correct) a selective fit computed."""
    from sksegcal import SelectiveScalingCalibrator

    seen = {}
    original = SelectiveScalingCalibrator._out_of_fold_p_correct

    def record(self, *args, **kwargs):
        seen["p"] = original(self, *args, **kwargs)
        return seen["p"]

    monkeypatch.setattr(SelectiveScalingCalibrator, "_out_of_fold_p_correct", record)
    return seen


@pytest.fixture
def logits_data():
    return make_logits()


@pytest.fixture
def segmentation_data():
    """Logit maps (N, C, H, W), labels with ignored pixels, over-confident."""
    rng = np.random.default_rng(1)
    n, c, h, w = 12, 4, 16, 16
    labels = rng.integers(0, c, size=(n, h, w))
    logits = 4.0 * (np.moveaxis(np.eye(c)[labels], -1, 1) + rng.normal(size=(n, c, h, w)))
    labels[:, :2, :] = 255
    return logits.astype(np.float32), labels.astype(np.uint8)


def overconfident_maps(n, c, h, w, *, scale, noise=1.0, seed=0):
    """Logit maps ``scale * (one-hot + noise * N(0, 1))`` (N, C, H, W) and their labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, size=(n, h, w))
    logits = scale * (
        np.moveaxis(np.eye(c)[labels], -1, 1) + noise * rng.normal(size=(n, c, h, w))
    )
    return logits.astype(np.float32), labels.astype(np.uint8)


def save_maps(folder, logits, labels):
    """``folder/logits.npy`` (float32) and ``folder/labels.npy`` (uint8): what extract reads."""
    np.save(Path(folder) / "logits.npy", np.asarray(logits).astype(np.float32))
    np.save(Path(folder) / "labels.npy", np.asarray(labels).astype(np.uint8))
    return Path(folder)


def extract_store(folder, store="store"):
    """``sksegcal extract`` of ``folder``'s logits.npy and labels.npy into ``folder/store``."""
    from sksegcal.cli import main

    folder = Path(folder)
    path = folder / store
    args = ["--logits", str(folder / "logits.npy"), "--labels", str(folder / "labels.npy")]
    assert main(["extract", *args, "--store", str(path), "-q"]) == 0
    return path


@pytest.fixture
def arrays(tmp_path):
    """Over-confident (N, C, H, W) logits and labels of 12 small images as .npy files."""
    return save_maps(tmp_path, *overconfident_maps(12, 3, 16, 16, scale=5.0, noise=0.8))


# ---------------------------------------------------------------------------
# both counting paths: the compiled (numba) one and the NumPy one
# ---------------------------------------------------------------------------


# A test marked ``counting_paths`` (a module marks all its tests with ``pytestmark``) runs
# once per counting path. The switch is ``sksegcal._kernels.HAVE_NUMBA``, read at call
# time by every caller (the kernels themselves and sksegcal.store), so patching that one
# binding switches them all. ``one_counting_path`` exempts a test of such a module (it
# switches the path itself, or never counts).
def pytest_configure(config):
    # and for a BLAS loaded before this file (by a plugin); one loaded later reads the variable
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
    config.addinivalue_line(
        "markers",
        "counting_paths: run the test once per counting path (numba and NumPy)",
    )
    config.addinivalue_line(
        "markers",
        "one_counting_path: the test switches the counting path itself, or never counts "
        "(it is not run once per path)",
    )


def pytest_generate_tests(metafunc):
    marked = metafunc.definition.get_closest_marker("counting_paths") is not None
    if (
        marked
        and "counting_path" in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("one_counting_path") is None
    ):
        metafunc.parametrize("counting_path", ["numba", "numpy"], indirect=True)


_workers_env = [None]  # the environment loky's reusable worker processes were started in


def _use_workers_of(env):
    """Shut loky's reusable workers down when they were started in the other environment.

    Workers read SKSEGCAL_DISABLE_NUMBA when they start; reused ones would keep
    the path of the test that started them ("numpy", or "default" for the rest).
    """
    if _workers_env[0] not in (None, env):
        from joblib.externals.loky import reusable_executor

        executor = getattr(reusable_executor, "_executor", None)  # None when never started
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)
    _workers_env[0] = env


@pytest.fixture(autouse=True)
def counting_path(request, monkeypatch):
    """ "numba" or "numpy" in tests marked ``counting_paths`` (None elsewhere)."""
    path = getattr(request, "param", None)
    _use_workers_of("numpy" if path == "numpy" else "default")
    if path is None:
        return None
    from sksegcal import _kernels

    if path == "numba":
        if not _kernels.HAVE_NUMBA:
            pytest.skip("numba is not installed (or SKSEGCAL_DISABLE_NUMBA is set)")
    else:
        monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
        # and for worker processes started from here (loky, multiprocessing)
        monkeypatch.setenv("SKSEGCAL_DISABLE_NUMBA", "1")
    return path
