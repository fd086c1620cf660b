"""The GPU path's one prepared device check: random-init models from configs (no downloads), one JSON line per
check on stdout, about 10 minutes on one H100/H200.

    .venv/bin/python bench/gpu/device_check.py --out /tmp/device-check        # on the GPU (needs the gpu extra)
    .venv/bin/python bench/gpu/device_check.py --tiny --out /tmp/dc           # CPU smoke run of the same code
    .venv/bin/python bench/gpu/device_check.py --out /tmp/dc --only ppo_peak   # one check (or several)

Checks (the `check` field of each line):
    dtype_audit      a 7B-class Llama loaded in 4-bit + LoRA: dtypes of each parameter group, the KV cache's dtype
    ppo_peak         PPO on the 7B-class base in 4-bit: measured peak GPU memory per phase (generate, score,
                     forward = reference + old, update) next to the estimator's, at 8 x 512 tokens and at the
                     recipe's batch (32 prompts, rollout chunks of 8, 512 + 128 tokens)
    decode           decode tokens/s on the 4-bit 7B-class base: our loop, `generate`, `generate` + static cache
    stage            SFT, reward, PPO, DPO on a 1B-class Llama, in 4-bit and in bf16: 1 step, then a rerun to 2
                     steps that resumes from the checkpoint; save + merge; PPO reports whether the reward adapter
                     shared the policy's 4-bit base (decided from lineage)
    load_8bit        the 1B-class base in 8-bit: dtypes, a short generation, its memory
--tiny runs every check on tiny configs on the CPU (the 4/8-bit ones report `skipped`: bitsandbytes needs CUDA),
so tests/bench/test_device_check.py proves the script runs end to end; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

GIB = 1 << 30
TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


JSON_OUT = sys.stdout  # the JSON lines; everything else the stages print goes to stderr (main redirects it)


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields}, default=str), file=JSON_OUT, flush=True)


def llama_config(size: str, vocab: int):
    import transformers

    shapes = {  # hidden, intermediate, layers, heads, kv heads
        "7b": (4096, 11008, 32, 32, 32),  # Llama-2-7B's shapes (vocabulary: the SmolLM2 tokenizer's)
        "1b": (2048, 5632, 16, 32, 4),  # TinyLlama-1.1B's widths, 16 layers
        "tiny": (64, 128, 2, 4, 2),
    }[size]
    hidden, inter, layers, heads, kv = shapes
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip


def build_model_dir(out: Path, size: str, device: str) -> Path:
    """A random-init Llama of `size` in bf16 (fp32 for tiny) with the SmolLM2 tokenizer, as safetensors."""
    import transformers

    from rlhf_pipeline.modeling.tiny import tiny_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = tiny_tokenizer()
    config = llama_config(size, len(tok))
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(dtype)  # .to: whatever dtype init chose
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    del model
    return out


def write_data(data_dir: Path, questions: int, words: int) -> Path:
    """prepare-data's four subsets with long questions (prompts reach max_prompt_length) and short answers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rlhf_pipeline.data.subsets import PAIR_COLUMNS

    rows = []
    for q in range(questions):
        rows.append(
            {
                "qid": f"beer:{q}",
                "question": f"Question {q}: " + " ".join(f"hops{(q * 7 + i) % 97}" for i in range(words)),
                "response_j": f"A malty amber ale {q}, served cool, with aged cheddar.",
                "response_k": f"No idea {q}.",
                "score_j": 5,
                "score_k": 0,
                "answer_id_j": 1000 + q,
                "answer_id_k": 2000 + q,
            }
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    for subset in ("finetune", "reward", "rl", "evaluation"):
        pq.write_table(pa.table({c: [r[c] for r in rows] for c in PAIR_COLUMNS}), data_dir / f"{subset}.parquet")
    return data_dir


def cuda() -> bool:
    return torch.cuda.is_available()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda() else None


def reset_peak() -> None:
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


# -- checks ---------------------------------------------------------------------------------------------------


def dtype_audit(model_dir: Path, quantization: str) -> object:
    from types import SimpleNamespace

    from rlhf_pipeline.modeling.loading import load_causal_lm
    from rlhf_pipeline.training.trainable import trainable_model

    if not cuda():
        emit("dtype_audit", skipped="needs CUDA (bitsandbytes)")
        return None
    base = load_causal_lm(str(model_dir), quantization=quantization, precision="bf16")
    cfg = SimpleNamespace(
        lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
        quantization=quantization, gradient_checkpointing=True, mixed_precision="bf16", cpu_kernels="off",
    )  # fmt: skip
    model = trainable_model(base, cfg)
    groups: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        group = next((g for g in ("lora_", "embed_tokens", "lm_head", "norm") if g in name), "quantized linears").strip(
            "_"
        )
        counts = groups.setdefault(group, {})
        counts[str(param.dtype)] = counts.get(str(param.dtype), 0) + param.numel()
    model.eval()
    with torch.no_grad():
        ids = torch.randint(10, 1000, (1, 8), device="cuda")
        cache = model(input_ids=ids, use_cache=True).past_key_values
    emit(
        "dtype_audit",
        quantization=quantization,
        groups=groups,
        kv_cache_dtype=str(cache.layers[0].keys.dtype),
        memory_gib=round(torch.cuda.memory_allocated() / GIB, 3),
    )
    model.train()
    return model


@contextmanager
def phase_peaks(peaks: dict[str, float]):
    """Record torch's peak allocation inside each `clock(name)` block of the PPO trainer (its Stopwatch)."""
    from rlhf_pipeline.ppo import metrics

    original = metrics.Stopwatch.__call__

    @contextmanager
    def measured(self, name):
        reset_peak()
        with original(self, name):
            yield
        sync()
        value = peak_gib()
        if value is not None:
            peaks[name] = max(peaks.get(name, 0.0), value)

    metrics.Stopwatch.__call__ = measured
    try:
        yield
    finally:
        metrics.Stopwatch.__call__ = original


@contextmanager
def no_final_save():
    """The PPO peak runs skip writing a 7B adapter + merged model (the stage check covers saving and merging)."""
    from rlhf_pipeline.ppo import policy

    original = policy.PolicyWithValue.save_trained

    def skip(self, output, tokenizer):
        self.detach_reward_model()
        dirs = Path(output) / "adapter", Path(output) / "merged"
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        return dirs

    policy.PolicyWithValue.save_trained = skip
    try:
        yield
    finally:
        policy.PolicyWithValue.save_trained = original


def ppo_peak(model_dir: Path, data_dir: Path, out: Path, label: str, quantization: str, **sizes) -> None:
    from rlhf_pipeline.modeling import memory_estimate as me
    from rlhf_pipeline.ppo.config import PPOConfig
    from rlhf_pipeline.ppo.trainer import run_ppo

    cfg = PPOConfig(
        model=str(model_dir), data=str(data_dir), output=str(out / f"ppo-peak-{label}"), quantization=quantization,
        precision="bf16" if cuda() else "fp32", mixed_precision="bf16" if cuda() else "no", steps=1, ppo_epochs=1,
        gradient_checkpointing=True, force_length=True, lora_r=16, lora_alpha=32, tracking_uri=tracking(out),
        register_model=False, **sizes,
    )  # fmt: skip
    peaks: dict[str, float] = {}
    reset_peak()
    tic = time.perf_counter()
    with phase_peaks(peaks), no_final_save():
        run_ppo(cfg, reward_fn=lambda questions, responses, rollout: [len(r) / 100 for r in responses])
    from transformers import AutoConfig

    arch = me.Architecture.from_hf_config(AutoConfig.from_pretrained(model_dir))
    estimated = {p.name: round(p.total_gib, 3) for p in me.estimate(arch, me.workload_from_config("ppo", cfg))}
    estimated["forward"] = max(estimated.pop("reference"), estimated.pop("old"))
    emit(
        "ppo_peak",
        label=label,
        quantization=quantization,
        batch=cfg.batch_size,
        rollout_batch_size=cfg.rollout_chunk(),
        tokens=cfg.max_prompt_length + cfg.max_new_tokens,
        measured_gib=peaks or None,
        estimated_gib={k: v for k, v in estimated.items() if k != "score"},
        goal_gib=20,
        within_goal=(max(peaks.values()) <= 20) if peaks else None,
        seconds=round(time.perf_counter() - tic, 1),
    )


def decode(model, tokenizer, rows: int, prompt: int, new: int) -> None:
    from rlhf_pipeline.modeling.generation import sample_responses

    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (prompt,), generator=generator).tolist() for _ in range(rows)]
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    eos = tokenizer.eos_token_id

    def ours():
        sample_responses(model, prompts, max_new_tokens=new, eos_token_id=eos, pad_token_id=eos, force_length=True)

    def hf(**extra):
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=True, top_k=0,
            pad_token_id=eos, eos_token_id=eos, **extra,
        )  # fmt: skip

    runs = {"cache_loop": ours, "generate": hf, "generate_static_cache": lambda: hf(cache_implementation="static")}
    figures = {}
    model.eval()
    with torch.no_grad():
        for name, run in runs.items():
            run()  # warm-up (the static cache compiles / allocates here)
            sync()
            tic = time.perf_counter()
            run()
            sync()
            figures[name] = round(rows * new / (time.perf_counter() - tic), 1)
    emit("decode", rows=rows, prompt_tokens=prompt, new_tokens=new, tokens_per_s=figures)


def tracking(out: Path) -> str:
    return f"sqlite:///{out / 'mlflow.db'}"


class _Interrupt(Exception):
    pass


def run_twice(name: str, run, make_cfg, out_dir: Path, step_field: str) -> dict:
    """A 2-step run interrupted after its step-1 checkpoint, then the same run again: it resumes from step 1."""
    from rlhf_pipeline.training.checkpoint import latest_checkpoint

    def interrupt(step: int) -> None:
        if step == 1:
            raise _Interrupt

    reset_peak()
    tic = time.perf_counter()
    cfg = make_cfg(**{step_field: 2})
    try:
        run(cfg, on_step=interrupt)
    except _Interrupt:
        pass
    resumed_from = latest_checkpoint(out_dir)
    result = run(cfg)
    return {
        "seconds": round(time.perf_counter() - tic, 1),
        "peak_gib": peak_gib(),
        "resumed_from": resumed_from.name if resumed_from else None,
        "status": result.status,
        "merged": (out_dir / "merged" / "config.json").is_file(),
        "adapter": (out_dir / "adapter" / "adapter_config.json").is_file(),
    }


def stage_runs(model_dir: Path, data_dir: Path, out: Path, quantization: str) -> None:
    from rlhf_pipeline.ppo.config import PPOConfig
    from rlhf_pipeline.ppo.policy import PolicyWithValue
    from rlhf_pipeline.ppo.rewards import SharedBaseRewardModel
    from rlhf_pipeline.ppo.trainer import run_ppo
    from rlhf_pipeline.training.dpo import DPOConfig, run_dpo
    from rlhf_pipeline.training.reward import RewardConfig, run_reward
    from rlhf_pipeline.training.sft import SFTConfig, run_sft

    if quantization != "none" and not cuda():
        emit("stage", quantization=quantization, skipped="needs CUDA (bitsandbytes)")
        return
    root = out / f"stages-{quantization}"
    precision = {"precision": "bf16", "mixed_precision": "bf16"} if cuda() else {"precision": "fp32"}
    common = dict(
        data=str(data_dir), quantization=quantization, lora_r=8, lora_alpha=16, save_steps=1, gradient_checkpointing=True,
        tracking_uri=tracking(out), register_model=False, **precision,
    )  # fmt: skip
    sft_out, rm_out = root / "sft", root / "reward"

    def sft_cfg(**steps):
        return SFTConfig(**common, model=str(model_dir), output=str(sft_out), seq_length=256, batch_size=2, **steps)

    emit("stage", stage="sft", quantization=quantization, **run_twice("sft", run_sft, sft_cfg, sft_out, "max_steps"))
    merged = str(sft_out / "merged")

    def rm_cfg(**steps):
        return RewardConfig(**common, model=merged, output=str(rm_out), max_length=256, batch_size=2, **steps)

    emit(
        "stage",
        stage="reward",
        quantization=quantization,
        **run_twice("reward", run_reward, rm_cfg, rm_out, "max_steps"),
    )

    ppo_out = root / "ppo"

    def ppo_cfg(**steps):
        return PPOConfig(
            **common, model=merged, reward_model=str(rm_out), output=str(ppo_out), batch_size=4, mini_batch_size=2,
            rollout_batch_size=2, ppo_epochs=1, max_prompt_length=128, min_new_tokens=16, max_new_tokens=16, **steps,
        )  # fmt: skip

    shared = []
    original = PolicyWithValue.attach_reward_model

    def spy(self, cfg):
        scorer = original(self, cfg)
        shared.append(isinstance(scorer, SharedBaseRewardModel))
        return scorer

    PolicyWithValue.attach_reward_model = spy
    try:
        figures = run_twice("ppo", run_ppo, ppo_cfg, ppo_out, "steps")
    finally:
        PolicyWithValue.attach_reward_model = original
    emit("stage", stage="ppo", quantization=quantization, reward_shared_base=all(shared) and bool(shared), **figures)

    dpo_out = root / "dpo"

    def dpo_cfg(**steps):
        return DPOConfig(**common, model=merged, output=str(dpo_out), max_length=256, batch_size=2, **steps)

    emit("stage", stage="dpo", quantization=quantization, **run_twice("dpo", run_dpo, dpo_cfg, dpo_out, "max_steps"))


def load_8bit(model_dir: Path) -> None:
    from rlhf_pipeline.modeling.generation import sample_responses
    from rlhf_pipeline.modeling.loading import load_causal_lm

    if not cuda():
        emit("load_8bit", skipped="needs CUDA (bitsandbytes)")
        return
    reset_peak()
    model = load_causal_lm(str(model_dir), quantization="8bit", precision="bf16").eval()
    dtypes: dict[str, int] = {}
    for param in model.parameters():
        dtypes[str(param.dtype)] = dtypes.get(str(param.dtype), 0) + param.numel()
    rollout = sample_responses(model, [[11, 12, 13, 14]] * 2, max_new_tokens=8, eos_token_id=2, force_length=True)
    emit(
        "load_8bit",
        dtypes=dtypes,
        generated=int(rollout.response_mask.sum()),
        memory_gib=round(torch.cuda.memory_allocated() / GIB, 3),
        peak_gib=peak_gib(),
    )
    del model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="Scratch directory (models, data, runs).")
    parser.add_argument("--tiny", action="store_true", help="Tiny configs on the CPU: proves the script runs.")
    parser.add_argument("--only", nargs="*", default=None, help="Run only these checks.")
    args = parser.parse_args(argv)
    with redirect_stdout(sys.stderr):  # tqdm.write / print of the stages: not JSON lines
        return run_checks(args)


def _bitsandbytes_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bitsandbytes")
    except PackageNotFoundError:
        return None


def run_checks(args) -> int:
    from rlhf_pipeline.modeling.loading import load_tokenizer

    wanted = set(args.only or ["dtype_audit", "ppo_peak", "decode", "stage", "load_8bit"])
    device = "cuda" if cuda() else "cpu"
    big, small = ("tiny", "tiny") if args.tiny else ("7b", "1b")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    emit(
        "device",
        name=torch.cuda.get_device_name() if cuda() else "cpu",
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,  # bitsandbytes must ship a library for this CUDA version
        bitsandbytes=_bitsandbytes_version(),
        tiny=args.tiny,
    )
    quantization = "4bit" if cuda() else "none"
    if wanted & {"dtype_audit", "ppo_peak", "decode"}:
        big_dir = build_model_dir(args.out / f"llama-{big}", big, device)
        tokenizer = load_tokenizer(str(big_dir), padding_side="left")
        model = dtype_audit(big_dir, "4bit") if "dtype_audit" in wanted else None
        if "decode" in wanted:
            if model is None:
                from rlhf_pipeline.modeling.loading import load_causal_lm

                model = load_causal_lm(str(big_dir), quantization=quantization)
            decode(model, tokenizer, rows=8, prompt=16 if args.tiny else 128, new=8 if args.tiny else 128)
        del model
        if cuda():
            torch.cuda.empty_cache()
        if "ppo_peak" in wanted:
            data = write_data(args.out / "data-long", questions=40, words=32 if args.tiny else 600)
            if args.tiny:
                sizes = [
                    (
                        "tiny",
                        dict(batch_size=2, mini_batch_size=2, max_prompt_length=24, min_new_tokens=8, max_new_tokens=8),
                    )
                ]
            else:
                sizes = [
                    ("8x512", dict(batch_size=8, mini_batch_size=8, max_prompt_length=384, min_new_tokens=128, max_new_tokens=128)),
                    ("recipe", dict(batch_size=32, mini_batch_size=8, rollout_batch_size=8, max_prompt_length=512, min_new_tokens=128, max_new_tokens=128)),
                ]  # fmt: skip
            for label, size in sizes:
                ppo_peak(big_dir, data, args.out, label, quantization, **size)
                if cuda():
                    torch.cuda.empty_cache()
    if wanted & {"stage", "load_8bit"}:
        small_dir = build_model_dir(args.out / f"llama-{small}", small, device)
        if "stage" in wanted:
            data = write_data(args.out / "data-short", questions=24, words=12)
            for quant in ("4bit", "none"):
                stage_runs(small_dir, data, args.out, quant)
        if "load_8bit" in wanted:
            load_8bit(small_dir)
    emit("done", seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
