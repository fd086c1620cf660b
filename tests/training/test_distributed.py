"""`accelerate launch` with several processes runs a stage as ONE job: the multi-GPU launcher and DDP code path,
here on the CPU (gloo instead of NCCL; `ACCELERATE_USE_CPU` makes accelerate pick the CPU backend).

For every training stage (SFT, reward, DPO, PPO), with 2 processes:
- after training every rank holds bit-identical trainable weights (each rank dumps them: $RLHF_DUMP_TRAINABLE),
- SFT, reward and DPO equal a 1-process run on the same global batch (batch_size x gradient accumulation 2):
  final trainable weights within atol 1e-5 / rtol 1e-4 (float summation order differs: DDP all-reduces what
  accumulation adds), mean train loss within 1e-5 relative,
- one MLflow run per launch, one registered model version, `processes: 2` in metrics.json,
- a run stopped after step k ($RLHF_STOP_AFTER_STEP, every process exits after that step's checkpoint) resumes
  and ends at the same step (PPO: with the same weights and history as an uninterrupted 2-process run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sft_reward_helpers import make_data_dir, pair_rows, write_subset

from rlhf_pipeline.training.loop import DUMP_TRAINABLE_ENV, STOP_AFTER_STEP_ENV, STOPPED_EXIT_CODE

BIN = Path(sys.executable).parent
WEIGHTS_TOLERANCE = dict(atol=1e-5, rtol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flags(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def launch(stage: str, args: dict, mlflow_uri: str, *, env: dict | None = None, processes: int = 2):
    """`accelerate launch --multi_gpu --num_processes N rlhf <stage> ...` on the CPU (gloo)."""
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--main_process_port",
        str(_free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(BIN / "rlhf"),
        stage,
        *_flags(args),
    ]
    # PYTHONPATH reaches the child processes through the launcher's environment
    full_env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MLFLOW_TRACKING_URI": mlflow_uri, **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=full_env)


def mlflow_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def rank_weights(dump_dir: Path, stage: str, processes: int = 2) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(dump_dir / f"{stage}-rank{i}.safetensors")) for i in range(processes)]


def assert_ranks_identical(weights: list[dict[str, torch.Tensor]]) -> None:
    first = weights[0]
    assert first, "no trainable weights dumped"
    for other in weights[1:]:
        assert other.keys() == first.keys()
        assert all(torch.equal(first[k], other[k]) for k in first), "ranks diverged"


def assert_close_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **WEIGHTS_TOLERANCE, msg=lambda m, k=key: f"{k}: {m}")


def test_sft_under_accelerate_launch_with_two_processes(tiny_model_dir, tmp_path, mlflow_sqlite):
    data, out = make_data_dir(tmp_path / "data"), tmp_path / "out"
    args = dict(
        model=tiny_model_dir,
        data=data,
        output=out,
        seq_length=32,
        batch_size=2,
        max_steps=4,
        save_steps=2,
        learning_rate=5e-3,
        eval_fraction=0.25,
        lora_dropout=0,
        num_threads=1,
    )
    from mlflow.tracking import MlflowClient

    # The run Kubeflow's MLflow plugin would have created for the task (nested under its pipeline run), injected as
    # MLFLOW_RUN_ID.
    client = MlflowClient(mlflow_sqlite)
    experiment = client.create_experiment("kfp")
    pipeline = client.create_run(experiment).info.run_id
    injected = client.create_run(experiment, tags={"mlflow.parentRunId": pipeline}).info.run_id
    proc = launch("sft", args, mlflow_sqlite, env={"MLFLOW_RUN_ID": injected, "MLFLOW_EXPERIMENT_ID": experiment})
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(proc.stdout[proc.stdout.index("{") :])  # one summary (rank 0), not one per process
    saved = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == saved["processes"] == 2
    assert saved["steps"] == saved["trained_steps"] == 4 and saved["eval_loss"] < saved["eval_loss_before"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()

    client, runs = mlflow_runs(mlflow_sqlite)
    # tracked by the main process only, in the injected run
    assert [r.info.run_id for r in runs if r.info.run_id != pipeline] == [injected]
    assert [r["run_id"] for r in saved["registered"]] == [injected]
    assert len(client.get_metric_history(injected, "sft/loss")) == 4
    assert [str(v.version) for v in client.search_model_versions("name='rlhf-sft'")] == ["1"]


def test_the_injected_run_id_reaches_child_processes_and_the_next_stage(mlflow_sqlite, monkeypatch):
    """Kubeflow injects MLFLOW_RUN_ID; MLflow removes it (start_run() reading it, end_run()). stage_run keeps a
    copy for processes started during the run (worker ranks, children) and puts MLFLOW_RUN_ID back afterwards."""
    from mlflow.tracking import MlflowClient

    from rlhf_pipeline.tracking import RUN_ID_COPY_ENV, TrackingOptions, injected_run_id, stage_run

    client = MlflowClient(mlflow_sqlite)
    experiment = client.create_experiment("kfp")
    pipeline = client.create_run(experiment).info.run_id  # the task's run is nested under it, as the plugin does
    injected = client.create_run(experiment, tags={"mlflow.parentRunId": pipeline}).info.run_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", injected)
    monkeypatch.delenv(RUN_ID_COPY_ENV, raising=False)
    child = [sys.executable, "-c", "from rlhf_pipeline.tracking import injected_run_id; print(injected_run_id())"]
    with stage_run(TrackingOptions(), "sft") as run:
        os.environ.pop("MLFLOW_RUN_ID")  # as MLflow's own start_run() does when it reads the variable
        seen = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip()
    assert run.run_id == injected and seen == injected
    assert os.environ["MLFLOW_RUN_ID"] == injected and RUN_ID_COPY_ENV not in os.environ  # as before the run
    with stage_run(TrackingOptions(), "reward") as second:  # the next stage in the same pod: the same run
        pass
    assert second.run_id == injected

    monkeypatch.delenv("MLFLOW_RUN_ID")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID")
    with stage_run(TrackingOptions(), "sft") as own:  # a run of its own: its id for the children, then gone
        assert injected_run_id() == own.run_id != injected
    assert injected_run_id() is None


# --- SFT, reward, DPO: stopped + resumed with 2 processes == 1 process with gradient accumulation 2 ---------------

# 16 questions, a quarter held out: 12 training questions. Three optimizer steps of 2 x 2 items stay inside the
# first epoch (SFT: 13 packed blocks of 32 tokens, reward/DPO: 24 pairs), where 2 processes x 1 micro-batch and
# 1 process x 2 accumulated micro-batches consume the same items in the same order.
STEPS, STOP_AFTER = 3, 2
COMMON = dict(
    batch_size=2,
    max_steps=STEPS,
    save_steps=1,
    eval_fraction=0.25,
    max_eval_samples=8,
    lora_dropout=0,
    lr_scheduler="constant",
    warmup_ratio=0,
    num_threads=1,
)
STAGES = {
    "sft": (dict(seq_length=32, learning_rate=5e-3), "sft/loss", "rlhf-sft"),
    "reward": (dict(max_length=128, learning_rate=5e-3, eval_before=False), "rm/loss", "rlhf-reward"),
    "dpo": (dict(max_length=128, learning_rate=5e-3, beta=0.1), "dpo/loss", "rlhf-policy"),
}


def run_in_process(stage: str, args: dict) -> object:
    from rlhf_pipeline.training.dpo import DPOConfig, run_dpo
    from rlhf_pipeline.training.reward import RewardConfig, run_reward
    from rlhf_pipeline.training.sft import SFTConfig, run_sft

    config_cls, run = {"sft": (SFTConfig, run_sft), "reward": (RewardConfig, run_reward), "dpo": (DPOConfig, run_dpo)}[
        stage
    ]
    threads = torch.get_num_threads()
    try:
        return run(config_cls(**{k: str(v) if isinstance(v, Path) else v for k, v in args.items()}))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_two_processes_stop_resume_and_equal_one_process(stage, tiny_model_dir, tmp_path, mlflow_sqlite, monkeypatch):
    extra, loss_metric, registered_name = STAGES[stage]
    data = make_data_dir(tmp_path / "data", num_questions=16)
    args = dict(model=tiny_model_dir, data=data, output=tmp_path / "two", **COMMON, **extra)
    dumps = tmp_path / "dumps"

    # Stopped after step 2 (every process exits after the checkpoint), then rerun: resumes at step 2.
    stopped = launch(stage, args, mlflow_sqlite, env={STOP_AFTER_STEP_ENV: str(STOP_AFTER)})
    assert stopped.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "two" / "checkpoints" / f"step-{STOP_AFTER}").is_dir()
    assert not (tmp_path / "two" / "metrics.json").exists()
    assert len(mlflow_runs(mlflow_sqlite)[1]) == 1
    resumed = launch(stage, args, mlflow_sqlite, env={DUMP_TRAINABLE_ENV: str(dumps)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = tmp_path / "two" / "checkpoints" / f"step-{STOP_AFTER}"
    assert f"resuming from {checkpoint}" in resumed.stdout + resumed.stderr

    saved = json.loads((tmp_path / "two" / "metrics.json").read_text())
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])  # printed once, by rank 0
    assert summary["processes"] == saved["processes"] == 2
    metrics = saved
    assert metrics["steps"] == STEPS and metrics["trained_steps"] == STEPS - STOP_AFTER
    client, runs = mlflow_runs(mlflow_sqlite)
    # ONE run for the stopped and the resumed launch (re-attached through run.json), not one per launch or process;
    # each step logged once
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, loss_metric)]
    assert sorted(steps) == list(range(1, STEPS + 1))
    assert [str(v.version) for v in client.search_model_versions(f"name='{registered_name}'")] == ["1"]
    two = rank_weights(dumps, stage)
    assert_ranks_identical(two)

    # The same global batch in one process: 2 micro-batches accumulated per step (in this process, no MLflow).
    monkeypatch.setenv(DUMP_TRAINABLE_ENV, str(tmp_path / "one-dumps"))
    one_args = dict(args, output=tmp_path / "one", gradient_accumulation_steps=2, register_model=False)
    one_args["tracking_uri"] = f"sqlite:///{tmp_path / 'one-mlflow.db'}"
    one = run_in_process(stage, one_args)
    assert one.processes == 1 and one.metrics["steps"] == STEPS
    assert_close_weights(two[0], rank_weights(tmp_path / "one-dumps", stage, processes=1)[0])
    assert metrics["train_loss" if stage != "dpo" else "dpo/loss"] == pytest.approx(
        one.metrics["train_loss" if stage != "dpo" else "dpo/loss"], rel=1e-5
    )


# --- PPO ---------------------------------------------------------------------------------------------------------

EOS = 2  # <|im_end|> in the SmolLM2 tokenizer: both eos and pad


@pytest.mark.slow
def test_ppo_two_processes_one_job_and_resume(tiny_model_dir, reward_model_dir, tmp_path, mlflow_sqlite):
    data = tmp_path / "data"
    write_subset(data, "rl", pair_rows(num_questions=8, pairs_per_question=1))
    args = dict(
        model=tiny_model_dir,
        data=data,
        reward_model=reward_model_dir,
        steps=4,
        batch_size=4,  # global: 2 prompts per process
        mini_batch_size=2,
        ppo_epochs=2,
        save_steps=2,
        min_new_tokens=3,
        max_new_tokens=5,
        max_prompt_length=64,
        lora_r=4,
        learning_rate=5e-3,
        init_kl_coef=0.05,
        log_generations_every=2,
        num_threads=1,
    )
    straight_dumps, resumed_dumps = tmp_path / "straight-dumps", tmp_path / "resumed-dumps"
    straight = launch(
        "ppo", dict(args, output=tmp_path / "straight"), mlflow_sqlite, env={DUMP_TRAINABLE_ENV: str(straight_dumps)}
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    summary = json.loads(straight.stdout[straight.stdout.index("{") :])
    saved = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert summary["processes"] == saved["processes"] == 2 and saved["steps"] == 4
    assert saved["samples"] == 16  # 4 steps x the global batch of 4
    client, runs = mlflow_runs(mlflow_sqlite)
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "ppo/reward_mean")] == [1, 2, 3, 4]
    tables = [a.path for a in client.list_artifacts(runs[0].info.run_id, "generations")]
    assert tables == ["generations/samples.json"]  # one long table: step, question, model, response, reward
    table = json.loads(Path(client.download_artifacts(runs[0].info.run_id, tables[0], str(tmp_path))).read_text())
    steps = [row[table["columns"].index("step")] for row in table["data"]]
    assert steps == [1] * 4 + [2] * 4 + [4] * 4  # the first step, 2 and 4, each with the whole global batch
    assert [str(v.version) for v in client.search_model_versions("name='rlhf-policy'")] == ["1"]
    straight_weights = rank_weights(straight_dumps, "ppo")
    assert_ranks_identical(straight_weights)

    resumed_args = dict(args, output=tmp_path / "resumed")
    stopped = launch("ppo", resumed_args, mlflow_sqlite, env={STOP_AFTER_STEP_ENV: "2"})
    assert stopped.returncode != 0 and f"exitcode  : {STOPPED_EXIT_CODE}" in stopped.stderr, stopped.stderr[-3000:]
    assert (tmp_path / "resumed" / "checkpoints" / "step-2").is_dir()
    resumed = launch("ppo", resumed_args, mlflow_sqlite, env={DUMP_TRAINABLE_ENV: str(resumed_dumps)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert again["steps"] == 4 and again["processes"] == 2
    for a, b in zip(saved["history"], again["history"]):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)
    resumed_weights = rank_weights(resumed_dumps, "ppo")
    assert_ranks_identical(resumed_weights)
    assert_close_weights(straight_weights[0], resumed_weights[0])
