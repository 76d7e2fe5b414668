"""Where the job runs: embedded local Ray or the cluster in RAY_ADDRESS; which device."""

from __future__ import annotations

import logging
import os

import torch


def check_device_option(device: str) -> str:
    """Validate --device without touching CUDA (the driver may sit on a CPU-only head)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: choose auto, cpu or cuda")
    return device


def resolve_device(device: str) -> str:
    """--device -> the torch device here: auto is cuda when one is visible, else cpu."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: choose auto, cpu or cuda")
    return device


def start_ray() -> bool:
    """Join RAY_ADDRESS's cluster, or start an embedded local Ray on 127.0.0.1 -> started here?"""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
        return True
    ray.init(
        address="local",  # not None: Ray would join whatever `ray start` cluster this machine last ran
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


def local_cluster() -> bool:
    return not os.environ.get("RAY_ADDRESS")


def wants_gpu_actors(device: str) -> bool:
    """Schedule actors on GPUs for --device cuda, or auto on a cluster that has GPUs."""
    import ray

    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def expected_device_type(device: str) -> str:
    """The device type ("cuda" | "cpu") the model actors will get, as the driver can tell:
    --device cuda; auto with a local GPU, or on a cluster (RAY_ADDRESS) that has GPUs."""
    check_device_option(device)
    if device != "auto":
        return device
    if local_cluster():  # the embedded Ray sees this machine's GPUs
        return "cuda" if torch.cuda.is_available() else "cpu"
    start_ray()
    return "cuda" if wants_gpu_actors(device) else "cpu"


def actor_resources(num_actors: int, gpu: bool) -> dict:
    """CPU/GPU per model actor, leaving a CPU for the read/decode tasks on small machines."""
    import ray

    if gpu:
        return {"num_cpus": 1, "num_gpus": 1}
    total = float(ray.cluster_resources().get("CPU", 1))
    spare = total - 1 if total > 1 else total / 2  # read tasks must always find a slot
    return {"num_cpus": max(0.25, min(1.0, spare / max(1, num_actors)))}
