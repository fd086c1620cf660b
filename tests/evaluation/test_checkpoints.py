"""A real DPO run's kept checkpoints (the CPU kernels of the recipes on): the last checkpoint, materialized the way
the frontier evaluates checkpoints, is the stage's final merged policy; the earlier ones are listed as frontier
points."""

from __future__ import annotations

import pandas as pd
import torch

from rlhf_pipeline.evaluation.models import checkpoint_policy, kept_checkpoints
from rlhf_pipeline.training.dpo import DPOConfig, run_dpo


def test_the_last_dpo_checkpoint_is_the_final_policy(tiny_model_dir, tmp_path, mlflow_sqlite):
    from transformers import AutoModelForCausalLM

    rows = [
        {
            "qid": q,
            "site": "beer",
            "question": f"How long should I age stout number {q}?",
            "response_j": f"About {q + 2} months in a cool cellar, then taste it.",
            "response_k": "No idea.",
            "score_j": 3,
            "score_k": 0,
            "answer_id_j": 100 + q,
            "answer_id_k": 200 + q,
        }
        for q in range(8)
    ]
    data = tmp_path / "data"
    data.mkdir()
    pd.DataFrame(rows).to_parquet(data / "reward.parquet")
    out = tmp_path / "dpo"
    cfg = DPOConfig(
        model=str(tiny_model_dir),
        data=str(data),
        output=str(out),
        max_steps=3,
        batch_size=2,
        learning_rate=2e-3,
        lora_r=4,
        lora_dropout=0.0,
        max_length=128,
        eval_fraction=0.25,
        save_steps=1,
        keep_checkpoints=3,
        cpu_kernels="eager",
        register_model=False,
        num_threads=1,
    )
    run_dpo(cfg)
    assert [step for step, _ in kept_checkpoints(out)] == [1, 2]  # step 3 is the final policy itself
    last = checkpoint_policy("dpo:step-3", out / "checkpoints" / "step-3", out, str(tiny_model_dir), tmp_path / "c3")
    first = checkpoint_policy("dpo:step-1", out / "checkpoints" / "step-1", out, str(tiny_model_dir), tmp_path / "c1")
    ids = torch.tensor([[1, 7, 12, 30, 4, 9]])
    final = AutoModelForCausalLM.from_pretrained(out / "merged")(ids).logits
    assert torch.allclose(AutoModelForCausalLM.from_pretrained(last.path)(ids).logits, final, atol=1e-4)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(first.path)(ids).logits, final, atol=1e-4)
