"""The training loop every gradient stage shares: plain PyTorch + accelerate, no HF Trainer.

What a stage does with it (SFT, reward, DPO; PPO uses the pieces):

    accelerator = build_accelerator(cfg)                  # 1 process on CPU, `accelerate launch` for several GPUs
    with tracked_run(cfg, "sft", accelerator, data_dir=cfg.data, base_model=cfg.model) as run:  # fail fast first
        set_seed(cfg.seed)
        module = ...                                      # apply_lora(...) model, or a wrapper whose forward is the loss
        optimizer = build_optimizer(module.parameters(), cfg)
        per_epoch = micro_batches_per_epoch(len(train_set), cfg.batch_size, accelerator.num_processes)
        total = total_optimizer_steps(cfg, per_epoch)
        scheduler = build_scheduler(optimizer, cfg, total)
        start = resume_if_possible(cfg.output, module, optimizer, scheduler)   # 0, or the checkpoint's step
        module, optimizer = accelerator.prepare(module, optimizer)
        batches = micro_batches(accelerator, train_set, batch_size=..., collate_fn=..., seed=cfg.seed,
                                start=start * cfg.gradient_accumulation_steps)
        result = train_loop(accelerator, module, optimizer, scheduler, batches, loss_fn, cfg=cfg,
                            total_steps=total, start_step=start, prefix="sft", log_metrics=run.log_metrics)
        save_adapter_and_merged(peft_model, tokenizer, cfg.output)     # -> (adapter_dir, merged_dir)

Resume: a rerun with the same `--output` restores weights, optimizer and scheduler from the newest sound checkpoint
and skips the micro-batches already consumed (the data order depends only on seed and epoch). The random draws of a
micro-batch (LoRA dropout) come from a generator seeded by (seed, step, micro-batch, process) right before its
forward, never from the global stream other code draws from (a DataLoader iterator, the held-out evaluation), so
an interrupted run ends at the same step with bit-identical weights to an uninterrupted one, dropout on.
`finished_run(..., cfg=cfg)` claims the output first (claim.py: other stage / other settings refused, MLflow run
re-attached). SIGTERM (a pod eviction) finishes the current step, checkpoints it and exits with PREEMPTED_EXIT_CODE.
A step whose loss or gradient norm is not finite is skipped (no optimizer update); more than MAX_NONFINITE_STEPS of
them fail the stage with one line, before anything is saved or registered.

Multi-GPU (`accelerate launch --num_processes N`, one job): call the PREPARED module's forward inside `loss_fn`
(DDP syncs gradients through it). If the loss needs more than `model(**batch)`, wrap it in an nn.Module whose
forward computes it (see sft.CausalLMLoss, dpo.PreferenceLoss). The main process alone tracks (tracked_run),
checkpoints (train_loop) and saves / registers / writes metrics.json (`on_main_then_wait`: the others wait).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.results import METRICS_FILE, StageResult
from rlhf_pipeline.training import claim as output_claim
from rlhf_pipeline.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

# loss_fn(prepared_module, batch) -> (loss to backpropagate, {metric name: float}, items in this micro-batch)
# "items" feed the throughput metric: tokens for SFT, pairs for the reward model.
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float], float]]


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_accelerator(cfg: Any):
    """An Accelerator that accumulates exactly `gradient_accumulation_steps` micro-batches per optimizer step.

    `sync_with_dataloader=False`: epochs are a continuous stream here (see `micro_batches`), so an epoch end must not
    force a short optimizer step; that keeps "step N" = "N x accumulation micro-batches", which resume relies on.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin

    if getattr(cfg, "num_threads", None):
        torch.set_num_threads(cfg.num_threads)
    # PPO has no gradient_accumulation_steps (one optimizer step per minibatch)
    plugin = GradientAccumulationPlugin(
        num_steps=getattr(cfg, "gradient_accumulation_steps", 1), sync_with_dataloader=False
    )
    mixed_precision = getattr(cfg, "mixed_precision", "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_plugin=plugin)
    own_scaling = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if mixed_precision == "fp16" and accelerator.scaler is None and not own_scaling:
        # accelerate creates the GradScaler only on a GPU-like device; on a CPU fp16 is not even autocast
        raise UserError(
            f"--mixed-precision fp16 needs a gradient scaler, which accelerate only creates on a GPU "
            f"(this process runs on {accelerator.device.type}); use --mixed-precision bf16 or no"
        )
    return accelerator


def build_optimizer(params, cfg: Any) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen base weights get no optimizer state)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise RuntimeError("no trainable parameters: was LoRA applied?")
    return torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int):
    """`cfg.lr_scheduler` (cosine by default) with linear warm-up over ceil(warmup_ratio x total_steps) steps."""
    from transformers import get_scheduler

    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    try:
        return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    except ValueError:
        raise UserError(
            f"unknown --lr-scheduler {cfg.lr_scheduler!r} (try cosine, linear, constant_with_warmup)"
        ) from None


def micro_batches_per_epoch(num_items: int, batch_size: int, num_processes: int = 1) -> int:
    """Micro-batches each process sees per epoch (accelerate pads the last round so all processes get as many)."""
    return max(1, math.ceil(math.ceil(num_items / batch_size) / num_processes))


def total_optimizer_steps(cfg: Any, per_epoch: int) -> int:
    """`max_steps` if set, else `num_epochs` passes over the data (at least one step)."""
    if cfg.max_steps:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * per_epoch / cfg.gradient_accumulation_steps))


# ----------------------------------------------------------------------------------------------------------------
# Data order and resume
# ----------------------------------------------------------------------------------------------------------------


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The shuffled item order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator).tolist()


def micro_batches(
    accelerator, dataset: Sequence, *, batch_size: int, collate_fn: Callable, seed: int, start: int = 0
) -> Iterator[Any]:
    """Endless stream of this process's micro-batches, epoch after epoch, skipping the first `start` of them."""
    from torch.utils.data import DataLoader

    per_epoch = micro_batches_per_epoch(len(dataset), batch_size, accelerator.num_processes)
    epoch, skip = divmod(start, per_epoch)
    while True:
        loader = DataLoader(
            dataset, batch_size=batch_size, sampler=epoch_order(len(dataset), seed, epoch), collate_fn=collate_fn
        )
        loader = accelerator.prepare_data_loader(loader)  # shards across processes, moves batches to the device
        if skip:
            loader = accelerator.skip_first_batches(loader, skip)  # skips indices, not collated batches
        yield from loader
        epoch, skip = epoch + 1, 0


def resume_if_possible(
    output: str | Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None
) -> int:
    """Load the newest `<output>/checkpoints/step-N` into the (unprepared) module/optimizer/scheduler; return N or 0."""
    path = latest_checkpoint(output)
    if path is None:
        return 0
    state = load_checkpoint(path, module, optimizer, scheduler)
    tqdm.write(f"resuming from {path} (step {state['step']})")
    return int(state["step"])


def write_metrics(output: str | Path, result: StageResult) -> Path:
    """`result` as `<output>/metrics.json`, written atomically: its presence marks a finished run (write it last)."""
    return result.write(output)


def finished_run(output: str | Path, stage: str | None = None, cfg: Any = None) -> StageResult | None:
    """The result of a run that already finished in `output` (model written, metrics.json present), with status
    "reused"; None when there is none. A finished run of another stage there is an error, not a result.

    With `cfg`, the output is checked first (claim.check_output): a run of another stage or with other settings or
    data there is refused (or discarded with --restart), and an unwritable output fails before any work."""
    if cfg is not None and stage is not None:
        output_claim.check_output(cfg, stage)
    out = Path(output)
    if not ((out / METRICS_FILE).is_file() and (out / "merged" / "config.json").is_file()):
        return None
    result = StageResult.read(out)
    if stage is not None and result.stage != stage:
        raise UserError(f"{out} holds a finished {result.stage} run, not {stage}: use another --output")
    return result.reused()


# ----------------------------------------------------------------------------------------------------------------
# Tracking on the main process only
# ----------------------------------------------------------------------------------------------------------------


class _NoTracking:
    """What non-main processes get instead of a StageRun: MLflow is written by the main process only. `run_id` is
    the main process's run (broadcast), so every rank knows which run it belongs to."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id
        self.registered: list = []  # per instance: nothing a rank appends here leaks into another run

    def log_input(self, data_dir, subset: str, context: str) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def log_table(self, data: dict, artifact_file: str) -> None:
        pass

    def register(self, *args, **kwargs) -> None:
        return None


@contextmanager
def tracked_run(cfg: Any, stage: str, accelerator, **lineage):
    """`tracking.stage_run` on the main process (fails fast on an unreachable server), a no-op elsewhere; with
    several processes the main process's run id is broadcast to the others (`run.run_id` on every rank)."""
    from rlhf_pipeline.modeling.mlflow_model import model_reference
    from rlhf_pipeline.tracking import stage_run

    if "base_model" in lineage:  # an input a previous stage registered is named by its version, not a local path
        lineage["base_model"] = model_reference(lineage["base_model"])
    if accelerator.is_main_process:
        training = not getattr(cfg, "evaluate_only", False)
        previous = output_claim.previous_run_id(cfg.output) if training else None
        with stage_run(cfg, stage, resume_run_id=previous, **lineage) as run:
            if training:  # claimed once the tracking server answered: an unreachable one leaves nothing behind
                output_claim.claim_output(cfg, stage, run.run_id)
            _broadcast_object(accelerator, run.run_id)
            yield run
    else:
        yield _NoTracking(_broadcast_object(accelerator, None))


def _broadcast_object(accelerator, value: Any) -> Any:
    """The main process's `value` on every process (itself with one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def on_main_then_wait(accelerator, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process only (save, register, write metrics.json), the others wait for it to finish;
    returns fn's value on the main process, None elsewhere."""
    accelerator.wait_for_everyone()
    value = fn() if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return value


# ----------------------------------------------------------------------------------------------------------------
# Hooks for tests of a multi-process run (environment variables, read by every stage's loop)
# ----------------------------------------------------------------------------------------------------------------

# A directory: after training, every process writes its trainable weights as `<stage>-rank<i>.safetensors` there
# (the test compares the ranks bit for bit, and with a 1-process run).
DUMP_TRAINABLE_ENV = "RLHF_DUMP_TRAINABLE"
# A step number k: every process exits (status STOPPED_EXIT_CODE) right after step k's checkpoint, as a
# preempted job would; the rerun resumes from it.
STOP_AFTER_STEP_ENV = "RLHF_STOP_AFTER_STEP"
STOPPED_EXIT_CODE = 75
# SIGTERM (what a pod eviction sends): the step in flight finishes, is checkpointed, and the process exits with this.
PREEMPTED_EXIT_CODE = 143
# Steps with a non-finite loss or gradient norm that are skipped before the stage fails.
MAX_NONFINITE_STEPS = 3


def dump_trainable(accelerator, module: torch.nn.Module, stage: str) -> None:
    import os

    target = os.environ.get(DUMP_TRAINABLE_ENV)
    if not target:
        return
    from safetensors.torch import save_file

    from rlhf_pipeline.training.checkpoint import trainable_state

    Path(target).mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(module), str(Path(target) / f"{stage}-rank{accelerator.process_index}.safetensors"))


def stop_if_asked(accelerator, step: int) -> None:
    """Exit every process after step `step` when $RLHF_STOP_AFTER_STEP says so (call it after the checkpoint)."""
    import os
    import sys

    if os.environ.get(STOP_AFTER_STEP_ENV) == str(step):
        accelerator.wait_for_everyone()
        tqdm.write(f"{STOP_AFTER_STEP_ENV}={step}: stopping after step {step}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOPPED_EXIT_CODE)  # no interpreter teardown: the process group is simply abandoned, as on a kill


# ----------------------------------------------------------------------------------------------------------------
# Preemption and randomness
# ----------------------------------------------------------------------------------------------------------------


class Preempted(UserError):
    """SIGTERM arrived: the last step is checkpointed; a rerun resumes from it."""

    exit_code = PREEMPTED_EXIT_CODE


class PreemptionGuard:
    """While active, SIGTERM only sets `requested`; the loop checkpoints at the end of the step and raises
    Preempted. (Outside a guard SIGTERM kills at once, which loses nothing: no step is in flight.)"""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        if not self.requested:
            tqdm.write("SIGTERM: finishing this step, checkpointing, then exiting", file=sys.stderr)
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def stop(self, stage: str, step: int) -> None:
        raise Preempted(
            f"stopped by SIGTERM after step {step}, checkpoint saved: rerun with the same --output to resume"
        )


def seed_micro_batch(seed: int, step: int, micro: int, process: int) -> None:
    """Seed torch's global generators (CPU and every CUDA device) for one micro-batch's forward and backward: the
    dropout masks of step `step` are then the same in a resumed run as in an uninterrupted one."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + micro) * 131 + process)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LoopResult:
    steps: int  # optimizer steps done in total, including those before a resume
    trained_steps: int  # optimizer steps done by this call
    train_loss: float | None  # mean loss over all steps, including those before a resume
    items_per_s: float | None  # steady-state throughput over all steps (each process's first step excluded)
    train_seconds: float = 0.0  # wall time of this call's steps
    last_metrics: dict[str, float] = field(default_factory=dict)


def train_loop(
    accelerator,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterator[Any],
    loss_fn: LossFn,
    *,
    cfg: Any,
    total_steps: int,
    start_step: int = 0,
    prefix: str,
    rate_name: str = "tokens",
    log_metrics: Callable | None = None,
    on_step: Callable[[int], None] | None = None,
    desc: str | None = None,
) -> LoopResult:
    """Optimizer steps `start_step+1 .. total_steps`, each over `cfg.gradient_accumulation_steps` micro-batches.

    Logs `<prefix>/loss`, `<prefix>/lr`, `<prefix>/grad_norm`, `<prefix>/<rate_name>_per_s` and loss_fn's own
    metrics every `cfg.logging_steps`; checkpoints every `cfg.save_steps` and at the end. `on_step(step)` runs after
    each step's checkpoint (tests use it to simulate a crash).
    """
    accum = cfg.gradient_accumulation_steps
    unwrapped = accelerator.unwrap_model(module)
    module.train()
    # Running totals survive a resume through the checkpoint's `extra`, so a resumed run still reports the mean
    # loss and the steady rate of ALL its steps (each process segment's first step excluded from the rate).
    totals = {"loss_sum": 0.0, "loss_steps": 0, "timed_items": 0.0, "timed_seconds": 0.0}
    if start_step > 0:
        totals.update(_checkpoint_extra(cfg.output).get("totals", {}))
    losses: list[float] = []
    timed_items, timed_seconds, first_step_items, first_step_seconds = 0.0, 0.0, 0.0, 0.0
    last: dict[str, float] = {}
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=desc or prefix,
        unit="step",
        dynamic_ncols=True,
        disable=not accelerator.is_main_process,
    )
    step = start_step
    nonfinite = int(totals.get("nonfinite_steps", 0))
    config_hash = output_claim.identity_hash(cfg)
    # the bar is closed however the loop ends, so an error line starts a line of its own
    with PreemptionGuard() as guard, contextlib.closing(bar):
        while step < total_steps:
            began = time.perf_counter()
            step_loss = torch.zeros((), device=accelerator.device)
            step_items = 0.0
            step_metrics: dict[str, float] = {}
            for micro in range(accum):
                batch = next(batches)
                seed_micro_batch(cfg.seed, step, micro, accelerator.process_index)
                with accelerator.accumulate(module), accelerator.autocast():
                    loss, metrics, items = loss_fn(module, batch)
                    accelerator.backward(loss)
                step_loss += loss.detach() / accum
                step_items += items
                for key, value in metrics.items():
                    step_metrics[key] = step_metrics.get(key, 0.0) + value / accum
            assert accelerator.sync_gradients, "accumulation out of step with the accelerator"
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            # Loss and norm are global (reduced over processes), so every process takes the same decision.
            finite = bool(torch.isfinite(accelerator.reduce(step_loss.detach(), "mean"))) and math.isfinite(
                float(grad_norm)
            )
            if finite:
                try:
                    optimizer.step()
                except RuntimeError as exc:  # AdamW's float32 scalars overflow for an absurd learning rate
                    if "overflow" not in str(exc):
                        raise
                    raise UserError(
                        f"{prefix}: the optimizer step at step {step + 1} overflowed float32 (learning rate {lr:g}): "
                        "nothing saved or registered; lower --learning-rate",
                        exit_code=3,
                    ) from None
            else:  # a NaN/inf never reaches the weights; the schedule and the data order go on as if stepped
                nonfinite += 1
                tqdm.write(
                    f"{prefix}: step {step + 1}: loss or gradient not finite, update skipped ({nonfinite} so far)",
                    file=sys.stderr,
                )
                if nonfinite > MAX_NONFINITE_STEPS:
                    raise UserError(
                        f"{prefix}: loss or gradient not finite in {nonfinite} steps (last: step {step + 1}); "
                        "training diverged, nothing saved or registered: lower --learning-rate or check the data",
                        exit_code=3,
                    )
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            # Throughput over all processes; the reduce also waits for the slowest process, as the step really does.
            items_all = float(accelerator.reduce(torch.tensor(step_items, device=accelerator.device), "sum"))
            loss_all = float(accelerator.reduce(step_loss, "mean"))
            step_metrics = mean_over_processes(accelerator, step_metrics)
            seconds = time.perf_counter() - began
            if step == start_step + 1:
                first_step_items, first_step_seconds = items_all, seconds
            else:
                timed_items += items_all
                timed_seconds += seconds
            if finite:
                losses.append(loss_all)
            rate = timed_items / timed_seconds if timed_seconds else items_all / seconds

            last = {
                f"{prefix}/loss": loss_all,
                f"{prefix}/lr": lr,
                f"{prefix}/grad_norm": float(grad_norm),
                f"{prefix}/{rate_name}_per_s": rate,
                f"{prefix}/skipped_steps": float(nonfinite),
                **{f"{prefix}/{k}": v for k, v in step_metrics.items()},
            }
            if not finite:  # MLflow stores NaN, but a NaN loss point only hides the curve: the skip count says it
                last = {k: v for k, v in last.items() if math.isfinite(v)}
            if log_metrics is not None and (step % cfg.logging_steps == 0 or step == total_steps):
                log_metrics(last, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_all:.4f}", lr=f"{lr:.2e}", **{f"{rate_name}/s": f"{rate:.1f}"})

            preempted = any_process(accelerator, guard.requested)
            if step % cfg.save_steps == 0 or step == total_steps or preempted:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    so_far = {**_merge_totals(totals, losses, timed_items, timed_seconds), "nonfinite_steps": nonfinite}
                    save_checkpoint(
                        cfg.output,
                        step,
                        unwrapped,
                        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                        scheduler,
                        extra={"totals": so_far},
                        config_hash=config_hash,
                        keep=cfg.keep_checkpoints,
                    )
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(step)
            stop_if_asked(accelerator, step)
            if preempted:
                guard.stop(prefix, step)

    if not timed_seconds and first_step_seconds:  # a single step: its own rate is all there is
        timed_items, timed_seconds = first_step_items, first_step_seconds
    all_steps = _merge_totals(totals, losses, timed_items, timed_seconds)
    return LoopResult(
        steps=step,
        trained_steps=step - start_step,
        train_loss=all_steps["loss_sum"] / all_steps["loss_steps"] if all_steps["loss_steps"] else None,
        items_per_s=all_steps["timed_items"] / all_steps["timed_seconds"] if all_steps["timed_seconds"] else None,
        train_seconds=timed_seconds + first_step_seconds,
        last_metrics=last,
    )


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when `flag` is true on any (a SIGTERM may reach one rank first)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") > 0)


def mean_over_processes(accelerator, metrics: dict[str, float]) -> dict[str, float]:
    """Each metric's mean over the processes (float64, one all-reduce); unchanged with one process."""
    if accelerator.num_processes == 1 or not metrics:
        return metrics
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(metrics, accelerator.reduce(values, "mean").tolist()))


def _merge_totals(before: dict, losses: list[float], timed_items: float, timed_seconds: float) -> dict:
    return {
        **before,
        "loss_sum": before["loss_sum"] + sum(losses),
        "loss_steps": before["loss_steps"] + len(losses),
        "timed_items": before["timed_items"] + timed_items,
        "timed_seconds": before["timed_seconds"] + timed_seconds,
    }


def _checkpoint_extra(output: str | Path) -> dict:
    path = latest_checkpoint(output, report=False)
    return json.loads((path / "state.json").read_text()).get("extra", {}) if path else {}
