"""`rlhf schedule` with the real kfp.Client against a local stub of the KFP v2beta1 REST endpoints it uses.

No Kubeflow Pipelines server runs here: the stub answers like one (same paths, JSON field names) and records
every request, so the tests assert what the real client actually sends.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from rlhf_pipeline.cli import main

from .conftest import free_port

API = "/apis/v2beta1"


class KfpStub:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.experiments = [{"experiment_id": "exp-1", "display_name": "rlhf-pipeline"}]
        self.pipelines = [{"pipeline_id": "pipe-1", "display_name": "rlhf-pipeline"}]
        self.versions = {
            "pipe-1": [
                {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-2", "display_name": "b"},
                {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1", "display_name": "a"},
            ]
        }
        self.recurring: dict[str, dict] = {}
        self.counter = 0

    def handle(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, dict]:
        entry = {"method": method, "path": path, "query": query, "auth": headers.get("Authorization")}
        if headers.get("Content-Type", "").startswith("application/json") and body:
            entry["json"] = json.loads(body)
        self.requests.append(entry)
        q = {k: v[0] for k, v in query.items()}
        name_filter = json.loads(q["filter"])["predicates"][0]["stringValue"] if "filter" in q else None
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if path == f"{API}/experiments" and method == "GET":
            return 200, {"experiments": [e for e in self.experiments if e["display_name"] == name_filter]}
        if path == f"{API}/experiments" and method == "POST":
            exp = {**entry["json"], "experiment_id": f"exp-{len(self.experiments) + 1}"}
            self.experiments.append(exp)
            return 200, exp
        if path == f"{API}/pipelines" and method == "GET":
            return 200, {"pipelines": [p for p in self.pipelines if p["display_name"] == name_filter]}
        m = re.fullmatch(f"{API}/pipelines/([^/]+)/versions", path)
        if m and method == "GET":
            return 200, {"pipeline_versions": self.versions.get(m.group(1), [])[: int(q.get("page_size", 10))]}
        if path == f"{API}/pipelines/upload_version" and method == "POST":
            assert b"pipelineSpec" in body or b"pipelineInfo" in body  # the YAML went up as multipart
            version = {"pipeline_id": q["pipelineid"], "pipeline_version_id": "ver-3", "display_name": q["name"]}
            self.versions[q["pipelineid"]].insert(0, version)
            return 200, version
        if path == f"{API}/recurringruns" and method == "POST":
            self.counter += 1
            run = {**entry["json"], "recurring_run_id": f"rr-{self.counter}"}
            self.recurring[run["recurring_run_id"]] = run
            return 200, run
        if path == f"{API}/recurringruns" and method == "GET":
            runs = [
                r
                for r in self.recurring.values()
                if ("experiment_id" not in q or r["experiment_id"] == q["experiment_id"])
                and (name_filter is None or r["display_name"] == name_filter)
            ]
            return 200, {"recurringRuns": runs, "total_size": len(runs)}  # json_name, as the server sends it
        m = re.fullmatch(f"{API}/recurringruns/([^/]+)", path)
        if m and m.group(1) in self.recurring:
            if method == "DELETE":
                del self.recurring[m.group(1)]
                return 200, {}
            return 200, self.recurring[m.group(1)]
        if m:
            return 404, {
                "error": f"RecurringRun {m.group(1)} not found",
                "code": 5,
                "message": f"RecurringRun {m.group(1)} not found",
            }
        return 404, {"error": f"no stub for {method} {path}", "code": 5, "message": f"no stub for {method} {path}"}

    def posts(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST" and r["path"] == f"{API}/{path}"]


@pytest.fixture()
def kfp_stub(monkeypatch, tmp_path):
    import kfp

    stub = KfpStub()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = stub.handle(self.command, url.path, parse_qs(url.query), body, self.headers)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))  # hermetic
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "s3cr3t-token")
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    stub.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield stub
    server.shutdown()
    server.server_close()


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["schedule", *args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_create_sends_cron_version_and_typed_parameters(kfp_stub, capsys):
    code, out, err = run_cli(
        capsys,
        "create",
        "--host",
        kfp_stub.host,
        "--name",
        "weekly",
        "--cron",
        "0 3 * * 1",
        "--param",
        "alignment=dpo",
        "--param",
        "max_steps=500",
        "--param",
        'sft_config={"lr": 0.0001}',
        "--param",
        'tag="123"',
        "--json",
    )
    assert code == 0, err
    [req] = kfp_stub.posts("recurringruns")
    body = req["json"]
    assert body["display_name"] == "weekly"
    assert body["experiment_id"] == "exp-1"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 1"  # 5 fields -> KFP's 6 (seconds first)
    assert body["pipeline_version_reference"] == {"pipeline_id": "pipe-1", "pipeline_version_id": "ver-2"}  # newest
    assert body["runtime_config"]["parameters"] == {
        "alignment": "dpo",
        "max_steps": 500,
        "sft_config": {"lr": 0.0001},
        "tag": "123",
    }
    assert body["mode"] == "ENABLE" and body["max_concurrency"] == 1 and body["no_catchup"] is True
    assert req["auth"] == "Bearer s3cr3t-token"  # token from the environment
    assert json.loads(out)["recurring_run_id"] == "rr-1"  # kfp's "details" links stay off stdout


def test_create_with_explicit_version_and_replace(kfp_stub, capsys):
    base = ["create", "--host", kfp_stub.host, "--name", "weekly", "--cron", "0 0 3 * * 1"]
    assert run_cli(capsys, *base)[0] == 0
    code, out, err = run_cli(capsys, *base, "--version-id", "ver-1", "--max-concurrency", "2")
    assert code == 0, err
    second = kfp_stub.posts("recurringruns")[1]["json"]
    assert second["pipeline_version_reference"]["pipeline_version_id"] == "ver-1"
    assert second["max_concurrency"] == 2
    assert list(kfp_stub.recurring) == ["rr-2"]  # the old one was deleted after the new one existed
    assert "replaced rr-1" in out
    deletes = [r["path"] for r in kfp_stub.requests if r["method"] == "DELETE"]
    assert deletes == [f"{API}/recurringruns/rr-1"]


def test_create_with_package_uploads_a_version_and_schedules_it(kfp_stub, capsys, tmp_path):
    package = tmp_path / "pipeline.yaml"
    package.write_text("pipelineInfo:\n  name: rlhf-pipeline\nroot: {}\nschemaVersion: 2.1.0\nsdkVersion: kfp-2.17.0\n")
    code, _, err = run_cli(
        capsys,
        "create",
        "--host",
        kfp_stub.host,
        "--name",
        "nightly",
        "--cron",
        "0 2 * * *",
        "--package",
        str(package),
        "--version-name",
        "abc123",
        "--experiment",
        "retrain",
    )
    assert code == 0, err
    [upload] = kfp_stub.posts("pipelines/upload_version")
    assert upload["query"]["name"] == ["abc123"] and upload["query"]["pipelineid"] == ["pipe-1"]
    [exp] = kfp_stub.posts("experiments")  # "retrain" did not exist: created
    assert exp["json"]["display_name"] == "retrain"
    body = kfp_stub.posts("recurringruns")[0]["json"]
    assert body["pipeline_version_reference"]["pipeline_version_id"] == "ver-3"
    assert body["experiment_id"] == "exp-2"


def test_list_and_delete(kfp_stub, capsys):
    run_cli(capsys, "create", "--host", kfp_stub.host, "--name", "weekly", "--cron", "0 3 * * 1")
    code, out, _ = run_cli(capsys, "list", "--host", kfp_stub.host, "--json")
    assert code == 0
    assert json.loads(out) == [
        {
            "recurring_run_id": "rr-1",
            "name": "weekly",
            "cron": "0 0 3 * * 1",
            "mode": "ENABLE",
            "experiment_id": "exp-1",
            "version_id": "ver-2",
        }
    ]
    code, out, _ = run_cli(capsys, "delete", "--host", kfp_stub.host, "--name", "weekly")
    assert code == 0 and out == "deleted recurring run rr-1\n"
    assert kfp_stub.recurring == {}


def test_unknown_recurring_run_is_one_line_error(kfp_stub, capsys):
    code, out, err = run_cli(capsys, "delete", "--host", kfp_stub.host, "--id", "rr-404")
    assert code == 2 and out == ""
    assert err == "rlhf schedule: error: recurring run 'rr-404' not found\n"


def test_unknown_pipeline_is_one_line_error(kfp_stub, capsys):
    code, _, err = run_cli(
        capsys, "create", "--host", kfp_stub.host, "--name", "w", "--cron", "0 3 * * 1", "--pipeline-name", "nope"
    )
    assert code == 2 and err.count("\n") == 1 and "pipeline 'nope' not found" in err
    assert kfp_stub.posts("recurringruns") == []


def test_unreachable_host_is_one_line_error(capsys):
    code, _, err = run_cli(capsys, "list", "--host", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and err.count("\n") == 1 and "is unreachable" in err


@pytest.mark.parametrize("cron", ["0 3 * *", "1 2 3 4 5 6 7"])
def test_bad_cron_fails_before_any_request(kfp_stub, capsys, cron):
    code, _, err = run_cli(capsys, "create", "--host", kfp_stub.host, "--name", "w", "--cron", cron)
    assert code == 2 and "--cron" in err
    assert kfp_stub.requests == []


def test_token_is_not_a_command_line_option():
    from click.testing import CliRunner

    from rlhf_pipeline.cli.ops import schedule_command

    for sub in ("create", "list", "delete"):
        help_text = CliRunner().invoke(schedule_command, [sub, "--help"]).output
        assert "--token" not in help_text
