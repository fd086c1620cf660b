"""Fixtures for the prepare-data tests: the shared beer dump, tiny hand-made dumps, and a CLI runner."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from prepare_data_helpers import posts_xml, small_dump_rows

from rlhf_pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    return Path(os.environ.get("RLHF_SHARED_DIR") or REPO.parent / "shared")


@pytest.fixture(scope="session")
def beer_posts() -> Path:
    path = shared_dir() / "data" / "stackexchange" / "beer.stackexchange.com" / "Posts.xml"
    if not path.is_file():
        pytest.skip(f"the beer sample is not at {path} (set RLHF_SHARED_DIR)")
    return path


@pytest.fixture
def small_dump(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.stackexchange.com" / "Posts.xml"
    path.parent.mkdir()
    path.write_text(posts_xml(small_dump_rows()), encoding="utf-8")
    return path


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Run `rlhf prepare-data ARGS...` in-process, as a user would, and capture the exit code and output."""

    def run(*args: object) -> CliResult:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare-data", *map(str, args)])
        out = capsys.readouterr()
        code = exit_info.value.code
        return CliResult(code if isinstance(code, int) else 1, out.out, out.err)

    return run
