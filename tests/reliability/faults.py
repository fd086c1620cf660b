"""The fault catalogue of the fault-injection suite: one `Fault` per kind of fault, run through the real `rlhf`
CLI by test_faults.py, which asserts the exit status, the one error line (or the one report line), no traceback, and
the state left behind. `python tests/reliability/fault_table.py` renders this list (and the kill/resume cases) as
the table in docs/reliability.md; a test checks the doc is that rendering, so it cannot drift."""

from __future__ import annotations

import json
import os
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
    partial: Path | None = None
    finished: Path | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run after the fault's check (unmounts)

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
    trains: bool = False  # fails after training steps ran: the error is the last line, after the progress bars


def stage_args(stage: str, ctx: Ctx) -> list[str]:
    if stage == "run":
        return ["--output", str(ctx.out)]
    if stage == "prepare-data":
        return [
            "--input",
            str(ctx.tmp / "dump" / "Posts.xml"),
            "--output",
            str(ctx.out),
            "--tmp-dir",
            str(ctx.tmp / "t"),
        ]
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


def _tmpfs(ctx: Ctx, name: str, options: str) -> Path:
    """A small tmpfs at ctx.tmp/name (root can mount here and in CI; elsewhere the case is skipped, and counted)."""
    import subprocess

    import pytest

    mnt = ctx.tmp / name
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(mnt)], check=False))
    return mnt


def read_only_output(ctx: Ctx) -> list[str]:
    mnt = _tmpfs(ctx, "ro", "size=1m,mode=0755")
    (mnt / "out").parent.chmod(0o755)
    import subprocess

    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    return ["--output", str(mnt / "out")]


def full_disk_output(ctx: Ctx) -> list[str]:
    return ["--output", str(_tmpfs(ctx, "full", "size=256k") / "out")]


def nothing_registered_no_traceback(ctx: Ctx) -> None:
    import mlflow

    from rlhf_pipeline.training.checkpoint import checkpoint_problem

    for step_dir in (ctx.tmp / "full" / "out").glob("**/step-*"):  # what fit on the full disk: only whole checkpoints
        if not step_dir.name.startswith(".tmp-"):
            assert checkpoint_problem(step_dir) is None, step_dir

    mlflow.set_tracking_uri(ctx.env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{ctx.tmp / 'mlflow.db'}")
    assert mlflow.MlflowClient().search_model_versions() == []


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
            f"{stage}-output-read-only",
            stage,
            "--output on a read-only mount",
            read_only_output,
            2,
            r"--output .*(not writable|[Rr]ead-only)",
            "nothing written; no registered version",
            nothing_registered_no_traceback,
        ),
        Fault(
            f"{stage}-output-disk-full",
            stage,
            "--output on a full disk (256 KiB tmpfs: checkpoints or the model do not fit)",
            full_disk_output,
            74,
            r"[Nn]o space left on device",
            "no registered version; what fit stays (a complete checkpoint or none)",
            nothing_registered_no_traceback,
            trains=True,
        ),
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


DEAD_PID = "999999999"  # above any pid_max: no such process


def killed_prepare_data(ctx: Ctx) -> list[str]:
    """What a prepare-data killed mid-run leaves: partial parquet in a staging dir, a scratch dir in --tmp-dir."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from prepare_data_helpers import posts_xml, small_dump_rows

    (ctx.tmp / "dump").mkdir()
    (ctx.tmp / "dump" / "Posts.xml").write_text(posts_xml(small_dump_rows()))
    stale = ctx.out / f".staging-{DEAD_PID}-abcd1234"
    stale.mkdir(parents=True)
    (stale / "finetune.parquet").write_bytes(b"PAR1 partial")
    scratch = ctx.tmp / "t" / f"rlhf-prepare-data-{DEAD_PID}-xyz"
    scratch.mkdir(parents=True)
    (scratch / "Posts.xml").write_text("<posts>" * 1000)
    live = ctx.tmp / "t" / f"rlhf-prepare-data-{os.getpid()}-live"  # a concurrent run's: kept
    live.mkdir()
    return []


def pathological_bodies(ctx: Ctx) -> list[str]:
    """Two 1 MB answers (Stack Exchange caps posts at 30,000 characters) among normal ones."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from prepare_data_helpers import answer, posts_xml, small_dump_rows

    huge = "<p>" + "malt " * 200_000 + "</p>"
    rows = small_dump_rows() + [answer(900, 1, 99, body=huge), answer(901, 1, -5, body=huge)]
    (ctx.tmp / "t").mkdir()
    (ctx.tmp / "dump").mkdir()
    (ctx.tmp / "dump" / "Posts.xml").write_text(posts_xml(rows))
    return []


def huge_bodies_counted(ctx: Ctx) -> None:
    stats = json.loads((ctx.out / "stats.json").read_text())
    assert stats["answers_skipped"]["over_body_cap"] == 2
    texts = [
        t
        for name in ("finetune", "reward", "rl", "evaluation")
        if (ctx.out / f"{name}.parquet").exists()
        for t in pq.read_table(ctx.out / f"{name}.parquet").column("response_j").to_pylist()
    ]
    assert texts and max(len(t) for t in texts) < 30_000


def stale_dirs_removed(ctx: Ctx) -> None:
    assert not list(ctx.out.glob(".staging-*")) and (ctx.out / "stats.json").is_file()
    assert [p.name for p in (ctx.tmp / "t").iterdir()] == [f"rlhf-prepare-data-{os.getpid()}-live"]


# fmt: off
FAULTS: list[Fault] = [f for stage in TRAINING for f in per_stage(stage)] + [
    Fault("prepare-data-after-a-kill", "prepare-data", "rerun after a kill left .staging-<pid>-* partial parquet in "
          "the output and a scratch dump copy in the temp dir", killed_prepare_data, 0, r"prepared|finetune",
          "the dead run's staging and scratch dirs removed (a live run's kept); a complete output",
          stale_dirs_removed),
    Fault("prepare-data-pathological-bodies", "prepare-data", "two 1 MB answer bodies (Stack Exchange's cap is "
          "30,000 characters)", pathological_bodies, 0, r"prepared|finetune",
          "both skipped before the Markdown conversion, counted as answers_skipped.over_body_cap in stats.json; "
          "the rest prepared", huge_bodies_counted),
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
    Fault("run-missing-model", "run", "rlhf run --model <missing>", lambda ctx: ["--model", str(ctx.tmp / "nope")],
          2, r"model path not found", "no work directory, no step run", no_output),
    Fault("run-corrupt-model", "run", "rlhf run --model <truncated weights>", truncated_weights, 2,
          r"model\.safetensors is not a readable safetensors file", "no step run", no_output),
    Fault("run-set-yaml-no", "run", "--set sft.mixed_precision=no (YAML 1.1 reads `no` as false) and a missing "
          "--model", lambda ctx: ["--set", "sft.mixed_precision=no", "--model", str(ctx.tmp / "nope")], 2,
          r"model path not found", "the option accepted (the error is the model's); no step run", no_output),
    Fault("sft-missing-data", "sft", "--data does not exist", lambda ctx: ["--data", str(ctx.tmp / "none")], 2,
          r"data directory not found", "an MLflow run marked FAILED; no checkpoint", nothing_written),
]
# fmt: on


# -- faults of a run that has trained: checkpoints damaged, settings changed, divergence ------------------------------
# ctx.partial: an SFT output stopped after step 4 of 6 (checkpoints step-2 and step-4, no result); ctx.finished: a
# finished 6-step SFT output; both with the MLflow store they were tracked in (copied per case with the output).

SFT_STEPS = ["--max-steps", "6"]


def from_partial(ctx: Ctx) -> None:
    shutil.copytree(ctx.partial, ctx.out)
    shutil.copy(ctx.partial.parent / "mlflow.db", ctx.tmp / "mlflow.db")


def from_finished(ctx: Ctx) -> None:
    shutil.copytree(ctx.finished, ctx.out)
    shutil.copy(ctx.finished.parent / "mlflow.db", ctx.tmp / "mlflow.db")


def damage(name: str, how: str, which: tuple[int, ...] = (4,)) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        from_partial(ctx)
        for step in which:
            path = ctx.out / "checkpoints" / f"step-{step}" / name
            if how == "truncate":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            elif how == "garble":
                path.write_text('{"step": 4, "optimizer": ')
            else:
                path.unlink()
        return SFT_STEPS

    return setup


def resumed_from(step: int) -> Callable[[Ctx], None]:
    def check(ctx: Ctx) -> None:
        result = json.loads((ctx.out / "metrics.json").read_text())
        assert result["status"] == "trained" and result["steps"] == 6 and result["trained_steps"] == 6 - step
        assert [p.name for p in sorted((ctx.out / "checkpoints").glob("step-*"))] == ["step-4", "step-6"]
        assert len(registered_versions(ctx)) == 1

    return check


def registered_versions(ctx: Ctx) -> list:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{ctx.tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri).search_model_versions("name='rlhf-sft'")


def checkpoints_kept(ctx: Ctx) -> None:
    assert [p.name for p in sorted((ctx.out / "checkpoints").glob("step-*"))] == ["step-2", "step-4"]
    assert not (ctx.out / "metrics.json").exists()


def partial_with(*args: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        from_partial(ctx)
        return [*SFT_STEPS, *args]

    return setup


def finished_with(*args: str, drop_result: bool = False) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        from_finished(ctx)
        if drop_result:  # killed after registering, before metrics.json
            (ctx.out / "metrics.json").unlink()
        return [*SFT_STEPS, *args]

    return setup


def changed_data(ctx: Ctx) -> list[str]:
    from_partial(ctx)
    data = ctx.tmp / "data"
    shutil.copytree(ctx.data, data)
    shutil.copy(data / "reward.parquet", data / "finetune.parquet")  # same path layout, other rows
    table = pq.read_table(data / "finetune.parquet")
    pq.write_table(table.slice(0, table.num_rows - 2), data / "finetune.parquet")
    return [*SFT_STEPS, "--data", str(data)]


def one_version_and_result(ctx: Ctx) -> None:
    result = json.loads((ctx.out / "metrics.json").read_text())
    versions = registered_versions(ctx)
    assert len(versions) == 1 and result["registered"][0]["version"] == str(versions[0].version)


def nan_model(ctx: Ctx) -> list[str]:
    from safetensors.torch import load_file, save_file

    model = copy_model(ctx, "nan-model")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    return [*SFT_STEPS, "--model", str(model)]


def diverged(ctx: Ctx) -> None:
    assert not (ctx.out / "metrics.json").exists() and not (ctx.out / "merged").exists()
    assert registered_versions(ctx) == []


def retrained_with_r8(ctx: Ctx) -> None:
    claim_file = json.loads((ctx.out / "run.json").read_text())
    result = json.loads((ctx.out / "metrics.json").read_text())
    assert claim_file["identity"]["lora_r"] == 8 and result["trained_steps"] == 6


# fmt: off
FAULTS += [
    Fault("sft-truncated-newest-weights", "sft", "newest checkpoint's trainable.safetensors truncated",
          damage("trainable.safetensors", "truncate"), 0,
          r"skipping damaged checkpoint .*step-4: trainable\.safetensors does not match its hash",
          "resumed from step-2; finished at step 6; one registered version", resumed_from(2), training_steps=True),
    Fault("sft-corrupt-newest-state", "sft", "newest checkpoint's state.json corrupt",
          damage("state.json", "garble"), 0, r"skipping damaged checkpoint .*step-4: state\.json does not match",
          "resumed from step-2; finished at step 6", resumed_from(2), training_steps=True),
    Fault("sft-interrupted-save", "sft", "newest checkpoint without manifest (killed mid-save)",
          damage("manifest.json", "delete"), 0, r"skipping damaged checkpoint .*step-4: no manifest",
          "resumed from step-2; finished at step 6", resumed_from(2), training_steps=True),
    Fault("sft-every-checkpoint-damaged", "sft", "all checkpoints truncated",
          damage("optimizer.safetensors", "truncate", (2, 4)), 0, r"skipping damaged checkpoint .*step-2",
          "trained from step 0; finished at step 6", resumed_from(0), training_steps=True),
    Fault("sft-resume-changed-lora-r", "sft", "resume with another --lora-r", partial_with("--lora-r", "8"), 2,
          r"other settings: lora_r \(16 -> 8\)", "checkpoints step-2/4 kept", checkpoints_kept,
          training_steps=True),
    Fault("sft-resume-changed-lr", "sft", "resume with another --learning-rate",
          partial_with("--learning-rate", "0.001"), 2, r"other settings: learning_rate \(0\.0002 -> 0\.001\)",
          "checkpoints step-2/4 kept", checkpoints_kept, training_steps=True),
    Fault("sft-resume-changed-data", "sft", "resume on other data at another --data path", changed_data, 2,
          r"other settings: data \(.* data_fingerprint", "checkpoints step-2/4 kept", checkpoints_kept,
          training_steps=True),
    Fault("sft-restart-changed-lora-r", "sft", "--restart with another --lora-r",
          partial_with("--lora-r", "8", "--restart"), 0, r'"trained_steps": 6',
          "old checkpoints discarded; retrained 6 steps with r=8", retrained_with_r8, training_steps=True),
    Fault("sft-finished-other-max-steps", "sft", "rerun of a finished run with another --max-steps",
          finished_with("--max-steps", "9"), 2, r"other settings: max_steps \(6 -> 9\)",
          "the finished result untouched (not reported as done)", one_version_and_result, training_steps=True),
    Fault("sft-finished-rerun", "sft", "rerun of a finished run, same settings", finished_with(), 0,
          r'"status": "reused"', "nothing redone; still one registered version", one_version_and_result,
          training_steps=True),
    Fault("sft-killed-after-registering", "sft", "killed after registering, before metrics.json",
          finished_with(drop_result=True), 0, r'"status": "trained"',
          "no step retrained; the same single registered version", one_version_and_result, training_steps=True),
    Fault("sft-nan-in-model", "sft", "a NaN in the base model's weights (final norm)", nan_model,
          2, r"the model's logits are not finite", "no model, no metrics.json, no registered version", diverged,
          training_steps=True),
    Fault("sft-learning-rate-overflow", "sft", "--learning-rate 1e38: the optimizer step overflows float32",
          lambda ctx: [*SFT_STEPS, "--learning-rate", "1e38"], 3, r"sft: the optimizer step at step 2 overflowed",
          "no model, no metrics.json, no registered version", diverged, training_steps=True),
]
# fmt: on


# -- cases tested by their own test functions (kill loops, outages, the registry): a row each in the table ---------


@dataclass
class Row:
    id: str
    stage: str
    what: str
    exit: str
    line: str
    leaves: str


def row(stage: str, what: str, exit: str, line: str, leaves: str):
    """Attach the table row of the fault a test function (or each of its parametrizations) injects."""

    def mark(fn):
        fn.fault_row = Row(fn.__name__.removeprefix("test_").replace("_", "-"), stage, what, exit, line, leaves)
        return fn

    return mark
