"""`--register-model` is offered by the stages that register a model version, and only by them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from rlhf_pipeline.cli import cli
from rlhf_pipeline.stages import STAGES


def _help(command: str) -> str:
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_register_flag_only_where_the_stage_registers(stage):
    entry = STAGES[stage]
    text = _help(entry.command)
    assert ("--register-model" in text) == bool(entry.registers), entry.command


def test_evaluate_does_not_offer_it_and_refuses_it_in_one_line():
    assert "--register-model" not in _help("evaluate") and "--no-register-model" not in _help("evaluate")
    result = CliRunner().invoke(cli, ["evaluate", "--register-model"])
    assert result.exit_code == 2 and "No such option '--register-model'" in result.output
