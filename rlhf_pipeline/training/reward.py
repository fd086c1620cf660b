"""Step 2: a pairwise reward model (one logit at the last real token), LoRA on the SFT model.

    rlhf reward --model /tmp/sft/merged --data /tmp/beer-data --output /tmp/reward --config recipes/smollm2/reward.yaml
    rlhf reward --evaluate-only --model models:/rlhf-reward/1 --data /tmp/beer-data --output /tmp/rm-eval

Training reads `<data>/reward.parquet`, holds out `--eval-fraction` of the questions, drops (and counts) pairs longer
than `--max-length`, and minimises -log sigmoid(r_chosen - r_rejected) with chosen and rejected scored in ONE
forward. Held-out accuracy, mean margin and the reward mean/std over all held-out responses (PPO normalizes its
rewards with them) go to `<output>/metrics.json` and MLflow; `<output>/adapter/` holds LoRA + score head,
`<output>/merged/` the full sequence-classification model; registered as `<prefix>-reward`, tagged `rm/accuracy`.

--evaluate-only scores an existing reward model (a registered `models:/name/version` URI, a reward output
directory, or a model directory) on `<data>/evaluation.parquet` (questions no training stage saw) when it exists,
else on the held-out questions of `<data>/reward.parquet` (same split as training) -- see `--eval-subset`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from rlhf_pipeline.batching.padding import collate_pairs, split_chosen_rejected
from rlhf_pipeline.batching.tokenize import tokenize_pairs
from rlhf_pipeline.data.subsets import limit, read_subset, split_by_question
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.lora import count_parameters, save_adapter_and_merged
from rlhf_pipeline.modeling.unpadded_attention import enable_shared_prefix
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training import loop
from rlhf_pipeline.training.options import LoopOptions
from rlhf_pipeline.training.outputs import finish_stage
from rlhf_pipeline.training.pair_eval import gather_over_pairs
from rlhf_pipeline.training.preflight import check_model
from rlhf_pipeline.training.reward_scoring import RewardScorer, pairwise_accuracy, pairwise_loss
from rlhf_pipeline.training.trainable import trainable_model


class RewardConfig(LoopOptions):
    lora_r: int = Field(8, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    max_length: int = Field(512, ge=8, description="Pairs with a side longer than this many tokens are dropped.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of questions held out for accuracy/margin.")
    eval_before: bool = Field(
        True, description="Also evaluate the initial model (accuracy_before); costs one eval pass."
    )
    evaluate_only: bool = Field(False, description="Only score --model on held-out pairs (no training).")
    eval_subset: Literal["auto", "evaluation", "reward"] = Field(
        "auto",
        description="--evaluate-only data: evaluation.parquet, the held-out part of reward.parquet, or "
        "auto (evaluation.parquet if present).",
    )
    subset: Literal["reward", "judge"] = Field(
        "reward",
        description="Training pairs: reward.parquet (the proxy reward model PPO optimizes), or judge.parquet "
        "(questions no other stage sees: an independent judge for `rlhf evaluate --judge-model`, registered as "
        "<prefix>-judge).",
    )
    register_weights: Literal["merged"] = Field(
        "merged",
        description="What the registered MLflow model holds: the merged full model (MLflow's transformers flavor "
        "cannot rebuild a 1-label score head on a causal-LM base from an adapter).",
    )
    shared_prefix: bool = Field(
        True,
        description="Score chosen and rejected in one row that computes their common prefix (the prompt) "
        "once (see shared_prefix.py); off, or with an attention implementation other than sdpa/eager: two rows.",
    )

    def fp16_problem(self) -> str | None:
        return None if self.evaluate_only else super().fp16_problem()  # scoring has no gradients to scale


def pair_loss(module, batch) -> tuple[torch.Tensor, dict[str, float], float]:
    chosen, rejected = split_chosen_rejected(module(**batch))
    margin = float((chosen - rejected).detach().mean())
    return (
        pairwise_loss(chosen, rejected),
        {"train_accuracy": pairwise_accuracy(chosen, rejected), "train_margin": margin},
        float(chosen.shape[0]),
    )


@torch.no_grad()
def evaluate_pairs(
    accelerator, module, pairs, batch_size: int, pad_token_id: int, desc: str = "eval", shared_prefix: bool = False
) -> dict:
    """Accuracy, mean margin, loss, and reward mean/std over every held-out response (chosen and rejected)."""
    if len(pairs) == 0:
        return {"num_pairs": 0}

    def forward(batch):
        chosen, rejected = split_chosen_rejected(module(**batch))
        return {"chosen": chosen, "rejected": rejected}

    out = gather_over_pairs(
        accelerator,
        module,
        forward,
        pairs,
        batch_size=batch_size,
        desc=desc,
        collate_fn=lambda b: collate_pairs(b, pad_token_id, shared_prefix),
    )
    chosen, rejected = out["chosen"], out["rejected"]
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": pairwise_accuracy(chosen, rejected),
        "margin": float((chosen - rejected).mean()),
        "eval_loss": float(pairwise_loss(chosen, rejected)),
        "reward_mean": float(both.mean()),
        "reward_std": float(both.std()) if both.numel() > 1 else 0.0,
        "num_pairs": int(chosen.numel()),
    }


def _log_eval(run, metrics: dict, step: int) -> None:
    keys = ("accuracy", "margin", "eval_loss", "reward_mean", "reward_std")
    run.log_metrics({f"rm/{k}": metrics[k] for k in keys if k in metrics}, step=step)


# The judge's initialization is drawn from another seed than the proxy's: two reward models initialized alike on
# the same base agree by construction, whatever their data (measured on the quality recipe: proxy and judge score
# heads at cosine 0.999 after 80 steps, and best-of-n picked by the proxy won 8/9 by the "independent" judge).
JUDGE_INIT_SEED_OFFSET = 7919


def init_seed(cfg: RewardConfig) -> int:
    """The seed of the fresh score head and LoRA matrices: --seed for the proxy, --seed + an offset for the judge
    (data order and splits keep --seed)."""
    return cfg.seed + (JUDGE_INIT_SEED_OFFSET if cfg.subset == "judge" else 0)


def load_reward_model(cfg: RewardConfig, device: str):
    """Sequence-classification model with ONE logit and a pad token, from --model (base, SFT merged, or RM)."""
    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(
        cfg.model,
        precision=cfg.precision,
        quantization=cfg.quantization,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
        device=device,
        model_class="AutoModelForSequenceClassification",
        num_labels=1,
    )
    model.config.pad_token_id = tokenizer.pad_token_id  # batches > 1 need it (our pooling does not read it)
    return model, tokenizer


def run_reward(cfg: RewardConfig, *, on_step=None) -> StageResult:
    """Train (or resume, or report a finished run), or --evaluate-only; `on_step(step)` runs after each step."""
    if cfg.evaluate_only:
        return evaluate_reward_model(cfg)
    done = loop.finished_run(cfg.output, "reward", cfg)
    if done is not None:
        return done
    check_model(cfg, task="SEQ_CLS")  # before any work: one line, not a traceback inside transformers

    accelerator = loop.build_accelerator(cfg)
    # Enter the MLflow run first: an unreachable tracking server must fail before any model is loaded.
    with loop.tracked_run(cfg, "reward", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:
        run.log_input(cfg.data, cfg.subset, "training")
        rows = read_subset(cfg.data, cfg.subset)
        train_rows, eval_rows = split_by_question(rows, cfg.eval_fraction)
        loop.set_seed(init_seed(cfg))  # also makes the fresh score head's initialisation reproducible
        model, tokenizer = load_reward_model(cfg, str(accelerator.device))
        train_pairs = tokenize_pairs(
            tokenizer, limit(train_rows, cfg.max_train_samples, cfg.seed), cfg.prompt_template, cfg.max_length
        )
        eval_pairs = tokenize_pairs(
            tokenizer, limit(eval_rows, cfg.max_eval_samples, cfg.seed), cfg.prompt_template, cfg.max_length
        )
        if len(train_pairs) == 0:
            raise UserError(
                f"all {train_pairs.dropped_too_long} training pairs are longer than --max-length "
                f"{cfg.max_length} tokens"
            )

        shared = cfg.shared_prefix and enable_shared_prefix(model)
        peft_model = trainable_model(model, cfg, "SEQ_CLS")  # score head trained + saved via modules_to_save
        module = RewardScorer(peft_model)
        optimizer = loop.build_optimizer(module.parameters(), cfg)
        per_epoch = loop.micro_batches_per_epoch(len(train_pairs), cfg.batch_size, accelerator.num_processes)
        total_steps = loop.total_optimizer_steps(cfg, per_epoch)
        scheduler = loop.build_scheduler(optimizer, cfg, total_steps)
        start_step = loop.resume_if_possible(cfg.output, module, optimizer, scheduler)
        module, optimizer = accelerator.prepare(module, optimizer)

        def evaluate(desc: str) -> dict:
            return evaluate_pairs(
                accelerator, module, eval_pairs, cfg.batch_size, tokenizer.pad_token_id, desc, shared_prefix=shared
            )

        # "Before" = adapters and the fresh head copy off: the initial model, also when this run resumed.
        before = {}
        if cfg.eval_before:
            with accelerator.unwrap_model(module).model.disable_adapter():
                before = evaluate("eval (initial)")
            _log_eval(run, before, step=0)

        batches = loop.micro_batches(
            accelerator,
            train_pairs,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            collate_fn=lambda b: collate_pairs(b, tokenizer.pad_token_id, shared),
            start=start_step * cfg.gradient_accumulation_steps,
        )
        result = loop.train_loop(
            accelerator,
            module,
            optimizer,
            scheduler,
            batches,
            pair_loss,
            cfg=cfg,
            total_steps=total_steps,
            start_step=start_step,
            prefix="rm",
            rate_name="pairs",
            log_metrics=run.log_metrics,
            on_step=on_step,
        )
        after = evaluate("eval")
        _log_eval(run, after, step=result.steps)

        metrics = {
            **after,
            "accuracy_before": before.get("accuracy"),
            "margin_before": before.get("margin"),
            "dropped_too_long": train_pairs.dropped_too_long + eval_pairs.dropped_too_long,
            "train_pairs": len(train_pairs),
            "train_questions": len({r["qid"] for r in train_rows}),
            "eval_questions": len({r["qid"] for r in eval_rows}),
            "train_loss": result.train_loss,
            "pairs_per_s": result.items_per_s,
            "steps": result.steps,
            "trained_steps": result.trained_steps,
            "train_seconds": result.train_seconds,
            "max_length": cfg.max_length,
            **count_parameters(accelerator.unwrap_model(module).model),
        }
        loop.dump_trainable(accelerator, accelerator.unwrap_model(module).model, "reward")

        model = accelerator.unwrap_model(module).model
        run.log_metrics({"rm/dropped_too_long": metrics["dropped_too_long"]}, step=result.steps)
        return finish_stage(
            accelerator,
            run,
            "reward",
            cfg.output,
            metrics,
            lambda: save_adapter_and_merged(model, tokenizer, cfg.output),
            register=cfg.register_weights,
            task="text-classification",
            artifact_path=cfg.register_weights,
            tags={"rm/accuracy": f"{after['accuracy']:.4f}"} if "accuracy" in after else {},
            name=f"{cfg.registered_model_prefix}-judge" if cfg.subset == "judge" else None,
        )


# ----------------------------------------------------------------------------------------------------------------
# --evaluate-only
# ----------------------------------------------------------------------------------------------------------------


def _local_reward_model(model: str, download_to: Path) -> str:
    """A directory holding config.json for `model`: a models:/ or runs:/ URI is exported from MLflow first."""
    if model.startswith(("models:/", "runs:/")):  # an MLflow model (or an older plain directory): merged weights
        from rlhf_pipeline.modeling.mlflow_model import export_merged

        model = str(export_merged(model, download_to))
    path = Path(model)
    if (path / "merged" / "config.json").is_file():  # a reward stage output directory
        return str(path / "merged")
    if path.is_dir() and not (path / "config.json").is_file() and (path / "adapter_config.json").is_file():
        raise UserError(f"{model} holds only a LoRA adapter; evaluate the merged model (the stage's merged/)")
    return model


def _eval_rows(cfg: RewardConfig) -> tuple[list[dict], str]:
    has_evaluation = (Path(cfg.data) / "evaluation.parquet").is_file()
    subset = cfg.eval_subset if cfg.eval_subset != "auto" else ("evaluation" if has_evaluation else "reward")
    if subset == "evaluation":
        return read_subset(cfg.data, "evaluation"), "evaluation"
    _, held_out = split_by_question(read_subset(cfg.data, "reward"), cfg.eval_fraction or 0.1)
    return held_out, "reward (held-out questions)"


def evaluate_reward_model(cfg: RewardConfig) -> StageResult:
    accelerator = loop.build_accelerator(cfg)
    eval_cfg = cfg.model_copy(update={"run_name": cfg.run_name or "reward-evaluate"})
    with loop.tracked_run(eval_cfg, "reward", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:
        rows, subset = _eval_rows(cfg)
        run.log_input(cfg.data, subset, "evaluation")
        rows = limit(rows, cfg.max_eval_samples, cfg.seed)
        local = _local_reward_model(cfg.model, Path(cfg.output) / "downloaded-model")
        model, tokenizer = load_reward_model(cfg.model_copy(update={"model": local}), str(accelerator.device))
        pairs = tokenize_pairs(tokenizer, rows, cfg.prompt_template, cfg.max_length)
        module = accelerator.prepare(RewardScorer(model))
        metrics = evaluate_pairs(
            accelerator,
            module,
            pairs,
            cfg.batch_size,
            tokenizer.pad_token_id,
            shared_prefix=cfg.shared_prefix and enable_shared_prefix(model),
        )
        metrics.update(dropped_too_long=pairs.dropped_too_long, subset=subset, model=cfg.model)
        _log_eval(run, metrics, step=0)
        outcome = StageResult.of("reward", "evaluated", cfg.output, metrics, processes=accelerator.num_processes)

        def write() -> None:
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
            loop.write_metrics(cfg.output, outcome)

        loop.on_main_then_wait(accelerator, write)
        return outcome
