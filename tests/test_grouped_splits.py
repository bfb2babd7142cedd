"""Grouped splits: the images of one group (a patient, a slice, a video) stay in one part."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import extract_store, overconfident_maps, save_maps
from sksegcal.cli import main
from sksegcal.cli._groups import _groups_from_regex
from sksegcal.pixels import flatten_segmentation, split_images
from sksegcal.store import LogitStore


def _parts_of(split, ids, groups):
    """{group: set of part indices its images landed in}."""
    where = {}
    for k, part in enumerate(split):
        for image in part:
            where.setdefault(groups[np.flatnonzero(ids == image)[0]], set()).add(k)
    return where


@pytest.mark.parametrize("seed", range(5))
def test_no_group_is_split_across_parts(seed):
    rng = np.random.default_rng(seed)
    ids = np.arange(40)
    groups = rng.integers(0, 9, size=40)  # uneven group sizes
    split = split_images(ids, groups=groups, random_state=seed)
    assert all(len(parts) == 1 for parts in _parts_of(split, ids, groups).values())
    # every image is in exactly one part
    np.testing.assert_array_equal(np.sort(np.concatenate(split)), ids)
    # the fractions count groups: 9 groups -> 2 validation, 2 test, 5 train (as split_images(9))
    counts = [len(np.unique(groups[np.isin(ids, part)])) for part in split]
    assert counts == [len(part) for part in split_images(len(np.unique(groups)))]


def test_pixel_level_ids_and_string_groups():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=(6, 4, 4))
    _, _, pixel_ids = flatten_segmentation(logits, labels)
    patient = np.array(["a", "a", "b", "b", "c", "c"])
    split = split_images(
        pixel_ids, groups=patient[pixel_ids], validation_size=0.34, test_size=0.34, random_state=0
    )
    assert sorted(map(tuple, split)) == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(ValueError, match="two groups"):
        split_images(np.array([0, 0, 1]), groups=np.array(["a", "b", "b"]))
    with pytest.raises(ValueError, match="one group label per image"):
        split_images(6, groups=patient[:5])


def test_store_make_split_keeps_groups_and_records_them(tmp_path):
    rng = np.random.default_rng(1)
    store = LogitStore.create(tmp_path / "s", n_classes=2)
    for i in range(12):
        store.add_image(
            f"p{i // 4}-s{i % 4}", rng.normal(size=(2, 3, 3)), rng.integers(0, 2, size=(3, 3))
        )
    groups = _groups_from_regex([str(n) for n in store.image_names], r"^(p\d+)-")
    split = store.make_split(validation_size=0.34, test_size=0.34, groups=groups, random_state=0)
    assert sorted(map(tuple, split)) == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11)]
    reopened = LogitStore.open(tmp_path / "s")
    for a, b in zip(reopened.split, split):
        np.testing.assert_array_equal(a, b)


def test_cli_fit_groups_from_a_csv(tmp_path, capsys):
    save_maps(tmp_path, *overconfident_maps(12, 3, 8, 8, scale=4.0, seed=2))
    store = extract_store(tmp_path)
    names = [str(x) for x in LogitStore.open(store).image_names]
    group_of = {name: f"g{k // 3}" for k, name in enumerate(names)}
    (tmp_path / "groups.csv").write_text(
        "image,patient\n" + "".join(f"{k},{v}\n" for k, v in group_of.items())
    )
    assert (
        main(
            [
                "fit",
                str(store),
                "--method",
                "temperature",
                "-o",
                str(tmp_path / "ts.skops"),
                "--groups",
                f"{tmp_path / 'groups.csv'}:patient",
                "-q",
            ]
        )
        == 0
    )
    split = LogitStore.open(store).split
    for part in split:
        # whole groups of three images only
        assert len({group_of[names[i]] for i in part}) * 3 == len(part)
    # a column that is not there: one line that names the columns
    assert (
        main(
            [
                "fit",
                str(store),
                "--method",
                "temperature",
                "--resplit",
                "-o",
                str(tmp_path / "ts2.skops"),
                "--groups",
                f"{tmp_path / 'groups.csv'}:site",
                "-q",
            ]
        )
        == 1
    )
    assert "no column 'site'" in capsys.readouterr().err
