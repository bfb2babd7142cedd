"""docs/deployment.md's complete example runs as written."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_deployment_page_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    text = (ROOT / "docs" / "deployment.md").read_text()
    blocks = text.split("```python\n")[1:]
    assert len(blocks) == 1, "the page holds one complete example"
    code = blocks[0].split("```")[0]
    monkeypatch.chdir(tmp_path)  # the example writes its model files here
    exec(compile(code, "docs/deployment.md", "exec"), {"__name__": "docs_example"})
    assert (tmp_path / "calibrator.onnx").is_file()
    assert (tmp_path / "calibrated_model.pt").is_file()
