"""The MLflow server image: its entrypoint refuses a server without authentication, and everything it installs
is pinned with hashes (`pip install --require-hashes`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

IMAGE = Path(__file__).resolve().parents[2] / "images" / "mlflow-server"
GUARD = IMAGE / "require_auth.py"


def guard(*argv: str, allow: str | None = None, path: str = "/usr/bin:/bin") -> subprocess.CompletedProcess:
    env = {"PATH": path}
    if allow is not None:
        env["MLFLOW_SERVER_ALLOW_NO_AUTH"] = allow
    return subprocess.run([sys.executable, str(GUARD), *argv], capture_output=True, text=True, env=env, timeout=30)


@pytest.fixture()
def fake_mlflow(tmp_path) -> str:
    """A PATH whose `mlflow` only echoes its arguments: what the wrapper would exec."""
    fake = tmp_path / "mlflow"
    fake.write_text('#!/bin/sh\necho "ran: $*"\n')
    fake.chmod(0o755)
    return f"{tmp_path}:/usr/bin:/bin"


@pytest.mark.parametrize(
    "argv, allow",
    [
        (["mlflow", "server", "--host", "0.0.0.0"], None),
        (["mlflow", "server", "--app-name", "other"], None),
        (["mlflow", "server"], "yes"),  # only the literal "true" opts out
    ],
)
def test_server_without_auth_is_refused(fake_mlflow, argv, allow):
    proc = guard(*argv, allow=allow, path=fake_mlflow)
    assert proc.returncode == 1 and proc.stdout == ""  # nothing ran
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlflow-server: error: refusing to start without authentication")


@pytest.mark.parametrize(
    "argv, allow",
    [
        (["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0"], None),
        (["mlflow", "server", "--app-name=basic-auth"], None),
        (["mlflow", "server", "--host", "0.0.0.0"], "true"),  # the chart's auth-off variant
        (["mlflow", "db", "upgrade", "postgresql://db"], None),  # not a server: nothing to guard
    ],
)
def test_auth_or_an_explicit_opt_out_execs_the_command(fake_mlflow, argv, allow):
    proc = guard(*argv, allow=allow, path=fake_mlflow)
    assert proc.returncode == 0 and proc.stdout == f"ran: {' '.join(argv[1:])}\n", proc.stderr


def test_default_command_goes_through_the_guard_with_auth():
    dockerfile = (IMAGE / "Dockerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["python", "/opt/require_auth.py"\]$', dockerfile, re.M)
    [cmd] = re.findall(r"^CMD (\[.*\])$", dockerfile, re.M)
    argv = __import__("json").loads(cmd)
    assert argv[:2] == ["mlflow", "server"] and "basic-auth" in argv[argv.index("--app-name") + 1]
    assert "--require-hashes" in dockerfile and "requirements.lock" in dockerfile


def lock() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of requirements.lock."""
    text = (IMAGE / "requirements.lock").read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        spec, *hashes = line.split()
        name, version = spec.split("==")
        out[name] = (version, [h.removeprefix("--hash=sha256:") for h in hashes])
    return out


def test_every_locked_package_is_pinned_with_a_hash():
    pins = lock()
    assert len(pins) > 20  # mlflow's whole dependency tree, not just the four top-level packages
    for name, (version, hashes) in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version), name
        assert hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_lock_matches_the_top_level_requirements():
    pins = lock()
    for line in (IMAGE / "requirements.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{name} is in requirements.txt but not locked: run lock_requirements.py"
        assert req.specifier.contains(pins[name][0]), (
            f"{name}: lock has {pins[name][0]}, requirements say {req.specifier}"
        )
