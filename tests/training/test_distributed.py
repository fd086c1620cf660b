"""`accelerate launch` with several processes runs a stage unchanged: the multi-GPU launcher and DDP code path,
here on the CPU (gloo instead of NCCL; `ACCELERATE_USE_CPU` makes accelerate pick the CPU backend)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sft_reward_helpers import make_data_dir


def test_sft_under_accelerate_launch_with_two_processes(tiny_model_dir, tmp_path, mlflow_sqlite, unused_port):
    bin_dir = Path(sys.executable).parent
    data, out = make_data_dir(tmp_path / "data"), tmp_path / "out"
    command = [
        str(bin_dir / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(unused_port),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(bin_dir / "rlhf"),
        "sft",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(data),
        "--output",
        str(out),
        "--seq-length",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "4",
        "--save-steps",
        "2",
        "--learning-rate",
        "5e-3",
        "--eval-fraction",
        "0.25",
        "--lora-dropout",
        "0",
        "--num-threads",
        "1",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "MLFLOW_TRACKING_URI": mlflow_sqlite}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(proc.stdout[proc.stdout.index("{") :])  # one summary (rank 0), not one per process
    saved = json.loads((out / "metrics.json").read_text())
    assert summary["processes"] == saved["processes"] == 2
    assert saved["steps"] == saved["trained_steps"] == 4 and saved["eval_loss"] < saved["eval_loss_before"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "merged" / "config.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1  # tracked by the main process only
    assert len(client.get_metric_history(runs[0].info.run_id, "sft/loss")) == 4
    assert [str(v.version) for v in client.search_model_versions("name='rlhf-sft'")] == ["1"]
