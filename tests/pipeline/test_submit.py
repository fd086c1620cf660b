"""`rlhf submit`: parameter parsing, one-line errors, and the upload/run calls against a fake kfp.Client."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhf_pipeline.errors import UserError
from rlhf_pipeline.orchestration import submit as sub
from rlhf_pipeline.orchestration.pipeline_params import parse_params

RLHF = str(Path(sys.executable).parent / "rlhf")
KNOWN = {
    "alignment": {"parameterType": "STRING"},
    "sft_config": {"parameterType": "STRUCT"},
    "gpu_tolerations": {"parameterType": "LIST"},
    "report_samples": {"parameterType": "NUMBER_INTEGER"},
}


def test_params_are_typed_by_the_pipeline_definition():
    assert parse_params(
        [
            "alignment=dpo",
            'sft_config={"max_steps": 5}',
            "report_samples=3",
            'gpu_tolerations=[{"key": "a", "operator": "Exists"}]',
        ],
        KNOWN,
    ) == {
        "alignment": "dpo",
        "sft_config": {"max_steps": 5},
        "report_samples": 3,
        "gpu_tolerations": [{"key": "a", "operator": "Exists"}],
    }


@pytest.mark.parametrize(
    "pair, message",
    [
        ("alignment", "NAME=VALUE"),
        ("nope=1", "not a pipeline parameter"),
        ("sft_config=[1]", "expected a JSON struct"),
        ("sft_config={bad", "expected a JSON struct"),
        ("report_samples=true", "number_integer"),
        ("alignment=rlaif", "ppo, dpo, both"),
    ],
)
def test_bad_params(pair, message):
    with pytest.raises(UserError, match=message):
        parse_params([pair], KNOWN)


def test_strings_stay_as_given_unless_quoted_as_json():
    assert parse_params(["alignment=ppo"], KNOWN) == parse_params(['alignment="ppo"'], KNOWN) == {"alignment": "ppo"}
    known = {"tag": {"parameterType": "STRING"}}
    assert parse_params(["tag=[1"], known) == {"tag": "[1"}
    assert parse_params(["tag=123"], known) == {"tag": "123"} == parse_params(['tag="123"'], known)


def test_without_definitions_values_are_json_or_strings():
    """`rlhf schedule create` has no compiled spec at hand: names are not checked, JSON types the values."""
    assert parse_params(["max_steps=500", "flag=true", "name=weekly", 'tag="123"', 'cfg={"a": 1}']) == {
        "max_steps": 500,
        "flag": True,
        "name": "weekly",
        "tag": "123",
        "cfg": {"a": 1},
    }
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_params(["=3"])
    with pytest.raises(UserError, match="ppo, dpo, both"):
        parse_params(["alignment=rlaif"])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_one_line_error():
    proc = subprocess.run(
        [RLHF, "submit", "--host", f"http://127.0.0.1:{_closed_port()}", "--param", "alignment=dpo"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf submit: error:") and "unreachable" in lines[0], proc.stderr


def test_token_is_not_a_flag():
    proc = subprocess.run([RLHF, "submit", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--token" not in proc.stdout and "KFP_TOKEN" in proc.stdout


class FakeClient:
    def __init__(self, existing_pipeline_id=None):
        self.existing = existing_pipeline_id
        self.calls = []

    def get_pipeline_id(self, name):
        self.calls.append(("get_pipeline_id", name))
        return self.existing

    def upload_pipeline(self, path, pipeline_name, namespace=None, description=None):
        self.calls.append(("upload_pipeline", pipeline_name, Path(path).is_file()))
        return SimpleNamespace(pipeline_id="p-1")

    def list_pipeline_versions(self, pipeline_id, page_size, sort_by=None):
        return SimpleNamespace(pipeline_versions=[SimpleNamespace(pipeline_version_id="v-1")])

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self.calls.append(("upload_pipeline_version", pipeline_version_name, pipeline_id))
        return SimpleNamespace(pipeline_version_id="v-2")

    def create_experiment(self, name, namespace=None):
        self.calls.append(("create_experiment", name))
        return SimpleNamespace(experiment_id="e-1")

    def run_pipeline(self, **kwargs):
        self.calls.append(("run_pipeline", kwargs))
        return SimpleNamespace(run_id="r-1")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from pipelines.rlhf_pipeline import COMPILED

    return COMPILED


def test_first_submit_uploads_the_pipeline_then_runs(package):
    client = FakeClient()
    result = sub.submit(
        host="http://kfp",
        package=package,
        pipeline_name="rlhf-pipeline",
        version_name="abc",
        experiment="exp",
        run_name="run",
        params={"alignment": "dpo"},
        client=client,
    )
    assert result["uploaded"] == "pipeline" and result["run_id"] == "r-1"
    run = client.calls[-1][1]
    assert run == {
        "experiment_id": "e-1",
        "job_name": "run",
        "params": {"alignment": "dpo"},
        "pipeline_id": "p-1",
        "version_id": "v-1",
    }
    assert result["run_url"] == "http://kfp/#/runs/details/r-1"


def test_later_submits_upload_a_new_version(package):
    client = FakeClient(existing_pipeline_id="p-9")
    result = sub.submit(
        host="http://kfp",
        package=package,
        pipeline_name="rlhf-pipeline",
        version_name="abc",
        experiment="exp",
        run_name="run",
        params={},
        client=client,
    )
    assert ("upload_pipeline_version", "abc", "p-9") in client.calls
    assert result["uploaded"] == "version" and client.calls[-1][1]["version_id"] == "v-2"


def test_server_errors_become_one_line(package):
    from kfp_server_api.exceptions import ApiException

    class Denied(FakeClient):
        def get_pipeline_id(self, name):
            raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(UserError, match=r"HTTP 403 Forbidden"):
        sub.submit(
            host="http://kfp",
            package=package,
            pipeline_name="p",
            version_name="v",
            experiment="e",
            run_name="r",
            params={},
            client=Denied(),
        )


@pytest.fixture
def kfp_api():
    """A stand-in Kubeflow Pipelines API on 127.0.0.1 that answers its health check and records every request."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from rlhf_pipeline.orchestration.kfp_client import HEALTHZ

    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            requests.append(f"{self.command} {self.path}")
            self.send_response(200 if self.path == HEALTHZ else 500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--param", 'sft_config={"max_seq_length": 1024}'], "sft_config: unknown option max_seq_length"),
        (["--param", "ppo_steps=-1"], "ppo_steps: Input should be greater than 0 (got -1)"),
        (["--params-file", "PARAMS"], "evaluate_config: unknown option max_question"),
        (["--param", "sft_max_steps=1.5"], "--param sft_max_steps: expected a JSON number_integer"),
    ],
)
def test_a_bad_stage_option_is_refused_before_anything_is_uploaded(kfp_api, tmp_path, args, message):
    from pipelines.rlhf_pipeline import COMPILED

    host, requests = kfp_api
    params = tmp_path / "params.yaml"
    params.write_text("alignment: dpo\nevaluate_config: {max_question: 3}\n")
    args = [str(params) if a == "PARAMS" else a for a in args]
    proc = subprocess.run(
        [RLHF, "submit", "--host", host, "--package", str(COMPILED), *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf submit: error:") and message in lines[0], proc.stderr
    from rlhf_pipeline.orchestration.kfp_client import HEALTHZ

    assert set(requests) <= {f"GET {HEALTHZ}"}  # the health check at most: nothing uploaded, no run


def test_params_file_values_are_typed_and_param_wins_over_them(tmp_path):
    from rlhf_pipeline.orchestration.pipeline_params import check_run_arguments, read_params_file

    params = tmp_path / "params.yaml"
    params.write_text("alignment: dpo\nsft_max_steps: 40\nsft_config: {lora_r: 16}\n")
    known = {**KNOWN, "sft_max_steps": {"parameterType": "NUMBER_INTEGER", "defaultValue": 0.0}}
    args = parse_params(["sft_max_steps=50"], known, base=read_params_file(params))
    assert args == {"alignment": "dpo", "sft_max_steps": 50, "sft_config": {"lora_r": 16}}
    # sft_seq_length is not in `known` here: its pipeline default (512) applies, as in the run
    assert check_run_arguments(args, known)["sft"] == {"lora_r": 16, "max_steps": 50, "seq_length": 512}
    params.write_text("report_samples: many\n")
    with pytest.raises(UserError, match="report_samples: expected a JSON number_integer"):
        parse_params([], KNOWN, base=read_params_file(params))
    params.write_text("[1, 2]\n")
    with pytest.raises(UserError, match="must be a mapping"):
        read_params_file(params)
