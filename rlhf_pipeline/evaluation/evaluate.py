"""`rlhf evaluate`: the SFT model against the aligned policies (online PPO, offline DPO/IPO), scored by the proxy
reward model (the one PPO optimized) and by an independent judge (`--judge-model`, trained on questions no other
stage saw), on the KL frontier with a best-of-n baseline.

    rlhf evaluate --model runs/sft/merged --reward-model runs/reward --judge-model runs/judge --data runs/data \\
        --output runs/eval --policy ppo=runs/ppo --policy dpo=runs/dpo --do-sample --best-of-n 16

Every model answers the same held-out questions (`<data>/evaluation.parquet`) with the same generation settings
(greedy by default; or sampling with one seed, reset before each model; sample at the training temperature for the
KL to mean what PPO's penalty means). Per model (metrics.summarize): proxy reward and win-rate vs SFT; judge reward,
judge win-rate with its 95 % Wilson interval (ties half) and length-controlled; KL(policy || SFT) with its interval
(exact per-position KL summed over the answer; and the sampled log-ratio form `kl_seq`); answer length.
Policies named `<family>:<tag>` (e.g. `ppo:step-10`) are checkpoints: frontier points, never the challenger.
The challenger is the policy (no ':') with the highest judge win-rate vs SFT (proxy win-rate without a judge),
the lower KL on a tie. Writes `<output>/metrics.json`, `generations.jsonl`, `report.md` and `frontier.png`, logs
`eval/models/<column>` (step = model index, SFT 0) and `eval/best_of_n/<column>` (step = n) to MLflow, with a
side-by-side table, the frontier, the reward distributions and the comparison figure, and tags each
registered policy version with the gate values `rlhf promote` reads (`eval/reward_mean`, `eval/win_rate`,
`eval/kl`, `eval/judge_win_rate`, and `rm/accuracy` from the reward model's metrics.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from rlhf_pipeline.data.subsets import read_questions
from rlhf_pipeline.evaluation.best_of_n import best_of_n_curve
from rlhf_pipeline.evaluation.frontier import family, matched_kl, plot
from rlhf_pipeline.evaluation.metrics import kl_to_reference, summarize
from rlhf_pipeline.evaluation.models import (
    ModelRef,
    checkpoint_policy,
    kept_checkpoints,
    resolve_judge,
    resolve_policy,
    tag_model_version,
)
from rlhf_pipeline.evaluation.report import report_markdown
from rlhf_pipeline.modeling.mlflow_model import model_reference
from rlhf_pipeline.modeling.options import GenerationOptions, ModelOptions
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.tracking import TrackingOptions

SFT = "sft"


class EvaluateConfig(ModelOptions, TrackingOptions, GenerationOptions):
    data: str = Field(..., description="Directory written by `rlhf prepare-data` (reads evaluation.parquet).")
    output: str = Field(..., description="Where metrics.json, generations.jsonl and report.md go.")
    reward_model: str = Field(..., description="The reward stage's output dir (merged/, metrics.json): the proxy.")
    judge_model: str | None = Field(
        None,
        description="An independent judge reward model (`rlhf reward --subset judge` output dir, a model dir, or "
        "models:/<prefix>-judge/<N>): scores every answer next to the proxy reward model.",
    )
    best_of_n: int = Field(
        0,
        ge=0,
        description="Draw this many SFT answers per question (at --temperature) for the best-of-n baseline "
        "(n = 1, 2, 4, ... up to it, picked by the proxy reward model); 0: none.",
    )
    best_of_n_questions: int | None = Field(
        None, gt=0, description="Draw the best-of-n samples for the first this many questions only (its cost)."
    )
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
    checkpoints: bool = Field(
        False,
        description="Also evaluate the checkpoints each policy's stage dir kept (`keep_checkpoints`) as "
        "<name>:step-<N>: points on the KL frontier.",
    )
    max_questions: int = Field(32, gt=0, description="Evaluate on at most this many questions.")
    do_sample: bool = Field(
        False, description="Sample (seeded, same for every model; --temperature/--top-p/--top-k) instead of greedy."
    )
    batch_size: int = Field(8, gt=0, description="Questions per generation batch.")
    samples_in_report: int = Field(3, ge=0, description="Sample generations shown in report.md.")
    scoring_batch_size: int = Field(16, gt=0, description="Answers per reward-model (proxy, judge) forward.")

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


def generate_answers(
    model, tokenizer, prompt_ids: list[list[int]], cfg: EvaluateConfig, do_sample: bool | None = None, progress=None
):
    """Yields (first row, response texts, response lengths, rollout) per batch of `cfg.batch_size` prompts, with
    the same settings and seed for every model; `progress` (a tqdm bar) advances by one per batch."""
    import torch

    from rlhf_pipeline.modeling.generation import decode_responses, eos_token_ids, sample_responses

    torch.manual_seed(cfg.seed)  # same sampling noise for every model
    for i in range(0, len(prompt_ids), cfg.batch_size):
        rollout = sample_responses(
            model,
            prompt_ids[i : i + cfg.batch_size],
            max_new_tokens=cfg.max_new_tokens,
            eos_token_id=eos_token_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            do_sample=cfg.do_sample if do_sample is None else do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            backend=cfg.generation_backend,
        )
        yield i, decode_responses(tokenizer, rollout), rollout.response_lengths().tolist(), rollout
        if progress is not None:
            progress.update(1)


def choose_challenger(models: dict[str, dict[str, Any]]) -> str | None:
    """The policy (not SFT, not a checkpoint `<family>:<tag>`) with the highest judge win-rate vs SFT (the proxy
    win-rate without a judge); on a tie the one closer to SFT (lower KL)."""
    candidates = [name for name in models if name != SFT and ":" not in name]
    if not candidates:
        return None
    key = "judge_win_rate" if "judge_win_rate" in models[candidates[0]] else "win_rate"
    return max(candidates, key=lambda name: (models[name][key], -models[name]["kl"]))


def log_compared_metrics(run, models: dict[str, dict[str, Any]], best_of_n: list[dict[str, float]]) -> None:
    """MLflow metrics that compare: `eval/models/<column>` with step = the model's index (0 = SFT; the index ->
    name map is `eval/models.json`), so SFT and every policy are points of ONE chart per column; best-of-n as
    `eval/best_of_n/<column>` with step = n (a curve). metrics.json keeps the flat `eval/<model>/<column>` names."""
    run.log_dict({str(i): name for i, name in enumerate(models)}, "eval/models.json")
    for index, m in enumerate(models.values()):
        run.log_metrics({f"eval/models/{k}": v for k, v in m.items() if v is not None}, step=index)
    for r in best_of_n:
        run.log_metrics({f"eval/best_of_n/{k}": v for k, v in r.items() if k != "n"}, step=int(r["n"]))


def log_figures(models: dict[str, dict[str, Any]], results: dict[str, dict[str, Any]]) -> None:
    """The two figures of the stage's run: every model's reward distributions and the side-by-side bars."""
    import mlflow

    from rlhf_pipeline.evaluation.figures import comparison_figure, reward_distributions_figure

    scores = {name: {"proxy": r["scores"], "judge": r["judge"]} for name, r in results.items()}
    mlflow.log_figure(reward_distributions_figure(scores), "eval/reward_distributions.png")
    mlflow.log_figure(comparison_figure(models), "eval/comparison.png")


def run_evaluate(cfg: EvaluateConfig) -> StageResult:
    import tempfile

    from tqdm.auto import tqdm

    from rlhf_pipeline.batching.tokenize import encode_prompts
    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
    from rlhf_pipeline.ppo.rewards import RewardModelScorer, read_reward_model_dir
    from rlhf_pipeline.tracking import check_policy_versions, stage_run

    specs = cfg.policies()
    rm_info = read_reward_model_dir(cfg.reward_model)  # fail fast on bad paths, before any model loads
    if cfg.judge_model and not cfg.judge_model.startswith("models:/"):
        read_reward_model_dir(cfg.judge_model)
    questions = read_questions(cfg.data, "evaluation", cfg.max_questions, cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)

    with (
        stage_run(cfg, "evaluate", data_dir=cfg.data, base_model=model_reference(cfg.sft_model or cfg.model)) as run,
        tempfile.TemporaryDirectory(prefix="rlhf-eval-") as tmp,
    ):
        run.log_input(cfg.data, "evaluation", "evaluation")
        check_policy_versions(specs, cfg.policy_model_uri)  # before any generation: tag only the producing run's
        refs = [resolve_policy(name, spec, Path(tmp)) for name, spec in specs.items()]
        if cfg.policy_model_uri and refs:
            refs[0].registered_uri = cfg.policy_model_uri
        judge_dir = resolve_judge(cfg.judge_model, Path(tmp)) if cfg.judge_model else None
        sft_path = cfg.sft_model or cfg.model
        if cfg.checkpoints:
            for name, spec in specs.items():
                given = Path(spec).expanduser()
                stage = given if (given / "adapter").is_dir() else given.parent  # a stage dir or its merged/
                for step, ckpt in kept_checkpoints(stage):
                    at = f"{name}:step-{step}"
                    refs.append(checkpoint_policy(at, ckpt, stage, sft_path, Path(tmp) / at))
        tokenizer = load_tokenizer(
            cfg.sft_model or cfg.model, padding_side="left", trust_remote_code=cfg.trust_remote_code
        )
        prompt_ids = encode_prompts(tokenizer, cfg.prompt_template, questions, cfg.max_prompt_length)
        load = lambda path: load_causal_lm(  # noqa: E731
            path,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        ).eval()
        reference = load(sft_path)
        load_scorer = lambda path: RewardModelScorer.load(  # noqa: E731
            path,
            template=cfg.prompt_template,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            max_length=cfg.max_reward_length,
        )
        scorer = load_scorer(cfg.reward_model)
        judge = load_scorer(judge_dir) if judge_dir else None

        def score(scorer_, qs: list[str], texts: list[str]) -> list[float]:
            raw = scorer_.raw_scores(qs, texts, batch_size=cfg.scoring_batch_size)
            return scorer_.normalize(raw).tolist()

        results: dict[str, dict[str, Any]] = {}
        models = [ModelRef(SFT, sft_path, None), *refs]
        kl_temperature = cfg.temperature if cfg.do_sample else 1.0  # the distributions sampled answers come from
        k = cfg.best_of_n if cfg.best_of_n > 1 else 0
        m = min(cfg.best_of_n_questions or len(questions), len(questions)) if k else 0
        batches = -(-len(prompt_ids) // cfg.batch_size) * len(models) + -(-m * k // cfg.batch_size)
        # one bar over every generation batch (each: generate, KL against SFT, proxy + judge scores): the step's
        # progress line in `rlhf run` ("evaluate 12/40 · ETA ..."), the model in its postfix
        progress = tqdm(total=batches, desc="evaluate", unit="batch")
        for ref in models:
            progress.set_postfix_str(ref.name)
            model = reference if ref.name == SFT else load(ref.path)
            r = {key: [] for key in ("responses", "scores", "lengths", "kls", "log_ratios")}
            r["judge"] = [] if judge else None
            for first, texts, lengths, rollout in generate_answers(
                model, tokenizer, prompt_ids, cfg, progress=progress
            ):
                qs = questions[first : first + len(texts)]
                if ref.name == SFT:
                    kls, log_ratios = [0.0] * len(texts), [0.0] * len(texts)
                else:
                    kls, log_ratios = kl_to_reference(model, reference, [rollout], kl_temperature)
                r["responses"] += texts
                r["lengths"] += lengths
                r["kls"] += kls
                r["log_ratios"] += log_ratios
                r["scores"] += score(scorer, qs, texts)
                if judge:
                    r["judge"] += score(judge, qs, texts)
            results[ref.name] = {**r, "ref": ref}
            if model is not reference:
                del model

        best_of_n: list[dict[str, float]] = []
        if k:  # k SFT samples per question, drawn once; every n is read off them
            progress.set_postfix_str(f"best-of-{k}")
            repeated = [ids for ids in prompt_ids[:m] for _ in range(k)]
            qs = [q for q in questions[:m] for _ in range(k)]
            proxy, judged, lengths = [], [] if judge else None, []
            for first, texts, lens, _ in generate_answers(
                reference, tokenizer, repeated, cfg, do_sample=True, progress=progress
            ):
                batch_qs = qs[first : first + len(texts)]
                proxy += score(scorer, batch_qs, texts)
                if judge:
                    judged += score(judge, batch_qs, texts)
                lengths += lens
            per_q = lambda xs: [xs[i * k : (i + 1) * k] for i in range(m)]  # noqa: E731
            sft_judge = results[SFT]["judge"][:m] if judge else None
            best_of_n = best_of_n_curve(per_q(proxy), per_q(judged) if judged else None, per_q(lengths), sft_judge)
        progress.close()

        summary_models = {name: summarize(r, results[SFT]) for name, r in results.items()}
        challenger = choose_challenger(summary_models)
        # paired against SFT on the same questions: best-of-n may cover fewer questions than the policies
        y_keys = ("judge_reward_gain", "judge_win_rate") if judge else ("reward_mean", "win_rate")
        matched = {y: matched_kl(summary_models, y) for y in y_keys}
        plot(summary_models, best_of_n, out / "frontier.png", y_keys)
        import mlflow

        mlflow.log_artifact(str(out / "frontier.png"), "eval")  # the stage's run is the active one

        log_figures(summary_models, results)

        flat = {f"eval/{name}/{k}": v for name, m in summary_models.items() for k, v in m.items() if v is not None}
        flat.update({f"eval/best_of_n/{int(r['n'])}/{k}": v for r in best_of_n for k, v in r.items() if k != "n"})
        log_compared_metrics(run, summary_models, best_of_n)
        table: dict[str, list] = {"question": questions}
        for name, r in results.items():
            table[f"{name}_response"] = r["responses"]
            table[f"{name}_reward"] = r["scores"]
            if r["judge"] is not None:
                table[f"{name}_judge"] = r["judge"]
        run.log_table(table, artifact_file="eval/side_by_side.json")

        rm_accuracy = rm_info.metrics.get("accuracy")
        tagged = []
        for name, r in results.items():
            uri = r["ref"].registered_uri
            if name != SFT and uri:
                m = summary_models[name]
                tags = {f"eval/{k}": m[k] for k in ("reward_mean", "win_rate", "kl", "judge_win_rate") if k in m}
                if rm_accuracy is not None:
                    tags["rm/accuracy"] = rm_accuracy
                tag_model_version(uri, tags)
                tagged.append(uri)

        with open(out / "generations.jsonl", "w", encoding="utf-8") as fh:
            for i, question in enumerate(questions):
                for name, r in results.items():
                    row = {
                        "question": question,
                        "model": name,
                        "response": r["responses"][i],
                        "reward": r["scores"][i],
                        "judge": r["judge"][i] if r["judge"] is not None else None,
                        "length": r["lengths"][i],
                        "kl": r["kls"][i],
                    }
                    fh.write(json.dumps(row) + "\n")
        (out / "report.md").write_text(
            report_markdown(summary_models, questions, results, cfg, rm_accuracy, best_of_n, matched, challenger)
        )
        summary: dict[str, Any] = {
            "num_questions": len(questions),
            "models": summary_models,
            "best_of_n": best_of_n,
            "best_of_n_questions": min(cfg.best_of_n_questions or len(questions), len(questions)) if best_of_n else 0,
            "matched_kl": matched,
            "rm/accuracy": rm_accuracy,
            "judge_model": cfg.judge_model,
            "tagged_versions": tagged,
            "frontier_png": str(out / "frontier.png"),
            **flat,
        }
        if challenger is not None:  # the gate values of the challenger, as the flat names `rlhf promote` uses
            primary = summary_models[challenger]
            summary.update(
                {
                    "policy": challenger,
                    "challenger": challenger,
                    "challenger_uri": results[challenger]["ref"].registered_uri,
                    "challenger_family": family(challenger),
                    **{f"eval/{k}": primary[k] for k in ("reward_mean", "win_rate", "kl")},
                }
            )
            if "judge_win_rate" in primary:
                summary["eval/judge_win_rate"] = primary["judge_win_rate"]
            run.log_metrics({k: v for k, v in summary.items() if k.startswith("eval/") and k.count("/") == 1})
        outcome = StageResult.of("evaluate", "evaluated", out, summary)
        outcome.write()
        return outcome
