"""Peak GPU memory of a stage, per phase, before launch: pick a node pool before spending GPU hours.

    arch = architecture("llama-2-7b")                      # or Architecture.from_hf_config(AutoConfig...)
    phases = estimate(arch, workload_from_config("ppo", cfg))
    for p in phases: print(p.name, p.total_gib, p.parts)

Pure arithmetic (no torch): every figure is a product of the config's sizes and the byte counts named below, so
a test can check it against a hand computation. It models what torch's allocator holds (what
`torch.cuda.max_memory_allocated` reports), not the CUDA context (`CUDA_CONTEXT_GIB`, added by `fits`) or
fragmentation. The activation model is an upper-bound count of the tensors autograd keeps per token and layer;
it is to be calibrated against measured peaks (bench/gpu/device_check.py prints both) once a GPU is lent.

Parts of a phase (bytes):
    weights      quantized decoder linears (4bit NF4 + double-quant absmax: 0.5159 B/param; 8bit: 1 B/param) and
                 everything else (embeddings, LM head, norms) in the compute dtype -- modeling/lora.py keeps a
                 k-bit base's non-quantized weights there instead of peft's fp32
    trainable    LoRA matrices and heads in fp32 with gradient and AdamW's two moments: 16 B/param
    activations  training: kept tensors of every layer (or, with gradient checkpointing, every layer's input
                 plus one layer recomputed with its gradients); frozen passes: one layer's working set
    kv_cache     generation: 2 (K, V) x layers x rows x tokens x kv width, in the compute dtype
    logits       one row chunk of the LM head at a time (forward.LOGITS_BUDGET elements), see `_logits_bytes`
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

GIB = 1 << 30
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS workspace: outside torch's allocator, not in the phases
LOGITS_BUDGET = 1 << 26  # forward.LOGITS_BUDGET (kept equal by a test; this module imports no torch)

# Bytes per quantized parameter: NF4 packs two weights per byte; double quantization stores one 8-bit absmax
# per 64 weights and one fp32 absmax per 256 such blocks. LLM.int8: one byte per weight (+ fp32 row scales, < 0.1 %).
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TRAINABLE_BYTES = 16  # fp32 weight + fp32 gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class Architecture:
    """The sizes of a decoder-only transformer that the estimate reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied_embeddings: bool

    @classmethod
    def from_hf_config(cls, config: Any) -> Architecture:
        heads = config.num_attention_heads
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder-layer linear, by the module name LoRA targets."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Parameters of the decoder linears (the ones bitsandbytes quantizes), all layers."""
        return self.num_layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, an untied LM head, two norms per layer and the final norm (never quantized)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.num_layers + 1) * self.hidden_size

    def lora_params(self, rank: int, targets: list[str] | tuple[str, ...]) -> int:
        shapes = self.linear_shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise ValueError(f"LoRA targets {unknown} are not decoder linears ({', '.join(shapes)})")
        return self.num_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)

    def activation_elements_per_token_layer(self) -> int:
        """Tensors one layer keeps for backward, per token (elements): attention = norm in/out (2H), q, k, v,
        the attention output, o_proj's output (H); MLP = norm in/out (2H), gate, up, act(gate), act * up (4I),
        down's output (H). A count of what autograd CAN keep (an upper bound for a frozen base)."""
        h = self.hidden_size
        attention = 2 * h + self.q_width + 2 * self.kv_width + self.q_width + h
        mlp = 2 * h + 4 * self.intermediate_size + h
        return attention + mlp


# Architectures by name or hub id, so a recipe whose model is not on this machine can still be estimated.
_LLAMA_2_7B = Architecture(32000, 4096, 11008, 32, 32, 32, 128, False)
_LLAMA_3_8B = Architecture(128256, 4096, 14336, 32, 32, 8, 128, False)
_SMOLLM2_135M = Architecture(49152, 576, 1536, 30, 9, 3, 64, True)
PRESETS: dict[str, Architecture] = {
    "llama-2-7b": _LLAMA_2_7B,
    "meta-llama/Llama-2-7b-hf": _LLAMA_2_7B,
    "llama-3-8b": _LLAMA_3_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA_3_8B,
    "smollm2-135m": _SMOLLM2_135M,
    "smollm2-135m-instruct": _SMOLLM2_135M,
}


@dataclass(frozen=True)
class Workload:
    """What a stage runs, in the sizes the estimate reads (built from a stage config by `workload_from_config`)."""

    stage: str  # sft | reward | dpo | ppo | evaluate
    quantization: str = "none"  # none | 8bit | 4bit
    dtype: str = "bf16"  # compute dtype of the weights that are not quantized, and of activations / KV cache
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    gradient_checkpointing: bool = False
    eager_attention: bool = False  # eager materializes [heads, T, T] scores; sdpa / flash do not
    batch_size: int = 4  # sft: blocks; reward / dpo: pairs; ppo / evaluate: prompts per step / per batch
    seq_length: int = 512  # sft: tokens per block; reward / dpo: tokens per side
    prompt_length: int = 256  # ppo / evaluate
    new_tokens: int = 128  # ppo / evaluate
    mini_batch_size: int = 8  # ppo
    rollout_batch_size: int | None = None  # ppo: rows generated / scored / passed at once (None: batch_size)
    reward_shares_base: bool = True  # ppo: reward adapter on the policy's base (else a second copy of the base)
    reward_lora_r: int = 8  # ppo: the reward adapter's rank (q_proj, v_proj)
    logits_budget: int = LOGITS_BUDGET


@dataclass
class Phase:
    name: str
    parts: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB


def weight_bytes(arch: Architecture, quantization: str, dtype: str) -> float:
    linear = QUANTIZED_BYTES.get(quantization, DTYPE_BYTES[dtype])
    return arch.linear_params() * linear + arch.other_params() * DTYPE_BYTES[dtype]


def _logits_bytes(arch: Architecture, rows: int, w: Workload, *, grad: bool) -> float:
    """One chunk of rows through the LM head (forward.head_logprobs): the head's output in the compute dtype, its
    fp32 copy and logsumexp's fp32 exp temporary; with autograd also the fp32 gradient of the logits and its copy
    in the compute dtype (the chunk is recomputed in backward, so only one chunk's are alive)."""
    chunk = min(rows, max(1, w.logits_budget // arch.vocab_size))
    per_element = DTYPE_BYTES[w.dtype] + 4 + 4
    if grad:
        per_element += 4 + DTYPE_BYTES[w.dtype]
    return chunk * arch.vocab_size * per_element


def _sampling_bytes(arch: Architecture, rows: int, w: Workload) -> float:
    """One decode step's head: logits (compute dtype + fp32), then the sampler's float64 probabilities and CDF."""
    return rows * arch.vocab_size * (DTYPE_BYTES[w.dtype] + 4 + 8 + 8)


def _attention_scores_bytes(arch: Architecture, rows: int, tokens: int, w: Workload) -> float:
    """Eager attention's scores and softmax [rows, heads, T, T] for one layer (sdpa / flash keep none)."""
    return 2 * rows * arch.num_heads * tokens * tokens * DTYPE_BYTES[w.dtype] if w.eager_attention else 0


def _train_activation_bytes(arch: Architecture, rows: int, tokens: int, w: Workload) -> float:
    """Autograd's kept tensors for a training forward of rows x tokens. Checkpointing keeps every layer's input
    (H per token) and, while one layer is recomputed, that layer's tensors and their gradients (x 2)."""
    n, b = rows * tokens, DTYPE_BYTES[w.dtype]
    layer = n * arch.activation_elements_per_token_layer() * b + _attention_scores_bytes(arch, rows, tokens, w)
    if w.gradient_checkpointing:
        return arch.num_layers * n * arch.hidden_size * b + 2 * layer
    return arch.num_layers * layer + layer  # + the gradients of the layer being differentiated


def _frozen_activation_bytes(arch: Architecture, rows: int, tokens: int, w: Workload) -> float:
    """A no-grad forward: the last hidden states kept for the head plus one layer's working set."""
    n, b = rows * tokens, DTYPE_BYTES[w.dtype]
    layer = n * arch.activation_elements_per_token_layer() * b + _attention_scores_bytes(arch, rows, tokens, w)
    return n * arch.hidden_size * b + layer


def kv_cache_bytes(arch: Architecture, rows: int, tokens: int, dtype: str) -> float:
    return 2 * arch.num_layers * rows * tokens * arch.kv_width * DTYPE_BYTES[dtype]


def estimate(arch: Architecture, w: Workload) -> list[Phase]:
    """The peak of each phase of `w.stage`, split into parts (bytes)."""
    weights = weight_bytes(arch, w.quantization, w.dtype)
    lora = arch.lora_params(w.lora_r, w.lora_targets)
    h = arch.hidden_size
    if w.stage == "sft":
        base = {"weights": weights, "trainable": lora * TRAINABLE_BYTES}
        n = w.batch_size * w.seq_length
        return [
            Phase(
                "train",
                {
                    **base,
                    "activations": _train_activation_bytes(arch, w.batch_size, w.seq_length, w),
                    "logits": _logits_bytes(arch, n, w, grad=True),
                },
            )
        ]
    if w.stage in ("reward", "dpo"):
        head = h if w.stage == "reward" else 0  # the score head trains with the LoRA
        base = {"weights": weights, "trainable": (lora + head) * TRAINABLE_BYTES}
        rows, n = 2 * w.batch_size, 2 * w.batch_size * w.seq_length  # chosen and rejected sides
        train = {**base, "activations": _train_activation_bytes(arch, rows, w.seq_length, w)}
        if w.stage == "reward":
            return [Phase("train", train)]
        reference = {
            **base,
            "activations": _frozen_activation_bytes(arch, rows, w.seq_length, w),
            "logits": _logits_bytes(arch, n, w, grad=False),
        }
        return [
            Phase("reference", reference),
            Phase("train", {**train, "logits": _logits_bytes(arch, n, w, grad=True)}),
        ]
    if w.stage == "ppo":
        return _ppo_phases(arch, w, weights, lora)
    if w.stage == "evaluate":
        # evaluation/evaluate.py holds the SFT reference, the reward model and one policy at a time, each a model
        # of its own; a policy generates, the reward model scores, then policy and reference give the exact KL
        base = {"weights": 3 * weights}
        tokens = w.prompt_length + w.new_tokens
        frozen = _frozen_activation_bytes(arch, w.batch_size, tokens, w)
        return [
            Phase(
                "generate",
                {
                    **base,
                    "kv_cache": kv_cache_bytes(arch, w.batch_size, tokens, w.dtype),
                    "activations": _frozen_activation_bytes(arch, w.batch_size, w.prompt_length, w),
                    "logits": _sampling_bytes(arch, w.batch_size, w),
                },
            ),
            Phase("score", {**base, "activations": frozen}),
            Phase(
                "kl",  # forward.response_kl: both models' hidden states, then both heads on the same row chunk
                {
                    **base,
                    "activations": frozen + w.batch_size * tokens * h * DTYPE_BYTES[w.dtype],
                    "logits": 2 * _logits_bytes(arch, w.batch_size * w.new_tokens, w, grad=False),
                },
            ),
        ]
    raise ValueError(f"no memory model for stage {w.stage!r} (sft, reward, dpo, ppo, evaluate)")


def _ppo_phases(arch: Architecture, w: Workload, weights: float, lora: int) -> list[Phase]:
    chunk = min(w.rollout_batch_size or w.batch_size, w.batch_size)
    tokens = w.prompt_length + w.new_tokens
    reward_lora = arch.lora_params(w.reward_lora_r, ("q_proj", "v_proj"))
    reward = reward_lora * 4 + arch.hidden_size * 4 if w.reward_shares_base else weights
    base = {
        "weights": weights,
        "reward_model": reward,
        "trainable": (lora + arch.hidden_size + 1) * TRAINABLE_BYTES,  # + the value head
    }
    frozen_pass = {
        **base,
        "activations": _frozen_activation_bytes(arch, chunk, tokens, w),
        "logits": _logits_bytes(arch, chunk * w.new_tokens, w, grad=False),
    }
    # trainer.py: with one minibatch per epoch and no chunking the old pass keeps its graph for the first update
    old_keeps_graph = w.mini_batch_size >= w.batch_size and chunk >= w.batch_size
    old = (
        {
            **base,
            "activations": _train_activation_bytes(arch, w.batch_size, tokens, w),
            "logits": _logits_bytes(arch, w.batch_size * w.new_tokens, w, grad=True),
        }
        if old_keeps_graph
        else frozen_pass
    )
    update_rows = min(w.mini_batch_size, chunk)  # the update runs each minibatch in chunks of at most `chunk` rows
    return [
        Phase(
            "generate",
            {
                **base,
                "kv_cache": kv_cache_bytes(arch, chunk, tokens, w.dtype),
                "activations": _frozen_activation_bytes(arch, chunk, w.prompt_length, w),
                "logits": _sampling_bytes(arch, chunk, w),
            },
        ),
        Phase("score", {**base, "activations": _frozen_activation_bytes(arch, chunk, tokens, w)}),
        Phase("reference", dict(frozen_pass)),
        Phase("old", dict(old)),
        Phase(
            "update",
            {
                **base,
                "activations": _train_activation_bytes(arch, update_rows, tokens, w),
                "logits": _logits_bytes(arch, update_rows * w.new_tokens, w, grad=True),
            },
        ),
    ]


def workload_from_config(stage: str, cfg: Any) -> Workload:
    """The Workload of a stage config (any object with the stage's fields); precision auto counts as bf16 (a GPU
    with native bf16, the only place these recipes run)."""
    precision = getattr(cfg, "precision", "auto")
    common = dict(
        stage=stage,
        quantization=getattr(cfg, "quantization", "none"),
        dtype="bf16" if precision == "auto" else precision,
        lora_r=getattr(cfg, "lora_r", 16),
        lora_targets=tuple(getattr(cfg, "lora_target_modules", ("q_proj", "v_proj"))),
        gradient_checkpointing=bool(getattr(cfg, "gradient_checkpointing", False)),
        eager_attention=getattr(cfg, "attn_implementation", "auto") == "eager",
        batch_size=getattr(cfg, "batch_size", 4),
    )
    if stage == "sft":
        return Workload(**common, seq_length=cfg.seq_length)
    if stage in ("reward", "dpo"):
        return Workload(**common, seq_length=cfg.max_length)
    if stage in ("ppo", "evaluate"):
        return Workload(
            **common,
            prompt_length=cfg.max_prompt_length,
            new_tokens=cfg.max_new_tokens,
            mini_batch_size=getattr(cfg, "mini_batch_size", 8),
            rollout_batch_size=getattr(cfg, "rollout_batch_size", None),
            reward_shares_base=bool(getattr(cfg, "share_reward_base", True)),
        )
    raise ValueError(f"no memory model for stage {stage!r} (sft, reward, dpo, ppo, evaluate)")


def peak(phases: list[Phase]) -> Phase:
    return max(phases, key=lambda p: p.total)


def fits(phases: list[Phase], budget_gib: float) -> bool:
    """Whether the largest phase plus the CUDA context fits in `budget_gib`."""
    return peak(phases).total_gib + CUDA_CONTEXT_GIB <= budget_gib


def smallest_fitting(peak_gib: float, pools: dict[str, float]) -> str | None:
    """The node pool (name -> GPU memory in GiB) with the least memory that holds `peak_gib` plus the CUDA
    context, or None when none does."""
    fitting = [(gib, name) for name, gib in pools.items() if peak_gib + CUDA_CONTEXT_GIB <= gib]
    return min(fitting)[1] if fitting else None


def with_rollout_batch(w: Workload, rows: int) -> Workload:
    return replace(w, rollout_batch_size=rows)
