"""The config loader and the generated CLI: precedence, coercion, one-line errors."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from rlhf_pipeline.cli import main, stage_command
from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.errors import UserError


class DemoConfig(StageConfig):
    output: str = Field(..., description="Where to write.")
    lora_r: int = Field(16, gt=0, description="Rank.")
    packing: bool = Field(True, description="Pack.")
    sizes: list[int] = Field(default_factory=lambda: [1, 2], description="Sizes.")
    ratio: float | None = Field(None, description="A ratio.")


def test_precedence_defaults_then_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: from-yaml\nlora_r: 8\n")
    cfg = DemoConfig.load(recipe, {"lora_r": "4"})
    assert (cfg.output, cfg.lora_r, cfg.packing, cfg.sizes) == ("from-yaml", 4, True, [1, 2])


def test_invalid_value_names_the_flag():
    with pytest.raises(UserError) as err:
        DemoConfig.load(None, {"output": "x", "lora_r": "-1"})
    msg = str(err.value)
    assert "\n" not in msg and "--lora-r" in msg and "greater than 0" in msg and "-1" in msg


def test_invalid_recipe_value_names_field_and_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: x\nlora_r: many\n")
    with pytest.raises(UserError, match=r"lora_r \(from .*r\.yaml\)"):
        DemoConfig.load(recipe)


def test_unknown_recipe_key_and_bad_yaml(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("output: x\nlora_rank: 3\n")
    with pytest.raises(UserError, match="unknown option lora_rank"):
        DemoConfig.load(recipe)
    recipe.write_text("output: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        DemoConfig.load(recipe)
    with pytest.raises(UserError, match="recipe not found"):
        DemoConfig.load(tmp_path / "missing.yaml")


def test_config_hash_changes_with_values():
    a = DemoConfig.load(None, {"output": "x"})
    b = DemoConfig.load(None, {"output": "x", "lora_r": "8"})
    assert a.config_hash() == DemoConfig.load(None, {"output": "x"}).config_hash()
    assert a.config_hash() != b.config_hash()


def test_generated_command_parses_flags(capsys):
    seen = {}

    def run(cfg):
        seen["cfg"] = cfg
        return {"ok": True}

    cmd = stage_command("demo", DemoConfig, run, help="demo")
    rv = cmd.main(
        ["--output", "o", "--lora-r", "3", "--no-packing", "--sizes", "4,5,6", "--ratio", "0.5"], standalone_mode=False
    )
    assert rv == 0
    cfg = seen["cfg"]
    assert (cfg.lora_r, cfg.packing, cfg.sizes, cfg.ratio) == (3, False, [4, 5, 6], 0.5)
    assert '"ok": true' in capsys.readouterr().out


def test_cli_error_is_one_line_and_nonzero(capsys, monkeypatch):
    import rlhf_pipeline.cli as cli_mod

    cmd = stage_command("demo", DemoConfig, lambda cfg: None, help="demo")
    monkeypatch.setattr(cli_mod.LazyGroup, "get_command", lambda self, ctx, name: cmd)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--output", "o", "--lora-r", "zero"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("rlhf demo: error:") and "--lora-r" in err


def test_unknown_flag_is_one_line(capsys, monkeypatch):
    import rlhf_pipeline.cli as cli_mod

    cmd = stage_command("demo", DemoConfig, lambda cfg: None, help="demo")
    monkeypatch.setattr(cli_mod.LazyGroup, "get_command", lambda self, ctx, name: cmd)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--output", "o", "--lora-rank", "3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lora-rank" in err


def test_model_level_error_is_one_line():
    from pydantic import model_validator

    class Fractions(StageConfig):
        a: float = 0.5
        b: float = 0.5

        @model_validator(mode="after")
        def _sum(self):
            if self.a + self.b > 1:
                raise ValueError("a + b must be at most 1")
            return self

    with pytest.raises(UserError, match=r"^invalid options: a \+ b must be at most 1$"):
        Fractions.load(None, {"a": "0.9"})


class ChoicesConfig(StageConfig):
    data: str = Field(..., description="Input dir.")
    steps: int = Field(3, gt=0, description="Steps.")
    lr: float = Field(1e-4, description="Rate.")
    mode: Literal["fast", "exact"] = Field("fast", description="Mode.")
    widths: list[int] = Field(default_factory=lambda: [2, 4], description="Widths.")
    template: str = Field("Q: {q}\n\nA:", description="Template.")


def _help_line(help_text: str, flag: str) -> str:
    """The help entry of one flag, its wrapped lines joined."""
    entry, started = [], False
    for line in help_text.splitlines():
        if line.lstrip().startswith("--"):
            if started:
                break
            started = line.lstrip().startswith(flag + " ")
        if started:
            entry.append(" ".join(line.split()))
    return " ".join(entry)


def test_help_shows_required_numbers_and_choices():
    from click.testing import CliRunner

    cmd = stage_command("demo", ChoicesConfig, lambda cfg: None, help="demo")
    text = CliRunner().invoke(cmd, ["--help"], terminal_width=200).output
    assert "PydanticUndefined" not in text and "<function" not in text
    assert _help_line(text, "--data") == "--data TEXT Input dir. [required]"
    assert _help_line(text, "--steps") == "--steps INTEGER Steps. [default: 3]"
    assert _help_line(text, "--lr") == "--lr FLOAT Rate. [default: 0.0001]"
    assert _help_line(text, "--mode") == "--mode [fast|exact] Mode. [default: fast]"
    assert _help_line(text, "--widths") == "--widths A,B,... Widths. [default: 2,4]"
    assert _help_line(text, "--template") == r"--template TEXT Template. [default: 'Q: {q}\n\nA:']"


def test_typed_options_still_validated_by_the_config(capsys, monkeypatch):
    import rlhf_pipeline.cli as cli_mod

    seen = {}
    cmd = stage_command("demo", ChoicesConfig, lambda cfg: seen.setdefault("cfg", cfg), help="demo")
    monkeypatch.setattr(cli_mod.LazyGroup, "get_command", lambda self, ctx, name: cmd)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--data", "d", "--steps", "7", "--lr", "2e-5", "--mode", "exact", "--widths", "8,16"])
    assert exc.value.code == 0
    assert (seen["cfg"].steps, seen["cfg"].lr, seen["cfg"].mode, seen["cfg"].widths) == (7, 2e-5, "exact", [8, 16])
    bad = (["--mode", "slow"], ["--steps", "0"], ["--lr", "x"], ["--steps", "none"])
    for argv, flag in ((argv, argv[0]) for argv in bad):
        with pytest.raises(SystemExit) as exc:
            main(["demo", "--data", "d", *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.count("\n") == 0 and flag in err, err
    with pytest.raises(SystemExit) as exc:  # a required field missing: one line naming it
        main(["demo"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "--data" in err, err


def test_run_print_config_refuses_an_unknown_stage_option(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--print-config", "--set", "sft.max_seq_length=512"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.count("\n") == 0 and "sft.max_seq_length" in err, err
    with pytest.raises(SystemExit) as exc:
        main(["run", "--print-config", "--set", "sft.max_steps=3"])
    assert exc.value.code == 0 and "max_steps: 3" in capsys.readouterr().out
