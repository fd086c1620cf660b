"""The stage registry: each stage of the pipeline declared ONCE.

Everything that needs to know the stages derives from `STAGES`: the `rlhf` subcommands (cli.py), the pipeline's
per-step settings and display names (orchestration/), the image each component runs in (components/, images/),
the metric namespace and the registered model name. Adding a stage (RLOO, GRPO, ...) = one `Stage(...)` entry
here, its config class, its run function, one component and one recipe (docs/DEVELOPING.md).

Config classes and run functions are named by import path and loaded on first use, so reading the registry
(`rlhf --help`, compiling the pipeline) never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.errors import UserError


@dataclass(frozen=True)
class Stage:
    key: str  # the step's name in the pipeline, settings and recipes (`sft`, `prepare_data`)
    config: str  # "module:Class", a StageConfig subclass (every field a flag)
    run: str  # "module:function", run(config) -> StageResult
    help: str  # one line: the CLI's command list
    display_name: str  # the Kubeflow UI's task name
    namespace: str  # metric prefix (`rm` -> rm/accuracy)
    image: str  # key in images/images.yaml
    gpu: bool = False  # runs on the GPU node pool when the settings give one
    trainjob: bool = False  # can run as a Kubeflow Trainer TrainJob (several processes / nodes)
    registers: str | None = None  # registered model suffix: <prefix>-<registers>

    @property
    def command(self) -> str:
        """The CLI subcommand (`prepare-data`)."""
        return self.key.replace("_", "-")

    def config_class(self) -> type:
        return _load(self.config)

    def run_function(self) -> Callable[[Any], Any]:
        return _load(self.run)


def _load(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage (or replace one of the same key); returns it."""
    STAGES[stage.key] = stage
    return stage


def get(key: str) -> Stage:
    """The stage named `key` (`prepare_data` or `prepare-data`); one-line error for an unknown one."""
    stage = STAGES.get(key.replace("-", "_"))
    if stage is None:
        raise UserError(f"unknown stage {key!r} (known: {', '.join(STAGES)})")
    return stage


def registered_name(prefix: str, key: str) -> str:
    """The registered model a stage's output becomes: `<prefix>-<Stage.registers>` (`rlhf-policy` for PPO and DPO),
    `<prefix>-<key>` for a stage the registry does not know."""
    stage = STAGES.get(key)
    return f"{prefix}-{stage.registers if stage is not None and stage.registers else key}"


def training_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.trainjob]


def gpu_stages() -> list[Stage]:
    return [s for s in STAGES.values() if s.gpu]


for _stage in (
    Stage(
        "prepare_data",
        "rlhf_pipeline.data.config:PrepareDataConfig",
        "rlhf_pipeline.data.prepare:run_prepare_data",
        help="Stack Exchange dump -> scored preference pairs.",
        display_name="Prepare data",
        namespace="data",
        image="prepare_data",
    ),
    Stage(
        "sft",
        "rlhf_pipeline.training.sft:SFTConfig",
        "rlhf_pipeline.training.sft:run_sft",
        help="Supervised fine-tuning with LoRA (step 1).",
        display_name="Supervised fine-tuning",
        namespace="sft",
        image="sft",
        gpu=True,
        trainjob=True,
        registers="sft",
    ),
    Stage(
        "reward",
        "rlhf_pipeline.training.reward:RewardConfig",
        "rlhf_pipeline.training.reward:run_reward",
        help="Train or evaluate a pairwise reward model (step 2).",
        display_name="Reward model (train + evaluate)",
        namespace="rm",
        image="reward",
        gpu=True,
        trainjob=True,
        registers="reward",
    ),
    Stage(
        "ppo",
        "rlhf_pipeline.ppo.config:PPOConfig",
        "rlhf_pipeline.ppo.trainer:run_ppo",
        help="PPO against the reward model with a KL penalty (step 3).",
        display_name="PPO",
        namespace="ppo",
        image="ppo",
        gpu=True,
        trainjob=True,
        registers="policy",
    ),
    Stage(
        "dpo",
        "rlhf_pipeline.training.dpo:DPOConfig",
        "rlhf_pipeline.training.dpo:run_dpo",
        help="DPO / IPO on preference pairs (offline step 3).",
        display_name="DPO",
        namespace="dpo",
        image="dpo",
        gpu=True,
        trainjob=True,
        registers="policy",
    ),
    Stage(
        "evaluate",
        "rlhf_pipeline.evaluation.evaluate:EvaluateConfig",
        "rlhf_pipeline.evaluation.evaluate:run_evaluate",
        help="Compare SFT and aligned policies.",
        display_name="Evaluate policy vs SFT",
        namespace="eval",
        image="evaluate",
        gpu=True,
    ),
):
    register(_stage)
