"""deploy/kuberay/*.yaml (and the ConfigMap-held nightly RayJob): parse, schema-validate,
check every `persam` command against the real CLI parser, versions, identities, secrets.

Validators: Kubernetes objects and every pod template against the Kubernetes OpenAPI
schemas shipped by the `kubernetes-validate` package (strict: unknown fields fail);
RayJob / RayCluster against the structural KubeRay v1 schema in deploy_checks.py
(no package ships KubeRay's CRD schemas).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest

from deploy_checks import (
    DEPLOY,
    DEPLOY_README,
    K8S_MIN_VERSION,
    KUBERAY_VERSION,
    PERSAM_IMAGE,
    RAY_CLUSTER_YAML,
    ROOT,
    all_kuberay_objects,
    cluster_spec,
    gpus_per_pod,
    kuberay_files,
    load_yaml_docs,
    option,
    persam_commands,
    pod_templates,
    project_version,
    ray_version,
    readme_persam_commands,
    validate_kuberay,
    walk,
)

KUBERAY_KINDS = {"RayJob", "RayCluster"}
NAMESPACE = "persam"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
CLOUD_IDENTITY_ANNOTATIONS = ("eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account", "azure.workload.identity/client-id")

OBJECTS = all_kuberay_objects()
KUBERAY_OBJECTS = [(where, obj) for where, obj in OBJECTS if obj.get("kind") in KUBERAY_KINDS]
NATIVE_OBJECTS = [(where, obj) for where, obj in OBJECTS if obj.get("kind") not in KUBERAY_KINDS]


def ids(pairs):
    return [where for where, _ in pairs]


def by_kind(kind: str) -> list[dict]:
    return [obj for _, obj in OBJECTS if obj.get("kind") == kind]


# --- parsing and layout ---------------------------------------------------------------------


def test_every_manifest_parses_and_names_its_kind():
    assert {p.name for p in kuberay_files()} >= {"rayjob-segment.yaml", "raycluster.yaml"}
    for where, obj in OBJECTS:
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata"), where
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{where}: namespace must be {NAMESPACE}"
    kinds = {obj["kind"] for _, obj in OBJECTS}
    assert {"RayJob", "RayCluster", "CronJob", "ServiceAccount", "Role", "RoleBinding"} <= kinds, kinds


def test_namespace_is_created_by_the_first_file_kubectl_applies():
    """`kubectl apply -f deploy/kuberay/` takes files in name order."""
    first = kuberay_files()[0]
    assert any(doc["kind"] == "Namespace" and doc["metadata"]["name"] == NAMESPACE for doc in load_yaml_docs(first)), \
        f"{first.name} (applied first) must create namespace {NAMESPACE}"


# --- schemas --------------------------------------------------------------------------------

def k8s_validate(obj: dict, version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(obj, version, strict=True)


def k8s_versions() -> list[str]:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    return sorted({K8S_MIN_VERSION, kv.latest_version()})


def as_pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}


@pytest.mark.parametrize("where, obj", NATIVE_OBJECTS, ids=ids(NATIVE_OBJECTS))
def test_kubernetes_objects_match_the_openapi_schema(where, obj):
    for version in k8s_versions():
        k8s_validate(obj, version)


@pytest.mark.parametrize("where, obj", KUBERAY_OBJECTS, ids=ids(KUBERAY_OBJECTS))
def test_kuberay_objects_match_the_v1_structure(where, obj):
    validate_kuberay(obj)


@pytest.mark.parametrize("where, obj", KUBERAY_OBJECTS, ids=ids(KUBERAY_OBJECTS))
def test_kuberay_pod_templates_match_the_openapi_schema(where, obj):
    for version in k8s_versions():
        for part, template in pod_templates(obj):
            try:
                k8s_validate(as_pod_template(template), version)
            except Exception as error:  # name the group in the failure
                raise AssertionError(f"{where} {part}: {getattr(error, 'message', error)}") from error


def rayjob() -> dict:
    return copy.deepcopy(next(obj for obj in by_kind("RayJob") if "name" in obj["metadata"]))


def test_misspelled_rayjob_field_is_rejected():
    jsonschema = pytest.importorskip("jsonschema")
    broken = rayjob()
    broken["spec"]["shutdownAfterJobFinish"] = broken["spec"].pop("shutdownAfterJobFinishes")
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(broken)


def test_numeric_ray_start_param_is_rejected():
    """rayStartParams is map[string]string in the CRD: `num-cpus: 0` must be quoted."""
    jsonschema = pytest.importorskip("jsonschema")
    broken = rayjob()
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(broken)


def test_misspelled_pod_template_field_is_rejected():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    broken = rayjob()
    container = broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    with pytest.raises(kv.ValidationError):
        k8s_validate(as_pod_template(broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]), K8S_MIN_VERSION)


def test_misspelled_cronjob_field_is_rejected():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    broken = copy.deepcopy(by_kind("CronJob")[0])
    broken["spec"]["schedul"] = broken["spec"].pop("schedule")
    with pytest.raises(kv.ValidationError):
        k8s_validate(broken, K8S_MIN_VERSION)


# --- the `persam` commands ---------------------------------------------------------------------


def strict_parser():
    """jobs.cli.build_parser() with abbreviations off: `--num-actor` would otherwise pass as
    `--num-actors`, and a manifest should spell the flags the CLI defines."""
    import argparse

    from jobs.cli import build_parser

    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers.extend(action.choices.values())
    for each in parsers:
        each.allow_abbrev = False
    return parser


def parse_persam(tokens: list[str]):
    """Parse with the real CLI parser; a flag it does not know fails the test with its message."""
    assert tokens[0] == "persam", tokens
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            return strict_parser().parse_args(tokens[1:])
        except SystemExit:
            raise AssertionError(f"`{' '.join(tokens)}` is not a valid persam command: {stderr.getvalue().strip()}") from None


COMMANDS = [(f"{where} {path}", tokens, obj) for where, obj in OBJECTS for path, tokens in persam_commands(obj)]


def test_the_jobs_have_persam_entrypoints():
    places = [where for where, _, _ in COMMANDS]
    assert sum(".spec.entrypoint" in w or w.endswith("spec.entrypoint") for w in places) >= 2, places


@pytest.mark.parametrize("where, tokens, obj", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_commands_parse_with_the_cli(where, tokens, obj):
    parse_persam(tokens)


@pytest.mark.parametrize("extra", [["--num-gpus", "2"], ["--num-actor", "2"], ["--batch-size", "four"]],
                         ids=["unknown flag", "abbreviated flag", "bad value"])
def test_a_wrong_flag_fails_the_parse(extra):
    tokens = COMMANDS[0][1] + extra
    with pytest.raises(AssertionError, match="not a valid persam command"):
        parse_persam(tokens)


@pytest.mark.parametrize("where, tokens, obj", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_segment_jobs_fit_the_cluster_they_run_on(where, tokens, obj):
    from persam_core.models import MODEL_TYPES

    args = parse_persam(tokens)
    if args.command != "segment" or obj["kind"] not in KUBERAY_KINDS:
        pytest.skip("not a segment job on a KubeRay cluster")
    assert args.model_type in MODEL_TYPES
    # auto picks GPU actors only if GPU workers are already up when the driver starts.
    assert args.device == "cuda", "say --device cuda: workers may still be starting (or at zero) at submission"
    # Workers start at submission (or from zero), so the driver cannot count GPUs: say how many.
    assert args.num_actors is not None, "pass --num-actors (one per GPU)"
    gpus = sum(g["maxReplicas"] * gpus_per_pod(g["template"]) for g in cluster_spec(obj).get("workerGroupSpecs", []))
    assert 1 <= args.num_actors <= gpus, f"--num-actors {args.num_actors} but the worker groups hold at most {gpus} GPUs"
    name = Path(args.checkpoint).name
    if name.startswith("sam_vit_"):
        assert name.startswith(f"sam_{args.model_type}_"), f"--checkpoint {name} is not a {args.model_type} checkpoint"
    for url in (args.input, args.output, *args.concepts):
        assert "://" in url, f"{url}: cluster jobs read and write object storage, not pod-local paths"


def test_nightly_runs_update_one_output_incrementally_with_a_cache():
    """Reruns of one --output recompute only changed shards; the cache spares the encoder."""
    entrypoint = next(obj for obj in by_kind("RayJob") if "generateName" in obj["metadata"])["spec"]["entrypoint"]
    assert "$(date" not in entrypoint and (option(entrypoint.split(), "--cache") or "").startswith("s3://")
    assert option(rayjob()["spec"]["entrypoint"].split(), "--output") != option(entrypoint.split(), "--output")


def test_readme_commands_parse_with_the_cli():
    if not DEPLOY_README.exists():
        pytest.skip("deploy/README.md not written")
    commands = readme_persam_commands(DEPLOY_README.read_text())
    assert commands, "deploy/README.md shows no persam command"
    for tokens in commands:
        parse_persam(tokens)


# --- RayJob / RayCluster semantics -----------------------------------------------------------


@pytest.mark.parametrize("where, obj", KUBERAY_OBJECTS, ids=ids(KUBERAY_OBJECTS))
def test_clusters_have_a_cpu_head_and_gpu_workers(where, obj):
    spec = cluster_spec(obj)
    assert spec["rayVersion"] == ray_version(), f"{where}: rayVersion {spec['rayVersion']} != installed ray {ray_version()}"
    assert gpus_per_pod(spec["headGroupSpec"]["template"]) == 0, f"{where}: the head should not hold a GPU"
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: keep tasks off the head"
    groups = spec.get("workerGroupSpecs", [])
    assert groups, f"{where}: no worker group"
    for group in groups:
        assert gpus_per_pod(group["template"]) >= 1, f"{where} {group['groupName']}: no nvidia.com/gpu limit"
        replicas = group.get("replicas", group["minReplicas"])
        assert group["minReplicas"] <= replicas <= group["maxReplicas"], f"{where} {group['groupName']}"
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{where}: tolerate the GPU node taint"


@pytest.mark.parametrize("obj", by_kind("RayJob"), ids=lambda o: o["metadata"].get("name") or o["metadata"]["generateName"])
def test_rayjobs_clean_up_after_themselves(obj):
    spec = obj["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("ttlSecondsAfterFinished", 0) > 0
    assert spec.get("activeDeadlineSeconds", 0) > 0, "cap a run's GPU time"
    assert spec.get("entrypoint", "").strip().startswith("persam ")


def test_interactive_cluster_autoscales_from_zero():
    cluster = by_kind("RayCluster")[0]
    assert cluster["spec"].get("enableInTreeAutoscaling") is True
    groups = cluster["spec"]["workerGroupSpecs"]
    assert any(g["minReplicas"] == 0 and g["maxReplicas"] > 0 for g in groups)


# --- images and versions -----------------------------------------------------------------------


def container_images() -> list[tuple[str, str]]:
    images = []
    for where, obj in OBJECTS:
        for path, value in walk(obj):
            if path.endswith(".image") and isinstance(value, str) and ".containers[" in path:
                images.append((f"{where} {path}", value))
    return images


def test_images_are_pinned_and_persam_images_carry_the_project_version():
    import yaml

    images = container_images()
    assert images
    launcher_image = yaml.safe_load(RAY_CLUSTER_YAML.read_text())["docker"]["image"]
    repos = {PERSAM_IMAGE.match(launcher_image).group("repo")}
    for where, image in images:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{where}: pin a tag ({image})"
        match = PERSAM_IMAGE.match(image)
        if match:
            assert match.group("tag") == project_version(), f"{where}: {image} is not persam {project_version()}"
            repos.add(match.group("repo"))
    assert len(repos) == 1, f"the manifests and ray_cluster.yaml name different persam images: {repos}"
    ray_pods = [image for where, image in images if "RayJob" in where or "RayCluster" in where]
    assert ray_pods and all(PERSAM_IMAGE.match(image) for image in ray_pods), "Ray pods must run the persam image"


def test_kuberay_version_is_stated_in_every_ray_manifest():
    for path in kuberay_files():
        text = path.read_text()
        if re.search(r"kind:\s*Ray(Job|Cluster)", text):
            assert f"KubeRay v{KUBERAY_VERSION}" in text, f"{path.name}: say which KubeRay version it is written for"


# --- identities and credentials ------------------------------------------------------------------


def test_ray_pods_get_cloud_credentials_from_their_service_account():
    accounts = {obj["metadata"]["name"]: obj for obj in by_kind("ServiceAccount")}
    for where, obj in KUBERAY_OBJECTS:
        for part, template in pod_templates(obj):
            name = template["spec"].get("serviceAccountName")
            assert name in accounts, f"{where} {part}: serviceAccountName {name!r} is not defined in deploy/kuberay"
            annotations = accounts[name]["metadata"].get("annotations", {})
            assert any(key in annotations for key in CLOUD_IDENTITY_ANNOTATIONS), \
                f"ServiceAccount {name}: bind it to a cloud identity (IRSA / Workload Identity annotation)"


def test_cronjob_can_create_the_rayjob_it_mounts_and_nothing_else():
    cronjob = by_kind("CronJob")[0]
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    account = pod["serviceAccountName"]
    bindings = [b for b in by_kind("RoleBinding") if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    assert bindings, f"no RoleBinding for {account}"
    roles = {r["metadata"]["name"]: r for r in by_kind("Role")}
    rules = [rule for b in bindings for rule in roles[b["roleRef"]["name"]]["rules"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    assert all(set(r["verbs"]) <= {"create", "get", "list", "watch"} for r in rules), rules
    assert not by_kind("ClusterRoleBinding"), "the scheduler needs no cluster-wide rights"

    (container,) = pod["containers"]
    argv = container.get("command", []) + container.get("args", [])
    assert argv[:2] == ["kubectl", "create"], "generateName needs `kubectl create` (apply refuses it)"
    manifest_path = Path(argv[argv.index("-f") + 1])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (volume_name,) = [n for n, p in mounts.items() if manifest_path.parent == Path(p)]
    config_map = volumes[volume_name]["configMap"]["name"]
    maps = {m["metadata"]["name"]: m for m in by_kind("ConfigMap")}
    assert config_map in maps and manifest_path.name in maps[config_map]["data"]


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
    assert not by_kind("Secret"), "credentials come from IAM roles / workload identity, not Secrets"


def test_no_credentials_in_container_environments():
    for where, obj in OBJECTS:
        for path, value in walk(obj):
            if path.endswith(".env") and isinstance(value, list):
                for entry in value:
                    name = entry.get("name", "")
                    assert not re.search(r"(?i)secret|password|token|access_key|credential", name) or "valueFrom" in entry, \
                        f"{where} {path}: {name} set literally"
    for where, tokens, _ in COMMANDS:
        assert "--storage-options" not in tokens or not re.search(r"(?i)key|secret|token", option(tokens, "--storage-options") or ""), \
            f"{where}: credentials in --storage-options"


def test_the_secret_scan_catches_a_key():
    """The patterns above really match what they are for."""
    samples = {
        "AWS access key id": "aws_access_key_id: " + "AKIA" + "ABCDEFGHIJKLMNOP",
        "AWS account id": "arn:aws:iam::" + "123456789012" + ":role/x",
        "secret assignment": "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG",
    }
    for what, sample in samples.items():
        assert SECRET_PATTERNS[what].search(sample), what
