"""The complete scripts of docs/torch.md and docs/transformers.md run as written (no network)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(page: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)
    assert len(blocks) == 1, f"docs/{page} must hold exactly one python script"
    return blocks[0]


@pytest.mark.parametrize(
    "page, needs, expected",
    [
        ("torch.md", None, r"test ECE: uncalibrated [0-9.]+, calibrated [0-9.]+"),
        (
            "transformers.md",
            "transformers",
            r"segformer: argmax equals the processor's map: True\n(.|\n)*"
            r"mask2former: argmax equals the processor's map: True",
        ),
    ],
)
def test_the_pages_script_runs(page, needs, expected, tmp_path):
    if needs:
        pytest.importorskip(needs)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # this checkout's sksegcal
        "HF_HUB_OFFLINE": "1",  # the scripts must not download anything
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _script(page)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(expected, proc.stdout), proc.stdout
