"""Helpers for the pipeline tests: compile with the real KFP compiler and walk the compiled spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml


def compile_spec(tmp_path: Path, settings_yaml: str | None = None, trainjob: bool = False) -> tuple[dict, dict, str]:
    """(pipeline spec, kubernetes platform spec, raw text) of a fresh compile."""
    from rlhf_pipeline.orchestration.compile import compile_to

    settings_path = None
    if settings_yaml is not None:
        settings_path = tmp_path / "k8s.yaml"
        settings_path.write_text(settings_yaml)
    out = compile_to(tmp_path / "pipeline.yaml", str(settings_path) if settings_path else None, trainjob)
    text = out.read_text()
    docs = list(yaml.safe_load_all(text))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform, text


def all_tasks(spec: dict) -> dict[str, tuple[dict, dict]]:
    """Every leaf task, by task name: (task spec, its component spec), conditions included."""
    out: dict[str, tuple[dict, dict]] = {}

    def walk(component: dict[str, Any]) -> None:
        for name, task in (component.get("dag") or {}).get("tasks", {}).items():
            comp = spec["components"][task["componentRef"]["name"]]
            if "dag" in comp:
                walk(comp)
            else:
                out[name] = (task, comp)

    walk(spec["root"])
    return out


def executor_of(spec: dict, task_name: str) -> tuple[str, dict]:
    _, comp = all_tasks(spec)[task_name]
    label = comp["executorLabel"]
    return label, spec["deploymentSpec"]["executors"][label]


@pytest.fixture(autouse=True)
def _repo_images(monkeypatch):
    # Compile against the committed images/images.yaml, whatever the shell has set.
    monkeypatch.delenv("RLHF_IMAGES_FILE", raising=False)
