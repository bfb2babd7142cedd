"""Boundary metrics: boundary_mask, the accumulator's regions, evaluate_store, the report.

References are independent of the code under test: a brute-force loop over pixel
pairs for the mask, direct NumPy formulas (equal-width bins, -log p_y) on the
masked pixels for the region metrics. Every test of this module runs on both
counting paths (numba and NumPy; tests/conftest.py), except those marked
``one_counting_path`` that never count.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from sksegcal.metrics import (
    BOUNDARY_REGIONS,
    CalibrationAccumulator,
    boundary_accumulator,
    boundary_mask,
    expected_calibration_error,
    negative_log_likelihood,
)
from sksegcal.scaling import TemperatureScaling, VectorScaling
from sksegcal.store import LogitStore, evaluate_store

# every test runs once per counting path (numba and NumPy): tests/conftest.py
pytestmark = pytest.mark.counting_paths

no_count = pytest.mark.one_counting_path


# ----------------------------------------------------------------------------- references
def brute_boundary(labels, width, ignore_index, distance):
    """The definition, pixel pair by pixel pair."""
    h, w = labels.shape
    out = np.zeros((h, w), dtype=bool)
    for i, j in itertools.product(range(h), range(w)):
        if labels[i, j] == ignore_index:
            continue
        for di, dj in itertools.product(range(-width, width + 1), repeat=2):
            near = (
                max(abs(di), abs(dj)) <= width
                if distance == "chebyshev"
                else (di * di + dj * dj <= width * width)
            )
            a, b = i + di, j + dj
            if (
                near
                and 0 <= a < h
                and 0 <= b < w
                and labels[a, b] != ignore_index
                and labels[a, b] != labels[i, j]
            ):
                out[i, j] = True
                break
    return out


def direct_ece(y, p, n_bins=15):
    """Top-label ECE, equal-width bins [b/n, (b+1)/n), 1.0 in the last."""
    conf, pred = p.max(axis=1).astype(np.float64), p.argmax(axis=1)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += abs((pred[m] == y[m]).sum() - conf[m].sum())
    return total / y.size


def direct_nll(y, p):
    return float(-np.log(p[np.arange(y.size), y].astype(np.float64)).mean())


def softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def blocky_maps(n=4, c=3, h=14, w=11, seed=0, ignore=0.08):
    """Piecewise-constant labels (so both regions are populated), logits, ignored pixels."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, c, size=(n, (h + 3) // 4, (w + 3) // 4))
    labels = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)[:, :h, :w].copy()
    z = 2.5 * rng.normal(size=(n, c, h, w)) + 3.0 * np.moveaxis(np.eye(c)[labels], -1, 1)
    labels[rng.random(labels.shape) < ignore] = 255
    return z.astype(np.float32), labels.astype(np.int64)


def pixels(z, labels):
    c = z.shape[1]
    return np.moveaxis(z, 1, -1).reshape(-1, c), labels.reshape(-1)


# ----------------------------------------------------------------------------- the mask
@no_count
@pytest.mark.parametrize("width", [1, 2, 3])
@pytest.mark.parametrize("distance", ["chebyshev", "euclidean"])
def test_boundary_mask_matches_the_brute_force_definition(width, distance):
    rng = np.random.default_rng(width)
    for trial in range(6):
        h, w = rng.integers(1, 13, size=2)
        lab = rng.integers(0, 2 + trial % 3, size=(h, w))
        if trial % 2:  # blocky maps, so that an interior exists
            lab = np.repeat(np.repeat(lab, 3, 0), 3, 1)[: h + 4, : w + 2]
        lab[rng.random(lab.shape) < 0.15] = 255
        got = boundary_mask(lab.astype(np.uint8), width=width, distance=distance)
        assert got.dtype == bool and got.shape == lab.shape
        np.testing.assert_array_equal(got, brute_boundary(lab, width, 255, distance))


@no_count
def test_boundary_mask_stack_is_per_image_and_honours_ignore_index_none():
    rng = np.random.default_rng(3)
    stack = np.repeat(rng.integers(0, 3, size=(5, 4, 4)), 3, axis=1)
    stack[2] = 7  # one class only: no boundary, even beside images with other labels
    got = boundary_mask(stack, width=2, ignore_index=None)
    for i in range(5):
        np.testing.assert_array_equal(got[i], brute_boundary(stack[i], 2, None, "chebyshev"))
    assert not got[2].any()
    # with ignore_index=None, 255 is a label like any other
    lab = np.zeros((3, 3), dtype=np.uint8)
    lab[1, 1] = 255
    assert boundary_mask(lab, width=1, ignore_index=None).all()
    assert not boundary_mask(lab, width=1).any()


@no_count
def test_boundary_mask_border_and_ignored_pixels_are_no_label_change():
    lab = np.zeros((5, 5), dtype=np.int64)
    assert not boundary_mask(lab, width=3).any()  # the image border is not a boundary
    lab[:, 2] = 255  # an ignored column between two regions of the same class
    assert not boundary_mask(lab, width=1).any()
    lab[:, 3:] = 1  # now class 1 on the right: the ignored column does not count...
    m = boundary_mask(lab, width=1)
    assert not m.any()  # ...and the two classes are 2 px apart
    m = boundary_mask(lab, width=2)
    np.testing.assert_array_equal(m[0], [False, True, False, True, False])


@no_count
def test_boundary_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="width"):
        boundary_mask(np.zeros((3, 3), int), width=0)
    with pytest.raises(ValueError, match="width"):
        boundary_mask(np.zeros((3, 3), int), width=1.5)
    with pytest.raises(TypeError, match="integer"):
        boundary_mask(np.zeros((3, 3)), width=1)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        boundary_mask(np.zeros(3, int), width=1)
    with pytest.raises(ValueError, match="distance"):
        boundary_mask(np.zeros((3, 3), int), width=1, distance="manhattan")


# ----------------------------------------------------------------------------- regions
@pytest.mark.parametrize("from_logits", [False, True])
def test_region_metrics_equal_direct_formulas_on_the_masked_pixels(from_logits):
    z, labels = blocky_maps()
    mask = boundary_mask(labels, width=1)
    ids = np.array([10, 11, 12, 13])
    acc = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS)
    if from_logits:
        acc.update_logits(labels, z, image_id=ids, region=mask)
    else:
        acc.update(labels, softmax(z), image_id=ids, region=mask)
    X, y = pixels(z, labels)
    p = softmax(X.astype(np.float64))
    valid = y != 255
    for name, sel in (("boundary", mask.reshape(-1)), ("interior", ~mask.reshape(-1) & valid)):
        part = acc.region(name)
        assert part.n_pixels_ == sel.sum() > 50
        assert part.expected_calibration_error() == pytest.approx(
            direct_ece(y[sel], p[sel]), abs=1e-6
        )
        assert part.negative_log_likelihood() == pytest.approx(
            direct_nll(y[sel], p[sel]), rel=1e-5
        )
        # the one-shot functions of sksegcal.metrics agree as well
        assert part.expected_calibration_error() == pytest.approx(
            expected_calibration_error(y[sel], p[sel]), abs=1e-6
        )
        assert part.negative_log_likelihood() == pytest.approx(
            negative_log_likelihood(y[sel], p[sel]), rel=1e-5
        )
        assert part.accuracy() == pytest.approx((p[sel].argmax(1) == y[sel]).mean())
        # per image: the ECE of each image's pixels of the region
        per = part.per_image_ece()
        img = np.repeat(ids, labels[0].size)
        for k in ids:
            m = sel & (img == k)
            assert per[int(k)] == pytest.approx(direct_ece(y[m], p[m]), abs=1e-6)
        assert part.mean_per_image_ece() == pytest.approx(np.mean(list(per.values())))
    s = acc.region_summary()
    assert s["boundary"]["ece"] == acc.region("boundary").expected_calibration_error()
    # boundary pixels are the worse calibrated ones here, as in the paper
    assert s["boundary"]["ece"] > s["interior"]["ece"]


@pytest.mark.parametrize("from_logits", [False, True])
def test_pooled_metrics_are_exactly_those_without_regions(from_logits):
    z, labels = blocky_maps(seed=1)
    mask = boundary_mask(labels, width=2)
    plain = CalibrationAccumulator(3, classwise=from_logits)
    split = CalibrationAccumulator(3, classwise=from_logits, regions=BOUNDARY_REGIONS)
    for acc, kw in ((plain, {}), (split, {"region": mask})):
        if from_logits:
            acc.update_logits(labels, z, temperature=1.7, **kw)
        else:
            acc.update(labels, softmax(z), **kw)
    a, b = plain.state_dict(), split.state_dict()
    for key in ("top", "confusion_matrix", "nll_sum", "brier_sum", "image_tallies"):
        np.testing.assert_array_equal(a[key], b[key])  # bit for bit
    # and the regions add up to the pool
    parts = [split.region(r) for r in BOUNDARY_REGIONS]
    np.testing.assert_allclose(parts[0]._top + parts[1]._top, split._top, rtol=1e-12)
    assert parts[0].n_pixels_ + parts[1].n_pixels_ == split.n_pixels_


def test_classwise_weights_and_three_regions_match_references():
    rng = np.random.default_rng(5)
    n, c = 3000, 4
    z = 3 * rng.normal(size=(n, c)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    y[:100] = 255
    codes = rng.integers(0, 3, size=n)
    w = rng.random(n)
    p = softmax(z.astype(np.float64)).astype(np.float32)
    acc = CalibrationAccumulator(c, classwise=True, regions=("a", "b", "c"))
    acc.update(y, p, sample_weight=w, region=codes)
    for r, name in enumerate(("a", "b", "c")):
        sel = (codes == r) & (y != 255)
        ref = CalibrationAccumulator(c, classwise=True).update(
            y[sel], p[sel], sample_weight=w[sel]
        )
        part = acc.region(name)
        assert part.total_weight_ == pytest.approx(w[sel].sum())
        assert part.static_calibration_error() == pytest.approx(ref.static_calibration_error())
        assert part.brier_score() == pytest.approx(ref.brier_score())
        np.testing.assert_allclose(part.confusion_matrix_, ref.confusion_matrix_)


def test_merge_of_region_accumulators_equals_one_pass(monkeypatch):
    z, labels = blocky_maps(n=6, seed=2)
    mask = boundary_mask(labels, width=1)
    ids = np.arange(6)
    one = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS)
    one.update_logits(labels, z, image_id=ids, region=mask)
    parts = []
    for s, e in ((0, 2), (2, 3), (3, 6)):
        parts.append(
            CalibrationAccumulator(3, regions=BOUNDARY_REGIONS).update_logits(
                labels[s:e], z[s:e], image_id=ids[s:e], region=mask[s:e]
            )
        )
    merged = parts[0].copy().merge(parts[1]).merge(parts[2])
    # pixel tables in odd chunks, flat masks, and the large-chunk pieces of update()
    X, y = pixels(z, labels)
    flat = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS)
    img = np.repeat(ids, labels[0].size)
    for s in range(0, y.size, 97):
        flat.update(
            y[s : s + 97],
            softmax(X[s : s + 97]),
            image_id=img[s : s + 97],
            region=mask.reshape(-1)[s : s + 97],
        )
    from sksegcal.metrics import _inputs

    monkeypatch.setattr(_inputs, "_CHUNK_ROWS", 300)  # cut (N, C, H, W) into whole images
    pieces = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS)
    pieces.update_logits(labels, z, image_id=ids, region=mask.reshape(-1))
    for other in (merged, flat, pieces):
        for r in BOUNDARY_REGIONS:
            a, b = one.region(r), other.region(r)
            assert a.n_pixels_ == b.n_pixels_
            np.testing.assert_allclose(a._top, b._top, rtol=1e-6, atol=1e-6)
            assert a.negative_log_likelihood() == pytest.approx(b.negative_log_likelihood())
            pa, pb = a.per_image_ece(), b.per_image_ece()
            assert pa.keys() == pb.keys()
            for k in pa:
                assert pa[k] == pytest.approx(pb[k], abs=1e-6)
    with pytest.raises(ValueError, match="regions"):
        one.copy().merge(CalibrationAccumulator(3))
    with pytest.raises(ValueError, match="regions"):
        one.copy().merge(CalibrationAccumulator(3, regions=("interior", "boundary")))


def test_region_arguments_are_checked():
    y, p = np.array([0, 1, 1]), np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match="tracks no regions"):
        CalibrationAccumulator(2).update(y, p, region=np.ones(3, bool))
    with pytest.raises(ValueError, match="pass region="):
        CalibrationAccumulator(2, regions=BOUNDARY_REGIONS).update(y, p)
    acc = CalibrationAccumulator(2, regions=("a", "b", "c"))
    with pytest.raises(ValueError, match="boolean"):
        acc.update(y, p, region=np.ones(3, bool))
    with pytest.raises(ValueError, match="outside"):
        acc.update(y, p, region=np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="Shape mismatch"):
        acc.update(y, p, region=np.zeros(4, int))
    with pytest.raises(TypeError, match="region"):
        acc.update(y, p, region=np.zeros(3))
    assert acc.n_pixels_ == 0  # nothing was counted by the failed updates
    for bad in (("a",), ("a", "a"), ("a", ""), "ab"):
        with pytest.raises((TypeError, ValueError), match="regions"):
            CalibrationAccumulator(2, regions=bad)
    with pytest.raises(ValueError, match="Unknown region"):
        acc.region("d")
    with pytest.raises(ValueError, match="no regions"):
        CalibrationAccumulator(2).region("a")
    # an empty region reads as NaN in the summary, and raises as an accumulator
    acc.update(y, p, region=np.zeros(3, int))
    assert acc.region_summary()["b"]["n_pixels"] == 0
    assert np.isnan(acc.region_summary()["b"]["ece"])
    with pytest.raises(ValueError, match="No pixels"):
        acc.region("b").expected_calibration_error()


def test_boundary_accumulator_takes_maps_and_one_image():
    z, labels = blocky_maps(seed=4)
    acc = boundary_accumulator(labels, logits=z, temperature=2.0, width=2)
    ref = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS).update_logits(
        labels, z, temperature=2.0, region=boundary_mask(labels, width=2)
    )
    for r in BOUNDARY_REGIONS:
        assert acc.region_summary()[r] == pytest.approx(ref.region_summary()[r])
    one = boundary_accumulator(labels[0], softmax(z[0], axis=0), width=1)
    mask = boundary_mask(labels[0], width=1)
    p = softmax(np.moveaxis(z[0], 0, -1).astype(np.float64), axis=-1)
    assert one.region("boundary").expected_calibration_error() == pytest.approx(
        direct_ece(labels[0][mask], p[mask]), abs=1e-6
    )
    with pytest.raises(ValueError, match="exactly one"):
        boundary_accumulator(labels, softmax(z), logits=z)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        boundary_accumulator(labels.reshape(-1), softmax(z).reshape(-1, 3))


# ----------------------------------------------------------------------------- state
def _through_npz(state, tmp_path):
    path = tmp_path / "acc.npz"
    np.savez(path, **state, allow_pickle=False)
    with np.load(path, allow_pickle=False) as f:
        return dict(f)


def _filled(classwise=False):
    z, labels = blocky_maps(seed=6)
    return CalibrationAccumulator(3, classwise=classwise, regions=BOUNDARY_REGIONS).update_logits(
        labels, z, region=boundary_mask(labels, width=1)
    )


@pytest.mark.parametrize("classwise", [False, True])
def test_state_dict_round_trip_keeps_regions(tmp_path, classwise):
    acc = _filled(classwise)
    back = CalibrationAccumulator.from_state_dict(_through_npz(acc.state_dict(), tmp_path))
    assert back.regions == BOUNDARY_REGIONS
    assert back.region_summary() == acc.region_summary()
    assert back.summary() == acc.summary()
    for r in BOUNDARY_REGIONS:
        assert back.region(r).per_image_ece() == acc.region(r).per_image_ece()
    # a loaded accumulator keeps counting and merging like the original
    both = back.copy().merge(acc)
    assert both.region("boundary").n_pixels_ == 2 * acc.region("boundary").n_pixels_
    # an accumulator without regions writes no region keys and loads as before
    plain = CalibrationAccumulator(3).update(np.array([0, 1]), np.full((2, 3), 1 / 3))
    state = plain.state_dict()
    assert not any(k.startswith("region") for k in state)
    assert CalibrationAccumulator.from_state_dict(state).regions is None


def _tamper(state, **changes):
    out = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


def test_from_state_dict_rejects_malformed_regions():
    s = _filled(classwise=True).state_dict()
    top = s["region_top"].copy()
    top[0, 0, -1] += 1.0  # one more weight in a region than in the pool
    # one pixel's weight moved to an empty bin within a region: every total holds,
    # only the sum over the regions of the grid differs from the pooled grid
    shifted = s["region_top"].copy()
    full = int(np.flatnonzero(shifted[0, 0] >= 1)[-1])
    empty = int(np.flatnonzero(s["top"][0] == 0)[0])
    shifted[0, :, full] *= 1.0 - 1.0 / shifted[0, 0, full]
    shifted[0, 0, empty] += 1.0
    sums = s["region_sums"].copy()
    sums[0, 3] += 0.5
    img = s["region_image_tallies"].copy()
    img[1, 0, 0, 0] += 2.0
    negative = s["region_confusion_matrix"].copy()
    negative[0, 0, 0] = -1.0
    swapped = s["region_top"][::-1].copy()
    cases = {
        "regions": ['["boundary"]', '["a", "a"]', "not json", "[1, 2]"],
        "region_top": [top, shifted, s["region_top"][:1], s["region_top"].astype(np.float32)],
        "region_sums": [sums, s["region_sums"][:, :3]],
        "region_image_tallies": [img],
        "region_confusion_matrix": [negative],
        "region_classwise_tallies": [None],
    }
    for key, values in cases.items():
        for value in values:
            with pytest.raises(ValueError, match=key):
                CalibrationAccumulator.from_state_dict(_tamper(s, **{key: value}))
    # the regions' grids swapped: each disagrees with its region's total weight
    with pytest.raises(ValueError, match="region_top"):
        CalibrationAccumulator.from_state_dict(_tamper(s, region_top=swapped))
    with pytest.raises(ValueError, match="missing"):
        CalibrationAccumulator.from_state_dict(_tamper(s, region_sums=None))
    no_regions = _tamper(s, regions=None)
    with pytest.raises(ValueError, match="no regions"):
        CalibrationAccumulator.from_state_dict(no_regions)
    with pytest.raises(ValueError, match="region_classwise_tallies"):
        CalibrationAccumulator.from_state_dict(
            _tamper(
                _filled(False).state_dict(), region_classwise_tallies=s["region_classwise_tallies"]
            )
        )


# ----------------------------------------------------------------------------- the store
@pytest.fixture
def store(tmp_path):
    s = LogitStore.create(tmp_path / "store", n_classes=3)
    for i, (h, w) in enumerate(((12, 9), (7, 15), (10, 10), (9, 9))):
        z, labels = blocky_maps(n=1, h=h, w=w, seed=10 + i)
        if i == 3:
            labels[0, :3] = 255  # whole rows ignored: blocks with no kept pixel are skipped
        s.add_image(i, z[0], labels[0])
    return s


def _in_memory(store, width, calibrators):
    """Per image: the stored (float16) logits, the mask, one accumulator per method."""
    accs = {}
    for name, est in calibrators.items():
        acc = CalibrationAccumulator(3, regions=BOUNDARY_REGIONS)
        for image in store.iter_images():
            z = np.asarray(image.logits, dtype=np.float32)
            t = np.asarray(image.labels).astype(np.int64)
            X = np.moveaxis(z, 0, -1).reshape(-1, 3)
            p = softmax(X.astype(np.float64)) if est is None else est.predict_proba(X)
            acc.update(
                t.reshape(-1),
                p.astype(np.float32),
                image_id=image.id,
                region=boundary_mask(t, width=width).reshape(-1),
            )
        accs[name] = acc
    return accs


@pytest.mark.parametrize("width", [1, 2])
def test_evaluate_store_boundary_numbers_equal_the_in_memory_computation(store, width):
    X = np.concatenate(
        [
            np.moveaxis(np.asarray(im.logits, np.float32), 0, -1).reshape(-1, 3)
            for im in store.iter_images()
        ]
    )
    y = np.concatenate([np.asarray(im.labels).reshape(-1) for im in store.iter_images()])
    keep = y != 255
    ts = TemperatureScaling().fit(X[keep], y[keep])
    vs = VectorScaling().fit(X[keep], y[keep])
    calibrators = {"uncalibrated": None, "ts": ts, "vs": vs}
    ref = _in_memory(store, width, calibrators)
    plain = evaluate_store(store, calibrators)
    for chunk_pixels in (7, 50, 10_000):  # chunks that cut images into pieces, or not
        got = evaluate_store(store, calibrators, boundary_width=width, chunk_pixels=chunk_pixels)
        for name in calibrators:
            assert got[name].summary() == pytest.approx(plain[name].summary(), rel=1e-12)
            for r in BOUNDARY_REGIONS:
                a, b = got[name].region(r), ref[name].region(r)
                assert a.n_pixels_ == b.n_pixels_ > 0
                assert a.expected_calibration_error() == pytest.approx(
                    b.expected_calibration_error(), abs=1e-6
                )
                assert a.negative_log_likelihood() == pytest.approx(
                    b.negative_log_likelihood(), rel=1e-6
                )
                pa, pb = a.per_image_ece(), b.per_image_ece()
                assert pa.keys() == pb.keys()
                assert [pa[k] for k in pa] == pytest.approx([pb[k] for k in pa], abs=1e-6)
    with pytest.raises(ValueError, match="width"):
        evaluate_store(store, calibrators, boundary_width=0)
    with pytest.raises(ValueError, match="not both"):
        evaluate_store(
            store, calibrators, boundary_width=1, accumulator_params={"regions": ("a", "b")}
        )


# ----------------------------------------------------------------------------- the report
@no_count
def test_report_writes_the_boundary_table_and_keeps_the_printed_one(store, tmp_path):
    from sksegcal.cli._report import format_table, summaries, write_report

    with_regions = {"test": evaluate_store(store, {"uncalibrated": None}, boundary_width=1)}
    without = {"test": evaluate_store(store, {"uncalibrated": None})}
    assert format_table(summaries(with_regions)) == format_table(summaries(without))
    s = summaries(with_regions)["test"]["uncalibrated"]
    b = with_regions["test"]["uncalibrated"].region("boundary")
    assert s["boundary_ece"] == b.expected_calibration_error()
    assert s["boundary_n_pixels"] == b.n_pixels_
    write_report(tmp_path, with_regions, {"dataset": "toy", "boundary_width": 1})
    md = (tmp_path / "report.md").read_text()
    assert "## Boundary and interior" in md and "within 1 px" in md
    assert f"| uncalibrated | {s['boundary_ece']:.4f} | {s['interior_ece']:.4f} |" in md
    assert "boundary_ece" in (tmp_path / "metrics.csv").read_text().splitlines()[0]
    # the evaluate command's saved results (JSON + npz, no pickle) keep the regions
    from sksegcal.cli._report import load_results, save_results

    (tmp_path / "saved").mkdir()
    save_results(tmp_path / "saved", with_regions, {"dataset": "toy"})
    back, _, _ = load_results(tmp_path / "saved")
    assert summaries(back) == summaries(with_regions)
    (tmp_path / "plain").mkdir()
    write_report(tmp_path / "plain", without, {"dataset": "toy"})
    assert "Boundary" not in (tmp_path / "plain" / "report.md").read_text()
