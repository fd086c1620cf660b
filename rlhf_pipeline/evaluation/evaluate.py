"""`rlhf evaluate`: the SFT model against the aligned policies (online PPO, offline DPO/IPO), judged by the reward model.

    rlhf evaluate --model runs/sft/merged --reward-model runs/reward --data runs/data --output runs/eval \\
        --policy ppo=runs/ppo --policy dpo=runs/dpo --max-questions 32

Every model answers the same held-out questions (`<data>/evaluation.parquet`) with the same generation settings
(greedy by default; or sampling with one seed, reset before each model). Per model:
  reward_mean      the reward model's score, normalized by its held-out mean/std (the PPO training scale)
  win_rate         share of questions where the policy's answer outscores the SFT answer (ties count 0.5)
  kl               KL(policy || SFT) along the policy's own answers: the exact per-position KL over the
                   vocabulary, summed over the answer, mean over answers (>= 0, valid for greedy answers;
                   0 for SFT itself). `kl_logratio` is the sampled form, sum of log pi(y_t) - log pi_SFT(y_t):
                   same expectation under sampling, but biased (possibly negative) for greedy answers
  response_length  answer tokens (up to and including EOS)
Writes `<output>/metrics.json`, `generations.jsonl` and `report.md`, logs `eval/<name>/...` to MLflow with a
side-by-side table, and tags each registered policy version with the gate values `rlhf promote` reads
(`eval/reward_mean`, `eval/win_rate`, `eval/kl`, and `rm/accuracy` from the reward model's metrics.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from rlhf_pipeline.data.subsets import read_questions
from rlhf_pipeline.evaluation.metrics import kl_to_reference, win_rate
from rlhf_pipeline.evaluation.models import ModelRef, resolve_policy, tag_model_version
from rlhf_pipeline.evaluation.report import report_markdown
from rlhf_pipeline.modeling.options import GenerationOptions, ModelOptions
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.tracking import TrackingOptions

SFT = "sft"


class EvaluateConfig(ModelOptions, TrackingOptions, GenerationOptions):
    data: str = Field(..., description="Directory written by `rlhf prepare-data` (reads evaluation.parquet).")
    output: str = Field(..., description="Where metrics.json, generations.jsonl and report.md go.")
    reward_model: str = Field(..., description="The reward stage's output dir (merged/, metrics.json).")
    sft_model: str | None = Field(None, description="The SFT model (the reference); overrides --model.")
    policy: list[str] = Field(
        default_factory=list,
        description="Aligned policies as NAME=DIR_OR_URI (a stage "
        "output dir, a merged model dir or models:/<name>/<version>); repeat the flag. "
        "A bare DIR_OR_URI is named 'policy'.",
    )
    ppo_model: str | None = Field(None, description="Shortcut for --policy ppo=...")
    dpo_model: str | None = Field(None, description="Shortcut for --policy dpo=...")
    policy_model_uri: str | None = Field(
        None, description="models:/<prefix>-policy/<N> of the (first) policy: gets the eval/* and rm/accuracy tags."
    )
    max_questions: int = Field(32, gt=0, description="Evaluate on at most this many questions.")
    do_sample: bool = Field(
        False, description="Sample (seeded, same for every model; --temperature/--top-p/--top-k) instead of greedy."
    )
    batch_size: int = Field(8, gt=0, description="Questions per generation batch.")
    samples_in_report: int = Field(3, ge=0, description="Sample generations shown in report.md.")

    @field_validator("policy", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("policy")
    @classmethod
    def _named(cls, value: list[str]) -> list[str]:
        for spec in value:
            name, sep, target = spec.partition("=")
            if sep and (not name.strip() or not target.strip()) or not spec.strip():
                raise ValueError(f"expected NAME=DIR_OR_URI, got {spec!r}")
            if name.strip() == SFT:
                raise ValueError("'sft' is the reference model's name; pick another policy name")
        return value

    def policies(self) -> dict[str, str]:
        specs: dict[str, str] = {}
        for spec in self.policy:
            name, sep, target = spec.partition("=")
            if not sep or spec.startswith("models:/"):  # a bare dir or URI
                name, target = "policy" if "policy" not in specs else f"policy{len(specs) + 1}", spec
            specs[name.strip()] = target.strip()
        for name, value in (("ppo", self.ppo_model), ("dpo", self.dpo_model)):
            if value:
                specs.setdefault(name, value)
        return specs


def generate_answers(model, tokenizer, prompt_ids: list[list[int]], cfg: EvaluateConfig):
    """(response texts, response lengths, rollouts) with the same settings and seed for every model."""
    import torch

    from rlhf_pipeline.modeling.generation import decode_responses, eos_token_ids, sample_responses

    torch.manual_seed(cfg.seed)  # same sampling noise for every model
    texts, lengths, rollouts = [], [], []
    for i in range(0, len(prompt_ids), cfg.batch_size):
        rollout = sample_responses(
            model,
            prompt_ids[i : i + cfg.batch_size],
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            backend=cfg.generation_backend,
        )
        texts.extend(decode_responses(tokenizer, rollout))
        lengths.extend(rollout.response_lengths().tolist())
        rollouts.append(rollout)
    return texts, lengths, rollouts


def run_evaluate(cfg: EvaluateConfig) -> StageResult:
    import tempfile

    from rlhf_pipeline.batching.tokenize import encode_prompts
    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
    from rlhf_pipeline.ppo.rewards import RewardModelScorer, read_reward_model_dir
    from rlhf_pipeline.tracking import check_policy_versions, stage_run

    specs = cfg.policies()
    rm_info = read_reward_model_dir(cfg.reward_model)  # fail fast on bad paths, before any model loads
    questions = read_questions(cfg.data, "evaluation", cfg.max_questions, cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)

    with (
        stage_run(cfg, "evaluate", data_dir=cfg.data, base_model=cfg.sft_model or cfg.model) as run,
        tempfile.TemporaryDirectory(prefix="rlhf-eval-") as tmp,
    ):
        check_policy_versions(specs, cfg.policy_model_uri)  # before any generation: tag only the producing run's
        refs = [resolve_policy(name, spec, Path(tmp)) for name, spec in specs.items()]
        if cfg.policy_model_uri and refs:
            refs[0].registered_uri = cfg.policy_model_uri
        tokenizer = load_tokenizer(
            cfg.sft_model or cfg.model, padding_side="left", trust_remote_code=cfg.trust_remote_code
        )
        prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, questions, cfg.max_prompt_length)
        load = lambda path: load_causal_lm(
            path,
            precision=cfg.precision,
            quantization=cfg.quantization,  # noqa: E731
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        ).eval()
        sft_path = cfg.sft_model or cfg.model
        reference = load(sft_path)
        scorer = RewardModelScorer.load(
            cfg.reward_model,
            template=cfg.prompt_template,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            max_length=cfg.max_reward_length,
        )

        results: dict[str, dict[str, Any]] = {}
        for ref in [ModelRef(SFT, sft_path, None), *refs]:
            model = reference if ref.name == SFT else load(ref.path)
            texts, lengths, rollouts = generate_answers(model, tokenizer, prompt_ids, cfg)
            scores = scorer(questions, texts).tolist()
            if ref.name == SFT:
                kls, log_ratios = [0.0] * len(texts), [0.0] * len(texts)
            else:
                kls, log_ratios = kl_to_reference(model, reference, rollouts)
            results[ref.name] = {
                "responses": texts,
                "scores": scores,
                "lengths": lengths,
                "kls": kls,
                "log_ratios": log_ratios,
                "ref": ref,
            }
            if model is not reference:
                del model

        sft_scores = results[SFT]["scores"]
        summary_models: dict[str, dict[str, float]] = {}
        for name, r in results.items():
            n = len(r["scores"])
            summary_models[name] = {
                "reward_mean": sum(r["scores"]) / n,
                "win_rate": win_rate(r["scores"], sft_scores),
                "kl": sum(r["kls"]) / n,
                "kl_logratio": sum(r["log_ratios"]) / n,
                "response_length": sum(r["lengths"]) / n,
            }
        flat = {f"eval/{name}/{k}": v for name, m in summary_models.items() for k, v in m.items()}
        run.log_metrics(flat)
        table: dict[str, list] = {"question": questions}
        for name, r in results.items():
            table[f"{name}_response"] = r["responses"]
            table[f"{name}_reward"] = r["scores"]
        run.log_table(table, artifact_file="eval/side_by_side.json")

        rm_accuracy = rm_info.metrics.get("accuracy")
        tagged = []
        for name, r in results.items():
            uri = r["ref"].registered_uri
            if name != SFT and uri:
                tags = {
                    "eval/reward_mean": summary_models[name]["reward_mean"],
                    "eval/win_rate": summary_models[name]["win_rate"],
                    "eval/kl": summary_models[name]["kl"],
                }
                if rm_accuracy is not None:
                    tags["rm/accuracy"] = rm_accuracy
                tag_model_version(uri, tags)
                tagged.append(uri)

        with open(out / "generations.jsonl", "w", encoding="utf-8") as fh:
            for i, question in enumerate(questions):
                for name, r in results.items():
                    fh.write(
                        json.dumps(
                            {
                                "question": question,
                                "model": name,
                                "response": r["responses"][i],
                                "reward": r["scores"][i],
                                "length": r["lengths"][i],
                                "kl": r["kls"][i],
                            }
                        )
                        + "\n"
                    )
        (out / "report.md").write_text(report_markdown(summary_models, questions, results, cfg, rm_accuracy))
        summary = {
            "num_questions": len(questions),
            "models": summary_models,
            "rm/accuracy": rm_accuracy,
            "tagged_versions": tagged,
            **flat,
        }
        if refs:  # the gate values of the first (primary) policy, as the flat names `rlhf promote` uses
            primary = summary_models[refs[0].name]
            summary.update(
                {
                    "policy": refs[0].name,
                    "eval/reward_mean": primary["reward_mean"],
                    "eval/win_rate": primary["win_rate"],
                    "eval/kl": primary["kl"],
                }
            )
            run.log_metrics({k: summary[k] for k in ("eval/reward_mean", "eval/win_rate", "eval/kl")})
        outcome = StageResult.of("evaluate", "evaluated", out, summary)
        outcome.write()
        return outcome
