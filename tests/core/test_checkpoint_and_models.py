"""Checkpoint round trip (safetensors only) and model loading: embedded SmolLM2, tiny models, bad paths."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_pipeline.data.prompts import format_example, format_prompt
from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling.loading import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf_pipeline.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)  # frozen: must not be saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train_step(model, opt, sched):
    loss = model(torch.randn(8, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    # uninterrupted: 4 steps
    model_a, opt_a, sched_a = _model_and_opt()
    torch.manual_seed(1)
    for _ in range(4):
        _train_step(model_a, opt_a, sched_a)

    # interrupted after 2 steps, resumed into fresh objects
    model_b, opt_b, sched_b = _model_and_opt()
    torch.manual_seed(1)
    random.seed(5)
    for _ in range(2):
        _train_step(model_b, opt_b, sched_b)
    save_checkpoint(tmp_path, 2, model_b, opt_b, sched_b, extra={"epoch": 0, "batch": 2})
    model_c, opt_c, sched_c = _model_and_opt()
    torch.manual_seed(999)  # the resumed process starts with other RNG state
    state = load_checkpoint(latest_checkpoint(tmp_path), model_c, opt_c, sched_c)
    assert state == {"step": 2, "extra": {"epoch": 0, "batch": 2}}
    for _ in range(2):
        _train_step(model_c, opt_c, sched_c)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        torch.testing.assert_close(pa, pc)
    assert sched_c.last_epoch == 4


def test_checkpoints_are_safetensors_and_pruned(tmp_path):
    model, opt, sched = _model_and_opt()
    _train_step(model, opt, sched)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    assert latest_checkpoint(tmp_path).name == "step-3"
    files = {p.name for p in (root / "step-3").iterdir()}
    assert files == {"trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json", "manifest.json"}
    from safetensors.torch import load_file

    assert set(load_file(str(root / "step-3" / "trainable.safetensors"))) == {"0.bias", "1.weight", "1.bias"}


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step-9").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-7").mkdir()  # no state.json: an interrupted copy
    assert latest_checkpoint(tmp_path) is None


def test_prompt_template():
    tpl = "Question: {question}\n\nAnswer: {answer}"
    assert format_prompt(tpl, "Why?") == "Question: Why?\n\nAnswer: "
    assert format_example(tpl, "Why?", "Because.") == "Question: Why?\n\nAnswer: Because."


def test_tiny_model_loads_with_smollm2_tokenizer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir), padding_side="left")
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    model = load_causal_lm(str(tiny_model_dir))
    assert model.dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    ids = tok("Question: hops?\n\nAnswer:", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_embedded_model_is_converted_once_and_cached(monkeypatch, tmp_path):
    from rlhf_pipeline.modeling import loading

    path = loading.ensure_embedded_model()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    mtime = (path / "config.json").stat().st_mtime
    assert loading.ensure_embedded_model() == path and (path / "config.json").stat().st_mtime == mtime
    assert resolve_model_path(loading.EMBEDDED_MODEL) == str(path)


def test_bad_model_paths_and_cpu_quantization(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_path(str(tmp_path / "empty"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            load_causal_lm(str(tmp_path / "empty"), quantization="4bit")
