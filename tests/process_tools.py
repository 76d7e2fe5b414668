"""A `persam segment` job in a child process that tests can signal, kill and watch: generated
images (no sample data), a concept fitted on one of them, and the job's process tree."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from cli_tools import MODEL, PERSAM, REPO, run_cli
from synthetic import frame_image, rectangles


def make_scenes(root: Path, count: int) -> SimpleNamespace:
    """`count` small JPEGs (two coloured rectangles on noise) and a concept fitted on the first
    -> root, images (folder), concept (file)."""
    images = root / "images"
    images.mkdir(parents=True)
    for index in range(count):
        Image.fromarray(frame_image(rectangles(index % 10), index)).save(images / f"scene{index:04d}.jpg", quality=90)
    labels = rectangles(0)
    Image.fromarray(frame_image(labels, 0)).save(root / "shot.jpg", quality=95)
    Image.fromarray(((labels == 1) * 255).astype(np.uint8)).save(root / "shot.png")
    concept = root / "thing.json"
    fitted = run_cli(["fit", *MODEL, "--name", "thing", "--image", str(root / "shot.jpg"),
                      "--mask", str(root / "shot.png"), "--out", str(concept)])
    assert fitted.rc == 0, fitted.err
    return SimpleNamespace(root=root, images=images, concept=concept)


def segment_args(scenes: SimpleNamespace, output: Path, runner: str, *extra: str) -> list[str]:
    """A segment run of many small commits (one image per shard and chunk) that reports
    progress after every chunk: long enough to be interrupted mid-way."""
    return ["segment", *MODEL, "--concept", str(scenes.concept), "--input", str(scenes.images),
            "--output", str(output), "--runner", runner, "--shard-size", "1", "--chunk-size", "1",
            "--progress-interval", "0.001", *extra]


def start_persam(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> subprocess.Popen:
    """The CLI in a child process, leading its own process group (as a shell's job)."""
    return subprocess.Popen((prefix or PERSAM) + args, env=dict(os.environ if env is None else env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=REPO)


def wait_for_progress(job: subprocess.Popen, timeout: float = 400) -> list[str]:
    """Read the job's stdout until its first progress line -> the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = job.stdout.readline()
        if not line:
            raise AssertionError(f"the job ended before reporting progress: {job.wait()} {job.stderr.read()[-3000:]}")
        lines.append(line)
        if " images (" in line:
            return lines
    raise AssertionError("no progress line in time")


def descendants(pid: int) -> list:
    """psutil.Process objects of every process below `pid` (Ray's processes for a driver)."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(processes: list, timeout: float) -> list:
    """Wait until every process ended (or `timeout` s passed) -> those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in processes if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if running(p)]
    return alive


def running(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(job: subprocess.Popen, processes: list) -> None:
    """Cleanup after a failed test: the job's group and whatever it left running."""
    import psutil

    try:
        os.killpg(job.pid, 9)
    except ProcessLookupError:
        pass
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
