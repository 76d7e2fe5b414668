"""The segment job against a data lake: S3 in and out, bad objects, reruns, killed driver
and actor.

Every test runs real services on loopback: moto's S3 server and local Ray clusters (in a
child process: the CLI as it is deployed, and a driver that can be killed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cli_tools import ACCESS_KEY, MODEL, PERSAM, REPO, SECRET_KEY, run_persam
from jobs.pipeline.commit import shard_of
from jobs.storage.schema import partition_concept, read_part
from process_tools import descendants

pytestmark = [pytest.mark.slow, pytest.mark.ray_processes]  # every test here runs Ray in child processes


@pytest.fixture()
def many_images(tmp_path, perseg_sample) -> Path:
    """12 JPEGs (the sample images, each twice) in a flat folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for copy in range(2):
        for path in sorted((perseg_sample / "Images").glob("*/*.jpg")):
            shutil.copy(path, folder / f"{path.parent.name}_{path.stem}_{copy}.jpg")
    # 9 sample images x 2 = 18; keep the job short
    for extra in sorted(folder.iterdir())[12:]:
        extra.unlink()
    return folder


def read_rows(output: str, filesystem=None) -> list[dict]:
    if filesystem is not None:
        paths = sorted(filesystem.glob(f"{output}/**/part-*.parquet"))
        # a concept's partition names its concept in the folder, not in a column
        return [{**row, "concept": partition_concept(p) or row.get("concept")}
                for p in paths for row in pq.read_table(p, filesystem=filesystem).to_pylist()]
    return [row for p in sorted(Path(output).rglob("part-*.parquet")) for row in read_part(str(p)).to_pylist()]


def assert_exactly_once(rows: list[dict], expected_images: int, concepts: int = 1) -> None:
    keys = [(r["image_uri"], r["concept"], r["instance"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate (image, concept, instance) rows"
    assert len({r["image_uri"] for r in rows}) == expected_images
    assert len(rows) == expected_images * concepts


def assert_no_secrets(*texts: str) -> None:
    for text in texts:
        assert ACCESS_KEY not in text and SECRET_KEY not in text


def test_s3_in_s3_out_with_bad_objects_and_rerun(s3, s3_env, perseg_sample, tiny_concept):
    s3.mkdir("lake")
    images = sorted((perseg_sample / "Images").glob("*/*.jpg"))[:4]
    for path in images:
        s3.put(str(path), f"lake/photos/{path.parent.name}-{path.name}")
    s3.pipe("lake/photos/empty.jpg", b"")
    s3.pipe("lake/photos/truncated.jpg", images[0].read_bytes()[:3000])
    s3.pipe("lake/photos/notes.txt", b"not an image")  # skipped by extension

    args = ["segment", *MODEL, "--concept", str(tiny_concept), "--input", "s3://lake/photos/", "--output", "s3://lake/masks/"]
    started = time.perf_counter()
    first = run_persam(args, s3_env)
    first_seconds = time.perf_counter() - started
    # 2 of 6 images are broken: their error rows are committed, then the run fails its error rate
    assert first.returncode == 4, first.stderr[-2000:]
    assert "2 of 6 images failed" in first.stderr
    rows = read_rows("lake/masks", s3)
    assert_exactly_once(rows, expected_images=6)
    errors = {r["image_uri"].rsplit("/", 1)[-1]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"empty.jpg", "truncated.jpg"}
    assert "empty" in errors["empty.jpg"]
    assert all(r["image_uri"].startswith("s3://lake/photos/") for r in rows)

    started = time.perf_counter()
    second = run_persam(args, s3_env)
    rerun_seconds = time.perf_counter() - started
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 shards written" in second.stdout
    assert_exactly_once(read_rows("lake/masks", s3), expected_images=6)
    print(f"first run {first_seconds:.1f} s, rerun {rerun_seconds:.1f} s")

    metadata = [str(pq.ParquetFile(s3.open(p, "rb")).metadata.metadata) for p in s3.glob("lake/masks/**/*.parquet")]
    records = [s3.cat(p).decode() for p in s3.glob("lake/masks/**/_persam_*.json")]
    assert metadata and records
    assert_no_secrets(first.stdout, first.stderr, second.stdout, second.stderr, *metadata, *records)


def _part_files(output: Path) -> list[Path]:
    return sorted(output.rglob("part-*.parquet"))


def _start_job(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(PERSAM + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=REPO)


def _wait_for_parts(output: Path, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while len(_part_files(output)) < count:
        assert process.poll() is None or len(_part_files(output)) >= count, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "job produced no shard in time"
        time.sleep(0.2)


def _one_image_per_shard(output: Path, images: Path, concept: Path) -> list[str]:
    """A segment command whose every image is its own shard: many commits to interrupt."""
    return ["segment", *MODEL, "--concept", str(concept), "--input", str(images), "--output", str(output),
            "--shard-size", "1"]


def _chunked_shards(output: Path, images: Path, concept: Path) -> list[str]:
    """A segment command whose shards (about 4 images) each span several one-image chunks."""
    return ["segment", *MODEL, "--concept", str(concept), "--input", str(images), "--output", str(output),
            "--shard-size", "4", "--chunk-size", "1"]


def test_killed_driver_resumes_without_duplicates(tmp_path, many_images, tiny_concept):
    output = tmp_path / "masks"
    args = _one_image_per_shard(output, many_images, tiny_concept)
    job = _start_job(args, dict(os.environ))
    _wait_for_parts(output, 2, job)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started
    job.wait(timeout=60)
    committed = len(_part_files(output))

    rerun = run_persam(args, dict(os.environ))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{committed} already committed" in rerun.stdout
    assert_exactly_once(read_rows(str(output)), expected_images=12)


def _actor_pids(driver: int) -> list[int]:
    """The SegmentActor processes below `driver` (its embedded Ray's workers): never those of
    another run on the same machine."""
    psutil = pytest.importorskip("psutil")
    pids = []
    for process in descendants(driver):
        try:
            command = " ".join(process.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "SegmentActor" in command and "ray::" in command:
            pids.append(process.pid)
    return pids


def test_killed_actor_is_restarted_and_no_row_is_lost(tmp_path, many_images, tiny_concept):
    """Killed while shards are half done: their chunks in flight are retried, each shard is
    committed once, and no row is lost or duplicated."""
    output = tmp_path / "masks"
    job = _start_job(_chunked_shards(output, many_images, tiny_concept), dict(os.environ))
    try:
        _wait_for_parts(output, 1, job)
        pids = _actor_pids(job.pid)
        assert pids, "no SegmentActor process found"
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=400)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, stderr[-3000:]
    rows = read_rows(str(output))
    assert_exactly_once(rows, expected_images=12)
    assert len(_part_files(output)) == len({shard_of(r["image_uri"], 3) for r in rows})  # one file per shard
