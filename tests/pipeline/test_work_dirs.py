"""`rlhf run` frees the disk of finished runs but never deletes the only copy of an unfinished run's work."""

from __future__ import annotations

import os

from rlhf_pipeline.orchestration.local_run import FINISHED_MARK, remove_previous_runs


class _Console:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def _run_dir(root, name: str, age: int, finished: bool):
    d = root / name
    (d / "sft" / "checkpoints" / "step-2").mkdir(parents=True)
    (d / "sft" / "checkpoints" / "step-2" / "trainable.safetensors").write_bytes(b"weights")
    if finished:
        (d / FINISHED_MARK).touch()
    os.utime(d, (1_000_000 + age, 1_000_000 + age))
    return d


def test_finished_runs_removed_newest_unfinished_kept(tmp_path):
    root = tmp_path / "work"
    old_killed = _run_dir(root, "run-a", 1, finished=False)
    done = _run_dir(root, "run-b", 2, finished=True)
    killed = _run_dir(root, "run-c", 3, finished=False)
    console = _Console()
    remove_previous_runs(root, console)
    assert not done.exists() and not old_killed.exists()
    assert (killed / "sft" / "checkpoints" / "step-2" / "trainable.safetensors").read_bytes() == b"weights"
    assert len(console.lines) == 1 and str(killed) in console.lines[0]


def test_only_finished_runs_nothing_kept(tmp_path):
    root = tmp_path / "work"
    _run_dir(root, "run-a", 1, finished=True)
    console = _Console()
    remove_previous_runs(root, console)
    assert list(root.iterdir()) == [] and console.lines == []
    remove_previous_runs(tmp_path / "absent", console)  # first run: nothing there
