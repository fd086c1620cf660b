"""Render the fault-injection suite as the markdown table of docs/reliability.md, from the tests' own
parametrization (faults.FAULTS, the kill-loop's stages x signals, the rows attached to the other tests):

    python tests/reliability/fault_table.py > /dev/null   # prints the table; test_fault_table checks the doc
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "training")]

DOC = HERE.parents[1] / "docs" / "reliability.md"
BEGIN, END = "<!-- fault-table:begin -->", "<!-- fault-table:end -->"
ROW_MODULES = ("test_kill_resume", "test_nonfinite", "test_tracking_outage", "test_registry_ownership")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def rows() -> list[tuple[str, ...]]:
    from faults import FAULTS

    out = [(f.id, f.stage, f.what, str(f.exit), f"`{f.line}`", f.leaves) for f in FAULTS]
    for name in ROW_MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            fn = getattr(module, attr)
            r = getattr(fn, "fault_row", None)
            if r is None:
                continue
            for case in getattr(module, "KILL_CASES", [None]) if name == "test_kill_resume" else [None]:
                stage, signal_name = case if case else (r.stage, "")
                what = r.what.format(signal=signal_name, stage=stage)
                ident = f"{stage}-{signal_name.lower()}-loop" if case else r.id
                out.append((ident, stage, what, r.exit, f"`{r.line}`" if r.line else "-", r.leaves))
    return out


def table() -> str:
    lines = [
        "| # | fault | command | what is injected | exit | the one line (regex) | state left behind |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows(), 1):
        lines.append("| " + " | ".join([str(i), *(_cell(c) for c in r)]) + " |")
    return "\n".join(lines)


def in_doc() -> str:
    text = DOC.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def write_doc() -> None:
    text = DOC.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    DOC.write_text(f"{head}\n{table()}\n{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv:
        write_doc()
    print(table())
