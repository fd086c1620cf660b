"""Every fault of faults.FAULTS through the real `rlhf` CLI: the exit status, exactly one `rlhf <cmd>: error:` line
(never a traceback), and the state left behind."""

from __future__ import annotations

import re
import shutil

import pytest
from faults import FAULTS, Ctx, stage_args
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


def merged_args(defaults: list[str], extra: list[str]) -> list[str]:
    """`defaults` with each flag of `extra` replaced (or appended)."""
    args = list(defaults)
    for i in range(0, len(extra), 2):
        flag, value = extra[i], extra[i + 1]
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.id)
def test_fault(fault, inputs, tmp_path, monkeypatch, capsys):
    model, data, reward = inputs
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ctx = Ctx(tmp=tmp_path, model=model, data=data, reward=reward, stage=fault.stage)
    if fault.tracking == "sqlite":
        ctx.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx.args = stage_args(fault.stage, ctx)
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
        assert len(lines) == 1, err[-2000:]
        assert lines[0].startswith(f"rlhf {fault.stage}: error: "), lines[0]
        assert re.search(fault.line, lines[0]), lines[0]
    else:
        assert re.search(fault.line, out + err), (out + err)[-2000:]
    fault.check(ctx)
