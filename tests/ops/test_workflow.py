"""The promotion workflow: secrets only via env, inputs never interpolated into scripts, serialized runs."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[2] / ".github" / "workflows" / "promote.yml"


def test_promote_workflow():
    wf = yaml.safe_load(WORKFLOW.read_text())
    on = wf[True]  # YAML 1.1 reads the key `on` as True
    assert {"model_name", "candidate", "gates"} <= set(on["workflow_dispatch"]["inputs"])
    assert wf["concurrency"]["cancel-in-progress"] is False
    steps = wf["jobs"]["promote"]["steps"]
    promote = next(s for s in steps if s.get("name") == "Promote")
    assert promote["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert promote["env"]["MLFLOW_TRACKING_PASSWORD"] == "${{ secrets.MLFLOW_TRACKING_PASSWORD }}"
    assert "rlhf promote" in promote["run"] and promote["shell"] == "bash"
    for step in steps:
        # ${{ }} inside `run:` is template injection; values must come in through env.
        assert not re.search(r"\$\{\{", step.get("run", "")), step.get("name")
