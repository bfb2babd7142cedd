"""``sksegcal fit --groups``: image groups that a split keeps together, from a CSV or a regex."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np

from ._common import CommandError

GROUPS_HELP = (
    "keep the images of one group in one part of the split (the slices of one patient, "
    "the frames of one video): 'regex:PATTERN' takes each image name's match of PATTERN "
    "(its first parenthesised group if it has one), 'FILE.csv:COLUMN' reads COLUMN of a CSV "
    "whose 'image' column names the store's images"
)


def store_groups(store, spec: str | None) -> np.ndarray | None:
    """One group label per image of ``store`` (in ``store.image_names`` order), or None."""
    if spec is None:
        return None
    names = [str(n) for n in store.image_names]
    if spec.startswith("regex:"):
        return _groups_from_regex(names, spec[len("regex:") :])
    path, sep, column = spec.rpartition(":")
    if not sep or not path:
        raise CommandError(f"--groups takes 'regex:PATTERN' or 'FILE.csv:COLUMN', got {spec!r}.")
    return _groups_from_csv(names, Path(path), column)


def _groups_from_regex(names: list[str], pattern: str) -> np.ndarray:
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise CommandError(
            f"--groups regex:{pattern} is not a regular expression: {exc}."
        ) from None
    labels = []
    for name in names:
        match = regex.search(name)
        if match is None:
            raise CommandError(
                f"--groups regex:{pattern} does not match the image {name!r}; "
                "every image needs a group."
            )
        labels.append(match.group(1) if regex.groups else match.group(0))
    return np.asarray(labels)


def _groups_from_csv(names: list[str], path: Path, column: str) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0]) if rows else []
    for needed in ("image", column):
        if needed not in fields:
            raise CommandError(
                f"{path} has no column {needed!r} (columns: {fields}); --groups "
                "FILE.csv:COLUMN needs an 'image' column and the group column."
            )
    group_of = {row["image"]: row[column] for row in rows}
    missing = [n for n in names if n not in group_of]
    if missing:
        raise CommandError(
            f"{path} gives no group for {len(missing)} images of the store, e.g. {missing[0]!r}."
        )
    return np.asarray([group_of[n] for n in names])
