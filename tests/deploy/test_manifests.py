"""deploy/kuberay/: every overlay rendered with `kubectl kustomize` (what `kubectl apply -k`
sends), schema-validated, every `persam` command checked against the real CLI parser,
versions and cleanup. Identities, token auth and secrets: test_credentials.py.

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
    DEPLOY_README,
    K8S_MIN_VERSION,
    KUBERAY_VERSION,
    PERSAM_IMAGE,
    RAY_CLUSTER_YAML,
    all_kuberay_objects,
    cluster_spec,
    gpus_per_pod,
    kuberay_files,
    overlay_commands,
    pod_templates,
    project_version,
    ray_version,
    readme_persam_commands,
    validate_kuberay,
    walk,
)

KUBERAY_KINDS = {"RayJob", "RayCluster"}

OBJECTS = all_kuberay_objects()
KUBERAY_OBJECTS = [(where, obj) for where, obj in OBJECTS if obj.get("kind") in KUBERAY_KINDS]
NATIVE_OBJECTS = [(where, obj) for where, obj in OBJECTS if obj.get("kind") not in KUBERAY_KINDS]


def ids(pairs):
    return [where for where, _ in pairs]


def by_kind(kind: str) -> list[dict]:
    return [obj for _, obj in OBJECTS if obj.get("kind") == kind]


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


COMMANDS = overlay_commands()


def test_the_jobs_have_persam_commands():
    if not OBJECTS:
        pytest.skip("kubectl not installed")
    places = [where for where, _, _, _ in COMMANDS]
    assert any(w.startswith("job[") and w.endswith("spec.entrypoint") for w in places), places
    assert any(w.startswith("cluster[") and "CronJob" in w for w in places), places


@pytest.mark.parametrize("where, tokens, obj, cluster", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_commands_parse_with_the_cli(where, tokens, obj, cluster):
    parse_persam(tokens)


@pytest.mark.parametrize("extra", [["--num-gpus", "2"], ["--num-actor", "2"], ["--batch-size", "four"]],
                         ids=["unknown flag", "abbreviated flag", "bad value"])
def test_a_wrong_flag_fails_the_parse(extra):
    if not COMMANDS:
        pytest.skip("kubectl not installed")
    tokens = COMMANDS[0][1] + extra
    with pytest.raises(AssertionError, match="not a valid persam command"):
        parse_persam(tokens)


@pytest.mark.parametrize("where, tokens, obj, cluster", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_cluster_jobs_fit_the_cluster_they_run_on(where, tokens, obj, cluster):
    from persam_core.modeling.models import model_types

    args = parse_persam(tokens)
    assert args.command in ("segment", "rank"), f"{where}: {args.command}"
    assert cluster is not None, f"{where}: runs on no RayCluster/RayJob of its overlay"
    assert args.model_type in model_types()
    # auto picks GPU actors only if GPU workers are already up when the driver starts.
    assert args.device == "cuda", "say --device cuda: workers may still be starting (or at zero) at submission"
    # Workers start at submission (or from zero), so the driver cannot count GPUs: say how many.
    assert args.num_actors is not None, "pass --num-actors (one per GPU)"
    gpus = sum(g["maxReplicas"] * gpus_per_pod(g["template"]) for g in cluster_spec(cluster).get("workerGroupSpecs", []))
    assert 1 <= args.num_actors <= gpus, f"--num-actors {args.num_actors} but the worker groups hold at most {gpus} GPUs"
    name = Path(args.checkpoint).name
    if name.startswith("sam_vit_"):
        assert name.startswith(f"sam_{args.model_type}_"), f"--checkpoint {name} is not a {args.model_type} checkpoint"
    for url in (args.input, args.output, *args.concepts):
        assert "://" in url, f"{url}: cluster jobs read and write object storage, not pod-local paths"


def test_the_nightly_retrieval_ranks_into_one_output_with_a_cache():
    """The CronJob runs `persam rank` (retrieval), rewriting one output each night; the
    cache spares the encoder for photos already seen."""
    nightly = [(tokens, obj) for _, tokens, obj, _ in COMMANDS if obj["kind"] == "CronJob"]
    if not OBJECTS:
        pytest.skip("kubectl not installed")
    assert nightly, "no CronJob runs persam"
    one_off = [parse_persam(tokens) for _, tokens, obj, _ in COMMANDS if obj["kind"] == "RayJob"]
    for tokens, _ in nightly:
        args = parse_persam(tokens)
        assert args.command == "rank", f"the nightly retrieval runs `persam {args.command}`"
        assert (args.cache or "").startswith(("s3://", "gs://")), "give the nightly run an embedding cache"
        assert all(args.output != job.output for job in one_off), "the nightly output is its own"


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
def test_rayjobs_delete_their_cluster_when_they_end(obj):
    spec = obj["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True
    assert spec.get("ttlSecondsAfterFinished", 0) > 0
    assert spec.get("activeDeadlineSeconds", 0) > 0, "cap a run's GPU time"
    assert spec.get("entrypoint", "").strip().startswith("persam ")


def test_nightly_runs_leave_no_objects_behind():
    """The CronJob submits to the long-lived cluster (no RayJob per night piling up) and
    keeps a bounded history of its own Jobs, each deleted a day after it finished."""
    cronjobs = by_kind("CronJob")
    if not OBJECTS:
        pytest.skip("kubectl not installed")
    assert cronjobs
    for cronjob in cronjobs:
        spec = cronjob["spec"]
        assert 0 < spec["successfulJobsHistoryLimit"] <= 5 and 0 < spec["failedJobsHistoryLimit"] <= 5
        assert spec["concurrencyPolicy"] == "Forbid"
        job = spec["jobTemplate"]["spec"]
        assert job.get("ttlSecondsAfterFinished", 0) > 0 and job.get("activeDeadlineSeconds", 0) > 0
        assert job.get("backoffLimit") == 0, "a retried submitter would start the same night twice"
        (container,) = job["template"]["spec"]["containers"]
        argv = container.get("command", []) + container.get("args", [])
        assert argv[:3] == ["ray", "job", "submit"] and "--no-wait" not in argv, \
            "the submitter follows the run, so Forbid and the Job status mean something"
    assert not [m for m in by_kind("ConfigMap") if "RayJob" in str(m.get("data"))], "no RayJob templates: nothing creates RayJobs nightly"


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
        if path.name != "kustomization.yaml" and re.search(r"kind:\s*Ray(Job|Cluster)", text):
            assert f"KubeRay v{KUBERAY_VERSION}" in text, f"{path.name}: say which KubeRay version it is written for"
