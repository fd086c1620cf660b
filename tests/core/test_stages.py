"""The stage registry is the one place a stage is declared: a toy stage registered here, with no other edit,
is an `rlhf` command with its config fields as flags, runs its function, and is a valid step name of the
pipeline settings (with the per-step defaults its flags imply)."""

from __future__ import annotations

import json

import pytest
from pydantic import Field

from rlhf_pipeline import stages
from rlhf_pipeline.cli import main
from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration.settings import PipelineSettings

CALLS: list[ToyConfig] = []


class ToyConfig(StageConfig):
    greeting: str = Field("hello", description="What the toy stage says.")
    repeat: int = Field(1, ge=1, description="How many times it says it.")


def run_toy(config: ToyConfig) -> dict:
    CALLS.append(config)
    return {"said": " ".join([config.greeting] * config.repeat)}


TOY = stages.Stage(
    "toy_stage",
    f"{__name__}:ToyConfig",
    f"{__name__}:run_toy",
    help="A toy stage that only talks.",
    display_name="Toy",
    namespace="toy",
    image="toy",
    gpu=True,
    trainjob=True,
)


@pytest.fixture()
def toy(monkeypatch):
    """The toy stage registered in a copy of the registry (the real one is back after the test)."""
    monkeypatch.setattr(stages, "STAGES", dict(stages.STAGES))
    CALLS.clear()
    return stages.register(TOY)


def rlhf(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


def test_toy_stage_is_listed_in_rlhf_help(toy, capsys):
    code, out, _ = rlhf(capsys, "--help")
    assert code == 0
    assert "toy-stage" in out and "A toy stage that only talks." in out


def test_toy_stage_help_lists_its_config_fields_as_flags(toy, capsys):
    code, out, _ = rlhf(capsys, "toy-stage", "--help")
    assert code == 0
    assert "--greeting" in out and "What the toy stage says." in out
    assert "--repeat" in out and "--config" in out


def test_running_the_toy_stage_calls_its_run_function(toy, capsys):
    code, out, _ = rlhf(capsys, "toy-stage", "--greeting", "hi", "--repeat", "2")
    assert code == 0
    assert [(c.greeting, c.repeat) for c in CALLS] == [("hi", 2)]
    assert json.loads(out) == {"said": "hi hi"}


def test_toy_stage_flag_errors_are_one_line(toy, capsys):
    code, _, err = rlhf(capsys, "toy-stage", "--repeat", "0")
    assert code != 0 and not CALLS
    assert len(err.strip().splitlines()) == 1 and "--repeat" in err


def test_pipeline_settings_accept_the_toy_step(toy):
    settings = PipelineSettings.load(
        None,
        {
            "gpu": {"steps": ["toy_stage"]},
            "retry": {"steps": ["toy_stage", "report"]},
            "caching": {"toy_stage": True},
            "secrets": {"hf": {"name": "hf-token", "keys": {"token": "HF_TOKEN"}, "steps": ["toy_stage"]}},
        },
    )
    assert settings.gpu.steps == ["toy_stage"] and settings.caching == {"toy_stage": True}
    # defaults follow the declaration: gpu=True -> GPU pool, trainjob=True -> retried, every step gets secrets
    defaults = PipelineSettings()
    assert "toy_stage" in defaults.gpu.steps and "toy_stage" in defaults.retry.steps
    assert all("toy_stage" in secret.steps for secret in defaults.secrets.values())


def test_toy_stage_can_run_as_a_trainjob(toy):
    from rlhf_pipeline.orchestration import trainjob as tj

    assert tj.launch_command("torchrun", "toy_stage", "/c.yaml", None) == [
        "torchrun",
        "--no-python",
        "rlhf",
        "toy-stage",
        "--config",
        "/c.yaml",
    ]


@pytest.mark.parametrize(
    "section",
    [
        {"gpu": {"steps": ["toy_stage"]}},
        {"retry": {"steps": ["toy_stage"]}},
        {"caching": {"toy_stage": True}},
        {"secrets": {"hf": {"name": "hf-token", "keys": {"token": "HF_TOKEN"}, "steps": ["toy_stage"]}}},
    ],
)
def test_an_unregistered_step_is_rejected(section):
    with pytest.raises(UserError, match="unknown steps"):
        PipelineSettings.load(None, section)
