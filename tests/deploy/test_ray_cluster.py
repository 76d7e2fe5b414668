"""ray_cluster.yaml: checked with the same code `ray up` runs before it touches AWS
(ray.autoscaler._private.util.prepare_config + validate_config, i.e. Ray's own
ray-schema.json), each node_config against the EC2 RunInstances request shape that
botocore ships (what Ray passes it to), and against the image and versions it must use.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from deploy_checks import PERSAM_IMAGE, RAY_CLUSTER_YAML, project_version

ray_util = pytest.importorskip("ray.autoscaler._private.util")
jsonschema = pytest.importorskip("jsonschema")

# Keys Ray's AWS provider reads itself and rewrites before calling RunInstances.
RAY_ONLY_NODE_CONFIG_KEYS = {"SubnetIds"}


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(RAY_CLUSTER_YAML.read_text())


def ray_up_validation(config: dict) -> dict:
    """What `ray up` does to the file before any cloud call (commands._bootstrap_config)."""
    prepared = ray_util.prepare_config(copy.deepcopy(config))
    ray_util.validate_config(prepared)
    return prepared


def test_validates_with_rays_own_schema(raw):
    ray_up_validation(raw)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.__setitem__("max_worker", c.pop("max_workers")), id="misspelled top-level key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].__setitem__(
            "min_worker", c["available_node_types"]["gpu_worker"].pop("min_workers")), id="misspelled node-type key"),
        pytest.param(lambda c: c["docker"].__setitem__("run_option", c["docker"].pop("run_options")), id="misspelled docker key"),
        pytest.param(lambda c: c["docker"].__setitem__("imagee", c["docker"].pop("image")), id="misspelled docker image key"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"]["resources"].__setitem__("GPU", "1"), id="GPU count as a string"),
        pytest.param(lambda c: c.__setitem__("head_node_type", "haed"), id="head_node_type naming no node type"),
        pytest.param(lambda c: c["available_node_types"]["gpu_worker"].__setitem__("min_workers", 99), id="min_workers above max_workers"),
    ],
)
def test_a_broken_config_fails_validation(raw, mutate):
    broken = copy.deepcopy(raw)
    mutate(broken)
    # ray up stops on any of these (its docker check is an assert).
    with pytest.raises((jsonschema.ValidationError, ValueError, AssertionError)):
        ray_up_validation(broken)


def run_instances_shape():
    botocore_session = pytest.importorskip("botocore.session")
    return botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


def node_config_errors(node_config: dict) -> str:
    from botocore.validate import ParamValidator

    request = {k: v for k, v in node_config.items() if k not in RAY_ONLY_NODE_CONFIG_KEYS}
    request.update(MinCount=1, MaxCount=1)
    report = ParamValidator().validate(request, run_instances_shape())
    return report.generate_report() if report.has_errors() else ""


def test_node_configs_are_valid_run_instances_requests(raw):
    for name, node_type in raw["available_node_types"].items():
        errors = node_config_errors(node_type["node_config"])
        assert not errors, f"{name}.node_config: {errors}"


def test_a_misspelled_node_config_key_is_caught(raw):
    node_config = dict(raw["available_node_types"]["gpu_worker"]["node_config"])
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    assert "InstanceTyp" in node_config_errors(node_config)


def test_image_is_the_project_image_at_the_project_version(raw):
    image = raw["docker"]["image"]
    match = PERSAM_IMAGE.match(image)
    assert match, f"docker.image {image!r}: expected REGISTRY/OWNER/persam:TAG"
    assert match.group("tag") == project_version()
    assert "head_image" not in raw["docker"] and "worker_image" not in raw["docker"], "head and workers share one image"


def test_cpu_head_and_autoscaling_gpu_workers(raw):
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != raw["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_workers, "no GPU worker type"
    for name, worker in gpu_workers.items():
        assert worker.get("min_workers", 0) < worker["max_workers"], f"{name} cannot autoscale"
        assert worker["max_workers"] <= raw["max_workers"]
        assert worker["resources"].get("CPU", 0) >= 2, f"{name}: the model actor takes a CPU, decoding needs more"


def test_every_node_type_names_its_ami(raw):
    """Without ImageId Ray falls back to an old (CUDA 11) Deep Learning AMI whose driver
    cannot run the CUDA 13 image."""
    for name, node_type in raw["available_node_types"].items():
        assert node_type["node_config"].get("ImageId"), f"{name}: set ImageId"


def test_the_container_is_used_as_built(raw):
    prepared = ray_up_validation(raw)
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        for command in prepared.get(key, []):
            assert not re.search(r"\bpip3? install\b", command), f"{key} installs packages at boot: {command!r}"
    assert any(re.search(r"\bpersam\b", c) for c in prepared["worker_setup_commands"]), \
        "worker setup should check that `persam` is on the PATH"
    assert any("ray start --head" in c for c in prepared["head_start_ray_commands"])
    assert any("ray start --address" in c for c in prepared["worker_start_ray_commands"])
