"""PPO's reward sources: the reward model (read at the last real token of prompt + response, normalized by the
reward stage's held-out mean/std) for real runs, any function of the decoded texts for tests and toy problems.

When the reward adapter was trained on the policy's own SFT weights (decided from the recorded lineage,
modeling/lineage.py, so a 4-bit base qualifies too), it runs as a frozen second adapter on the policy's base
(`SharedBaseRewardModel`): one copy of the backbone serves policy, reference and reward model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from rlhf_pipeline.batching.padding import pad
from rlhf_pipeline.batching.tokenize import keep_end, leading_special_ids, tokenize_documents
from rlhf_pipeline.data.prompts import format_example
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.forward import sequence_rewards
from rlhf_pipeline.modeling.generation import Rollout
from rlhf_pipeline.modeling.loading import resolve_model_path
from rlhf_pipeline.results import METRICS_FILE, StageResult


class RewardSource(Protocol):
    """Scores [B] (already normalized) for a batch of (question, response text) pairs and their rollout."""

    def __call__(self, questions: list[str], responses: list[str], rollout: Rollout) -> torch.Tensor: ...


class FunctionReward:
    """Wraps `fn(questions, responses, rollout) -> list[float] | Tensor` (toy rewards, rule-based rewards)."""

    def __init__(self, fn: Callable[[list[str], list[str], Rollout], Sequence[float] | torch.Tensor]):
        self.fn = fn

    def __call__(self, questions, responses, rollout):
        return torch.as_tensor(self.fn(questions, responses, rollout), dtype=torch.float32).reshape(-1)


@dataclass
class RewardModelInfo:
    merged_dir: Path  # AutoModelForSequenceClassification (num_labels=1) + tokenizer
    adapter_dir: Path | None  # LoRA SEQ_CLS adapter incl. the score head (base = the SFT model)
    metrics: dict  # the reward stage's own metrics (StageResult.metrics of its metrics.json: reward_mean, ...)

    @property
    def reward_mean(self) -> float:
        return float(self.metrics.get("reward_mean", 0.0))

    @property
    def reward_std(self) -> float:
        std = float(self.metrics.get("reward_std", 1.0))
        return std if std > 1e-6 else 1.0


def read_reward_model_dir(path: str | Path) -> RewardModelInfo:
    """The reward stage's output dir (merged/, adapter/, metrics.json), or a bare seq-cls model dir."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"reward model not found: {path} (expected the reward stage's output directory)")
    if (root / "merged" / "config.json").is_file():
        merged = root / "merged"
    elif (root / "config.json").is_file():
        merged = root
    else:
        raise UserError(f"{path} holds no reward model (no merged/config.json or config.json)")
    metrics: dict = {}
    for stage_dir in (root, merged.parent):
        if (stage_dir / METRICS_FILE).is_file():
            result = StageResult.read(stage_dir)
            if result.stage != "reward":
                raise UserError(f"{stage_dir} is the output of the {result.stage} stage, not of the reward stage")
            metrics = result.metrics
            break
    adapter = root / "adapter" if (root / "adapter" / "adapter_config.json").is_file() else None
    return RewardModelInfo(merged_dir=merged, adapter_dir=adapter, metrics=metrics)


class RewardModelScorer:
    """Step (2) of PPO: the reward model's score, normalized by the reward stage's held-out mean/std.

    The text is re-tokenized with the reward model's own tokenizer in the reward stage's format
    (template(question, answer) + EOS, `data.tokenize_documents`), so it sees exactly what it was trained on.
    """

    def __init__(self, info: RewardModelInfo, model, tokenizer, *, template: str, max_length: int = 1024):
        self.info, self.model, self.tokenizer = info, model.eval(), tokenizer
        self.template, self.max_length = template, max_length

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        template: str,
        precision: str = "auto",
        quantization: str = "none",
        device: str | None = None,
        trust_remote_code: bool = False,
        max_length: int = 1024,
    ):
        from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer

        info = read_reward_model_dir(path)
        model = load_causal_lm(
            str(info.merged_dir),
            model_class="AutoModelForSequenceClassification",
            num_labels=1,
            precision=precision,
            quantization=quantization,
            device=device,
            trust_remote_code=trust_remote_code,
        )
        model.requires_grad_(False)
        tokenizer = load_tokenizer(str(info.merged_dir), padding_side="right", trust_remote_code=trust_remote_code)
        return cls(info, model, tokenizer, template=template, max_length=max_length)

    def raw_scores(self, questions: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        texts = [format_example(self.template, q, r) for q, r in zip(questions, responses)]
        # the reward stage's own encoding (special tokens + EOS); an over-long text keeps its END, where the
        # score is read, rather than being cut before its last token (and its BOS, for a model that needs one)
        head = leading_special_ids(self.tokenizer)
        encoded = [keep_end(ids, self.max_length, head) for ids in tokenize_documents(self.tokenizer, texts)]
        device = self.score_head().weight.device
        out = []
        for i in range(0, len(encoded), batch_size):
            input_ids, attention_mask = pad(encoded[i : i + batch_size], self.tokenizer.pad_token_id, "right", device)
            out.append(self._score_batch(input_ids, attention_mask).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _score_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_rewards(self.model, input_ids, attention_mask)

    def score_head(self) -> torch.nn.Module:
        return getattr(self.model, "score", None) or self.model.classifier

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.info.reward_mean) / self.info.reward_std

    def __call__(self, questions, responses, rollout=None) -> torch.Tensor:
        return self.normalize(self.raw_scores(questions, responses))


class SharedBaseRewardModel(RewardModelScorer):
    """The reward model as a frozen second LoRA adapter ('reward') on the POLICY's base weights + its score head.

    Possible when the reward adapter was trained on the same SFT weights the policy starts from (the pipeline's
    normal case): one copy of the backbone serves policy, reference and reward model.
    """

    ADAPTER = "reward"

    def __init__(
        self, info: RewardModelInfo, policy, head: torch.nn.Linear, tokenizer, *, template: str, max_length: int
    ):
        self.info, self.policy, self.head, self.tokenizer = info, policy, head, tokenizer
        self.template, self.max_length = template, max_length

    @classmethod
    def try_attach(cls, policy, info: RewardModelInfo, cfg) -> SharedBaseRewardModel | None:
        from safetensors.torch import load_file

        from rlhf_pipeline.modeling.loading import load_tokenizer

        if info.adapter_dir is None or not shares_base(policy.get_base_model(), info, cfg.model):
            return None
        weights = load_file(str(info.adapter_dir / "adapter_model.safetensors"))
        score = [v for k, v in weights.items() if k.endswith(("score.weight", "score.modules_to_save.weight"))]
        if len(score) != 1 or score[0].shape[0] != 1:
            return None
        policy.load_adapter(str(info.adapter_dir), adapter_name=cls.ADAPTER, is_trainable=False)
        policy.set_adapter("default")
        device = next(policy.parameters()).device
        head = torch.nn.Linear(score[0].shape[1], 1, bias=False, device=device, dtype=score[0].dtype)
        head.weight.data.copy_(score[0])
        head.requires_grad_(False)
        tokenizer = load_tokenizer(str(info.merged_dir), padding_side="right", trust_remote_code=cfg.trust_remote_code)
        return cls(info, policy, head, tokenizer, template=cfg.prompt_template, max_length=cfg.max_reward_length)

    @torch.no_grad()
    def _score_batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.policy.set_adapter(self.ADAPTER)
        try:
            return sequence_rewards(self.policy, input_ids, attention_mask, head=self.head)
        finally:
            self.policy.set_adapter("default")  # also restores requires_grad: only the policy adapter trains

    def score_head(self) -> torch.nn.Module:
        return self.head

    def detach(self) -> None:
        self.policy.delete_adapter(self.ADAPTER)
        self.policy.set_adapter("default")


def shares_base(base_model, info: RewardModelInfo, policy_model: str) -> bool:
    """Whether the reward adapter was trained on the policy's base weights: from the recorded lineage (the content
    hash the reward stage wrote of the base it trained on, against the policy base's), which works for a 4/8-bit
    base too; only without a record (an output of an older version) from comparing tensors (`same_backbone`)."""
    from rlhf_pipeline.modeling.lineage import local_model_dir, trained_on

    base_dir = local_model_dir(resolve_model_path(policy_model))
    decided = trained_on(info.adapter_dir, base_dir) if base_dir is not None else None
    if decided is not None:
        return decided
    return same_backbone(base_model, info)


def same_backbone(base_model, info: RewardModelInfo) -> bool:
    """Whether the reward adapter was trained on exactly the policy's base weights.

    Compares, between the loaded base and the reward model's merged checkpoint, the embeddings, the final norm, an
    MLP weight and the reward adapter's own target modules in the first and last layers, the latter after
    subtracting the adapter's merged delta (scale * B @ A). That catches a reward model trained on the raw base
    when the policy starts from an SFT model whose LoRA changed only q/v. Quantized weights cannot be compared:
    then the answer is no (and the reward model is loaded separately).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    adapter_cfg = json.loads((info.adapter_dir / "adapter_config.json").read_text())
    targets = adapter_cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    scale = float(adapter_cfg.get("lora_alpha", 1)) / float(adapter_cfg.get("r", 1))
    lora = load_file(str(info.adapter_dir / "adapter_model.safetensors"))
    ours = {k.replace(".base_layer", ""): v for k, v in base_model.state_dict().items()}
    layers = sorted({int(k.split("layers.")[1].split(".")[0]) for k in ours if "layers." in k})
    if not layers:
        return False
    probes = [
        k
        for k in ours
        if k.endswith(("embed_tokens.weight", "model.norm.weight"))
        or k.endswith(f"layers.{layers[0]}.mlp.down_proj.weight")
        or any(
            k.endswith(f"layers.{i}.{part}.weight")
            for i in (layers[0], layers[-1])
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
            if part.split(".")[-1] in targets
        )
    ]
    files = sorted(info.merged_dir.glob("*.safetensors"))
    found = 0
    for file in files:
        with safe_open(str(file), framework="pt") as fh:
            names = set(fh.keys())
            for name in probes:
                if name not in names:
                    continue
                mine = ours[name]
                if not mine.is_floating_point() or mine.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    return False  # quantized: not comparable
                theirs = fh.get_tensor(name)
                module = name.removesuffix(".weight")
                lora_a = lora.get(f"base_model.model.{module}.lora_A.weight")
                lora_b = lora.get(f"base_model.model.{module}.lora_B.weight")
                delta = scale * (lora_b.float() @ lora_a.float()) if lora_a is not None and lora_b is not None else 0.0
                if theirs.shape != mine.shape or not _merged_from(mine.detach().cpu(), delta, theirs):
                    return False
                found += 1
    return found == len(probes) and found > 0


def _merged_from(base: torch.Tensor, delta, merged: torch.Tensor) -> bool:
    """Whether `merged` (a checkpoint weight) is `base` + the adapter's `delta`, merged the way peft merges.

    fp32: subtract the delta and compare (float tolerance). bf16/fp16: the merge rounded base + delta to the weight
    dtype, so redo exactly that rounding and require (almost) every element to be bit-equal -- a subtraction test
    would need a tolerance above bf16's 0.4 % rounding, wide enough to mistake an SFT-changed q/v for the base.
    """
    if base.dtype == torch.float32:
        return torch.allclose(merged.float() - delta, base, rtol=1e-3, atol=1e-4)
    redone = (base.float() + delta).to(base.dtype)
    return bool((redone == merged.to(base.dtype)).float().mean() >= 0.999)


def shape_scores(
    scores: torch.Tensor, has_eos: torch.Tensor, *, reward_clip: float | None, missing_eos_penalty: float | None
) -> torch.Tensor:
    """Optional clip to [-c, c], then subtract the penalty from responses that never emitted EOS."""
    if reward_clip is not None:
        scores = scores.clamp(-reward_clip, reward_clip)
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * (~has_eos.cpu()).to(scores.dtype)
    return scores


def score_responses(
    reward: RewardSource, questions: list[str], responses: list[str], rollout: Rollout, cfg
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (2) of PPO: (raw scores, for the logs; the scores PPO optimizes) [B], the latter on the rollout's device.

    The reward model's raw score is normalized by the reward stage's held-out mean/std; a function reward is taken
    as already normalized. Then `shape_scores`: the optional clip and the no-EOS penalty.
    """
    if isinstance(reward, RewardModelScorer):  # keep the raw score too
        chunk = cfg.rollout_chunk() if hasattr(cfg, "rollout_chunk") else 16
        raw = reward.raw_scores(questions, responses, batch_size=chunk).float()
        normalized = reward.normalize(raw)
    else:
        raw = normalized = reward(questions, responses, rollout).float().cpu()
    scores = shape_scores(
        normalized, rollout.has_eos, reward_clip=cfg.reward_clip, missing_eos_penalty=cfg.missing_eos_penalty
    )
    return raw, scores.to(rollout.response_mask.device)
