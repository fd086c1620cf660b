"""The prompt template: how a question and an answer become one text (StackLLaMA's "Question: ... Answer: ...")."""

from __future__ import annotations

DEFAULT_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


def format_prompt(template: str, question: str) -> str:
    """The prompt part of the template (everything before {answer}), ready for generation."""
    return template[: template.rindex("{answer}")].replace("{question}", question)


def format_example(template: str, question: str, answer: str) -> str:
    """Prompt and answer joined by the template (SFT text, reward-model input)."""
    return format_prompt(template, question) + answer
