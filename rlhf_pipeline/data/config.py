"""Configuration of `rlhf prepare-data` (flat fields: each one is a `--flag`)."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from rlhf_pipeline.config import StageConfig

# The four StackLLaMA subsets, in the order their fractions are laid out on [0, 1).
SUBSETS: tuple[str, ...] = ("finetune", "reward", "rl", "evaluation")
# Plus the judge's (an independent reward model for the evaluation; empty by default), laid out last so that
# holding it out moves no question of the four others.
JUDGE = "judge"
ALL_SUBSETS: tuple[str, ...] = (*SUBSETS, JUDGE)


class PrepareDataConfig(StageConfig):
    input: str = Field(
        description="Posts.xml, a site archive (*.7z), a HuggingFaceH4/stack-exchange-preferences file "
        "(.parquet or .jsonl), or a directory holding several of these."
    )
    output: str = Field(description="Output directory: <subset>.parquet for each subset, and stats.json.")
    site: str | None = Field(
        default=None,
        description="Site name for a single input file (default: the archive name, or the parent directory "
        "of Posts.xml / of the preference file). Not allowed with a directory input.",
    )
    seed: int = Field(default=0, description="Seed for the subset assignment and for choosing pairs.")
    max_pairs_per_question: int = Field(
        default=10, ge=1, description="At most this many preference pairs per question (StackLLaMA: 10)."
    )
    finetune_fraction: float = Field(default=0.3, ge=0, le=1, description="Share of questions for SFT.")
    reward_fraction: float = Field(default=0.3, ge=0, le=1, description="Share of questions for the reward model.")
    rl_fraction: float = Field(default=0.3, ge=0, le=1, description="Share of questions for PPO/DPO.")
    evaluation_fraction: float = Field(
        default=0.1, ge=0, le=1, description="Share of questions held out for evaluation."
    )
    judge_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of questions held out to train the judge (`rlhf reward --subset judge`), a reward model "
        "no policy trains against; take it from the others (the fractions add up to at most 1).",
    )
    finetune_max_questions: int | None = Field(default=None, ge=1, description="Cap on finetune questions.")
    reward_max_questions: int | None = Field(default=None, ge=1, description="Cap on reward questions.")
    rl_max_questions: int | None = Field(default=None, ge=1, description="Cap on rl questions.")
    evaluation_max_questions: int | None = Field(default=None, ge=1, description="Cap on evaluation questions.")
    judge_max_questions: int | None = Field(default=None, ge=1, description="Cap on judge questions.")
    finetune_max_pairs: int | None = Field(default=None, ge=1, description="Cap on finetune pairs (rows).")
    reward_max_pairs: int | None = Field(default=None, ge=1, description="Cap on reward pairs (rows).")
    rl_max_pairs: int | None = Field(default=None, ge=1, description="Cap on rl pairs (rows).")
    evaluation_max_pairs: int | None = Field(default=None, ge=1, description="Cap on evaluation pairs (rows).")
    judge_max_pairs: int | None = Field(default=None, ge=1, description="Cap on judge pairs (rows).")
    max_body_chars: int | None = Field(
        default=100_000,
        ge=1,
        description="Skip (and count) a question or answer whose HTML body is longer: Stack Exchange caps posts at "
        "30,000 characters, so only a damaged or hostile dump has longer ones, and converting and tokenizing them "
        "would cost minutes and gigabytes. None = no cap.",
    )
    row_group_size: int = Field(default=2000, ge=1, description="Rows per parquet row group (bounds writer memory).")
    tmp_dir: str | None = Field(
        default=None,
        description="Where to put the temporary SQLite grouping file (about the size of Posts.xml) and "
        "extracted archives (default: the system temp dir).",
    )

    @model_validator(mode="after")
    def _fractions_fit(self) -> Self:
        total = sum(self.fraction(s) for s in ALL_SUBSETS)
        if total <= 0 or total > 1 + 1e-9:
            raise ValueError(f"the subset fractions must add up to more than 0 and at most 1, got {total:g}")
        return self

    def fraction(self, subset: str) -> float:
        return getattr(self, f"{subset}_fraction")

    def max_questions(self, subset: str) -> int | None:
        return getattr(self, f"{subset}_max_questions")

    def max_pairs(self, subset: str) -> int | None:
        return getattr(self, f"{subset}_max_pairs")
