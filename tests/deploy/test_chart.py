"""The helm chart, rendered and linted with the real Helm engine (helm-python-sdk), validated with
kubernetes-validate (strict), and checked for the restricted Pod Security profile and leaked secrets."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "rlhf-pipeline"
KUBE_VERSION = "1.31.0"
# apiVersion groups of built-in kinds (validated against the Kubernetes schemas); anything else is a custom resource.
BUILTIN_GROUPS = {"", "apps", "batch", "rbac.authorization.k8s.io", "networking.k8s.io", "policy"}

# Contents of the existing Secrets the chart is pointed at. None of them may ever appear in a manifest.
FAKE_SECRETS = {
    "pg-password": "PgFake-Pa55w0rd-7731",
    "s3-key-id": "FAKEKEYID0000000X1Y2",
    "s3-secret": "fAkE/S3cr3t+K3y/0000000000000000000000",
    "admin-password": "AdminFake-Pw-5521",
    "flask-key": "FlaskFake-Key-0192837465",
}

VARIANTS = {
    "defaults": {},
    "everything-set": {
        "opsImage": {"digest": "sha256:" + "a" * 64},
        "imagePullSecrets": ["regcred"],
        "mlflow": {
            "image": {"digest": "sha256:" + "b" * 64},
            "allowedHosts": ["mlflow.example.com"],
            "artifactStore": {"endpointUrl": "http://minio.minio:9000", "prefix": "rlhf"},
            "backendStore": {"existingSecret": "prod-pg", "sslmode": "verify-full"},
            "tls": {"enabled": True, "existingSecret": "mlflow-cert"},
            "networkPolicy": {"extraFrom": [{"namespaceSelector": {"matchLabels": {"team": "ml"}}}]},
        },
        "runner": {"name": "rlhf-runner", "annotations": {"iam.gke.io/gcp-service-account": "x@y.iam"}},
        "gpu": {
            "acceleratorType": "nvidia.com/gpu",
            "acceleratorCount": 4,
            "nodeSelector": {"nvidia.com/gpu.present": None, "pool": "a100"},  # Helm merges maps: null drops a default
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        },
        "pipelineJob": {
            "kfpNamespace": "team-ml",
            "compileSettings": {"model_cache": {"pvc_name": "cache"}},
            "parameters": {"alignment": "dpo", "sft_config": {"max_steps": 500}},
        },
        "schedule": {"enabled": False, "cron": "0 0 4 * * *"},
    },
    "auth-off": {"mlflow": {"auth": {"enabled": False}}},
    "mlflow-off": {"mlflow": {"enabled": False}, "runner": {"trainJobs": False, "artifactStoreSecrets": []}},
    "job-off": {"pipelineJob": {"enabled": False}, "runner": {"create": False}},
}


def render(values: dict | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name="rlhf", namespace="ml", is_install=True)


def objects(rendered: dict[str, str]) -> list[dict]:
    docs = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet")
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_is_clean(variant):
    report = helm.lint(CHART, VARIANTS[variant], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_objects_validate_strictly(variant):
    docs = objects(render(VARIANTS[variant]))
    assert docs
    for doc in docs:
        group = doc["apiVersion"].rpartition("/")[0]
        if group in BUILTIN_GROUPS:
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_custom_resources_checked_separately():
    """The chart renders no custom resources (TrainJobs are created by pipeline steps at run time, allowed by
    the runner's Role); if one is ever added it must be deliberate and well-formed."""
    allowed: set[str] = set()
    for variant in VARIANTS.values():
        for doc in objects(render(variant)):
            group = doc["apiVersion"].rpartition("/")[0]
            if group not in BUILTIN_GROUPS:
                assert f"{doc['apiVersion']}/{doc['kind']}" in allowed, doc
                assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_expected_objects():
    docs = objects(render())
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount/rlhf-rlhf-pipeline-mlflow",
            "ConfigMap/rlhf-rlhf-pipeline-mlflow-auth",
            "Service/rlhf-rlhf-pipeline-mlflow",
            "Deployment/rlhf-rlhf-pipeline-mlflow",
            "NetworkPolicy/rlhf-rlhf-pipeline-mlflow",
            "ServiceAccount/rlhf-rlhf-pipeline-runner",
            "Role/rlhf-rlhf-pipeline-runner",
            "RoleBinding/rlhf-rlhf-pipeline-runner",
            "ClusterRole/ml-rlhf-rlhf-pipeline-runner",
            "ClusterRoleBinding/ml-rlhf-rlhf-pipeline-runner",
            "ServiceAccount/rlhf-rlhf-pipeline-pipeline-upload",
            "ConfigMap/rlhf-rlhf-pipeline-pipeline-upload",
            "Job/rlhf-rlhf-pipeline-pipeline-upload",
        ]
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_restricted_pod_security(variant):
    docs = objects(render(VARIANTS[variant]))
    for where, spec in pod_specs(docs):
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert not sc.get("privileged")
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, (where, c["name"])


def test_mlflow_server_uses_auth_postgres_s3_from_existing_secrets():
    [deploy] = by_kind(objects(render(VARIANTS["everything-set"])), "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    args = c["args"]
    assert "--app-name=basic-auth" in args
    assert "--backend-store-uri=postgresql://mlflow@postgresql:5432/mlflow?sslmode=verify-full" in args
    assert "--uvicorn-opts=--ssl-certfile=/etc/mlflow-tls/tls.crt --ssl-keyfile=/etc/mlflow-tls/tls.key" in args
    assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" and c["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    tls = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls")
    assert tls == {"name": "tls", "secret": {"secretName": "mlflow-cert"}}
    assert "--artifacts-destination=s3://mlflow-artifacts/rlhf" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "prod-pg", "key": "password"}
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.minio:9000"
    assert c["image"].endswith("@sha256:" + "b" * 64)
    # Without auth: no basic-auth app, no admin credentials mounted.
    [deploy] = by_kind(objects(render(VARIANTS["auth-off"])), "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" not in c["args"]
    assert not any(e["name"].startswith("MLFLOW_AUTH") for e in c["env"])
    # ... and the image's guard is told so explicitly (it refuses a server without auth otherwise)
    assert {"name": "MLFLOW_SERVER_ALLOW_NO_AUTH", "value": "true"} in c["env"]


def test_mlflow_secure_defaults():
    """Defaults: PostgreSQL over TLS, no access without an explicit grant, only this namespace may connect."""
    docs = objects(render())
    [deploy] = by_kind(docs, "Deployment")
    c = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "--backend-store-uri=postgresql://mlflow@postgresql:5432/mlflow?sslmode=require" in c["args"]
    assert not any(e["name"] == "MLFLOW_SERVER_ALLOW_NO_AUTH" for e in c["env"])
    [auth] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("mlflow-auth")]
    ini = auth["data"]["basic_auth.ini"]
    assert "default_permission = NO_PERMISSIONS" in ini and "sslmode=require" in ini
    [policy] = by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == deploy["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [
        {"from": [{"podSelector": {}}], "ports": [{"port": "http", "protocol": "TCP"}]}
    ]
    [policy] = by_kind(objects(render(VARIANTS["everything-set"])), "NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"][1] == {"namespaceSelector": {"matchLabels": {"team": "ml"}}}
    assert by_kind(objects(render({"mlflow": {"networkPolicy": {"enabled": False}}})), "NetworkPolicy") == []


def test_pipeline_job_passes_gpu_settings_schedule_and_parameters():
    docs = objects(render(VARIANTS["everything-set"]))
    [job] = by_kind(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["args"][:2] == ["rlhf", "compile"]
    args = spec["containers"][0]["args"]
    assert args[:3] == ["rlhf", "schedule", "create"]
    assert spec["containers"][0]["image"].endswith("@sha256:" + "a" * 64)
    params = {a.split("=", 2)[1]: json.loads(a.split("=", 2)[2]) for a in args if a.startswith("--param=")}
    assert params["gpu_node_selector"] == {"pool": "a100"}
    assert params["gpu_tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}
    ]
    assert params["alignment"] == "dpo" and params["sft_config"] == {"max_steps": 500}
    assert params["mlflow_tracking_uri"] == "https://rlhf-rlhf-pipeline-mlflow.ml.svc:5000"  # mlflow.tls.enabled
    assert "--cron=0 0 4 * * *" in args and "--disabled" in args and "--namespace=team-ml" in args
    assert "--service-account=rlhf-runner" in args
    [settings_cm] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("pipeline-upload")]
    settings = yaml.safe_load(settings_cm["data"]["settings.yaml"])
    assert settings["gpu"]["accelerator_count"] == 4 and settings["model_cache"] == {"pvc_name": "cache"}
    token = next(v for v in spec["volumes"] if v["name"] == "kfp-token")
    assert token["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"


# The runner's permissions, verb by verb (why each: docs/deployment.md "Runner RBAC"). Exact: anything added
# makes this fail, so a broader grant is always a deliberate change to this table and the docs.
RUNNER_ROLE = [
    {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["kfp-launcher"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["mlpipeline-minio-artifact"], "verbs": ["get"]},
    {"apiGroups": ["trainer.kubeflow.org"], "resources": ["trainjobs"], "verbs": ["get", "create", "delete"]},
]
RUNNER_CLUSTER_ROLE = [
    {
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["clustertrainingruntimes"],
        "resourceNames": ["torch-distributed"],
        "verbs": ["get"],
    }
]


def test_runner_rbac_is_exactly_the_documented_table():
    docs = objects(render())
    [role] = by_kind(docs, "Role")
    assert role["rules"] == RUNNER_ROLE
    [cluster_role] = by_kind(docs, "ClusterRole")
    assert cluster_role["rules"] == RUNNER_CLUSTER_ROLE
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rlhf-rlhf-pipeline-runner", "namespace": "ml"}]
    # without TrainJobs and artifact Secrets: no Trainer rule, no ClusterRole, no Secret read
    docs = objects(render(VARIANTS["mlflow-off"]))
    [role] = by_kind(docs, "Role")
    assert role["rules"] == RUNNER_ROLE[:3]
    assert by_kind(docs, "ClusterRole") == [] and by_kind(docs, "ClusterRoleBinding") == []


def dangerous_grants(rules: list[dict]) -> list[str]:
    """What must never come back into the runner's roles, whatever else changes."""
    found = []
    for r in rules:
        verbs, resources, groups = set(r["verbs"]), set(r["resources"]), set(r["apiGroups"])
        if "*" in verbs | resources | groups:
            found.append(f"wildcard in {r}")
        if "" in groups and resources & {"pods", "pods/exec", "pods/attach", "pods/ephemeralcontainers"}:
            if verbs & {"create", "update", "patch", "delete", "deletecollection"}:
                found.append(f"pod write {r}")
        if "" in groups and "persistentvolumeclaims" in resources and verbs - {"get"}:
            found.append(f"PVC write {r}")
        if (
            "" in groups
            and resources & {"secrets", "configmaps"}
            and (verbs & {"list", "watch"} or "resourceNames" not in r)
        ):
            found.append(f"unnamed Secret/ConfigMap read {r}")
        if groups & {"rbac.authorization.k8s.io"} or verbs & {"escalate", "bind", "impersonate"}:
            found.append(f"RBAC power {r}")
    return found


def test_dangerous_grants_are_caught():
    """The guard itself fails on what the old Role had (pods create/delete/patch, PVC delete) and on wildcards."""
    assert dangerous_grants([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "create", "delete", "patch"]}])
    assert dangerous_grants([{"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["delete"]}])
    assert dangerous_grants([{"apiGroups": ["*"], "resources": ["trainjobs"], "verbs": ["get"]}])
    assert dangerous_grants([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}])
    assert dangerous_grants(RUNNER_ROLE + RUNNER_CLUSTER_ROLE) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_dangerous_grant_in_any_variant(variant):
    docs = objects(render(VARIANTS[variant]))
    for role in by_kind(docs, "Role") + by_kind(docs, "ClusterRole"):
        assert dangerous_grants(role["rules"]) == [], role["metadata"]["name"]


def test_no_secret_value_in_any_manifest():
    """Point every secret reference at Secrets whose (fake) contents we know, render every variant, and grep."""
    for variant in VARIANTS.values():
        rendered = render(variant)
        text = "\n".join(rendered.values())
        for value in FAKE_SECRETS.values():
            assert value not in text
        docs = objects(rendered)
        assert by_kind(docs, "Secret") == []  # the chart only references existing Secrets
        for _, spec in pod_specs(docs):
            for c in spec.get("initContainers", []) + spec["containers"]:
                for e in c.get("env", []):
                    if re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", e["name"]):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e


@pytest.mark.parametrize(
    "values",
    [
        # There is no field for a secret value: the schema rejects every attempt to inline one ...
        {"mlflow": {"auth": {"adminPassword": FAKE_SECRETS["admin-password"]}}},
        {"mlflow": {"backendStore": {"password": FAKE_SECRETS["pg-password"]}}},
        {"mlflow": {"artifactStore": {"secretAccessKey": FAKE_SECRETS["s3-secret"]}}},
        {"pipelineJob": {"kfpToken": "FakeToken-123"}},
        # ... or to smuggle credentials into a URL.
        {"mlflow": {"artifactStore": {"endpointUrl": f"http://admin:{FAKE_SECRETS['s3-secret']}@minio:9000"}}},
        {"pipelineJob": {"kfpHost": f"http://admin:{FAKE_SECRETS['admin-password']}@ml-pipeline:8888"}},
        # Run parameters are free-form, so the template itself refuses a credentialed tracking URI.
        {
            "pipelineJob": {
                "parameters": {"mlflow_tracking_uri": f"http://a:{FAKE_SECRETS['admin-password']}@mlflow:5000"}
            }
        },
    ],
)
def test_secret_values_cannot_be_rendered(values):
    with pytest.raises(helm.HelmError) as exc:
        render(values)
    for value in FAKE_SECRETS.values():  # the refusal itself must not quote the secret
        assert value not in str(exc.value)


def test_schema_rejects_bad_values():
    for bad in (
        {"schedule": {"cron": "daily"}},
        {"opsImage": {"digest": "sha256:abc"}},
        {"gpu": {"acceleratorCount": -1}},
        {"gpu": {"tolerations": [{"key": "a", "tolerationSeconds": 5}]}},
    ):
        with pytest.raises(helm.HelmError):
            render(copy.deepcopy(bad))


def test_notes_render():
    notes = render()["rlhf-pipeline/templates/NOTES.txt"]
    assert "Authentication is ON" in notes and "rlhf-retrain" in notes and "0 3 * * 1" in notes


def test_job_compile_settings_are_accepted_by_the_pipeline(tmp_path):
    """The settings.yaml the Job hands to `rlhf compile --settings` validates against the pipeline's own model."""
    settings_mod = pytest.importorskip("rlhf_pipeline.orchestration.settings")
    docs = objects(render(VARIANTS["everything-set"]))
    [cm] = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("pipeline-upload")]
    path = tmp_path / "settings.yaml"
    path.write_text(cm["data"]["settings.yaml"])
    settings = settings_mod.PipelineSettings.load(path)
    assert settings.gpu.accelerator_count == 4 and settings.gpu.node_selector == {"pool": "a100"}
    assert [t.key for t in settings.gpu.tolerations] == ["dedicated"]
