"""The fault catalogue of the fault-injection suite: one `Fault` per kind of fault, run through the real `rlhf`
CLI by test_faults.py, which asserts the exit status, the one error line (or the one report line), no traceback, and
the state left behind. `python tests/reliability/fault_table.py` renders this list (and the kill/resume cases) as
the table in docs/reliability.md; a test checks the doc is that rendering, so it cannot drift."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TRAINING = ("sft", "reward", "dpo", "ppo")


@dataclass
class Ctx:
    """What a fault's setup works with: a tiny model, prepared data, a reward dir, a scratch dir, the env."""

    tmp: Path
    model: Path
    data: Path
    reward: Path
    env: dict[str, str] = field(default_factory=dict)
    stage: str = ""
    args: list[str] = field(default_factory=list)  # the command's arguments before the fault's setup

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@dataclass
class Fault:
    id: str
    stage: str  # the command
    what: str  # the fault, in words
    setup: Callable[[Ctx], list[str]]  # prepares the fault; returns the arguments that replace/extend the defaults
    exit: int
    line: str  # regex the one stderr line (error) must match; for exit 0 a line of the output that must appear
    leaves: str  # the state left behind, in words (the table's last column)
    check: Callable[[Ctx], None] = lambda ctx: None  # asserts that state
    tracking: str = "sqlite"  # "sqlite": a fresh store; "none": the test's env decides
    training_steps: bool = False  # needs a finished/partial run first (slower)


def stage_args(stage: str, ctx: Ctx) -> list[str]:
    common = ["--model", str(ctx.model), "--data", str(ctx.data), "--output", str(ctx.out), "--num-threads", "1"]
    small = {
        "sft": ["--seq-length", "32", "--batch-size", "2", "--max-steps", "4", "--save-steps", "2"],
        "reward": ["--max-length", "64", "--batch-size", "4", "--max-steps", "4", "--save-steps", "2"],
        "dpo": ["--max-length", "96", "--batch-size", "4", "--max-steps", "4", "--save-steps", "2", "--lora-r", "4"],
        "ppo": ["--steps", "2", "--batch-size", "4", "--mini-batch-size", "2", "--ppo-epochs", "1", "--save-steps", "1"]
        + ["--min-new-tokens", "2", "--max-new-tokens", "4", "--lora-r", "4", "--reward-model", str(ctx.reward)],
    }[stage]
    return common + small


def replace_arg(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


# -- helpers that build broken things ------------------------------------------------------------------------------


def copy_model(ctx: Ctx, name: str) -> Path:
    target = ctx.tmp / name
    shutil.copytree(ctx.model, target)
    return target


def config_of(ctx: Ctx):
    """The config the CLI builds from `ctx.args` (flags -> fields; pydantic coerces the strings)."""
    from rlhf_pipeline.stages import STAGES

    values = {ctx.args[i].removeprefix("--").replace("-", "_"): ctx.args[i + 1] for i in range(0, len(ctx.args), 2)}
    return STAGES[ctx.stage].config_class().model_validate(values)


def claim(ctx: Ctx, stage: str, **identity_changes) -> None:
    """A run.json as a previous attempt of `stage` with these settings (but `identity_changes`) would leave it,
    next to its progress (a model dir)."""
    from rlhf_pipeline.training import claim as claim_mod

    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "merged").mkdir(exist_ok=True)  # progress: a finished model
    identity = {**claim_mod.identity(config_of(ctx)), **identity_changes}
    claim_mod.write_claim(ctx.out, {"stage": stage, "identity": identity, "identity_hash": "x", "mlflow_run_id": None})


def nothing_written(ctx: Ctx) -> None:
    assert not (ctx.out / "metrics.json").exists() and not (ctx.out / "checkpoints").exists()


def out_untouched_file(ctx: Ctx) -> None:
    assert ctx.out.is_file() and ctx.out.read_text() == "not a directory"


def no_output(ctx: Ctx) -> None:
    assert not ctx.out.exists() or not any(p.name != "run.json" for p in ctx.out.iterdir())


def claim_kept(stage: str) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        assert json.loads((ctx.out / "run.json").read_text())["stage"] == stage
        assert not (ctx.out / "metrics.json").exists()

    return check


def null_text_column(ctx: Ctx) -> list[str]:
    data = ctx.tmp / "null-data"
    shutil.copytree(ctx.data, data)
    for path in data.glob("*.parquet"):
        table = pq.read_table(path)
        col = table.column_names.index("response_j")
        table = table.set_column(col, "response_j", pa.array([None] * table.num_rows, pa.string()))
        pq.write_table(table, path)
    return ["--data", str(data)]


def truncated_weights(ctx: Ctx) -> list[str]:
    model = copy_model(ctx, "truncated-model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return ["--model", str(model)]


def no_tokenizer(ctx: Ctx) -> list[str]:
    model = copy_model(ctx, "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (model / name).unlink(missing_ok=True)
    return ["--model", str(model)]


def adapter_only(ctx: Ctx) -> list[str]:
    model = ctx.tmp / "adapter-only"
    model.mkdir()
    (model / "adapter_config.json").write_text("{}")
    return ["--model", str(model)]


def shape_mismatch(ctx: Ctx) -> list[str]:
    model = copy_model(ctx, "shape-mismatch")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (model / "config.json").write_text(json.dumps(config))
    return ["--model", str(model)]


def pickled_only(ctx: Ctx) -> list[str]:
    model = copy_model(ctx, "pickled")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return ["--model", str(model)]


def output_is_file(ctx: Ctx) -> list[str]:
    ctx.out.write_text("not a directory")
    return []


def foreign_result(stage: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        from rlhf_pipeline.results import StageResult

        other = "sft" if stage != "sft" else "dpo"
        ctx.out.mkdir()
        (ctx.out / "merged").mkdir()
        (ctx.out / "merged" / "config.json").write_text("{}")
        StageResult.of(other, "trained", ctx.out, {"steps": 3}).write()
        return []

    return setup


def other_stage_claim(stage: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        claim(ctx, "sft" if stage != "sft" else "dpo")
        return []

    return setup


def changed_settings(stage: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        claim(ctx, stage, learning_rate=1.0)  # the previous attempt's learning rate
        return []

    return setup


def damaged_claim(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "run.json").write_text("{not json")
    return []


def env(**values: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        ctx.env.update(values)
        return []

    return setup


def non_mlflow_server(ctx: Ctx) -> list[str]:
    """An HTTP server that answers 200 with HTML to everything (a proxy's landing page)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self):
            body = b"<html>welcome</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{server.server_address[1]}"
    return []


def per_stage(stage: str) -> list[Fault]:
    """The faults every training stage must handle the same way (before any work)."""
    return [
        Fault(
            f"{stage}-output-is-file",
            stage,
            "--output names a file",
            output_is_file,
            2,
            r"--output .* is a file, not a directory",
            "the file untouched; no MLflow run",
            out_untouched_file,
        ),
        Fault(
            f"{stage}-output-of-another-stage",
            stage,
            "--output holds another stage's checkpointed run",
            other_stage_claim(stage),
            2,
            r"holds a (sft|dpo) run, not " + stage,
            "the other run's files untouched",
            claim_kept("sft" if stage != "sft" else "dpo"),
        ),
        Fault(
            f"{stage}-foreign-finished-result",
            stage,
            "--output holds another stage's finished result",
            foreign_result(stage),
            2,
            r"holds a finished (sft|dpo) run",
            "the result untouched",
            lambda ctx: None,
        ),
        Fault(
            f"{stage}-changed-settings",
            stage,
            "rerun with another --learning-rate than the run in --output",
            changed_settings(stage),
            2,
            r"other settings: learning_rate \(1\.0 -> ",
            "the previous run untouched (use --restart to discard it)",
            claim_kept(stage),
        ),
        Fault(
            f"{stage}-damaged-run-json",
            stage,
            "a corrupt run.json in --output",
            damaged_claim,
            2,
            r"run\.json is damaged",
            "run.json kept for inspection",
            lambda ctx: None,
        ),
        Fault(
            f"{stage}-learning-rate-inf",
            stage,
            "--learning-rate inf",
            lambda ctx: ["--learning-rate", "inf"],
            2,
            r"--learning-rate: Input should be a finite number",
            "nothing written",
            no_output,
        ),
        Fault(
            f"{stage}-missing-model",
            stage,
            "--model path does not exist",
            lambda ctx: ["--model", str(ctx.tmp / "nope")],
            2,
            r"model path not found",
            "nothing written",
            no_output,
        ),
        Fault(
            f"{stage}-corrupt-weights",
            stage,
            "truncated model.safetensors",
            truncated_weights,
            2,
            r"model\.safetensors is not a readable safetensors file",
            "nothing written",
            no_output,
        ),
        Fault(
            f"{stage}-no-tokenizer",
            stage,
            "a model dir without tokenizer files",
            no_tokenizer,
            2,
            r"has no tokenizer",
            "nothing written",
            no_output,
        ),
        Fault(
            f"{stage}-unknown-lora-targets",
            stage,
            "--lora-target-modules names no module of the model",
            lambda ctx: ["--lora-target-modules", "qkv_proj"],
            2,
            r"--lora-target-modules qkv_proj: not modules",
            "nothing written",
            no_output,
        ),
        Fault(
            f"{stage}-tracking-unreachable",
            stage,
            "MLflow server down (nothing listens)",
            env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"),
            2,
            r"MLflow tracking server .* is unreachable",
            "nothing written",
            no_output,
            tracking="none",
        ),
        Fault(
            f"{stage}-unknown-run-id",
            stage,
            "MLFLOW_RUN_ID names no run",
            env(MLFLOW_RUN_ID="0" * 32),
            2,
            r"MLFLOW_RUN_ID=0+: no such run",
            "nothing written",
            no_output,
        ),
    ]


# fmt: off
FAULTS: list[Fault] = [f for stage in TRAINING for f in per_stage(stage)] + [
    Fault("sft-adapter-only-model", "sft", "--model is a LoRA adapter dir", adapter_only, 2,
          r"holds only a LoRA adapter", "nothing written", no_output),
    Fault("sft-shape-mismatch", "sft", "weights' shapes differ from config.json", shape_mismatch, 2,
          r"has shape \[.*\] but config\.json implies", "nothing written", no_output),
    Fault("sft-pickled-weights-only", "sft", "only pytorch_model.bin (pickle)", pickled_only, 2,
          r"has no \*\.safetensors weights", "nothing written", no_output),
    Fault("sft-unknown-experiment-id", "sft", "MLFLOW_EXPERIMENT_ID names no experiment",
          env(MLFLOW_EXPERIMENT_ID="987654"), 2, r"MLFLOW_EXPERIMENT_ID=987654: no such experiment",
          "nothing written", no_output),
    Fault("sft-non-mlflow-server", "sft", "the tracking URL answers 200 with a web page", non_mlflow_server, 2,
          r"MLflow tracking http://127\.0\.0\.1:\d+: ", "nothing written", no_output, tracking="none"),
    Fault("sft-null-text-column", "sft", "parquet text column full of nulls", null_text_column, 2,
          r"finetune\.parquet: column response_j has \d+ null", "an MLflow run marked FAILED; no checkpoint",
          nothing_written),
    Fault("sft-missing-data", "sft", "--data does not exist", lambda ctx: ["--data", str(ctx.tmp / "none")], 2,
          r"data directory not found", "an MLflow run marked FAILED; no checkpoint", nothing_written),
]
# fmt: on
