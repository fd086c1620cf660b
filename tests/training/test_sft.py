"""SFT stage on a tiny random-init Llama with the real SmolLM2 tokenizer: packing tensors, training, outputs,
registry, resume, the unreachable-server error."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_reward_helpers import make_data_dir

from rlhf_pipeline.batching.packing import IGNORE_INDEX, pack_documents
from rlhf_pipeline.batching.padding import collate_padded
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.loading import load_causal_lm
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.training.sft import CausalLMLoss, SFTConfig, run_sft

EOS = 2  # SmolLM2: eos == pad == <|im_end|>


def sft_config(tiny_model_dir, tmp_path, **overrides) -> SFTConfig:
    values = dict(
        model=str(tiny_model_dir),
        data=str(make_data_dir(tmp_path / "data")),
        output=str(tmp_path / "out"),
        seq_length=32,
        batch_size=2,
        max_steps=4,
        save_steps=2,
        learning_rate=5e-3,
        eval_fraction=0.25,
        lora_dropout=0.0,
        num_threads=1,
    )
    values.update(overrides)
    return SFTConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# Packing: the actual tensors
# ----------------------------------------------------------------------------------------------------------------


def test_packed_blocks_are_dense_and_restart_at_each_document():
    docs = [[10, 11, 12, EOS], [20, 21, EOS], [30, 31, 32, 33, 34, EOS], [40, EOS]]
    blocks = pack_documents(docs, seq_length=5, eos_token_id=EOS)
    # 15 tokens -> 3 full blocks, nothing padded, nothing reordered
    assert blocks.input_ids.tolist() == [[10, 11, 12, EOS, 20], [21, EOS, 30, 31, 32], [33, 34, EOS, 40, EOS]]
    # positions restart after every EOS (and at each block start: a continued document)
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    # a document's first token is never a target of the previous document's EOS
    assert blocks.labels.tolist() == [[-100, 11, 12, EOS, -100], [-100, EOS, -100, 31, 32], [-100, 34, EOS, -100, EOS]]


def test_blocks_opening_inside_a_document_open_with_its_bos():
    """A BOS-first tokenizer (Gemma, Llama 3): every block's position 0 is a BOS -- the document's own where a
    document starts there, an added one (never a target) where the block continues a document; nothing is lost
    or repeated: without the added BOSes the blocks are the stream in order."""
    bos = 1
    docs = [[bos, 10, 11, 12, EOS], [bos, 20, EOS], [bos, 30, 31, 32, 33, EOS]]
    blocks = pack_documents(docs, seq_length=4, eos_token_id=EOS, bos_token_id=bos)
    assert blocks.input_ids.tolist() == [[bos, 10, 11, 12], [bos, EOS, bos, 20], [bos, EOS, bos, 30], [bos, 31, 32, 33]]
    assert blocks.position_ids.tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 0, 1], [0, 1, 2, 3]]
    no = IGNORE_INDEX
    assert blocks.labels.tolist() == [[no, 10, 11, 12], [no, EOS, no, 20], [no, EOS, no, 30], [no, 31, 32, 33]]
    added = [row[1:] for row in blocks.input_ids.tolist()[1:]]  # blocks 2-4 continue a document
    stream = [t for doc in docs for t in doc]
    assert blocks.input_ids.tolist()[0] + [t for row in added for t in row] == stream[: 4 + 3 * 3]
    # without a BOS: the old cut, blocks of the stream as it is
    assert pack_documents(docs, 4, EOS).input_ids.tolist() == [stream[i : i + 4] for i in range(0, 12, 4)]


def test_packed_document_sees_only_itself(tiny_model_dir):
    """A document's hidden states inside a packed block equal those of the document alone: no cross-document
    attention, same RoPE positions."""
    model = load_causal_lm(str(tiny_model_dir)).eval()
    doc_a, doc_b = [5, 6, 7, 8, EOS], [50, 60, 70, EOS]
    blocks = pack_documents([doc_a, doc_b, [1, 2, 3]], seq_length=12, eos_token_id=EOS)
    with torch.no_grad():
        # use_cache=False matters: with a KV cache transformers skips the packed-sequence mask (as CausalLMLoss does)
        packed = model.model(
            input_ids=blocks.input_ids, position_ids=blocks.position_ids, use_cache=False
        ).last_hidden_state
        alone = model.model(input_ids=torch.tensor([doc_b])).last_hidden_state
        cross = model.model(
            input_ids=blocks.input_ids, use_cache=False
        ).last_hidden_state  # plain causal: b attends to a
    torch.testing.assert_close(packed[0, 5:9], alone[0], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cross[0, 5:9], alone[0], atol=1e-3)


def test_padded_batches_mask_padding_but_keep_eos_target():
    batch = collate_padded([[7, 8, 9, EOS], [7, EOS]], pad_token_id=EOS)
    assert batch["input_ids"].tolist() == [[7, 8, 9, EOS], [7, EOS, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    # pad == eos: the real EOS stays a target, the padding EOS tokens do not
    assert batch["labels"].tolist() == [[7, 8, 9, EOS], [7, EOS, IGNORE_INDEX, IGNORE_INDEX]]


def test_loss_ignores_padding(tiny_model_dir):
    """Padded rows give the same per-document loss as the documents one by one."""
    module = CausalLMLoss(load_causal_lm(str(tiny_model_dir)).eval())
    docs = [[7, 8, 9, 10, EOS], [30, 31, EOS]]
    with torch.no_grad():
        row_loss, row_tokens = module(**collate_padded(docs, EOS))
        for i, doc in enumerate(docs):
            alone_loss, alone_tokens = module(**collate_padded([doc], EOS))
            torch.testing.assert_close(row_loss[i], alone_loss[0], atol=1e-5, rtol=1e-5)
            assert row_tokens[i] == alone_tokens[0] == len(doc) - 1


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expressive_tiny_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its (tied, frozen) embeddings scaled x8.

    At the default init (std 0.02, hidden 64) the frozen output embeddings cap every logit near +-1, so no adapter
    can make a prediction confident and the loss cannot fall far below ln(vocab) = 10.8, however well it learns.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("expressive-tiny") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_sft_learns_and_writes_contract_outputs(expressive_tiny_model, tmp_path, mlflow_sqlite):
    tiny_model_dir = expressive_tiny_model
    targets = ["q_proj", "v_proj"]  # the default
    cfg = sft_config(tiny_model_dir, tmp_path, max_steps=60, save_steps=100, learning_rate=3e-2)
    summary = run_sft(cfg)
    out = tmp_path / "out"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 60 and metrics["train_questions"] == 6 and metrics["eval_questions"] == 2
    for key in (
        "eval_loss",
        "eval_perplexity",
        "eval_loss_before",
        "eval_perplexity_before",
        "train_loss",
        "tokens_per_s",
    ):
        assert metrics[key] is not None and torch.isfinite(torch.tensor(metrics[key])), key
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before"]  # held-out questions improve too
    assert (summary.stage, summary.status, summary.output, summary.processes) == ("sft", "trained", str(out), 1)
    assert StageResult.read(out) == summary  # metrics.json is the returned result

    # losses fall on the memorizable set (first vs last logged step)
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    [registered] = summary.registered
    assert metrics["registered"] == [registered.model_dump()] and registered.uri == "models:/rlhf-sft/1"
    run_id = registered.run_id
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "sft/loss"), key=lambda m: m.step)]
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    print("sft losses", losses[:3], losses[-3:])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 2.0
    for name in ("sft/lr", "sft/tokens_per_s", "sft/eval_loss", "sft/eval_perplexity"):
        assert client.get_metric_history(run_id, name), name
    assert "sft/curves.png" in [a.path for a in client.list_artifacts(run_id, "sft")]  # the training curves

    # LoRA weights moved, frozen base weights did not
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # lora_B starts at zero
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    assert set(merged) == set(base)  # a plain full model, no peft names
    for name, weight in base.items():
        changed = not torch.equal(merged[name], weight)
        assert changed == any(f".{t}." in name for t in targets), name  # embeddings and norms stay frozen
    assert (out / "merged" / "tokenizer_config.json").is_file()

    # registered in the SQLite store with lineage
    version = client.get_model_version("rlhf-sft", "1")
    assert version.tags["stage"] == "sft" and version.tags["base_model"] == str(tiny_model_dir)

    # a rerun reports the finished run instead of retraining
    again = run_sft(cfg)
    assert again.status == "reused" and again.steps == 60 and again.registered == summary.registered
    assert len(client.search_model_versions("name='rlhf-sft'")) == 1


def test_sft_without_packing(tiny_model_dir, tmp_path, mlflow_sqlite):
    cfg = sft_config(tiny_model_dir, tmp_path, packing=False, register_model=False)
    result = run_sft(cfg)
    assert result.steps == 4 and result.train_rows == 6  # one padded document per row
    assert result.registered == []


def test_sft_without_held_out_questions(tiny_model_dir, tmp_path, mlflow_sqlite):
    cfg = sft_config(tiny_model_dir, tmp_path, eval_fraction=0.0, register_model=False)
    result = run_sft(cfg)
    assert result.eval_documents == 0 and result.eval_perplexity is None
    assert result.steps == 4 and result.train_loss == result.train_loss  # trained, loss not NaN


def test_resume_after_interruption_matches_uninterrupted(tiny_model_dir, tmp_path, mlflow_sqlite):
    full = sft_config(
        tiny_model_dir, tmp_path, output=str(tmp_path / "full"), register_model=False, gradient_accumulation_steps=2
    )
    uninterrupted = run_sft(full)

    interrupted = full.model_copy(update={"output": str(tmp_path / "interrupted")})

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt("simulated preemption")

    with pytest.raises(KeyboardInterrupt):
        run_sft(interrupted, on_step=crash)
    assert (tmp_path / "interrupted" / "checkpoints" / "step-2").is_dir()
    assert not (tmp_path / "interrupted" / "metrics.json").exists()

    resumed = run_sft(interrupted)
    assert resumed.status == "trained" and resumed.steps == 4 and resumed.trained_steps == 2
    # the mean train loss covers all 4 steps (the 2 before the crash come from the checkpoint) and matches
    assert resumed.train_loss == pytest.approx(uninterrupted.train_loss, rel=1e-5)
    assert resumed.tokens_per_s > 0
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_sft_registers_through_a_real_mlflow_server(tiny_model_dir, tmp_path, mlflow_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    cfg = sft_config(
        tiny_model_dir, tmp_path, max_steps=2, tracking_uri=mlflow_server, registered_model_prefix="server-test"
    )
    result = run_sft(cfg)
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_server)
    version = MlflowClient().get_model_version("server-test-sft", result.registered[0].version)
    assert version.tags["stage"] == "sft"
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/server-test-sft/{version.version}", dst_path=str(tmp_path / "download")
        )
    )
    # an MLflow model: the LoRA adapter and tokenizer, with a reference to the base (no full weights)
    assert (local / "MLmodel").is_file() and (local / "peft" / "adapter_model.safetensors").is_file()
    assert not list(local.rglob("model.safetensors"))


def test_unreachable_tracking_server_fails_fast_before_training(tiny_model_dir, tmp_path):
    cfg = sft_config(tiny_model_dir, tmp_path, tracking_uri="http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(UserError, match="unreachable"):
        run_sft(cfg)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written

    # and through the CLI: one line on stderr, exit status 2
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "rlhf"),
            "sft",
            "--model",
            str(tiny_model_dir),
            "--data",
            cfg.data,
            "--output",
            str(tmp_path / "cli-out"),
            "--tracking-uri",
            "http://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("rlhf sft: error: MLflow tracking server")
    assert not (tmp_path / "cli-out").exists()


def test_missing_data_is_one_line_error(tiny_model_dir, tmp_path, mlflow_sqlite):
    cfg = sft_config(tiny_model_dir, tmp_path, data=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="data directory not found"):
        run_sft(cfg)


@pytest.mark.parametrize("recipe", ["recipes/smollm2/sft.yaml", "recipes/llama-7b/sft.yaml"])
def test_sft_recipes_are_valid(recipe):
    cfg = SFTConfig.load(Path(__file__).resolve().parents[2] / recipe)
    assert cfg.lora_r == 16 and cfg.packing
