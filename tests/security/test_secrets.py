"""Credentials by value: refused by compile, submit, schedule and the chart (real Helm engine), and never in an
output, error line, compiled YAML or logged MLflow parameter."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rlhf_pipeline import secrets
from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import UserError

PASSWORD = "Fake-Pw-8812-zz"
CRED_URI = f"http://admin:{PASSWORD}@mlflow.example.com:5000"
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2EifQ.c2lnbmF0dXJlLWJ5dGVz"
CHART = Path(__file__).resolve().parents[2] / "helm" / "rlhf-pipeline"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def assert_one_line_refusal(code: int, out: str, err: str, command: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"rlhf {command}: error:"), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    for value in (PASSWORD, HF_TOKEN, JWT):
        assert value not in out + err


# ----------------------------------------------------------------------------------------------------------
# Detection and redaction
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, kind",
    [
        (CRED_URI, "a URI with a password"),
        ("postgresql://mlflow:pw@db:5432/mlflow", "a URI with a password"),
        ("s3://key:@bucket/x", "a URI with a password"),  # an empty password is still userinfo with a password
        (f"https://{HF_TOKEN}@huggingface.co/x", "a URI with a token as user"),
        (HF_TOKEN, "a Hugging Face token"),
        (f"token is {HF_TOKEN} here", "a Hugging Face token"),
        ("ghp_" + "a" * 36, "a GitHub token"),
        ("AKIA" + "ABCDEFGHIJKLMNOP", "an AWS access key id"),
        (JWT, "a JSON web token"),
        ("Bearer abcdefghijklmnop1234", "a bearer token"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMII...", "a private key"),
    ],
)
def test_credential_values_are_recognised(value, kind):
    assert secrets.credential_kind(value) == kind


@pytest.mark.parametrize(
    "value",
    [
        "http://rlhf-mlflow:5000",
        "postgresql://mlflow@postgresql:5432/mlflow?sslmode=require",  # a user without a password: no secret
        "sha256:" + "ab" * 32,  # digests look random; they are not credentials
        "localhost:5000/rlhf/rlhf-sft:dev@sha256:" + "0" * 64,
        "0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0",
        "hf_short",
        "sqlite:////tmp/mlflow.db",
    ],
)
def test_ordinary_values_are_not_credentials(value):
    assert secrets.credential_kind(value) is None


@pytest.mark.parametrize(
    "name, secret",
    [
        ("MLFLOW_TRACKING_PASSWORD", True),
        ("DB_PASS", True),
        ("HF_TOKEN_VALUE", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("OPENAI_API_KEY", True),
        ("MLFLOW_TRACKING_URI", False),
        ("MLFLOW_TRACKING_USERNAME", False),
        ("RLHF_CACHE_DIR", False),
        ("PASSPORT_DIR", False),  # "PASS" only as a whole word
    ],
)
def test_secret_names(name, secret):
    assert secrets.is_secret_name(name) is secret


def test_redact_keeps_the_text_readable():
    assert (
        secrets.redact(f"server {CRED_URI}/api is down")
        == "server http://admin:***@mlflow.example.com:5000/api is down"
    )
    assert secrets.redact(f"a={HF_TOKEN}, b={JWT}") == "a=***, b=***"
    assert secrets.redact(f"https://{HF_TOKEN}@hf.co") == "https://***@hf.co"
    assert secrets.redact("http://rlhf-mlflow:5000") == "http://rlhf-mlflow:5000"


def test_find_credentials_names_the_place():
    found = list(
        secrets.find_credentials(
            {
                "env": [{"name": "DB_PASS", "value": "x1"}, {"name": "HOME", "value": "/tmp"}],
                "params": {"uri": CRED_URI, "list": ["ok", HF_TOKEN]},
                "keys": {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"},  # Secret key -> env name: a reference
                "plain": {"HF_TOKEN_VALUE": "abc"},
            }
        )
    )
    assert found == [
        ("env[0][DB_PASS]", "a value for the secret-named variable DB_PASS"),
        ("params.uri", "a URI with a password"),
        ("params.list[1]", "a Hugging Face token"),
        ("plain.HF_TOKEN_VALUE", "a value for the secret-named variable HF_TOKEN_VALUE"),
    ]


def test_every_error_line_is_redacted():
    assert str(UserError(f"MLflow tracking server {CRED_URI} is unreachable")) == (
        "MLflow tracking server http://admin:***@mlflow.example.com:5000 is unreachable"
    )


# ----------------------------------------------------------------------------------------------------------
# rlhf compile
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, needle",
    [
        (f"env: {{MLFLOW_TRACKING_URI: '{CRED_URI}'}}", "MLFLOW_TRACKING_URI holds a URI with a password"),
        (f"env: {{SOME_ENDPOINT: 'see {HF_TOKEN}'}}", "SOME_ENDPOINT holds a Hugging Face token"),
        ("env: {DB_PASS: hunter2}", "look like secrets"),
        ("env: {HF_TOKEN_VALUE: abc}", "look like secrets"),
    ],
)
def test_compile_refuses_credentials_in_settings(tmp_path, capsys, settings, needle):
    path = tmp_path / "k8s.yaml"
    path.write_text(settings + "\n")
    out = tmp_path / "pipeline.yaml"
    code, stdout, err = run_cli(capsys, "compile", "--settings", str(path), "--output", str(out))
    assert_one_line_refusal(code, stdout, err, "compile", needle)
    assert "hunter2" not in err and not out.exists()


def test_compile_refuses_a_spec_that_would_hold_a_credential():
    """What reaches the YAML another way (a recipe default, a pipeline parameter) is caught on the result."""
    from rlhf_pipeline.orchestration.compile import refuse_credentials

    docs = [
        {"root": {"inputDefinitions": {"parameters": {"base_model": {"defaultValue": f"https://{HF_TOKEN}@hf.co"}}}}}
    ]
    with pytest.raises(
        UserError, match=r"at \[0\]\.root\.inputDefinitions\.parameters\.base_model\.defaultValue"
    ) as exc:
        refuse_credentials(docs)
    assert HF_TOKEN not in str(exc.value)
    refuse_credentials([{"root": {"inputDefinitions": {"parameters": {"a": {"defaultValue": "http://mlflow:5000"}}}}}])


# ----------------------------------------------------------------------------------------------------------
# rlhf submit / rlhf schedule: refused before any request
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "param, needle",
    [
        (f"mlflow_tracking_uri={CRED_URI}", "--param mlflow_tracking_uri holds a URI with a password"),
        (f'sft_config={{"hub_token": "{HF_TOKEN}"}}', "--param sft_config holds a Hugging Face token"),
    ],
)
def test_submit_refuses_credential_parameters(capsys, param, needle):
    host = f"http://127.0.0.1:{closed_port()}"  # nothing listens: the refusal must come first
    code, out, err = run_cli(capsys, "submit", "--host", host, "--param", param)
    assert_one_line_refusal(code, out, err, "submit", needle)
    assert "unreachable" not in err


def test_submit_refuses_a_host_with_credentials(capsys):
    code, out, err = run_cli(capsys, "submit", "--host", f"http://admin:{PASSWORD}@127.0.0.1:{closed_port()}")
    assert_one_line_refusal(code, out, err, "submit", "--host must not carry credentials")


def test_schedule_refuses_credential_parameters(capsys):
    args = ["schedule", "create", "--host", f"http://127.0.0.1:{closed_port()}", "--name", "w", "--cron", "0 3 * * 1"]
    code, out, err = run_cli(capsys, *args, "--param", f"mlflow_tracking_uri={CRED_URI}")
    assert_one_line_refusal(code, out, err, "schedule", "--param mlflow_tracking_uri holds a URI with a password")
    code, out, err = run_cli(capsys, *args, "--param", f"token={JWT}")
    assert_one_line_refusal(code, out, err, "schedule", "--param token holds a JSON web token")


def test_a_package_holding_a_credential_is_not_uploaded(tmp_path):
    """`--package` (compiled elsewhere or edited by hand) is checked like a fresh compile, before any request."""
    from pipelines.rlhf_pipeline import COMPILED
    from rlhf_pipeline.orchestration.kfp_client import upload

    package = tmp_path / "pipeline.yaml"
    package.write_text(COMPILED.read_text().replace("http://rlhf-mlflow:5000", CRED_URI))

    class NoCalls:
        def __getattr__(self, name):
            raise AssertionError(f"{name} called")

    with pytest.raises(UserError, match="refusing: the pipeline would hold a URI with a password at ") as exc:
        upload(NoCalls(), package, "rlhf-pipeline", "v1", None)
    assert PASSWORD not in str(exc.value)


@pytest.mark.parametrize(
    "host, allowed",
    [
        ("https://kubeflow.example.com", True),
        ("http://127.0.0.1:8888", True),
        ("http://localhost:8080", True),
        ("http://ml-pipeline:8888", True),
        ("http://ml-pipeline.kubeflow.svc.cluster.local:8888", True),
        ("http://kubeflow.example.com", False),
        ("http://10.0.0.5:8888", False),
    ],
)
def test_token_goes_over_plain_http_only_inside(host, allowed):
    from rlhf_pipeline.orchestration.kfp_client import may_send_token

    assert may_send_token(host) is allowed


def test_token_is_not_sent_to_a_plain_http_host(capsys, monkeypatch):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", JWT)
    code, out, err = run_cli(capsys, "schedule", "list", "--host", "http://kubeflow.example.com")
    assert_one_line_refusal(code, out, err, "schedule", "refusing to send the Kubeflow token over plain HTTP")


# ----------------------------------------------------------------------------------------------------------
# The chart (real Helm engine)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, needle",
    [
        (
            {"pipelineJob": {"parameters": {"mlflow_tracking_uri": CRED_URI}}},
            "parameters.mlflow_tracking_uri holds a URI",
        ),
        ({"pipelineJob": {"parameters": {"sft_config": {"hub": HF_TOKEN}}}}, "parameters.sft_config holds a token"),
        (
            {"pipelineJob": {"compileSettings": {"env": {"MLFLOW_TRACKING_URI": CRED_URI}}}},
            "compileSettings holds a URI",
        ),
        ({"pipelineJob": {"compileSettings": {"env": {"DB_PASS": PASSWORD}}}}, "env.DB_PASS looks like a secret"),
        ({"pipelineJob": {"kfpHost": f"http://admin:{PASSWORD}@ml-pipeline.kubeflow.svc:8888"}}, "kfpHost"),
        (
            {"pipelineJob": {"kfpHost": "http://kubeflow.example.com"}},
            "kfpHost must be https",
        ),  # a token over plain HTTP
    ],
)
def test_chart_refuses_credentials(values, needle):
    import helm_python as helm

    with pytest.raises(helm.HelmError) as exc, helm.Chart.load(CHART) as chart:
        chart.render(values, name="rlhf", namespace="ml", is_install=True)
    message = str(exc.value)
    assert needle in message and PASSWORD not in message and HF_TOKEN not in message


# ----------------------------------------------------------------------------------------------------------
# MLflow: the logged parameters, and the "unreachable" line of rlhf promote
# ----------------------------------------------------------------------------------------------------------


def test_tracking_uri_param_is_logged_without_its_password(mlflow_server, monkeypatch):
    from mlflow import MlflowClient

    from rlhf_pipeline.tracking import TrackingOptions, stage_run

    host = mlflow_server.removeprefix("http://")
    cfg = TrackingOptions(tracking_uri=f"http://ci-user:{PASSWORD}@{host}", experiment_name="secrets-test")
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "RLHF_MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    # the reachability probe (http_probe) does not take userinfo URIs; the server itself is the real one
    monkeypatch.setattr("rlhf_pipeline.tracking.check_tracking_server", lambda uri: None)
    with stage_run(cfg, "sft") as run:
        run_id = run.run_id
    params = MlflowClient(tracking_uri=mlflow_server).get_run(run_id).data.params
    assert params["sft.tracking_uri"] == f"http://ci-user:***@{host}"
    assert not any(PASSWORD in v for v in params.values())


def test_promote_unreachable_line_has_no_password(capsys):
    uri = f"http://admin:{PASSWORD}@127.0.0.1:{closed_port()}"
    code, out, err = run_cli(capsys, "promote", "--model-name", "m", "--tracking-uri", uri)
    assert_one_line_refusal(code, out, err, "promote", "http://admin:***@127.0.0.1", "is unreachable")
