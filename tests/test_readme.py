"""The README's library example (the python block that uses NTXentLoss) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    blocks = [block for block in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "NTXentLoss" in block]
    assert blocks, "README has no library example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["loss"].item() > 0
    assert namespace["z"].shape == (2 * namespace["global_batch"], 128)


def test_readme_lists_every_run_parameter_with_its_default():
    """The Kubeflow section's parameter table is the pipeline's (pipelines/simclr_pipeline.py)."""
    import json

    from pipelines.simclr_pipeline import PARAMETERS

    rows = dict(re.findall(r"^\| `(\w+)`(?: \(†\))? \| (.*?) \|", README.read_text(), flags=re.M))
    for parameter in PARAMETERS:
        assert parameter.name in rows, f"README's parameter table lacks {parameter.name}"
        if parameter.name != "image":
            assert rows[parameter.name] == f"`{json.dumps(parameter.default)}`", parameter.name
