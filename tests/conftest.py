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
