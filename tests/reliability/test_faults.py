"""Every fault of faults.FAULTS through the real `rlhf` CLI: the exit status, exactly one `rlhf <cmd>: error:` line
(never a traceback), and the state left behind."""

from __future__ import annotations

import re
import shutil

import pytest
from faults import FAULTS, SFT_STEPS, Ctx, config_of, stage_args
from stage_runs import data_for

from rlhf_pipeline.cli import main
from rlhf_pipeline.results import StageResult


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fault-inputs")
    data = data_for(tmp)
    reward = tmp / "reward"
    shutil.copytree(tiny_model_dir, reward / "merged")
    StageResult.of("reward", "trained", reward, {"accuracy": 0.7, "reward_mean": 0.0, "reward_std": 1.0}).write()
    return tiny_model_dir, data, reward


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """(partial, finished): 6-step SFT outputs stopped after step 4 / finished, each next to its mlflow.db."""
    import os

    from rlhf_pipeline.training.sft import run_sft

    model, data, reward = inputs
    outputs = []
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID")}
    try:
        for kind in ("partial", "finished"):
            root = tmp_path_factory.mktemp(kind)
            ctx = Ctx(tmp=root, model=model, data=data, reward=reward, stage="sft")
            ctx.args = merged_args(stage_args("sft", ctx), SFT_STEPS)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
            for var in ("MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
                os.environ.pop(var, None)

            def stop_after_4(step, kind=kind):
                if kind == "partial" and step == 4:
                    raise Stop

            try:
                run_sft(config_of(ctx), on_step=stop_after_4)
            except Stop:
                pass
            outputs.append(ctx.out)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return tuple(outputs)


def merged_args(defaults: list[str], extra: list[str]) -> list[str]:
    """`defaults` with each `--flag value` of `extra` replaced (or appended); a bare `--flag` is appended."""
    args, i = list(defaults), 0
    while i < len(extra):
        flag = extra[i]
        if i + 1 == len(extra) or extra[i + 1].startswith("--"):
            args.append(flag)
            i += 1
            continue
        if flag in args:
            args[args.index(flag) + 1] = extra[i + 1]
        else:
            args += [flag, extra[i + 1]]
        i += 2
    return args


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault(fault, inputs, request, tmp_path, monkeypatch, capsys):
    model, data, reward = inputs
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ctx = Ctx(tmp=tmp_path, model=model, data=data, reward=reward, stage=fault.stage)
    if fault.training_steps:
        ctx.partial, ctx.finished = request.getfixturevalue("trained")
    if fault.tracking == "sqlite":
        ctx.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx.args = stage_args(fault.stage, ctx)
    try:
        _run_and_check(fault, ctx, monkeypatch, capsys)
    finally:
        for cleanup in ctx.cleanups:  # unmount what the fault mounted, pass or fail
            cleanup()


def _run_and_check(fault, ctx, monkeypatch, capsys) -> None:
    args = merged_args(ctx.args, fault.setup(ctx))
    for name, value in ctx.env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([fault.stage, *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    assert exc.value.code == fault.exit, err[-2000:]
    if fault.exit != 0:
        lines = err.strip().splitlines()
        if (
            fault.training_steps or fault.trains
        ):  # after progress bars: the error is the one last line, on a line of its own
            lines = lines[-1:]
            assert err.count(": error: ") == 1, err[-2000:]
        assert len(lines) == 1, err[-2000:]
        assert lines[0].startswith(f"rlhf {fault.stage}: error: "), lines[0]
        assert re.search(fault.line, lines[0]), lines[0]
    else:
        assert re.search(fault.line, out + err), (out + err)[-2000:]
    fault.check(ctx)
