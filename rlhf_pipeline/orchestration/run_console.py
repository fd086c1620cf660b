"""`rlhf run`'s console: kfp.local prints task start/finish lines and the steps' output to stdout; the tee copies
it into the log, StepTimer turns the start/finish lines into progress lines and per-step wall and CPU times and
the steps' tqdm refreshes into the spinner's "step n/N · loss · ETA", and the terminal sees everything only with
--verbose.
"""

from __future__ import annotations

import io
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

# task name prefix (kfp names tasks after components) -> label shown in progress and the summary
TASK_LABELS = {
    "validate-config": "validate config",
    "prepare-data": "prepare data",
    "sft": "SFT",
    "reward": "reward model",
    "judge": "judge",
    "ppo": "PPO",
    "dpo": "DPO",
    "evaluate": "evaluate",
    "report": "report",
    "unknown-alignment": "unknown alignment",
}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_FINISH = re.compile(r"Task '([^']+)' finished with status (\w+)")
# A tqdm update ("sft:  30%|███   | 12/40 [00:05<00:12,  2.31step/s, loss=1.2345, lr=1e-04]"): kfp.local reads the
# step's output in text mode, so every \r-terminated refresh arrives here as a line of its own.
_TQDM = re.compile(
    r"(?P<desc>[^:|\]]+):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)\s+\[[^<\]]*<(?P<eta>[^,\]]+)(?P<rest>[^\]]*)\]"
)
_LOSS = re.compile(r"\bloss=([^,\]\s]+)")


def progress_text(line: str) -> str | None:
    """'ppo 12/40 · loss 1.2345 · ETA 00:12' from a tqdm refresh line, None for any other line."""
    m = _TQDM.search(line)
    if m is None:
        return None
    text = f"{m.group('desc').strip()} {m.group('n')}/{m.group('total')}"
    if loss := _LOSS.search(m.group("rest")):
        text += f" · loss {loss.group(1)}"
    eta = m.group("eta").strip()
    return text + (f" · ETA {eta}" if eta and eta != "?" else "")


def strip_ansi(text: str) -> str:
    """kfp.local colours its lines; the log, the progress parser and error messages want plain text."""
    return _ANSI.sub("", text)


class StepTimer:
    def __init__(self, console, verbose: bool):
        self.console = console
        self.verbose = verbose
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.cpu: dict[str, float] = {}  # CPU seconds (user + system) of the step's processes
        self._cpu0: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.output: dict[str, list[str]] = {}
        self.current: str | None = None
        self.live = None

    @staticmethod
    def label(task: str) -> str:
        base = re.sub(r"-\d+$", "", task)
        return TASK_LABELS.get(base, task)

    def line(self, text: str) -> None:
        clean = strip_ansi(text)
        if m := _START.search(clean):
            self.current = m.group(1)
            self.started[self.current] = time.monotonic()
            self._cpu0[self.current] = children_cpu()
            self.output[self.current] = []
            self.console.print(f"[bold cyan]▶[/] {self.label(self.current)} started")
            if self.live is not None:
                self.live.update(f"{self.label(self.current)} running…")
            return
        if m := _FINISH.search(clean):
            task, status = m.group(1), m.group(2)
            took = time.monotonic() - self.started.get(task, time.monotonic())
            self.durations[task] = took
            self.cpu[task] = children_cpu() - self._cpu0.get(task, children_cpu())
            self.status[task] = status
            ok = status == "SUCCESS"
            mark = "[bold green]✓[/]" if ok else "[bold red]✗[/]"
            self.console.print(f"{mark} {self.label(task)} {'finished' if ok else 'FAILED'} in {fmt_seconds(took)}")
            self.current = None
            if self.live is not None:
                self.live.update("waiting for the next step…")
            return
        if self.current is not None:
            if self.live is not None and (progress := progress_text(clean)) is not None:
                self.live.update(f"{self.label(self.current)}: {progress}")
            buf = self.output.setdefault(self.current, [])
            buf.append(clean)
            del buf[:-200]


class _Tee(io.TextIOBase):
    """sys.stdout replacement: everything to the log file, lines to the StepTimer, optionally to the terminal."""

    def __init__(self, log: TextIO, timer: StepTimer, echo: TextIO | None):
        self.log, self.timer, self.echo = log, timer, echo
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.log.write(s)
        if self.echo is not None:
            self.echo.write(s)
        self._partial += s
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self.timer.line(line)
        return len(s)

    def flush(self) -> None:
        self.log.flush()
        if self.echo is not None:
            self.echo.flush()

    def isatty(self) -> bool:
        return False


@contextmanager
def captured_stdout(log_path: Path, timer: StepTimer, verbose: bool) -> Iterator[None]:
    real = sys.stdout
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log:
        sys.stdout = _Tee(log, timer, real if verbose else None)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stdout = real


def children_cpu() -> float:
    """CPU seconds of finished child processes (kfp.local waits for each step's process before reporting it)."""
    t = os.times()
    return t.children_user + t.children_system


def fmt_seconds(s: float) -> str:
    return f"{int(s // 60)}m{s % 60:04.1f}s" if s >= 60 else f"{s:.1f}s"
