"""`rlhf run`'s console turns the steps' tqdm refreshes into the spinner's progress text."""

from __future__ import annotations

import io

from tqdm import tqdm

from rlhf_pipeline.orchestration.run_console import StepTimer, progress_text


class _Live:
    def __init__(self) -> None:
        self.shown: list[str] = []

    def update(self, text: str) -> None:
        self.shown.append(text)


class _Console:
    def print(self, *args, **kwargs) -> None:
        pass


def _tqdm_refreshes(total: int, **postfix: str) -> list[str]:
    """What a real tqdm bar writes (\\r-separated refreshes), as kfp.local's text-mode reader splits it."""
    out = io.StringIO()
    bar = tqdm(total=total, desc="sft", unit="step", file=out, mininterval=0, ascii=False)
    for _ in range(total):
        bar.update(1)
        bar.set_postfix(**postfix)
    bar.close()
    return [part for part in out.getvalue().replace("\n", "\r").split("\r") if part.strip()]


def test_progress_text_from_real_tqdm_lines():
    lines = _tqdm_refreshes(4, loss="1.2345", lr="1.00e-04")
    texts = [progress_text(line) for line in lines]
    assert texts[-1].startswith("sft 4/4 · loss 1.2345")
    assert any(t is not None and t.startswith("sft 2/4") for t in texts)
    assert progress_text("Executing task 'sft'") is None
    assert progress_text("resuming from /x/checkpoint-3 (step 3)") is None


def test_timer_shows_the_running_steps_progress():
    timer = StepTimer(_Console(), verbose=False)
    timer.live = _Live()
    timer.line("Executing task 'sft'")
    for line in _tqdm_refreshes(3, loss="0.5000"):
        timer.line(line)
    assert timer.live.shown[0] == "SFT running…"
    assert timer.live.shown[-1].startswith("SFT: sft 3/3 · loss 0.5000")
    timer.line("Task 'sft' finished with status SUCCESS")
    assert timer.live.shown[-1] == "waiting for the next step…" and timer.status == {"sft": "SUCCESS"}
