"""sksegcal.conformal against independent references: sorted scores, brute-force searches,
direct loops, and coverage over many random splits of exchangeable synthetic data."""

import math
import warnings

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from sksegcal import TemperatureScaling
from sksegcal.conformal import (
    ConformalPixelSets,
    ConformalRiskControl,
    ConformalSetAccumulator,
    ImageRiskTally,
    ScoreHistogram,
    aps_scores,
    conformal_rank,
    evaluate_conformal_store,
    fit_conformal_store,
    lac_scores,
)
from sksegcal.features import softmax


def _logits(n=3000, c=4, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, size=n)
    X = scale * (np.eye(c)[y] + rng.normal(size=(n, c)))
    return X.astype(np.float32), y


def _images(n_images=30, pixels=64, c=3, seed=0):
    """Images with an image-level difficulty (pixels of one image correlate)."""
    rng = np.random.default_rng(seed)
    Xs, ys, gs = [], [], []
    for i in range(n_images):
        y = rng.integers(0, c, size=pixels)
        hard = rng.uniform(0.5, 2.0)  # shared by the image's pixels
        Xs.append(3.0 * (np.eye(c)[y] + hard * rng.normal(size=(pixels, c))))
        ys.append(y)
        gs.append(np.full(pixels, i))
    return np.concatenate(Xs).astype(np.float32), np.concatenate(ys), np.concatenate(gs)


def _exact_threshold(scores, alpha):
    """The k-th smallest score, k = ceil((n + 1)(1 - alpha)), or inf."""
    n = len(scores)
    k = math.ceil(round((n + 1) * (1 - alpha), 9))
    return np.inf if k > n else np.sort(scores)[k - 1]


# ---------------------------------------------------------------- the histogram
@pytest.mark.parametrize("n", [1, 9, 19, 100, 1001])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2, 0.5])
def test_threshold_is_the_corrected_quantile_rounded_up(n, alpha):
    rng = np.random.default_rng(n)
    scores = rng.uniform(size=n).astype(np.float32)
    h = ScoreHistogram(n_bins=2**16).update(scores)
    exact = _exact_threshold(scores, alpha)
    got = h.threshold(alpha)
    if np.isinf(exact):
        assert np.isinf(got)
        return
    # np.quantile's inverted CDF between (k - 1)/n and k/n is the same order statistic
    k = conformal_rank(n, alpha)
    assert np.quantile(scores, (k - 0.5) / n, method="inverted_cdf") == exact
    assert exact <= got < exact + 2**-16  # conservative, by less than one grid step
    # so every pixel the exact threshold covers is covered
    assert np.all((scores <= exact) <= (np.ceil(scores.astype(np.float64) * 2**16) / 2**16 <= got))


def test_conformal_rank_is_exact_for_decimal_alphas():
    # (n + 1)(1 - alpha) is an integer here; binary rounding must not push it to the next one
    assert conformal_rank(9, 0.1) == 9
    assert conformal_rank(19, 0.05) == 19
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(10, 0.1) == 10  # 9.9 -> 10
    assert conformal_rank(8, 0.1) == 9  # more than n: no finite threshold


def test_coarse_grid_never_loses_coverage():
    rng = np.random.default_rng(3)
    scores = rng.uniform(size=500)
    for n_bins in (7, 10, 100):
        got = ScoreHistogram(n_bins).update(scores).threshold(0.1)
        exact = _exact_threshold(scores, 0.1)
        assert exact <= got <= exact + 1 / n_bins + 1e-12


def test_histogram_merge_equals_one_pass_and_state_round_trips():
    rng = np.random.default_rng(0)
    s = rng.uniform(size=1000)
    one = ScoreHistogram(1024).update(s)
    a = ScoreHistogram(1024).update(s[:300])
    b = ScoreHistogram(1024).update(s[300:])
    a.merge(b)
    assert np.array_equal(a.counts_, one.counts_) and a.n_ == one.n_ == 1000
    back = ScoreHistogram.from_state_dict(one.state_dict())
    assert np.array_equal(back.counts_, one.counts_) and back.threshold(0.1) == one.threshold(0.1)
    bad = one.state_dict()
    bad["n"] = 999
    with pytest.raises(ValueError, match="summing to n"):
        ScoreHistogram.from_state_dict(bad)
    with pytest.raises(ValueError, match="same n_bins"):
        one.merge(ScoreHistogram(512))


# ------------------------------------------------------------------ scores
def test_scores_against_a_loop():
    rng = np.random.default_rng(1)
    p = softmax(rng.normal(size=(50, 5)) * 2)
    u = rng.uniform(size=50)
    lac, aps, aps_u = lac_scores(p), aps_scores(p), aps_scores(p, u)
    for i in range(50):
        order = sorted(range(5), key=lambda k: (-p[i, k], k))
        mass = 0.0
        for rank, k in enumerate(order):
            assert lac[i, k] == pytest.approx(1 - p[i, k])
            assert aps_u[i, k] == pytest.approx(mass + u[i] * p[i, k], abs=1e-6)
            mass += p[i, k]
            assert aps[i, k] == pytest.approx(0.0 if rank == 0 else min(mass, 1.0), abs=1e-6)


# ------------------------------------------------------------- pixel sets
@pytest.mark.parametrize("score", ["lac", "aps"])
def test_pixel_sets_threshold_matches_direct_quantile(score):
    X, y = _logits(n=2001)
    est = ConformalPixelSets(guarantee="pixel", alpha=0.1, conformity_score=score).fit(X, y)
    p = softmax(X)
    s = (lac_scores(p) if score == "lac" else aps_scores(p))[np.arange(len(y)), y]
    exact = _exact_threshold(s, 0.1)
    assert exact <= est.threshold_ < exact + 2**-16
    assert est.n_calibration_ == 2001
    # the set at the threshold holds every class the exact threshold would hold
    all_scores = lac_scores(p) if score == "lac" else aps_scores(p)
    assert np.all(est.predict_set(X) >= (all_scores <= exact))


def test_lac_set_is_classes_above_probability_threshold():
    X, y = _logits()
    est = ConformalPixelSets(guarantee="pixel", alpha=0.1).fit(X[:1500], y[:1500])
    p = softmax(X[1500:])
    level = est.threshold_level_
    direct = np.ceil((1.0 - p).astype(np.float64) * 2**16) <= level
    assert np.array_equal(est.predict_set(X[1500:]), direct)
    assert np.array_equal(est.predict_set_size(X[1500:]), direct.sum(1))


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_sets_are_nested_in_alpha(score):
    X, y = _logits()
    sets = [
        ConformalPixelSets(guarantee="pixel", alpha=a, conformity_score=score)
        .fit(X[:1500], y[:1500])
        .predict_set(X[1500:])
        for a in (0.02, 0.05, 0.1, 0.2, 0.4)
    ]
    for bigger, smaller in zip(sets, sets[1:]):
        assert np.all(smaller <= bigger)
    assert sets[0].sum() > sets[-1].sum()


def test_aps_sets_hold_the_argmax_and_are_prefixes_of_the_ranking():
    X, y = _logits(c=6, scale=1.5)
    est = ConformalPixelSets(guarantee="pixel", alpha=0.1, conformity_score="aps").fit(
        X[:1500], y[:1500]
    )
    sets = est.predict_set(X[1500:])
    p = softmax(X[1500:])
    assert np.all(sets[np.arange(len(p)), p.argmax(1)])
    ranked = np.take_along_axis(sets, np.argsort(-p, axis=1, kind="stable"), axis=1)
    assert np.all(np.diff(ranked.astype(int), axis=1) <= 0)  # True...True False...False


def test_randomized_aps_is_reproducible_and_may_be_empty():
    X, y = _logits(c=4, scale=1.0)
    kw = dict(conformity_score="aps", randomized=True, random_state=0, alpha=0.3)
    a = ConformalPixelSets(guarantee="pixel", **kw).fit(X[:1500], y[:1500])
    b = ConformalPixelSets(guarantee="pixel", **kw).fit(X[:1500], y[:1500])
    assert a.threshold_ == b.threshold_
    assert np.array_equal(a.predict_set(X[1500:]), b.predict_set(X[1500:]))
    assert (a.predict_set(X[1500:]).sum(1) == 0).any()
    c = ConformalPixelSets(guarantee="pixel", **{**kw, "random_state": 1}).fit(X[:1500], y[:1500])
    assert c.threshold_ != a.threshold_


def test_partial_fit_and_merge_equal_one_fit():
    X, y = _logits(n=3000)
    one = ConformalPixelSets(guarantee="pixel", alpha=0.1).fit(X, y)
    parts = ConformalPixelSets(guarantee="pixel", alpha=0.1)
    for part in np.array_split(np.arange(3000), 7):
        parts.partial_fit(X[part], y[part])
    a = ConformalPixelSets(guarantee="pixel", alpha=0.1).fit(X[:1000], y[:1000])
    b = ConformalPixelSets(guarantee="pixel", alpha=0.1).fit(X[1000:], y[1000:])
    a.merge(b)
    for est in (parts, a):
        assert np.array_equal(est.state_.counts_, one.state_.counts_)
        assert est.threshold_level_ == one.threshold_level_
    with pytest.raises(ValueError, match="score"):
        a.merge(ConformalPixelSets(guarantee="pixel", conformity_score="aps").fit(X, y))


def test_ignored_pixels_are_left_out():
    X, y = _logits(n=2000)
    y2 = y.copy()
    y2[::3] = 255
    keep = y2 != 255
    a = ConformalPixelSets(guarantee="pixel").fit(X, y2)
    b = ConformalPixelSets(guarantee="pixel").fit(X[keep], y[keep])
    assert a.threshold_level_ == b.threshold_level_ and a.n_calibration_ == keep.sum()


def test_calibrator_in_front_equals_its_probabilities():
    X, y = _logits(n=3000)
    ts = TemperatureScaling().fit(X[:1000], y[:1000])
    a = ConformalPixelSets(guarantee="pixel", calibrator=ts).fit(X[1000:2000], y[1000:2000])
    b = ConformalPixelSets(guarantee="pixel", input_type="probabilities").fit(
        ts.predict_proba(X[1000:2000]), y[1000:2000]
    )
    assert a.threshold_level_ == b.threshold_level_
    assert np.array_equal(a.predict_set(X[2000:]), b.predict_set(ts.predict_proba(X[2000:])))
    assert ts.temperature_ == TemperatureScaling().fit(X[:1000], y[:1000]).temperature_


def test_maps_helpers_match_the_pixel_table(segmentation_data):
    logits, labels = segmentation_data
    est = ConformalPixelSets(guarantee="pixel").fit_maps(logits[:6], labels[:6])
    masks = est.predict_set_maps(logits[6:])
    sizes = est.predict_set_size_maps(logits[6:])
    n, c, h, w = logits[6:].shape
    table = est.predict_set(np.moveaxis(logits[6:], 1, -1).reshape(-1, c))
    assert masks.shape == (n, c, h, w) and sizes.shape == (n, h, w)
    assert np.array_equal(np.moveaxis(masks, 1, -1).reshape(-1, c), table)
    assert np.array_equal(sizes, masks.sum(1))


def test_too_few_calibration_pixels_warn_and_give_full_sets():
    X, y = _logits(n=20)
    with pytest.warns(UserWarning, match="cannot support"):
        est = ConformalPixelSets(guarantee="pixel", alpha=0.01).fit(X[:5], y[:5])
    assert np.isinf(est.threshold_) and est.predict_set(X).all()


# ------------------------------------------------------------- risk control
def _brute_force_crc(levels_per_image, alpha, n_bins):
    """min lambda on the grid with n/(n+1) R_hat + 1/(n+1) <= alpha, by a loop."""
    n = len(levels_per_image)
    for t in range(n_bins + 1):
        risk = np.mean([np.mean(lv > t) for lv in levels_per_image])
        if n / (n + 1) * risk + 1 / (n + 1) <= alpha:
            return t
    return None


@pytest.mark.parametrize("loss", ["miscoverage", "fnr"])
@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_risk_control_matches_a_brute_force_search(loss, alpha):
    n_bins = 256
    X, y, g = _images(n_images=25, pixels=40)
    kw = {"target_class": 1} if loss == "fnr" else {}
    est = ConformalRiskControl(alpha=alpha, loss=loss, n_bins=n_bins, **kw).fit(X, y, g)
    p = softmax(X)
    levels = np.ceil((1.0 - p[np.arange(len(y)), y]).astype(np.float64) * n_bins)
    per_image = [levels[(g == i) & ((y == 1) if loss == "fnr" else True)] for i in range(25)]
    per_image = [lv for lv in per_image if lv.size]
    assert est.n_calibration_ == len(per_image)
    assert est.threshold_level_ == _brute_force_crc(per_image, alpha, n_bins)
    risk = np.mean([np.mean(lv > est.threshold_level_) for lv in per_image])
    assert est.calibration_risk_ == pytest.approx(risk)


@pytest.mark.filterwarnings("ignore:.*cannot support:UserWarning")
def test_risk_tally_merge_and_images_whole():
    X, y, g = _images(n_images=20)
    one = ConformalRiskControl().fit(X, y, g)
    a = ConformalRiskControl().fit(X[g < 8], y[g < 8], g[g < 8])
    b = ConformalRiskControl().fit(X[g >= 8], y[g >= 8], g[g >= 8])
    a.merge(b)
    np.testing.assert_allclose(a.state_.loss_sums_, one.state_.loss_sums_, rtol=1e-12)
    assert a.threshold_level_ == one.threshold_level_
    with pytest.raises(ValueError, match="saw images"):
        a.merge(ConformalRiskControl().fit(X[g < 2], y[g < 2], g[g < 2]))
    with pytest.raises(ValueError, match="already added"):
        one.partial_fit(X[g == 3], y[g == 3], g[g == 3])
    back = ImageRiskTally.from_state_dict(one.state_.state_dict())
    assert back.lambda_level(0.1) == one.state_.lambda_level(0.1)


def test_fnr_mask_is_the_class_column_of_the_sets():
    X, y, g = _images()
    est = ConformalRiskControl(loss="fnr", target_class=2).fit(X, y, g)
    assert np.array_equal(est.predict_mask(X), est.predict_set(X)[:, 2])


# ------------------------------------------------- coverage over random splits
# A few dozen splits at sizes where a wrong rank moves the coverage by several standard
# errors (10 calibration pixels: rank 10 of 11 covers 0.909, rank 9 covers 0.818). The
# 200-split runs: benchmarks/conformal_synthetic_coverage.py, figures in docs/conformal.md.
@pytest.mark.parametrize("score", ["lac", "aps"])
def test_pixel_coverage_holds_over_random_splits_of_exchangeable_pixels(score):
    # exchangeable pixels: split conformal's guarantee, 1 - alpha <= E[coverage] <= + 1/(n+1)
    X, y = _logits(n=4000, c=4, scale=2.0, seed=5)
    alpha, n_cal, n_splits = 0.1, 10, 100
    p = softmax(X)
    s_all = lac_scores(p) if score == "lac" else aps_scores(p)
    s = s_all[np.arange(len(y)), y]
    rng = np.random.default_rng(0)
    cover = []
    for _ in range(n_splits):
        perm = rng.permutation(len(y))
        h = ScoreHistogram().update(s[perm[:n_cal]])
        t = h.threshold_level(alpha)
        cover.append(np.mean(np.ceil(s[perm[n_cal:]].astype(np.float64) * 2**16) <= t))
    mean, se = np.mean(cover), np.std(cover) / np.sqrt(n_splits)
    assert mean >= 1 - alpha - 3 * se
    assert mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se


@pytest.mark.filterwarnings("ignore:.*cannot support:UserWarning")
def test_image_risk_holds_over_random_splits_of_correlated_images():
    X, y, g = _images(n_images=60, pixels=50, seed=2)
    alpha, n_splits = 0.1, 40
    per_image = [
        ConformalRiskControl(alpha=alpha).fit(X[g == i], y[g == i], g[g == i]).state_
        for i in range(60)
    ]
    p = softmax(X)
    levels = np.ceil((1.0 - p[np.arange(len(y)), y]).astype(np.float64) * 2**16)
    rng = np.random.default_rng(0)
    risks = []
    for _ in range(n_splits):
        perm = rng.permutation(60)
        tally = ImageRiskTally()
        for i in perm[:30]:
            tally.merge(per_image[i])
        t = tally.lambda_level(alpha)
        risks.append(np.mean([np.mean(levels[g == i] > t) for i in perm[30:]]))
    mean, se = np.mean(risks), np.std(risks) / np.sqrt(n_splits)
    assert mean <= alpha + 3 * se
    assert mean >= alpha - 2 / 31 - 3 * se  # CRC is tight to within 2B/(n+1)


# ------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "est, match",
    [
        (ConformalPixelSets(guarantee="pixel", alpha=0.0), "alpha"),
        (ConformalPixelSets(guarantee="pixel", alpha=1.5), "alpha"),
        (ConformalPixelSets(guarantee="pixel", conformity_score="raps"), "score"),
        (ConformalPixelSets(guarantee="pixel", randomized=True), "conformity_score='aps' only"),
        (ConformalPixelSets(guarantee="pixel", calibrator=TemperatureScaling()), "not fitted"),
        (ConformalPixelSets(guarantee="pixel", calibrator="ts"), "calibrator"),
        (ConformalPixelSets(guarantee="pixel", n_bins=0), "n_bins"),
    ],
)
def test_bad_parameters_are_named(est, match):
    X, y = _logits(n=50)
    with pytest.raises((ValueError, TypeError, NotFittedError), match=match):
        est.fit(X, y)


def test_bad_inputs_are_named():
    X, y = _logits(n=50, c=3)
    with pytest.raises(ValueError, match="outside"):
        ConformalPixelSets(guarantee="pixel").fit(X, np.full(50, 7))
    with pytest.raises(ValueError, match="values outside"):
        ConformalPixelSets(guarantee="pixel", input_type="probabilities").fit(X, y)
    with pytest.raises(ValueError, match="rows but y"):
        ConformalPixelSets(guarantee="pixel").fit(X, y[:10])
    with pytest.raises(ValueError, match="groups is required"):
        ConformalRiskControl().fit(X, y, None)
    with pytest.raises(ValueError, match="needs target_class"):
        ConformalRiskControl(loss="fnr").fit(X, y, np.zeros(50))
    with pytest.raises(ValueError, match="applies to loss='fnr'"):
        ConformalRiskControl(target_class=1).fit(X, y, np.zeros(50))
    with pytest.raises(ValueError, match="target_class=5"):
        ConformalRiskControl(loss="fnr", target_class=5).fit(X, y, np.zeros(50))
    est = ConformalPixelSets(guarantee="pixel").fit(X, y)
    with pytest.raises(ValueError, match="features"):
        est.predict_set(X[:, :2])
    with pytest.raises(ValueError, match="N, C, H, W"):
        est.predict_set_maps(X)
    with pytest.raises(NotFittedError):
        ConformalPixelSets(guarantee="pixel").predict_set(X)


# -------------------------------------------------------------- accumulator
def test_accumulator_against_direct_numpy():
    rng = np.random.default_rng(0)
    n, c = 600, 4
    y = rng.integers(0, c, size=n)
    y[::17] = 255
    sets = rng.uniform(size=(n, c)) < 0.5
    ids = rng.integers(0, 5, size=n)
    acc = ConformalSetAccumulator(c)
    for part in np.array_split(np.arange(n), 3):
        acc.update(y[part], sets[part], image_id=ids[part])
    keep = y != 255
    hit = sets[keep][np.arange(keep.sum()), y[keep]]
    assert acc.coverage() == pytest.approx(hit.mean())
    assert acc.mean_set_size() == pytest.approx(sets[keep].sum(1).mean())
    for k in range(c):
        assert acc.per_class_coverage()[k] == pytest.approx(hit[y[keep] == k].mean())
    for i in range(5):
        rows = keep & (ids == i)
        h = sets[rows][np.arange(rows.sum()), y[rows]]
        assert acc.per_image_miscoverage()[i] == pytest.approx(1 - h.mean())
        assert acc.per_image_fnr(2)[i] == pytest.approx(1 - h[y[rows] == 2].mean())
    a = ConformalSetAccumulator(c).update(y[:300], sets[:300], image_id=ids[:300])
    b = ConformalSetAccumulator(c).update(y[300:], sets[300:], image_id=ids[300:])
    a.merge(b)
    assert a.summary(target_class=1) == pytest.approx(acc.summary(target_class=1))


def test_accumulator_maps_and_errors(segmentation_data):
    logits, labels = segmentation_data
    est = ConformalPixelSets(guarantee="pixel").fit_maps(logits[:6], labels[:6])
    acc = ConformalSetAccumulator(4).update(labels[6:], est.predict_set_maps(logits[6:]))
    assert len(acc.per_image_miscoverage()) == 6
    with pytest.raises(TypeError, match="boolean"):
        acc.update(labels[6:], est.predict_set_size_maps(logits[6:])[:, None].repeat(4, 1))
    with pytest.raises(ValueError, match="No labelled pixel"):
        ConformalSetAccumulator(3).coverage()


# ---------------------------------------------------------------- the store path
@pytest.fixture
def store(tmp_path, segmentation_data):
    from sksegcal.store import LogitStore

    logits, labels = segmentation_data
    s = LogitStore.create(tmp_path / "store", n_classes=4)
    for i in range(len(logits)):
        s.add_image(i, logits[i], labels[i])
    return s, logits, labels


def _stored(logits):  # what the store reads back: float16 logits
    return logits.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConformalPixelSets(alpha=0.2),
        lambda: ConformalPixelSets(guarantee="pixel", alpha=0.2),
        lambda: ConformalPixelSets(guarantee="pixel", alpha=0.2, conformity_score="aps"),
        lambda: ConformalRiskControl(alpha=0.2),
        lambda: ConformalRiskControl(alpha=0.2, loss="fnr", target_class=1),
    ],
)
def test_store_fit_equals_in_memory_fit_for_any_jobs(store, make):
    s, logits, labels = store
    ids = np.arange(8)
    ref = make().fit_maps(_stored(logits[ids]), labels[ids])
    for n_jobs, task_pixels in ((1, 10**9), (2, 300)):
        est = fit_conformal_store(
            make(),
            s,
            images=ids,
            n_jobs=n_jobs,
            backend="threading",
            chunk_pixels=100,
            task_pixels=task_pixels,
        )
        assert est.threshold_level_ == ref.threshold_level_
        assert est.n_calibration_ == ref.n_calibration_
    accs = evaluate_conformal_store({"e": est}, s, images=np.arange(8, 12))
    direct = ConformalSetAccumulator(4).update(
        labels[8:], est.predict_set_maps(_stored(logits[8:])), image_id=np.arange(8, 12)
    )
    assert accs["e"].summary() == pytest.approx(direct.summary())


def test_store_path_refuses_mismatched_inputs(store):
    s, _, _ = store
    with pytest.raises(ValueError, match="input_type"):
        fit_conformal_store(
            ConformalPixelSets(guarantee="pixel", input_type="probabilities"), s, images=None
        )
    with pytest.raises(TypeError, match="ConformalPixelSets"):
        fit_conformal_store(TemperatureScaling(), s, images=None)


# ------------------------------------------------------------------ the CLI
def test_cli_conformal_end_to_end(store, tmp_path, capsys):
    import json

    from sksegcal.cli import main
    from sksegcal.persistence import save
    from sksegcal.store import fit_store

    s, _, _ = store
    ts = fit_store(TemperatureScaling(), s, images=np.arange(4), max_pixels=2000, random_state=0)
    save(ts, tmp_path / "ts.skops", format="skops")
    save(ts, tmp_path / "ts.joblib")
    out = tmp_path / "out"
    argv = [
        "conformal",
        str(s.path),
        "-c",
        str(tmp_path / "ts.skops"),
        "--images",
        "all",
        "--fnr-class",
        "1",
        "--margin-class",
        "1",
        "--guarantee",
        "image",
        "pixel",
        "--alpha",
        "0.2",
        "-o",
        str(out),
        "-q",
    ]
    # 6 images cannot support margins at alpha/2 = 0.1 on each side: the user is told
    with pytest.warns(UserWarning, match="at least 9 images are needed"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "pixel sets" in printed and "CRC FNR class 1" in printed
    assert "pixel sets (pixel)" in printed and "margins class 1" in printed
    result = json.loads((out / "conformal.json").read_text())
    rows = result["results"]
    assert {r["method"] for r in rows} == {"uncalibrated", "ts"}
    assert len(result["meta"]["calibration_images"]) == 6
    assert all(0 <= r["coverage"] <= 1 and r["mean_set_size"] >= 0 for r in rows)
    assert (out / "conformal.md").is_file() and (out / "set_sizes.png").is_file()
    margins = result["margins"]
    assert [m["method"] for m in margins] == ["uncalibrated", "ts"]
    assert all(m["n_calibration"] == 6 and 0 <= m["outer_covers"] <= 1 for m in margins)
    # the untrusted pickle is refused; a class outside the store is a one-line error
    assert main(argv[:3] + [str(tmp_path / "ts.joblib")] + argv[4:]) == 1
    assert "--trusted" in capsys.readouterr().err
    assert main([*argv[:6], "--fnr-class", "9", "-o", str(out)]) == 1
    assert "--fnr-class 9" in capsys.readouterr().err
    assert main([*argv[:6], "--margin-class", "9", "-o", str(out)]) == 1
    assert "--margin-class 9" in capsys.readouterr().err


# ------------------------------------------------------------- plotting
def test_set_size_heat_map():
    pytest.importorskip("matplotlib")
    from sksegcal.plotting import plot_set_size_maps

    fig = plot_set_size_maps(
        {"a": np.ones((3, 5, 5), int), "b": np.zeros((3, 5, 5), int)}, titles=["x", "y", "z"]
    )
    assert len(fig.axes) == 7
    with pytest.raises(ValueError, match="same"):
        plot_set_size_maps({"a": np.ones((3, 5, 5)), "b": np.ones((2, 5, 5))})


# ------------------------------------------------------ scikit-learn's checks
# ConformalRiskControl and ConformalPixelSets' default guarantee="image" are not run through
# them (guarantee="pixel" is): their fit requires groups (the image of every
# pixel; images are its exchangeable units), which the generic checks never pass. What they
# guard is tested above on image data (fit returns self, refit, merge, errors).
_LOGITS = "labels are not indices of X's columns (e.g. 3 classes, 2 columns), which we reject"


@parametrize_with_checks(
    [
        ConformalPixelSets(guarantee="pixel"),
        ConformalPixelSets(
            guarantee="pixel", conformity_score="aps", randomized=True, random_state=0
        ),
    ],
    expected_failed_checks=lambda est: {
        "check_estimators_overwrite_params": _LOGITS,
        "check_estimators_fit_returns_self": _LOGITS,
        "check_readonly_memmap_input": _LOGITS,
    },
)
def test_sklearn_compatible(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # infinite thresholds on tiny data
        check(estimator)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConformalPixelSets(guarantee="pixel"),
        lambda: ConformalPixelSets(
            guarantee="pixel", conformity_score="aps", randomized=True, random_state=0
        ),
        lambda: ConformalRiskControl(loss="fnr", target_class=1),
    ],
)
def test_what_the_xfailed_checks_guard_on_logit_data(make, tmp_path):
    # fit returns self, leaves its parameters alone, and reads a read-only memmap
    import pickle

    X, y, g = _images()
    path = tmp_path / "X.npy"
    np.save(path, X)
    Xm = np.load(path, mmap_mode="r")
    est = make()
    before = pickle.dumps(est.get_params())
    args = (Xm, y, g) if isinstance(est, ConformalRiskControl) else (Xm, y)
    assert est.fit(*args) is est
    assert pickle.dumps(est.get_params()) == before
    again = make().fit(*[np.asarray(a) for a in args])
    assert again.threshold_level_ == est.threshold_level_


def test_randomized_aps_coverage_over_random_splits():
    # the estimator end to end (fit, then predict_set) on exchangeable pixels
    X, y = _logits(n=1500, c=4, scale=1.5, seed=7)
    alpha, n_cal, cover = 0.1, 300, []
    rng = np.random.default_rng(1)
    for seed in range(32):
        perm = rng.permutation(len(y))
        cal, test = perm[:n_cal], perm[n_cal:]
        est = ConformalPixelSets(
            alpha=alpha,
            guarantee="pixel",
            conformity_score="aps",
            randomized=True,
            random_state=seed,
        ).fit(X[cal], y[cal])
        cover.append(est.predict_set(X[test])[np.arange(len(test)), y[test]].mean())
    mean, se = np.mean(cover), np.std(cover) / np.sqrt(len(cover))
    assert 1 - alpha - 3 * se <= mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se
