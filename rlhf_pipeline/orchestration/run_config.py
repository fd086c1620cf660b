"""`rlhf run`'s configuration: LocalRunConfig and its sources, in increasing precedence: the default recipe
(recipes/smollm2/pipeline.yaml, the only source of the small default sizes) < `--config` < flags < `--set`.
Also the fp32 fallback where bf16 is emulated, and the check of every stage's options before anything runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO / "recipes" / "smollm2" / "pipeline.yaml"
STAGE_SECTIONS = ("prepare_data", "sft", "reward", "judge", "ppo", "dpo", "evaluate")


def shared_beer_posts() -> Path:
    shared = Path(os.environ.get("RLHF_SHARED_DIR") or REPO.parent / "shared")
    return shared / "data" / "stackexchange" / "beer.stackexchange.com" / "Posts.xml"


class LocalRunConfig(StageConfig):
    alignment: Literal["ppo", "dpo", "both"] = Field(
        "ppo",
        description="Alignment step after the reward model: ppo, dpo, or both (side by side in one evaluation).",
    )
    model: str = Field(EMBEDDED_MODEL, description="Base model: HF id, local dir, or the embedded SmolLM2.")
    input: str | None = Field(
        None, description="Stack Exchange dump; default: the beer sample in $RLHF_SHARED_DIR or ../shared."
    )
    runner: Literal["subprocess", "docker"] = Field(
        "subprocess",
        description="subprocess: each step a Python process; docker: each step in its own image "
        "(images/build.sh local), through podman.",
    )
    output: str = Field("outputs", description="Output directory (MLflow SQLite store, artifacts, report).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; default sqlite:///<output>/mlflow.db.")
    experiment_name: str = Field("rlhf-pipeline", description="MLflow experiment.")
    registered_model_prefix: str = Field("rlhf", description="Registered models: <prefix>-sft, -reward, -policy.")
    report_samples: int = Field(4, ge=0, description="Sample generations in the report.")
    num_threads: int | None = Field(None, gt=0, description="torch threads per step (default: all cores).")
    prepare_data: dict[str, Any] = Field(default_factory=dict, description="prepare-data options.")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFT options.")
    reward: dict[str, Any] = Field(default_factory=dict, description="Reward-model options.")
    judge: dict[str, Any] = Field(
        default_factory=dict, description="Judge options (a reward model on the judge subset; `rlhf reward`'s)."
    )
    ppo: dict[str, Any] = Field(default_factory=dict, description="PPO options.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="DPO options.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="Evaluation options.")

    def input_path(self) -> Path:
        return Path(self.input).expanduser() if self.input else shared_beer_posts()

    def alignments(self) -> list[str]:
        """The alignment stages this run trains."""
        return ["ppo", "dpo"] if self.alignment == "both" else [self.alignment]

    def tracking(self) -> str:
        return self.tracking_uri or f"sqlite:///{Path(self.output).resolve() / 'mlflow.db'}"


def load_config(recipe: str | None, overrides: dict[str, Any], sets: tuple[str, ...] = ()) -> LocalRunConfig:
    """The default recipe (recipes/smollm2/pipeline.yaml, the only source of the small sizes) < `recipe` < flags
    < --set section.key=value."""
    from rlhf_pipeline.config import read_recipe

    data: dict[str, Any] = read_recipe(DEFAULT_RECIPE)
    source = str(DEFAULT_RECIPE)
    if recipe is not None and Path(recipe).resolve() != DEFAULT_RECIPE.resolve():
        source = recipe
        for key, value in read_recipe(recipe).items():
            if key in STAGE_SECTIONS and isinstance(value, dict):
                data[key] = {**data.get(key, {}), **value}
            else:
                data[key] = value
    data.update({k: v for k, v in overrides.items() if v is not None})
    _without_native_bf16(data)
    for item in sets:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. sft.max_steps=10")
        path, raw = item.split("=", 1)
        section, key = path.split(".", 1)
        if section not in STAGE_SECTIONS:
            raise UserError(f"--set {item!r}: section must be one of {', '.join(STAGE_SECTIONS)}")
        data.setdefault(section, {})[key] = _set_value(raw)
    try:
        return LocalRunConfig.model_validate(data)
    except Exception as exc:  # pydantic ValidationError -> the shared one-line format
        from pydantic import ValidationError

        from rlhf_pipeline.config import format_validation_error

        if isinstance(exc, ValidationError):
            raise UserError(format_validation_error(exc, overrides, source)) from None
        raise


def _set_value(raw: str) -> Any:
    """A --set value as YAML reads it, except YAML 1.1's yes/no/on/off: `mixed_precision=no` means the string."""
    if not raw.strip():
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        return raw.strip()  # a bool field still reads "no"/"off" as False (pydantic)
    return value


def _without_native_bf16(data: dict[str, Any]) -> None:
    """bf16 weights/autocast are 1.5-2x faster than fp32 on CPUs with AVX512_BF16/AMX (and on GPUs) but several
    times SLOWER where bf16 is emulated: there the stages fall back to fp32 (said once, on stderr)."""
    from rlhf_pipeline.modeling.loading import native_bf16_available

    if native_bf16_available():
        return
    changed = []
    for section in STAGE_SECTIONS:
        values = data.get(section)
        if isinstance(values, dict) and (values.get("precision") == "bf16" or values.get("mixed_precision") == "bf16"):
            values["precision"] = "fp32"
            if "mixed_precision" in values:  # evaluate has no autocast option: nothing to turn off there
                values["mixed_precision"] = "no"
            changed.append(section)
    if changed:
        print(f"rlhf run: no native bf16 on this machine: {', '.join(changed)} run in fp32", file=sys.stderr)


def validate_stage_options(cfg: LocalRunConfig) -> None:
    """Build every stage's config from its section before anything runs, so a typo fails in a second, not after
    the first steps trained for minutes. Paths are placeholders; the pipeline wires the real ones."""
    from rlhf_pipeline.orchestration import steps

    placeholders = {
        "data": "/placeholder/data",
        "output": "/placeholder/out",
        "input": str(cfg.input_path()),
        "model": cfg.model,
        "reward_model": "/placeholder/reward",
    }
    needed = ["prepare_data", "sft", "reward", "judge", *cfg.alignments(), "evaluate"]
    for section in needed:
        values = dict(getattr(cfg, section))
        if None in values.values():
            nulls = [k for k, v in values.items() if v is None]
            raise UserError(f"{section}: null values are not supported ({', '.join(nulls)}); leave the key out")
        try:
            config_cls = steps.stage_config_class(section)
        except ModuleNotFoundError as exc:
            raise UserError(f"stage '{section}' is not available in this version ({exc.name})") from None
        unknown = sorted(set(values) - set(config_cls.model_fields))
        if unknown:
            raise UserError(
                f"unknown option {', '.join(f'{section}.{k}' for k in unknown)} "
                f"(see `rlhf {section.replace('_', '-')} --help`)"
            )
        try:
            steps.build_config(config_cls, values, **placeholders)
        except UserError as exc:
            raise UserError(f"{section}: {exc}") from None
    from rlhf_pipeline.training.preflight import check_model

    check_model(None, model=cfg.model)  # a missing or broken --model fails here, not inside the SFT step
