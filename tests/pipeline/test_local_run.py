"""`rlhf run` configuration (fast: nothing is trained here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration import run_config

RLHF = str(Path(sys.executable).parent / "rlhf")


def test_the_default_recipe_is_the_defaults():
    recipe = yaml.safe_load(run_config.DEFAULT_RECIPE.read_text())
    cfg = run_config.load_config(None, {})
    for section in run_config.STAGE_SECTIONS:
        assert {k: v for k, v in getattr(cfg, section).items() if k not in ("precision", "mixed_precision")} == {
            k: v for k, v in recipe[section].items() if k not in ("precision", "mixed_precision")
        }, section
    assert cfg.alignment == recipe["alignment"] == "ppo" and cfg.model == recipe["model"] == "smollm2-135m-instruct"


def test_precedence_defaults_recipe_flags_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("alignment: dpo\nsft: {max_steps: 7}\nreward: {batch_size: 8}\n")
    cfg = run_config.load_config(str(recipe), {"alignment": "ppo"}, ("sft.max_steps=9", "ppo.temperature=0.7"))
    assert cfg.alignment == "ppo"
    default_seq_length = yaml.safe_load(run_config.DEFAULT_RECIPE.read_text())["sft"]["seq_length"]
    assert cfg.sft["max_steps"] == 9 and cfg.sft["seq_length"] == default_seq_length
    assert cfg.reward["batch_size"] == 8 and cfg.ppo["temperature"] == 0.7


def test_bf16_falls_back_to_fp32_without_native_bf16(monkeypatch, capsys):
    from rlhf_pipeline.modeling import loading

    monkeypatch.setattr(loading, "native_bf16_available", lambda: True)
    cfg = run_config.load_config(None, {})
    assert (cfg.sft["precision"], cfg.ppo["mixed_precision"]) == ("bf16", "bf16")
    monkeypatch.setattr(loading, "native_bf16_available", lambda: False)
    cfg = run_config.load_config(None, {}, ("dpo.precision=bf16",))  # an explicit --set still wins
    for section in ("sft", "reward", "ppo"):
        assert (getattr(cfg, section)["precision"], getattr(cfg, section)["mixed_precision"]) == ("fp32", "no")
    assert cfg.dpo["precision"] == "bf16"
    assert cfg.evaluate["precision"] == "fp32" and "mixed_precision" not in cfg.evaluate
    run_config.validate_stage_options(cfg)  # every section still builds its stage's config
    assert (
        "no native bf16 on this machine: sft, reward, judge, ppo, dpo, evaluate run in fp32" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "sets, message",
    [
        (("sft.max_steps",), "SECTION.KEY=VALUE"),
        (("train.max_steps=3",), "section must be one of"),
    ],
)
def test_bad_set(sets, message):
    with pytest.raises(UserError, match=message):
        run_config.load_config(None, {}, sets)


def test_unknown_stage_option_fails_before_anything_runs(tmp_path):
    proc = subprocess.run(
        [RLHF, "run", "-o", str(tmp_path / "o"), "--set", "sft.max_stepz=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "max_stepz" in proc.stderr
    assert not (tmp_path / "o" / "kfp").exists()


def test_missing_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [RLHF, "run", "-o", str(tmp_path / "o"), "--input", str(tmp_path / "nope.xml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "input not found" in proc.stderr


def test_print_config(tmp_path):
    proc = subprocess.run(
        [RLHF, "run", "--print-config", "--alignment", "dpo", "--set", "dpo.beta=0.2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["alignment"] == "dpo" and cfg["dpo"]["beta"] == 0.2
