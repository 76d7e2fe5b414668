"""The commit protocol under a kill at every step (docs/guarantees-output.md).

Each storage step a run takes in its output (a publish, a staged write, a removal, a
promotion, a record write) is counted; the writer is "killed" at step N, before or after it
acts, by a BaseException that every later step raises too (a dead process does nothing
more). For N = 1, 2, ... until a run completes: at every step of the killed run and after
the kill, readers (pandas, pyarrow's dataset, DuckDB's `**/*.parquet` glob, our own
`output_tables`) see at most one version of each shard and never a row twice; a rerun then
ends with exactly one row per (image, concept, instance).

The fast sweep replaces the model stages with generated rows (the commit path is the real
one); the slow one runs the tiny model with `--runner local`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest
from fsspec.implementations.local import LocalFileSystem

import jobs.commands.segment as segment_command
import jobs.pipeline.run as run_module
from jobs.exports.rows import MaskDataset
from jobs.commands.segment import run_segment
from jobs.pipeline import commit
from jobs.pipeline.payload import FinishedChunk, table_to_ipc
from jobs.pipeline.supersede import PENDING_FOLDER
from jobs.spec import JobSpec, ModelSpec, SpeedSpec
from jobs.storage.schema import CONCEPT, IMAGE_URI, INSTANCE, mask_row, rows_to_table

from fault_scenes import CONCEPTS, Killed, write_concepts, write_image


# ---------------------------------------------------------------------------- scenes


def _spec(concepts: list[Path], images: Path, output: Path) -> JobSpec:
    return JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), SpeedSpec(), concepts=tuple(map(str, concepts)),
                   input=str(images), output=str(output), shard_size=2, runner="local")


def _change(images: Path) -> None:
    """New content for one image, one image removed, one added: recomputed, carried and dropped files."""
    names = sorted(p.name for p in images.iterdir())
    write_image(images / names[0], 999)
    (images / names[-1]).unlink()
    write_image(images / "new.png", 77)


def _expected(images: Path, instances: dict[str, int] | None = None) -> Counter:
    return Counter((str(p), c, i) for p in images.iterdir() for c in CONCEPTS
                   for i in range((instances or {}).get(str(p), 1)))


# ---------------------------------------------------------------------------- readers


def _visible_versions(output: Path) -> Counter:
    """(folder, shard) -> published part files, as a dataset reader lists them."""
    found: Counter = Counter()
    for folder, dirs, files in os.walk(output):
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        for name in files:
            parsed = commit.parse_part_path(name)
            if parsed is not None and not name.startswith(("_", ".")):
                found[(folder, parsed[0])] += 1
    return found


KEY = [IMAGE_URI, CONCEPT, INSTANCE]


def _keys(frame: pd.DataFrame) -> Counter:
    return Counter(zip(frame[IMAGE_URI], frame[CONCEPT].astype(str), frame[INSTANCE]))


def _our_keys(output: Path) -> Counter:
    return Counter(k for t in commit.output_tables(str(output), columns=KEY) for k in zip(*t.to_pydict().values()))


def readers_see_one_version(output: Path, every_reader: bool = False) -> None:
    """pandas at every step; with `every_reader` also pyarrow's dataset, DuckDB and ours."""
    versions = _visible_versions(output)
    assert all(count == 1 for count in versions.values()), versions
    if not versions:
        return
    seen = [_keys(pd.read_parquet(output, columns=KEY))]
    if every_reader:
        seen += [_keys(ds.dataset(output, format="parquet", partitioning="hive").to_table(columns=KEY).to_pandas()),
                 _our_keys(output)]
        try:
            import duckdb
        except ImportError:
            duckdb = None
        if duckdb is not None:
            seen.append(_keys(duckdb.sql(
                f"SELECT {IMAGE_URI}, {CONCEPT}, {INSTANCE} FROM read_parquet('{output}/**/*.parquet', "
                f"hive_partitioning = true, hive_types = {{'{CONCEPT}': VARCHAR}})").df()))
    for keys in seen:
        assert keys and max(keys.values()) == 1, keys.most_common(3)


# ---------------------------------------------------------------------------- the kill


class Writer:
    """Counts the mutating storage steps under `output` and kills the run at step `kill_at`."""

    def __init__(self, output: Path, kill_at: int | None, after: bool) -> None:
        self.output, self.kill_at, self.after = str(output), kill_at, after
        self.steps: list[str] = []
        self.dead = False

    def _step(self, kind: str, act, *paths: str):
        if not any(str(p).startswith(self.output) for p in paths):
            return act()
        if self.dead:
            raise Killed(kind)
        readers_see_one_version(Path(self.output))
        self.steps.append(kind)
        killed = len(self.steps) == self.kill_at
        if killed and not self.after:
            self.dead = True
            raise Killed(kind)
        result = act()
        readers_see_one_version(Path(self.output))
        if killed:
            self.dead = True
            raise Killed(kind)
        return result

    def install(self, monkeypatch) -> None:
        real_replace, real_rm, real_link = os.replace, LocalFileSystem.rm_file, os.link

        def replace(source, target, **kwargs):
            kind = ("stage" if f"/{PENDING_FOLDER}/" in str(target) else
                    "promote" if f"/{PENDING_FOLDER}/" in str(source) else "publish")
            return self._step(kind, lambda: real_replace(source, target, **kwargs), target)

        def rm_file(fs, path, **kwargs):
            return self._step("remove", lambda: real_rm(fs, path, **kwargs), path)

        def link(source, target, **kwargs):  # a record created create-only (files.create_only)
            return self._step("create", lambda: real_link(source, target, **kwargs), target)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "link", link)
        monkeypatch.setattr(LocalFileSystem, "rm_file", rm_file)


def sweep(base: Path, spec_of, expected: Counter, work: Path, monkeypatch) -> set[str]:
    """Kill a run over a copy of `base` at every step, before and after it -> the kinds of steps seen."""
    kinds: set[str] = set()
    step = 1
    while True:
        for after in (False, True):
            output = work / f"out-{step}-{int(after)}"
            if base.exists():
                shutil.copytree(base, output)
            writer = Writer(output, step, after)
            with monkeypatch.context() as patch:
                writer.install(patch)
                try:
                    run_segment(spec_of(output), log=lambda line: None)
                    completed = True
                except Killed:
                    completed = False
            kinds.update(writer.steps)
            readers_see_one_version(output, every_reader=True)
            if completed:
                assert _keys(pd.read_parquet(output, columns=KEY)) == expected
                return kinds
            run_segment(spec_of(output), log=lambda line: None)  # the rerun
            readers_see_one_version(output, every_reader=True)
            assert _keys(pd.read_parquet(output, columns=KEY)) == expected, (step, after, writer.steps)
            assert _our_keys(output) == expected
            assert not list(output.rglob(f"{PENDING_FOLDER}/part-*")), "a staged file outlived the rerun"
            shutil.rmtree(output)
        step += 1


# ---------------------------------------------------------------------------- the fast sweep


def fake_pipeline(job, actor, shards, on_shard, on_progress=None) -> list:
    """The model stages replaced by generated rows (two instances for URLs holding "two"); the
    committer is the product's own, called shard by shard."""
    results = []
    for shard in shards:
        rows = [mask_row(url, name, method, job.fingerprint, f"sha-{url}", size=(24, 32), instance=i, present=True,
                         area=1, score=0.5)
                for url in shard.urls for name, method in job.labels() for i in range(2 if "two" in url else 1)]
        chunk = FinishedChunk(shard.shard, 0, len(shard.urls), table_to_ipc(rows_to_table(rows)),
                              encoded=len(shard.urls))
        results.append(on_shard(shard, [chunk]))
    return results


@pytest.fixture
def fake_model(monkeypatch, tiny_fingerprint):
    """The model stages and the weights' load replaced: only the commit path runs for real."""
    monkeypatch.setattr(segment_command, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(segment_command, "prepare_job", lambda spec, concepts, log: (tiny_fingerprint, None, None))  # no cache, no DINOv2


@pytest.fixture
def scene(tmp_path, tiny_fingerprint):
    images = tmp_path / "images"
    for index, name in enumerate(["a.png", "b.png", "c-two.png", "d.png", "e.png"]):
        write_image(images / name, index)
    concepts = write_concepts(tmp_path, tiny_fingerprint)
    return images, functools.partial(_spec, concepts, images)


def test_a_kill_at_every_step_of_a_new_output(scene, fake_model, tmp_path, monkeypatch):
    images, spec_of = scene
    kinds = sweep(tmp_path / "nothing", spec_of, _expected(images, {str(images / "c-two.png"): 2}), tmp_path,
                  monkeypatch)
    assert kinds == {"create", "publish"}  # the records, then the first version of each shard


def test_a_kill_at_every_step_of_a_rerun_that_supersedes(scene, fake_model, tmp_path, monkeypatch):
    images, spec_of = scene
    base = tmp_path / "base"
    run_segment(spec_of(base), log=lambda line: None)
    _change(images)
    kinds = sweep(base, spec_of, _expected(images, {str(images / "c-two.png"): 2}), tmp_path, monkeypatch)
    assert {"stage", "remove", "promote"} <= kinds


def test_the_dry_run_plans_what_the_run_does_after_recovering(scene, fake_model, tmp_path, monkeypatch):
    """Killed with the new versions staged: the dry run (read only) plans as the run will, which
    first finishes the staged versions, so neither recomputes them."""
    images, spec_of = scene
    output = tmp_path / "out"
    run_segment(spec_of(output), log=lambda line: None)
    _change(images)
    with monkeypatch.context() as patch:  # the old files are never removed: every new version stays staged
        patch.setattr(commit, "remove_files", lambda *args, **kwargs: [])
        run_segment(spec_of(output), log=lambda line: None)
    staged = list(output.glob(f"*/{PENDING_FOLDER}/part-*"))
    assert staged and all(count == 1 for count in _visible_versions(output).values())
    lines: list[str] = []
    assert run_segment(dataclasses.replace(spec_of(output), dry_run=True), log=lines.append) is None
    assert "dry run: 0 shards to run" in lines[-1], lines[-1]
    assert list(output.glob(f"*/{PENDING_FOLDER}/part-*")) == staged  # the dry run changed nothing
    assert run_segment(spec_of(output), log=lambda line: None).shards_run == 0
    assert _keys(pd.read_parquet(output, columns=KEY)) == _expected(images, {str(images / "c-two.png"): 2})


# ---------------------------------------------------------------------------- the tiny model


@pytest.mark.slow
def test_a_kill_at_every_step_with_the_tiny_model(tmp_path, tiny_fingerprint, monkeypatch):
    """The real stages, `--runner local`, over three images of which one changes (so that the
    sweep stays in minutes); commits on one thread so that step N is one step."""
    images = tmp_path / "images"
    for index, name in enumerate(["a.png", "b.png", "c.png"]):
        write_image(images / name, index)
    spec_of = functools.partial(_spec, write_concepts(tmp_path, tiny_fingerprint), images)
    monkeypatch.setattr(run_module, "ShardGatherer", functools.partial(run_module.ShardGatherer, threads=1))
    base = tmp_path / "base"
    run_segment(spec_of(base), log=lambda line: None)
    write_image(images / "a.png", 999)
    reference = tmp_path / "reference"  # the changed images in a new output: the rows a rerun must end with
    run_segment(spec_of(reference), log=lambda line: None)
    expected = _keys(pd.read_parquet(reference, columns=KEY))
    assert {(u, c) for u, c, _ in expected} == {(u, c) for u, c, _ in _expected(images)}
    kinds = sweep(base, spec_of, expected, tmp_path, monkeypatch)
    assert {"stage", "remove", "promote"} <= kinds


# ---------------------------------------------------------------------------- two versions found anyway


def _version(output: str, partition: str, digest: str, urls: list[str], created: str, supersedes=()) -> str:
    table = rows_to_table([mask_row(u, partition, "persam", "fp", f"sha-{u}-{digest}", size=(4, 4), area=1)
                           for u in urls])
    metadata = {"persam.created": created}
    if supersedes:
        metadata["persam.supersedes"] = json.dumps([os.path.basename(p) for p in supersedes])
    return commit.commit_shard(output, 0, digest, table, None, partition, metadata=metadata)


@pytest.mark.parametrize("case", ["newest created", "supersedes names the other", "three versions"])
def test_our_readers_keep_one_version_of_a_shard_published_twice(tmp_path, case):
    """What two different jobs racing on one output may leave (each job's commit publishes one
    version at a time): our readers read one."""
    output, partition = str(tmp_path / "out"), "cat"
    old = _version(output, partition, "a" * 12, ["x.jpg", "y.jpg"], "2026-01-01T00:00:00+00:00")
    if case == "newest created":
        kept = _version(output, partition, "b" * 12, ["x.jpg", "z.jpg"], "2026-01-02T00:00:00+00:00")
    elif case == "supersedes names the other":  # even though the clock of its writer was behind
        kept = _version(output, partition, "b" * 12, ["x.jpg", "z.jpg"], "2025-01-01T00:00:00+00:00", [old])
    else:
        middle = _version(output, partition, "c" * 12, ["x.jpg"], "2026-01-02T00:00:00+00:00", [old])
        kept = _version(output, partition, "b" * 12, ["x.jpg", "z.jpg"], "2026-01-03T00:00:00+00:00", [middle])
    assert commit.part_files(output) == [kept]
    rows = [r for t in commit.output_tables(output) for r in t.to_pylist()]
    assert sorted((r[IMAGE_URI], r[CONCEPT]) for r in rows) == sorted(
        (u, partition) for u in ("x.jpg", "z.jpg"))
    exported = [r for rows in MaskDataset(output, log=None).shards() for r in rows]
    assert sorted(r["content_sha256"] for r in exported) == sorted(r["content_sha256"] for r in rows)
