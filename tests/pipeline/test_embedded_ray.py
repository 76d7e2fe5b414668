"""The embedded local Ray stays on loopback and ends with the driver.

During a `persam segment` run on Ray (the CLI in a child process), every socket that the
driver or any process below it listens on is bound to loopback — GCS, raylet (node and
object manager), workers' and actors' gRPC, the agents, metrics — no dashboard web UI is
served, and when the driver is killed with SIGKILL every one of those processes is gone
within 30 s (docs/guarantees-process.md)."""

from __future__ import annotations

import ipaddress
import os
import signal

import pytest

from process_tools import descendants, kill_tree, make_scenes, segment_args, start_persam, wait_for_progress, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.ray_processes]  # Ray in child processes

DASHBOARD_PORT = 8265  # Ray's web UI, were it served


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), 150)


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _listening(processes: list) -> list[tuple[str, str, int]]:
    """(command, address, port) of every listening TCP/UDP socket of `processes`."""
    import psutil

    found = []
    for process in processes:
        try:
            connections = process.net_connections(kind="inet")
            command = " ".join(process.cmdline())[:100]
        except psutil.NoSuchProcess:
            continue
        found += [(command, c.laddr.ip, c.laddr.port) for c in connections
                  if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr)]  # 2: SOCK_DGRAM
    return found


def _assert_contained(job) -> list:
    """The run's processes, after checking what they listen on -> them."""
    import psutil

    processes = descendants(job.pid)
    assert any("raylet" in " ".join(p.cmdline()) for p in processes), "no raylet below the driver"
    sockets = _listening([psutil.Process(job.pid), *processes])
    assert sockets, "nothing listening: the check would prove nothing"
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert exposed == [], exposed
    assert not [s for s in sockets if s[2] == DASHBOARD_PORT]
    # Ray 2.60 always starts its API-server process on a head node; ours serves no web UI.
    servers = [" ".join(p.cmdline()) for p in processes if "dashboard/dashboard.py" in " ".join(p.cmdline())]
    assert all("--disable-frontend" in command for command in servers), servers
    return processes


@pytest.mark.parametrize("whole_group", [False, True], ids=["driver", "driver-and-its-group"])
def test_ray_listens_on_loopback_and_dies_with_a_killed_driver(scenes, tmp_path, whole_group):
    job = start_persam(segment_args(scenes, tmp_path / "masks", "ray"))
    processes = []
    try:
        wait_for_progress(job)
        processes = _assert_contained(job)
        if whole_group:
            os.killpg(job.pid, signal.SIGKILL)
        else:
            os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        left = wait_gone(processes, timeout=30)
    finally:
        kill_tree(job, processes)
    assert left == [], [" ".join(p.cmdline())[:80] for p in left]


def test_a_finished_run_leaves_no_ray_process(tmp_path):
    # 8 one-image shards: after the first progress line, seven images (seconds of work) are
    # left while the processes are looked at, and the run then ends by itself
    few = make_scenes(tmp_path / "few", 8)
    job = start_persam(segment_args(few, tmp_path / "masks", "ray"))
    processes = []
    try:
        wait_for_progress(job)
        processes = _assert_contained(job)
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
        left = wait_gone(processes, timeout=30)
    finally:
        kill_tree(job, processes)
    assert left == [], [" ".join(p.cmdline())[:80] for p in left]
