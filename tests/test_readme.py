"""The README's demo table is what ``sksegcal demo`` prints, to the last printed digit.

The numbers are parsed from README.md and docs/demo.md (so that the text and the
pipeline cannot drift apart) and compared with a fresh run of the demo on the
networks shipped in the package, whose logits are the same on every machine.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_SUBSET = {"in-domain": "test", "shifted scanner": "shifted-test"}
_COLUMNS = ("ece", "nll", "brier", "accuracy")
_ROW = re.compile(
    r"^\|\s*(in-domain|shifted scanner)\s*\|\s*([a-z ]+?)\s*\|"
    r"\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*([0-9.]+)\s*\|\s*$"
)


def demo_table(path: Path) -> dict:
    """{(subset, method): {metric: printed text}} from the demo table of a Markdown file."""
    rows = {}
    for line in path.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            subset, method, *values = m.groups()
            rows[(_SUBSET[subset], method)] = dict(zip(_COLUMNS, values, strict=True))
    return rows


def test_the_table_parser_reads_a_row(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| shifted scanner | selective scaling | 0.0494 | 0.2821 | 0.1447 | 0.9066 |\n"
                    "| in-domain | x | 1 | 2 |\n")
    assert demo_table(page) == {("shifted-test", "selective scaling"): {
        "ece": "0.0494", "nll": "0.2821", "brier": "0.1447", "accuracy": "0.9066"}}


@pytest.fixture(scope="module")
def demo_metrics(tmp_path_factory):
    pytest.importorskip("nilearn")
    from sksegcal.cli import main

    out = tmp_path_factory.mktemp("demo") / "report"
    cache = tmp_path_factory.mktemp("cache")
    assert main(["demo", "-o", str(out), "--cache-dir", str(cache), "-q"]) == 0
    return json.loads((out / "metrics.json").read_text())["results"]


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/demo.md"])
def test_the_docs_show_what_the_demo_prints(page, demo_metrics):
    table = demo_table(ROOT / page)
    assert len(table) == 8, f"{page}: expected the 8-row demo table, found {sorted(table)}"
    wrong = {}
    for (subset, method), printed in table.items():
        for metric, text in printed.items():
            decimals = len(text.split(".")[1])
            got = f"{demo_metrics[subset][method][metric]:.{decimals}f}"
            if got != text:
                wrong[(subset, method, metric)] = (text, got)
    assert not wrong, f"{page} shows (text, demo prints): {wrong}"
