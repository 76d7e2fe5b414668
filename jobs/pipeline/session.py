"""Where the job runs: embedded local Ray or the cluster in RAY_ADDRESS; which device; how
many model actors with which resources. The one place that starts and stops Ray."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from jobs.logs import ray_logging_level
from jobs.pipeline.host_memory import process_environment
from jobs.pipeline.signals import restore_stop_signals
from jobs.pipeline.watchdog import children_of, start_watchdog, stop_watchdog
from jobs.spec import check_device


def resolve_device(device: str) -> str:
    """--device -> the torch device here: auto is cuda when one is visible, else cpu."""
    if check_device(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return device


# Ray (2.60) turns a loopback node address into this machine's routable one unless its cluster
# mode is off, as on Windows and macOS; with the node address 127.0.0.1 every server it starts
# (GCS, raylet, object manager, workers' gRPC, agents, metrics) stays on loopback, else its
# gRPC servers listen on every interface. Ray reads the variable when imported, its processes
# inherit it (docs/guarantees-process.md).
LOOPBACK_ONLY_ENV = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_watchdog = None  # the process that ends the embedded Ray with the driver (watchdog.py)


def start_ray() -> bool:
    """Join RAY_ADDRESS's cluster, or start an embedded local Ray on 127.0.0.1 -> started here?"""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=ray_logging_level(), log_to_driver=True)
    else:
        _start_local_ray()
    restore_stop_signals()  # ray.init replaced SIGTERM's handler with one that aborts (signals.py)
    return True


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts here: its cluster mode off (the processes it spawns keep it); put back
    afterwards, so that a later `ray start` or cluster connection from this process is unchanged."""
    from ray._private import ray_constants

    name, value = LOOPBACK_ONLY_ENV
    before_env, before_constant = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = value
    ray_constants.ENABLE_RAY_CLUSTER = False  # what the variable sets when Ray is imported
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_constant
        if before_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before_env


def _start_local_ray() -> None:
    import ray

    global _watchdog
    before = children_of(os.getpid())
    with _loopback_node():
        ray.init(
            address="local",  # not None: Ray would join whatever `ray start` cluster this machine last ran
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=ray_logging_level(),
            configure_logging=True,
        )
    _watchdog = start_watchdog(children_of(os.getpid()) - before)


@contextmanager
def ray_session() -> Iterator[None]:
    """Ray for the duration of the block: joined or started here; an embedded local Ray
    started here is shut down at the end (a cluster's and a caller's Ray are left running)."""
    started_here = start_ray()
    try:
        yield
    finally:
        if started_here and local_cluster():
            stop_local_ray()


def stop_local_ray() -> None:
    """Shut down this process's Ray and the watchdog of the embedded one started here."""
    import ray

    global _watchdog
    if ray.is_initialized():
        ray.shutdown()
    stop_watchdog(_watchdog)
    _watchdog = None


def local_cluster() -> bool:
    return not os.environ.get("RAY_ADDRESS")


def wants_gpu_actors(device: str) -> bool:
    """Schedule actors on GPUs for --device cuda, or auto on a cluster that has GPUs."""
    import ray

    return device == "cuda" or (device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


def expected_device_type(device: str) -> str:
    """The device type ("cuda" | "cpu") the model actors will get, as the driver can tell:
    --device cuda; auto with a local GPU, or on a cluster (RAY_ADDRESS) that has GPUs."""
    check_device(device)
    if device != "auto":
        return device
    if local_cluster():  # the embedded Ray sees this machine's GPUs
        return "cuda" if torch.cuda.is_available() else "cpu"
    start_ray()
    return "cuda" if wants_gpu_actors(device) else "cpu"


# The CPU stages' reservations per task where CPUs are plenty: prepare decodes JPEGs on a whole
# CPU; finish (RLE, Arrow rows) takes half.
PREPARE_TASK_CPUS, FINISH_TASK_CPUS = 1.0, 0.5


def stage_cpus(total: float, actors: float) -> tuple[float, float]:
    """CPUs per prepare task and per finish task beside `actors` CPUs of model actors on a
    cluster of `total` CPUs: the defaults where one task of each fits in what the actors leave,
    else what they leave split in the same ratio. Where a prepare task could take the last
    free CPU, Ray Data launched every prepare task before the first finish task: no result
    and no commit before the whole input was read."""
    spare = total - actors
    wanted = PREPARE_TASK_CPUS + FINISH_TASK_CPUS
    if spare >= wanted:
        return PREPARE_TASK_CPUS, FINISH_TASK_CPUS
    scale = max(spare, 0.01) / wanted
    return PREPARE_TASK_CPUS * scale, FINISH_TASK_CPUS * scale


def actor_resources(num_actors: int, gpu: bool, total: float) -> dict:
    """CPU/GPU per model actor on a cluster of `total` CPUs, leaving a CPU for the read/decode
    tasks on small machines."""
    if gpu:
        return {"num_cpus": 1, "num_gpus": 1}
    spare = total - 1 if total > 1 else total / 2  # read tasks must always find a slot
    return {"num_cpus": max(0.25, min(1.0, spare / max(1, num_actors)))}


def local_threads(count: int) -> int:
    """Torch threads of each of `count` actors on this machine: the cores this process may run
    on, shared among them, and no more than OMP_NUM_THREADS where it is set (the cap torch
    itself starts with, which a user sets when the run shares the machine)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // count)
    try:
        cap = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:  # unset or not a number: torch ignores it too
        return threads
    return min(threads, cap) if cap > 0 else threads


@dataclass(frozen=True)
class ActorPlan:
    count: int
    resources: dict  # Ray resources per actor: num_cpus (+ num_gpus)
    threads: int  # torch threads per actor
    env: dict  # environment variables the actors' processes start with (host_memory.py)
    prepare_cpus: float = PREPARE_TASK_CPUS  # per task of the CPU stages (stage_cpus)
    finish_cpus: float = FINISH_TASK_CPUS


def plan_actors(device: str, num_actors: int | None, work_items: int | None = None) -> ActorPlan:
    """--num-actors (default: one per GPU on a GPU cluster, else 1), at most one per work
    item, with their resources and torch threads. Locally the actors share this machine's
    cores; on a cluster each uses the CPUs it reserved (rounded up: a fraction still runs)."""
    import ray

    gpu = wants_gpu_actors(device)
    count = num_actors or (max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1)
    if work_items is not None:
        count = max(1, min(count, work_items))
    total = float(ray.cluster_resources().get("CPU", 1))
    resources = actor_resources(count, gpu, total)
    if local_cluster():
        threads = local_threads(count)
    else:
        threads = max(1, math.ceil(resources["num_cpus"]))
    prepare, finish = stage_cpus(total, count * resources["num_cpus"])
    return ActorPlan(count, resources, threads, process_environment("cuda" if gpu else "cpu"), prepare, finish)
