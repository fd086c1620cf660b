"""The pipeline's typed top-level parameters (steps and sizes a user must think about) and the check of every
stage's options, shared by the `validate-config` step, `rlhf submit` and `rlhf run`'s arguments.

Each typed parameter sets one key of one stage's options: `sft_max_steps` is `sft_config["max_steps"]`. **The
typed parameter wins** over the same key in its `<section>_config` blob, except at its *unset* value `0`, which
only a field whose stage default is "none" has (`max_steps`: no cap, the epochs decide); there the blob's key, else
the stage's default, applies. The Kubeflow run form needs a real value in every field, hence 0 and not empty.

Stage options are checked by building each stage's real config class (rlhf_pipeline/stages.py) with placeholder
paths for what the pipeline wires (data, output, models): a bad key or value is one line naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.errors import UserError

ALIGNMENTS = ("ppo", "dpo", "both")
# The default of the `mlflow_tracking_uri` parameter: the steps' own $MLFLOW_TRACKING_URI (compile settings `env`).
FROM_ENVIRONMENT = "$MLFLOW_TRACKING_URI"
# The pipeline's stage sections, each with a `<section>_config` blob parameter (the judge: a reward stage).
SECTIONS = ("prepare_data", "sft", "reward", "judge", "ppo", "dpo", "evaluate")
# What the pipeline wires into a stage config at run time; unknown to the user's options, so placeholders here.
PLACEHOLDERS = {
    "data": "/placeholder/data",
    "output": "/placeholder/out",
    "input": "/placeholder/Posts.xml",
    "model": "placeholder-model",
    "reward_model": "/placeholder/reward",
    "sft_model": "/placeholder/sft/merged",
    "policy": ["ppo=/placeholder/ppo"],
}


@dataclass(frozen=True)
class TypedParameter:
    name: str  # the pipeline parameter
    section: str  # the stage section whose options it sets
    key: str  # the option
    default: int  # the pipeline's default: the stage config's, or UNSET where the stage's default is none
    unset_means: str = ""  # what UNSET stands for (only for options whose stage default is none)

    @property
    def blob(self) -> str:
        return f"{self.section}_config"


UNSET = 0
# Defaults are the stage configs' own (tests/pipeline/test_stage_parameters.py checks each against its class), so
# compiling never imports the config classes (and torch).
TYPED_PARAMETERS: tuple[TypedParameter, ...] = (
    TypedParameter("sft_max_steps", "sft", "max_steps", UNSET, "no cap: num_epochs decide"),
    TypedParameter("sft_seq_length", "sft", "seq_length", 512),
    TypedParameter("reward_max_steps", "reward", "max_steps", UNSET, "no cap: num_epochs decide"),
    TypedParameter("judge_max_steps", "judge", "max_steps", UNSET, "no cap: num_epochs decide"),
    TypedParameter("ppo_steps", "ppo", "steps", 20),
    TypedParameter("ppo_batch_size", "ppo", "batch_size", 8),
    TypedParameter("dpo_max_steps", "dpo", "max_steps", UNSET, "no cap: num_epochs decide"),
    TypedParameter("evaluate_max_questions", "evaluate", "max_questions", 32),
)
TYPED = {p.name: p for p in TYPED_PARAMETERS}


def merge_typed(blobs: dict[str, dict[str, Any]], typed: dict[str, int]) -> dict[str, dict[str, Any]]:
    """section -> options: each `blobs[section]` with the typed parameters laid over it (the typed one wins, except
    at UNSET where the stage default is none)."""
    out = {section: dict(blobs.get(section) or {}) for section in SECTIONS}
    for name, value in typed.items():
        param = TYPED.get(name)
        if param is None:
            raise UserError(f"{name}: not a typed pipeline parameter (known: {', '.join(TYPED)})")
        if param.unset_means and value == UNSET:
            continue
        out[param.section][param.key] = value
    return out


def split_typed(arguments: dict[str, Any]) -> dict[str, Any]:
    """Pipeline arguments with the typed keys moved out of their blobs into typed parameters (what `rlhf run`
    passes: its recipe sections are blobs, and a typed parameter left at its default would override them)."""
    out = dict(arguments)
    for param in TYPED_PARAMETERS:
        blob = dict(out.get(param.blob) or {})
        if param.key in blob:
            out[param.name] = blob.pop(param.key)
            out[param.blob] = blob
    return out


def check_stage_options(
    options: dict[str, dict[str, Any]], sections: tuple[str, ...] = SECTIONS, typed: dict[str, int] | None = None
) -> None:
    """Build every section's real stage config from its options (placeholders for the wired paths); one line
    naming the parameter (`sft_config.max_seq_length`, or the typed `ppo_steps` a value came from)."""
    from pydantic import ValidationError

    from rlhf_pipeline.orchestration import steps
    from rlhf_pipeline.stages import get

    origin = {(TYPED[n].section, TYPED[n].key): n for n in typed or {} if n in TYPED}
    for section in sections:
        where = f"{section}_config"
        if not isinstance(options.get(section, {}), dict):
            raise UserError(f"{where}: expected a JSON object, got {options[section]!r}")
        values = dict(options.get(section) or {})
        nulls = sorted(k for k, v in values.items() if v is None)
        if nulls:
            raise UserError(f"{where}: null values are not supported ({', '.join(nulls)}); leave the key out")
        config_cls = steps.stage_config_class(section)
        unknown = sorted(set(values) - set(config_cls.model_fields))
        if unknown:
            command = get(steps.STEP_STAGES.get(section, section)).command
            raise UserError(
                f"{where}: unknown option {', '.join(unknown)} (see `rlhf {command} --help`, underscores for dashes)"
            )
        try:
            config_cls.model_validate(steps.stage_values(config_cls, values, **PLACEHOLDERS))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else ""
            name = origin.get((section, key)) or (f"{where}.{key}" if key else where)
            shown = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            raise UserError(f"{name}: {err['msg'].removeprefix('Value error, ')}{shown}") from None


def validated_options(arguments: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """section -> the options its step gets, from the run's arguments (`<section>_config` blobs and typed
    parameters; absent ones at their defaults), every stage config checked."""
    alignment = arguments.get("alignment", "ppo")
    if alignment not in ALIGNMENTS:
        raise UserError(f"alignment must be one of {', '.join(ALIGNMENTS)}, got {alignment!r}")
    blobs = {section: arguments.get(f"{section}_config") or {} for section in SECTIONS}
    typed = {p.name: arguments.get(p.name, p.default) for p in TYPED_PARAMETERS}
    for name, value in typed.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name}: expected an integer, got {value!r}")
    options = merge_typed(blobs, typed)
    check_stage_options(options, typed=typed)
    return options
