"""`ray job submit -- persam segment` against a real two-node Ray cluster on one machine.

The head has CPUs only; a second node advertises a fake GPU, so the model actor is
scheduled there (num_gpus=1) and falls back to CPU because no CUDA device exists.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_tools import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray_processes]  # every test here runs Ray in child processes

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(args: list[str], env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture()
def two_node_cluster(tmp_path):
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed")
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's driver must find `persam`
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    gcs_port, dashboard_port = _free_port(), _free_port()
    head = _ray(["start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
                 "--include-dashboard", "true", "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats"], env)
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        worker = _ray(["start", "--address", f"127.0.0.1:{gcs_port}", "--node-ip-address", "127.0.0.1",
                       "--num-cpus", "1", "--num-gpus", "1", "--disable-usage-stats"], env)
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield f"http://127.0.0.1:{dashboard_port}", env
    finally:
        _ray(["stop", "--force"], env)


def test_ray_job_submit_runs_segment_on_the_gpu_node(two_node_cluster, tmp_path, perseg_sample, tiny_concept):
    address, env = two_node_cluster
    output = tmp_path / "masks"
    images = perseg_sample / "Images" / "duck_toy"
    submit = _ray(["job", "submit", "--address", address, "--",
                   "persam", "segment", "--model-type", "tiny", "--checkpoint", "random:0",
                   "--concept", str(tiny_concept), "--input", str(images), "--output", str(output)], env, timeout=400)
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
    assert "'num_gpus': 1" in submit.stdout  # the actor asked for the worker node's GPU
    rows = [row for p in sorted(output.rglob("part-*.parquet")) for row in pq.read_table(p).to_pylist()]
    assert len(rows) == 3 and all(r["error"] is None for r in rows)
    assert env["RAY_AUTH_TOKEN"] not in submit.stdout + submit.stderr
