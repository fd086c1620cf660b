"""Registered versions are MLflow models: MLflow's own loaders give the logits and rewards our loaders give.

Through a real `mlflow server` on 127.0.0.1: a tiny SFT run registers its LoRA adapter with a reference to its
base; a tiny DPO run on the SFT output registers the policy, with the SFT version (not a local path) as its
lineage; both load back with `mlflow.transformers.load_model`, by number and by alias, and `export_merged` rebuilds
merged weights by following the lineage when the SFT output directory is gone. The reward model (merged weights,
a text-classification model) gives our scorer's rewards through `mlflow.pyfunc`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from sft_reward_helpers import make_data_dir

from rlhf_pipeline.data.prompts import DEFAULT_TEMPLATE, format_example
from rlhf_pipeline.evaluation.models import resolve_judge, resolve_policy
from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer
from rlhf_pipeline.modeling.mlflow_model import export_merged, model_reference, register_stage_model
from rlhf_pipeline.results import StageResult
from rlhf_pipeline.tracking import TrackingOptions, stage_run
from rlhf_pipeline.training.dpo import DPOConfig, run_dpo
from rlhf_pipeline.training.sft import SFTConfig, run_sft

TEXTS = ["Question: What is a stout?\n\nAnswer: A dark beer.", "Question: Best hops?\n\nAnswer: Citra, for sure!"]


def _logits(model, tokenizer) -> torch.Tensor:
    encoded = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**encoded).logits


def _ours(model_dir) -> torch.Tensor:
    """Our own loading of a stage's merged/ output."""
    return _logits(load_causal_lm(str(model_dir), precision="fp32", device="cpu"), load_tokenizer(str(model_dir)))


def _mlflow(uri: str, tokenizer_dir) -> torch.Tensor:
    """MLflow's loading of a registered version (the same tokenizer as ours: both pad alike)."""
    import mlflow

    components = mlflow.transformers.load_model(uri, return_type="components")
    return _logits(components["model"], load_tokenizer(str(tokenizer_dir)))


def _artifact_bytes(client, model_id: str, path: str | None = None) -> int:
    total = 0
    for item in client.list_logged_model_artifacts(model_id, path):
        total += _artifact_bytes(client, model_id, item.path) if item.is_dir else item.file_size
    return total


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture()
def server(mlflow_server, monkeypatch):
    import mlflow

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow_server


def test_sft_and_policy_versions_load_with_mlflow_and_match_our_loading(tiny_model_dir, tmp_path, server):
    import mlflow
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    from rlhf_pipeline.modeling.mlflow_model import save_mlflow_model

    client = MlflowClient()
    data = make_data_dir(tmp_path / "data")
    common = dict(data=str(data), batch_size=2, max_steps=2, save_steps=100, lora_r=4, lora_dropout=0.0)
    sft_out = tmp_path / "sft"
    sft = run_sft(
        SFTConfig(
            model=str(tiny_model_dir),
            output=str(sft_out),
            seq_length=32,
            learning_rate=5e-3,
            eval_fraction=0.0,
            registered_model_prefix="reg",
            **common,
        )
    )
    [sft_version] = sft.registered
    assert sft_version.uri == "models:/reg-sft/1"
    version = client.get_model_version("reg-sft", "1")
    assert version.tags["weights"] == "adapter" and version.tags["base_model"] == str(tiny_model_dir)

    # the version is a logged model of the SFT run (MLflow 3: the run's "Logged models"), ready to load
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == sft_version.run_id and logged.name == "adapter"
    assert logged.status == LoggedModelStatus.READY
    # the adapter version: MLmodel + peft adapter + tokenizer, no full weights
    files = {a.path for a in client.list_logged_model_artifacts(logged.model_id)}
    assert {"MLmodel", "peft", "components"} <= files and "model" not in files
    torch.testing.assert_close(
        _mlflow("models:/reg-sft/1", sft_out / "merged"), _ours(sft_out / "merged"), atol=1e-5, rtol=1e-4
    )

    # its size against the merged registration of the same output
    adapter_bytes = _artifact_bytes(client, logged.model_id)
    merged = tmp_path / "merged-mlflow-model"
    saved = save_mlflow_model(sft_out / "adapter", sft_out / "merged", merged, task="text-generation", weights="merged")
    assert saved == "merged"
    merged_bytes = _dir_bytes(merged)
    print(f"registered sft: adapter {adapter_bytes / 1e6:.2f} MB, merged {merged_bytes / 1e6:.2f} MB")
    weights = (merged / "model" / "model.safetensors").stat().st_size
    assert adapter_bytes < merged_bytes - weights / 2  # the full weights are what the adapter version leaves out

    # the policy, trained on the SFT output: lineage names the SFT version, not the local merged/ path
    assert model_reference(str(sft_out / "merged")) == "models:/reg-sft/1"
    dpo_out = tmp_path / "dpo"
    dpo = run_dpo(
        DPOConfig(
            model=str(sft_out / "merged"),
            output=str(dpo_out),
            learning_rate=2e-3,
            max_length=64,
            eval_fraction=0.0,
            registered_model_prefix="reg",
            **common,
        )
    )
    [policy] = dpo.registered
    assert policy.uri == "models:/reg-policy/1"
    version = client.get_model_version("reg-policy", "1")
    assert version.tags["base_model"] == "models:/reg-sft/1" and version.tags["weights"] == "adapter"
    assert client.get_run(policy.run_id).data.tags["rlhf.base_model"] == "models:/reg-sft/1"
    client.set_registered_model_alias("reg-policy", "challenger", "1")  # what the pipeline's last step does
    ours = _ours(dpo_out / "merged")
    torch.testing.assert_close(_mlflow("models:/reg-policy/1", dpo_out / "merged"), ours, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_mlflow("models:/reg-policy@challenger", dpo_out / "merged"), ours, atol=1e-5, rtol=1e-4)

    # the pipeline MLflow builds generates what our merged model generates (greedy)
    pipe = mlflow.transformers.load_model("models:/reg-policy@challenger")
    generated = pipe(TEXTS[0], max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]
    model, tokenizer = load_causal_lm(str(dpo_out / "merged"), precision="fp32", device="cpu"), pipe.tokenizer
    prompt = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=6, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert generated == tokenizer.decode(tokens, skip_special_tokens=True)

    # merged weights for serving, with the SFT output directory gone: the base is rebuilt from models:/reg-sft/1
    shutil.move(sft_out, tmp_path / "sft-moved")
    exported = export_merged("models:/reg-policy@challenger", tmp_path / "export")
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    assert not (exported / "adapter_config.json").exists()
    torch.testing.assert_close(_ours(exported), ours, atol=1e-5, rtol=1e-4)
    ref = resolve_policy("dpo", "models:/reg-policy/1", tmp_path / "evaluate")  # what `rlhf evaluate` loads
    assert ref.registered_uri == "models:/reg-policy/1"
    torch.testing.assert_close(_ours(ref.path), ours, atol=1e-5, rtol=1e-4)


def test_reward_version_gives_our_scorers_rewards(reward_model_dir, tmp_path, server):
    import mlflow

    from rlhf_pipeline.ppo.rewards import RewardModelScorer

    questions = ["What is a stout?", "Best hops?"]
    answers = ["A dark beer.", "Citra, for sure! Or maybe Mosaic, it depends on the beer."]
    ours = RewardModelScorer.load(reward_model_dir, template=DEFAULT_TEMPLATE, device="cpu").raw_scores(
        questions, answers
    )
    cfg = TrackingOptions(experiment_name="reward-models", registered_model_prefix="regrm")
    with stage_run(cfg, "reward", base_model="models:/regrm-sft/1") as run:
        entry = register_stage_model(
            run,
            reward_model_dir / "adapter",
            reward_model_dir / "merged",
            task="text-classification",
            weights="merged",
            artifact_path="merged",
        )
    assert entry["uri"] == "models:/regrm-reward/1"
    eos = load_tokenizer(str(reward_model_dir / "merged")).eos_token
    texts = [format_example(DEFAULT_TEMPLATE, q, a) + eos for q, a in zip(questions, answers)]

    predicted = mlflow.pyfunc.load_model(entry["uri"]).predict(texts)
    torch.testing.assert_close(torch.tensor(predicted["score"].tolist()), ours, atol=1e-5, rtol=1e-4)
    pipe = mlflow.transformers.load_model(entry["uri"])  # batched: padded rows score at their own last token
    batched = [row["score"] for row in pipe(texts, batch_size=2, function_to_apply="none")]
    torch.testing.assert_close(torch.tensor(batched), ours, atol=1e-5, rtol=1e-4)

    # the judge path (`rlhf evaluate --judge-model models:/...`): a directory our scorer loads
    exported = resolve_judge(entry["uri"], tmp_path / "export")
    again = RewardModelScorer.load(exported, template=DEFAULT_TEMPLATE, device="cpu").raw_scores(questions, answers)
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-4)


def test_model_reference_names_the_registered_version_of_a_stage_output(tmp_path, tiny_model_dir):
    out = tmp_path / "sft"
    (out / "merged").mkdir(parents=True)
    entry = {"name": "rlhf-sft", "version": 3, "uri": "models:/rlhf-sft/3", "run_id": "r"}
    StageResult.of("sft", "trained", out, {}, registered=[entry]).write()
    assert model_reference(str(out / "merged")) == "models:/rlhf-sft/3"
    assert model_reference(str(out)) == "models:/rlhf-sft/3"
    assert model_reference(str(tiny_model_dir)) == str(tiny_model_dir)  # not a stage output: the path itself
    assert model_reference("smollm2-135m-instruct") == "smollm2-135m-instruct"
    StageResult.of("sft", "trained", out, {}).write()  # registration was off: nothing to name
    assert model_reference(str(out / "merged")) == str(out / "merged")


def _adapter_output(base_dir: Path, out: Path) -> Path:
    """A stage-shaped output on `base_dir`: adapter/ (random LoRA) and merged/ (with the tokenizer)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(5)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.0)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out / "adapter")
    model.merge_and_unload().save_pretrained(out / "merged", safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out / "merged")
    return out


def test_an_adapter_whose_base_is_gone_follows_its_parent_or_fails_in_one_line(tiny_model_dir, tmp_path):
    from rlhf_pipeline.errors import UserError
    from rlhf_pipeline.modeling.mlflow_model import save_mlflow_model

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    out = _adapter_output(base, tmp_path / "out")
    named, unnamed = tmp_path / "named", tmp_path / "unnamed"
    parent = str(tmp_path / "base-elsewhere")  # where the base will be: the name a stage input recorded
    kind = dict(task="text-generation", weights="adapter")
    assert save_mlflow_model(out / "adapter", out / "merged", named, parent=parent, **kind) == "adapter"
    save_mlflow_model(out / "adapter", out / "merged", unnamed, **kind)
    shutil.move(base, parent)

    exported = export_merged(str(named), tmp_path / "export")  # a local MLflow model dir loads as a URI does
    torch.testing.assert_close(_ours(exported), _ours(out / "merged"), atol=1e-5, rtol=1e-4)
    with pytest.raises(UserError, match=r"base directory is gone and no rlhf.parent_model names it"):
        export_merged(str(unnamed), tmp_path / "export-unnamed")
