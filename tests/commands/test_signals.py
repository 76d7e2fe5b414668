"""Ctrl-C (SIGINT) and SIGTERM (what Kubernetes and schedulers send) stop a run cleanly: one
line on stderr, no traceback and no native dump, the documented exit code (130 / 143), every
shard committed before (or while) the signal came stays whole, and the embedded Ray with its
actors is shut down. Each run is the CLI in a child process, signalled after its first
progress line."""

from __future__ import annotations

import os
import signal

import pytest

from jobs.storage.schema import read_part
from process_tools import descendants, kill_tree, make_scenes, segment_args, start_persam, wait_for_progress, wait_gone


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), 150)


def _stop(job, signum: int, whole_group: bool) -> tuple[str, str]:
    if whole_group:  # a terminal's Ctrl-C reaches every process of the foreground job
        os.killpg(job.pid, signum)
    else:  # Kubernetes and schedulers signal the main process
        os.kill(job.pid, signum)
    return job.communicate(timeout=300)


def _assert_committed_shards_whole(output) -> int:
    """Every part file reads, holds one row per image of its shard (one image per shard
    here) and no image is in two files -> the count."""
    parts = sorted(output.rglob("part-*.parquet"))
    uris = []
    for path in parts:
        table = read_part(str(path))
        assert table.num_rows == 1, path
        uris += table.column("image_uri").to_pylist()
    assert len(uris) == len(set(uris))
    assert not [p for p in output.rglob("*") if p.is_file() and not p.name.startswith(("part-", "_persam"))]
    return len(parts)


def _assert_stopped(stdout: str, stderr: str, returncode: int, signum: int) -> None:
    name = signal.Signals(signum).name
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 128 + signum, stderr[-3000:]
    assert lines == [f"persam segment: stopped: {name} received; what was committed stays committed, "
                     "a rerun continues from there"], stderr[-3000:]
    assert "Traceback" not in stderr + stdout and "***" not in stderr


@pytest.mark.parametrize("signum,whole_group", [
    (signal.SIGINT, False),
    (signal.SIGTERM, False),
    (signal.SIGINT, True),
], ids=["sigint", "sigterm", "ctrl-c-to-the-group"])
def test_a_signal_stops_a_local_run_with_one_line(scenes, tmp_path, signum, whole_group):
    output = tmp_path / "masks"
    job = start_persam(segment_args(scenes, output, "local"))
    try:
        wait_for_progress(job)
        stdout, stderr = _stop(job, signum, whole_group)
    finally:
        kill_tree(job, [])
    _assert_stopped(stdout, stderr, job.returncode, signum)
    assert 1 <= _assert_committed_shards_whole(output) < 150  # the shard in flight was committed, not the rest


@pytest.mark.slow
@pytest.mark.parametrize("signum,whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "ctrl-c-to-the-group"])
def test_a_signal_stops_a_ray_run_and_ray_with_it(scenes, tmp_path, signum, whole_group):
    output = tmp_path / "masks"
    job = start_persam(segment_args(scenes, output, "ray"))
    ray_processes = []
    try:
        wait_for_progress(job)
        ray_processes = descendants(job.pid)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)
        stdout, stderr = _stop(job, signum, whole_group)
        left = wait_gone(ray_processes, timeout=30)
    finally:
        kill_tree(job, ray_processes)
    _assert_stopped(stdout, stderr, job.returncode, signum)
    assert left == [], [" ".join(p.cmdline())[:80] for p in left]
    assert 1 <= _assert_committed_shards_whole(output) < 150
