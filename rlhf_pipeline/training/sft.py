"""Step 1: supervised fine-tuning with LoRA on question + preferred answer.

    rlhf sft --data /tmp/beer-data --output /tmp/sft --config recipes/smollm2/sft.yaml
    accelerate launch --num_processes 8 $(which rlhf) sft --config recipes/llama-7b/sft.yaml --data DIR --output OUT

Reads `<data>/finetune.parquet` (one text per (question, preferred answer)), holds out `--eval-fraction` of the
QUESTIONS, trains LoRA adapters on packed blocks (see packing.py) or padded documents, and writes
`<output>/adapter/`, `<output>/merged/` (full model + tokenizer: PPO's reference policy) and `<output>/metrics.json`
(held-out loss and perplexity before and after, train loss, steady-state tokens/s). Rerunning with the same
--output resumes from the last checkpoint; a finished run is reported, not retrained.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from rlhf_pipeline.batching.packing import IGNORE_INDEX, collate_packed, pack_documents
from rlhf_pipeline.batching.padding import collate_padded, truncate_documents
from rlhf_pipeline.batching.tokenize import leading_special_ids, sft_texts, tokenize_documents
from rlhf_pipeline.data.subsets import limit, read_subset, split_by_question
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import head_logprobs, transformer_parts
from rlhf_pipeline.modeling.lora import count_parameters, save_adapter_and_merged
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training import loop
from rlhf_pipeline.training.options import LoopOptions
from rlhf_pipeline.training.outputs import finish_stage
from rlhf_pipeline.training.preflight import check_model
from rlhf_pipeline.training.trainable import trainable_model


class SFTConfig(LoopOptions):
    seq_length: int = Field(512, ge=16, description="Tokens per packed block (or max tokens per padded document).")
    packing: bool = Field(True, description="Pack documents into dense blocks (no padding); off = padded batches.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of questions held out for eval loss/perplexity.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    register_weights: Literal["merged", "adapter"] = Field(
        "adapter",
        description="What the registered MLflow model holds: the LoRA adapter with a reference to its base "
        "(MBs), or the merged full model.",
    )


class CausalLMLoss(torch.nn.Module):
    """forward(batch) -> (summed token loss per row, target tokens per row), logits only at labelled positions.

    A module (rather than a function) so that accelerate/DDP can wrap it: the gradient sync of several GPUs hooks
    into the forward of the module it wraps.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # the PeftModel (saved and merged by the stage)

    def forward(self, input_ids, labels, attention_mask=None, position_ids=None):
        backbone, lm_head = transformer_parts(self.model)
        # use_cache=False is not only about memory: with a KV cache, transformers ignores position_ids when building
        # the mask, and packed documents would attend to each other.
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        # log-probs of the labelled tokens, in row chunks above forward.LOGITS_BUDGET (128k-262k vocabularies)
        token_loss = -head_logprobs(lm_head, hidden[:, :-1][keep], targets[keep])[0]
        rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
        row_loss = torch.zeros(input_ids.shape[0], device=input_ids.device).index_add(0, rows, token_loss)
        return row_loss, keep.sum(dim=1)


def sft_loss(module, batch) -> tuple[torch.Tensor, dict[str, float], float]:
    row_loss, row_tokens = module(**batch)
    loss = row_loss.sum() / row_tokens.sum().clamp(min=1)
    inputs = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()
    return loss, {}, float(inputs)  # throughput counts non-pad input tokens (as TRL's benchmark does)


@torch.no_grad()
def evaluate_perplexity(
    accelerator, module, documents: list[list[int]], batch_size: int, pad_token_id: int, desc: str = "eval"
) -> dict[str, float]:
    """Mean token loss and perplexity over whole held-out documents (padded, longest first, same in both modes)."""
    from torch.utils.data import DataLoader

    order = sorted(documents, key=len, reverse=True)  # similar lengths per batch: little padding
    loader = accelerator.prepare_data_loader(
        DataLoader(order, batch_size=batch_size, collate_fn=lambda docs: collate_padded(docs, pad_token_id))
    )
    was_training = module.training
    module.eval()
    total_loss, total_tokens = 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        with accelerator.autocast():
            row_loss, row_tokens = module(**batch)
        row_loss, row_tokens = accelerator.gather_for_metrics((row_loss, row_tokens))  # drops padded duplicates
        total_loss += float(row_loss.sum())
        total_tokens += int(row_tokens.sum())
    module.train(was_training)
    mean = total_loss / max(total_tokens, 1)
    return {"eval_loss": mean, "eval_perplexity": math.exp(min(mean, 50.0)), "eval_tokens": total_tokens}


def run_sft(cfg: SFTConfig, *, on_step=None) -> StageResult:
    """Train (or resume, or report a finished run); `on_step(step)` is called after every optimizer step."""
    from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer

    done = loop.finished_run(cfg.output, "sft", cfg)
    if done is not None:
        return done
    check_model(cfg, task="CAUSAL_LM")  # before any work: one line, not a traceback inside transformers

    accelerator = loop.build_accelerator(cfg)
    # Enter the MLflow run first: an unreachable tracking server must fail before any model is loaded.
    with loop.tracked_run(cfg, "sft", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:
        run.log_input(cfg.data, "finetune", "training")
        rows = read_subset(cfg.data, "finetune")
        train_rows, eval_rows = split_by_question(rows, cfg.eval_fraction)
        tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        train_texts = limit(sft_texts(train_rows, cfg.prompt_template), cfg.max_train_samples, cfg.seed)
        eval_texts = limit(sft_texts(eval_rows, cfg.prompt_template), cfg.max_eval_samples, cfg.seed)
        train_docs = tokenize_documents(tokenizer, train_texts)
        eval_docs = truncate_documents(tokenize_documents(tokenizer, eval_texts), cfg.seq_length)
        if cfg.packing:
            # a block that opens inside a document opens with the BOS every document starts with (if any)
            bos = leading[0] if len(leading := leading_special_ids(tokenizer)) == 1 else None
            # Shuffle documents before packing so blocks mix questions; blocks are reshuffled every epoch.
            shuffled = [train_docs[i] for i in loop.epoch_order(len(train_docs), cfg.seed, epoch=-1)]
            try:
                train_set = pack_documents(shuffled, cfg.seq_length, tokenizer.eos_token_id, bos_token_id=bos)
            except ValueError as exc:
                raise UserError(f"too little SFT data for --seq-length {cfg.seq_length}: {exc}") from None
            collate = collate_packed
        else:
            train_set = truncate_documents(train_docs, cfg.seq_length)
            collate = lambda docs: collate_padded(docs, tokenizer.pad_token_id)  # noqa: E731

        loop.set_seed(cfg.seed)
        base = load_causal_lm(
            cfg.model,
            precision=cfg.precision,
            quantization=cfg.quantization,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            device=str(accelerator.device),
        )
        peft_model = trainable_model(base, cfg, "CAUSAL_LM")
        module = CausalLMLoss(peft_model)
        optimizer = loop.build_optimizer(module.parameters(), cfg)
        per_epoch = loop.micro_batches_per_epoch(len(train_set), cfg.batch_size, accelerator.num_processes)
        total_steps = loop.total_optimizer_steps(cfg, per_epoch)
        scheduler = loop.build_scheduler(optimizer, cfg, total_steps)
        start_step = loop.resume_if_possible(cfg.output, module, optimizer, scheduler)
        module, optimizer = accelerator.prepare(module, optimizer)

        # "Before" = the base model (adapters off), so it is the same number whether or not this run resumed.
        with accelerator.unwrap_model(module).model.disable_adapter():
            before = (
                evaluate_perplexity(
                    accelerator, module, eval_docs, cfg.batch_size, tokenizer.pad_token_id, desc="eval (base)"
                )
                if eval_docs
                else {}
            )
        if before:
            run.log_metrics(
                {"sft/eval_loss": before["eval_loss"], "sft/eval_perplexity": before["eval_perplexity"]}, step=0
            )

        batches = loop.micro_batches(
            accelerator,
            train_set,
            batch_size=cfg.batch_size,
            collate_fn=collate,
            seed=cfg.seed,
            start=start_step * cfg.gradient_accumulation_steps,
        )
        result = loop.train_loop(
            accelerator,
            module,
            optimizer,
            scheduler,
            batches,
            sft_loss,
            cfg=cfg,
            total_steps=total_steps,
            start_step=start_step,
            prefix="sft",
            rate_name="tokens",
            log_metrics=run.log_metrics,
            on_step=on_step,
        )

        after = (
            evaluate_perplexity(accelerator, module, eval_docs, cfg.batch_size, tokenizer.pad_token_id, desc="eval")
            if eval_docs
            else {}
        )
        if after:
            run.log_metrics(
                {"sft/eval_loss": after["eval_loss"], "sft/eval_perplexity": after["eval_perplexity"]},
                step=result.steps,
            )

        metrics = {
            "eval_loss_before": before.get("eval_loss"),
            "eval_perplexity_before": before.get("eval_perplexity"),
            "eval_loss": after.get("eval_loss"),
            "eval_perplexity": after.get("eval_perplexity"),
            "eval_tokens": after.get("eval_tokens"),
            "train_loss": result.train_loss,
            "tokens_per_s": result.items_per_s,
            "steps": result.steps,
            "trained_steps": result.trained_steps,
            "train_seconds": result.train_seconds,
            "train_documents": len(train_docs),
            "eval_documents": len(eval_docs),
            "train_questions": len({r["qid"] for r in train_rows}),
            "eval_questions": len({r["qid"] for r in eval_rows}),
            "packing": cfg.packing,
            "seq_length": cfg.seq_length,
            "train_rows": len(train_set),
            **count_parameters(accelerator.unwrap_model(module).model),
        }
        loop.dump_trainable(accelerator, accelerator.unwrap_model(module).model, "sft")

        model = accelerator.unwrap_model(module).model
        return finish_stage(
            accelerator,
            run,
            "sft",
            cfg.output,
            metrics,
            lambda: save_adapter_and_merged(model, tokenizer, cfg.output),
            register=cfg.register_weights,
            artifact_path=cfg.register_weights,
        )
