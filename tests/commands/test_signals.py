"""Ctrl-C (SIGINT) and SIGTERM (what Kubernetes and schedulers send) stop a run cleanly: one
line on stderr, no traceback and no native dump, the documented exit code (130 / 143), every
shard committed before (or while) the signal came stays whole, and the embedded Ray with its
actors is shut down. Each run is the CLI in a child process, signalled after its first
progress line."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from cli_tools import run_cli
from jobs import cli, logs
from jobs.pipeline.signals import restore_stop_signals
from jobs.storage.schema import read_part
from process_tools import (descendants, kill_tree, make_scenes, segment_args, start_persam, wait_for_progress,
                           wait_gone)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_scenes(tmp_path_factory.mktemp("scenes"), 150)


def _first_commit(job, output) -> int:
    """After the first progress line, wait for a committed shard -> the shards committed."""
    wait_for_progress(job)
    deadline = time.monotonic() + 300
    while not list(output.rglob("part-*.parquet")):
        assert job.poll() is None and time.monotonic() < deadline, "no shard committed"
        time.sleep(0.1)
    return len(list(output.rglob("part-*.parquet")))


def _stop(job, signum: int, whole_group: bool) -> tuple[str, str]:
    if whole_group:  # a terminal's Ctrl-C reaches every process of the foreground job
        os.killpg(job.pid, signum)
    else:  # Kubernetes and schedulers signal the main process
        os.kill(job.pid, signum)
    return job.communicate(timeout=300)


def _assert_committed_shards_whole(output) -> int:
    """Every part file reads, each (image, instance) row is there once and no image is in two
    files -> the count of files."""
    parts = sorted(output.rglob("part-*.parquet"))
    owner = {}
    for path in parts:
        rows = read_part(str(path)).to_pylist()
        keys = [(r["image_uri"], r["instance"]) for r in rows]
        assert rows and len(keys) == len(set(keys)), path
        for uri in {r["image_uri"] for r in rows}:
            assert owner.setdefault(uri, path) == path, f"{uri} in {owner[uri]} and {path}"
    # no half-written file where readers look (hidden and `_` names are skipped by pyarrow, pandas, Spark)
    listed = [p for p in output.rglob("*") if p.is_file()
              and not any(part.startswith((".", "_")) for part in p.relative_to(output).parts)]
    assert sorted(listed) == parts
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
        committed = _first_commit(job, output)
        stdout, stderr = _stop(job, signum, whole_group)
    finally:
        kill_tree(job, [])
    _assert_stopped(stdout, stderr, job.returncode, signum)
    assert committed <= _assert_committed_shards_whole(output) < 150  # committed stays; the rest is not run


@pytest.mark.slow
@pytest.mark.ray_processes  # the CLI in a child process, on Ray
@pytest.mark.parametrize("signum,whole_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["sigterm", "ctrl-c-to-the-group"])
def test_a_signal_stops_a_ray_run_and_ray_with_it(scenes, tmp_path, signum, whole_group):
    output = tmp_path / "masks"
    job = start_persam(segment_args(scenes, output, "ray"))
    ray_processes = []
    try:
        committed = _first_commit(job, output)
        ray_processes = descendants(job.pid)
        assert any("raylet" in " ".join(p.cmdline()) for p in ray_processes)
        stdout, stderr = _stop(job, signum, whole_group)
        left = wait_gone(ray_processes, timeout=30)
    finally:
        kill_tree(job, ray_processes)
    _assert_stopped(stdout, stderr, job.returncode, signum)
    assert left == [], [" ".join(p.cmdline())[:80] for p in left]
    assert committed <= _assert_committed_shards_whole(output) < 150


# ---------------------------------------------------------------------------- in this process


def _signal_self(signum: int, replace_handler: bool = False):
    def run(args):
        if replace_handler:  # what ray.init does to SIGTERM; start_ray then puts ours back
            signal.signal(signum, lambda *a: os._exit(134))
            restore_stop_signals()
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the handler runs between bytecodes of this thread
            time.sleep(0.01)
        raise AssertionError("the signal did not stop the command")

    return run


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("replace_handler", [False, True], ids=["", "after-ray-init"])
def test_a_signal_ends_the_command_in_one_line_and_puts_the_callers_handlers_back(monkeypatch, signum,
                                                                                  replace_handler):
    before = signal.getsignal(signum)
    monkeypatch.setattr(cli, "_run", _signal_self(signum, replace_handler))
    result = run_cli(["export", "coco", "--masks", "m/", "--output", "o.json"])
    assert result.rc == 128 + signum
    assert result.err.splitlines() == [f"persam export: stopped: {signal.Signals(signum).name} received; what was "
                                       "committed stays committed, a rerun continues from there"]
    assert signal.getsignal(signum) is before


def test_a_signal_in_json_mode_is_one_json_line(monkeypatch):
    monkeypatch.setattr(cli, "_run", _signal_self(signal.SIGTERM))
    try:
        result = run_cli(["export", "coco", "--masks", "m/", "--output", "o.json", "--log-format", "json"])
    finally:
        logs.configure()
    lines = result.err.splitlines()
    assert result.rc == 143 and len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["exit_code"] == 143 and entry["level"] == "error" and "SIGTERM received" in entry["message"]
