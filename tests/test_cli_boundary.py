"""``sksegcal evaluate --boundary-width``: boundary / interior metrics from the command line."""

import json

import numpy as np
import pytest

from conftest import extract_store, save_maps
from sksegcal.cli import main
from sksegcal.metrics import boundary_mask, expected_calibration_error
from sksegcal.store import LogitStore


@pytest.fixture
def store(tmp_path):
    """A store of 6 small over-confident images with blocky labels (real boundaries)."""
    rng = np.random.default_rng(1)
    n, c, h, w = 6, 3, 16, 16
    blocks = rng.integers(0, c, size=(n, 4, 4))
    labels = np.kron(blocks, np.ones((4, 4), dtype=int))
    logits = 4.0 * (np.moveaxis(np.eye(c)[labels], -1, 1) + 0.9 * rng.normal(size=(n, c, h, w)))
    save_maps(tmp_path, logits, labels)
    return extract_store(tmp_path)


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_evaluate_boundary_width_matches_a_direct_computation(store, tmp_path, capsys):
    out = tmp_path / "results"
    assert (
        main(
            [
                "evaluate",
                str(store),
                "--images",
                "all",
                "--boundary-width",
                "1",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    capsys.readouterr()
    rows = json.loads((out / "metrics.json").read_text())
    text = json.dumps(rows)
    assert "boundary_ece" in text and "interior_ece" in text

    # the independent reference: the stored float16 logits, the mask per image, one-shot ECE
    s = LogitStore.open(store)
    z, y, mask = [], [], []
    for image in s.iter_images():
        logits, labels = image.logits, image.labels
        z.append(np.moveaxis(np.asarray(logits, np.float32), 0, -1).reshape(-1, s.n_classes))
        y.append(np.asarray(labels).ravel())
        mask.append(boundary_mask(np.asarray(labels), width=1).ravel())
    z, y, mask = np.concatenate(z), np.concatenate(y), np.concatenate(mask)
    p = _softmax(z)
    want_b = expected_calibration_error(y[mask], p[mask])
    want_i = expected_calibration_error(y[~mask], p[~mask])

    def find(obj):
        if isinstance(obj, dict):
            if "boundary_ece" in obj and obj.get("method", "uncalibrated") == "uncalibrated":
                return obj
            for v in obj.values():
                hit = find(v)
                if hit is not None:
                    return hit
        if isinstance(obj, list):
            for v in obj:
                hit = find(v)
                if hit is not None:
                    return hit
        return None

    got = find(rows)
    assert got is not None, text[:500]
    assert got["boundary_ece"] == pytest.approx(want_b, abs=1e-6)
    assert got["interior_ece"] == pytest.approx(want_i, abs=1e-6)


def test_evaluate_boundary_width_must_be_positive(store, tmp_path, capsys):
    assert (
        main(["evaluate", str(store), "--boundary-width", "0", "-o", str(tmp_path / "r"), "-q"])
        != 0
    )
    assert "--boundary-width" in capsys.readouterr().err
