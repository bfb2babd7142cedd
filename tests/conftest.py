import numpy as np
import pytest


def make_logits(n=4000, n_classes=4, *, scale=4.0, noise=1.0, seed=0, dtype=np.float32):
    """Over-confident logits with a known accuracy below one."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, size=n)
    X = scale * (np.eye(n_classes)[y] + noise * rng.normal(size=(n, n_classes)))
    return X.astype(dtype), y


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


# ---------------------------------------------------------------------------
# both counting paths: the compiled (numba) one and the NumPy one
# ---------------------------------------------------------------------------

# Test modules whose every test runs once per counting path. The switch is
# ``sksegcal._kernels.HAVE_NUMBA``, read at call time by every caller (the kernels
# themselves and sksegcal.store), so patching that one binding switches them all.
COUNTING_PATH_MODULES = {"test_metrics", "test_store", "test_selective", "test_kernels"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "one_counting_path: the test switches the counting path itself "
        "(it is not run once per path)",
    )


def pytest_generate_tests(metafunc):
    module = metafunc.module.__name__.rpartition(".")[2]
    if (
        module in COUNTING_PATH_MODULES
        and "counting_path" in metafunc.fixturenames
        and metafunc.definition.get_closest_marker("one_counting_path") is None
    ):
        metafunc.parametrize("counting_path", ["numba", "numpy"], indirect=True)


@pytest.fixture(autouse=True)
def counting_path(request, monkeypatch):
    """"numba" or "numpy" in the modules above (None elsewhere): the path tallies take."""
    path = getattr(request, "param", None)
    if path is None:
        return None
    from sksegcal import _kernels

    if path == "numba":
        if not _kernels.HAVE_NUMBA:
            pytest.skip("numba is not installed (or SKSEGCAL_DISABLE_NUMBA is set)")
    else:
        monkeypatch.setattr(_kernels, "HAVE_NUMBA", False)
    return path
