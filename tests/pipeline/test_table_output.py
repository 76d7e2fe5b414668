"""The commit protocol on an Apache Iceberg table (pipeline/table_output.py): the twins of the
folder output's exactly-once and incremental tests (test_commit_faults.py,
test_partitioned_outputs.py, test_commit_races.py).

The model stages are replaced by generated rows (the commit path is the real one); the
table lives in the embedded catalog under a temporary PERSAM_CACHE. Every catalog commit
is a step: a run is killed before or after step N, for N = 1, 2, ... until a run
completes; at every step a reader of the table sees no row twice, and a rerun ends with
exactly one row per (image, concept, instance)."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from pyiceberg.table import Transaction

import jobs.commands.segment as segment_command
import jobs.pipeline.table_output as table_output
from jobs.commands.segment import run_segment
from jobs.pipeline.output import mask_output
from jobs.pipeline.payload import FinishedChunk, table_to_ipc
from jobs.spec import JobSpec, ModelSpec, SpeedSpec
from jobs.storage.iceberg_table import JOB_PROPERTY, SHARD_PROPERTY, open_catalog
from jobs.storage.outputs import OutputError
from jobs.storage.sharding import shard_of
from jobs.storage.schema import CONCEPT, CONTENT_SHA256, IMAGE_URI, INSTANCE, mask_row, rows_to_table
from persam_core.concept import Concept

from fault_scenes import CONCEPTS, Killed, write_concepts, write_image

TABLE = "masks.cats"
KEY = [IMAGE_URI, CONCEPT, INSTANCE]


def _spec(concepts: list[Path], images: Path, table: str = TABLE, **changes) -> JobSpec:
    spec = JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), SpeedSpec(), concepts=tuple(map(str, concepts)),
                   input=str(images), table=table, shard_size=2, runner="local")
    return dataclasses.replace(spec, **changes)


def _version(url: str) -> str:
    """A stand-in for the image's content hash: the file's bytes."""
    return str(hash(Path(url).read_bytes()))


def fake_pipeline(job, actor, shards, on_shard, on_progress=None) -> list[dict]:
    """Generated rows (two instances for URLs holding "two"); the committer is the product's."""
    fake_pipeline.calls += 1
    results = []
    for shard in shards:
        rows = [mask_row(url, name, method, job.fingerprint, _version(url), size=(24, 32), instance=i, present=True,
                         area=1, score=0.5)
                for url in shard.urls for name, method in job.labels() for i in range(2 if "two" in Path(url).name else 1)]
        chunk = FinishedChunk(shard.shard, 0, len(shard.urls), table_to_ipc(rows_to_table(rows)),
                              encoded=len(shard.urls))
        results.append(on_shard(shard, [chunk]))
    return results


fake_pipeline.calls = 0


@pytest.fixture
def fake_model(monkeypatch, tiny_fingerprint, tmp_path):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))  # the embedded catalog lives here
    monkeypatch.setattr(segment_command, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(segment_command, "prepare_job", lambda spec, concepts, log: (tiny_fingerprint, None, None))


@pytest.fixture
def scene(tmp_path, tiny_fingerprint):
    """Five images in --shard-size 2's three shards, spread over at least two of them (the hash
    of a URL includes the temp path: the folder's name is picked)."""
    names = ["a.png", "b.png", "c-two.png", "d.png", "e.png"]
    images = next(tmp_path / f"images{i}" for i in range(100)
                  if len({shard_of(str(tmp_path / f"images{i}" / n), 3) for n in names}) >= 2)
    for index, name in enumerate(names):
        write_image(images / name, index)
    return images, write_concepts(tmp_path, tiny_fingerprint)


def _expected(images: Path, concepts=CONCEPTS) -> Counter:
    return Counter((str(p), c, i) for p in images.iterdir() for c in concepts for i in range(2 if "two" in p.name else 1))


def _keys(table: str = TABLE, catalog: str | None = None) -> Counter:
    rows = mask_output(None, table, catalog).rows(KEY)
    return Counter(zip(*(rows.column(c).to_pylist() for c in KEY)))


def _pyiceberg_table(name: str = TABLE):
    return open_catalog(None).load_table(name)


@pytest.mark.slow
def test_a_kill_at_every_commit_then_a_rerun_ends_exactly_once(scene, fake_model, monkeypatch):
    """New table, then a rerun after a change: killed before and after each catalog commit."""
    images, concepts = scene
    for change in (False, True):
        step = 1
        while True:
            completed = None
            for after in (False, True):
                table = f"masks.k{int(change)}_{step}_{int(after)}"
                if change:
                    write_image(images / "a.png", 0)  # the base's content
                    run_segment(_spec(concepts, images, table), log=lambda line: None)
                    write_image(images / "a.png", 999)
                calls = Counter()
                real = Transaction.commit_transaction

                def dying(self, after=after, calls=calls):
                    calls["n"] += 1
                    if calls["n"] == step and not after:
                        raise Killed
                    result = real(self)
                    if calls["n"] == step:
                        raise Killed
                    return result

                with monkeypatch.context() as patch:
                    patch.setattr(Transaction, "commit_transaction", dying)
                    try:
                        run_segment(_spec(concepts, images, table), log=lambda line: None)
                        completed = True
                    except Killed:
                        completed = False
                seen = _keys(table) if _pyiceberg_table(table) is not None else Counter()
                assert not seen or max(seen.values()) == 1, (step, after, seen.most_common(2))
                run_segment(_spec(concepts, images, table), log=lambda line: None)  # the rerun
                assert _keys(table) == _expected(images), (change, step, after)
            if completed:
                break
            step += 1
        # new: the records, then one commit per (shard, concept); change: the changed shard's two
        assert step > (2 if change else 3)


@pytest.mark.parametrize("after", [False, True])
def test_killed_after_some_shards_on_a_catalog_of_the_environment(scene, fake_model, tmp_path, monkeypatch, after):
    """The catalog `lake` configured as pyiceberg's users do; killed at its third commit."""
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__TYPE", "sql")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__URI", f"sqlite:///{tmp_path}/catalog.db")
    monkeypatch.setenv("PYICEBERG_CATALOG__LAKE__WAREHOUSE", f"file://{tmp_path}/warehouse")
    images, concepts = scene
    calls = Counter()
    real = Transaction.commit_transaction

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 3 and not after:
            raise Killed
        result = real(self)
        if calls["n"] == 3:
            raise Killed
        return result

    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(Transaction, "commit_transaction", dying)
        run_segment(_spec(concepts, images, catalog="lake"), log=lambda line: None)
    seen = _keys(TABLE, "lake")
    assert seen and max(seen.values()) == 1 and seen != _expected(images)  # some shards committed, once
    summary = run_segment(_spec(concepts, images, catalog="lake"), log=lambda line: None)
    assert sum(c["shards_skipped"] for c in summary.per_concept.values()) >= 1  # committed ones not redone
    assert _keys(TABLE, "lake") == _expected(images)
    assert list((tmp_path / "warehouse").rglob("*.parquet"))


def test_a_rerun_skips_a_second_concept_adds_a_partition(scene, fake_model):
    images, concepts = scene
    first = run_segment(_spec(concepts[:1], images), log=lambda line: None)
    shards = first.shards_run
    assert shards >= 2 and first.rows == 6
    cat_files = {f.file.file_path for f in _pyiceberg_table().scan().plan_files()}
    again = run_segment(_spec(concepts[:1], images), log=lambda line: None)
    assert again.shards_run == 0 and again.shards_skipped == shards

    both = run_segment(_spec(concepts, images), log=lambda line: None)
    assert both.per_concept["cat"] == {"shards_skipped": shards}
    assert both.per_concept["dog"] == {"shards_skipped": 0, "shards_run": shards, "rows": 6}
    table = _pyiceberg_table()
    assert [f.name for f in table.spec().fields] == [CONCEPT] and table.spec().fields[0].transform.__str__() == "identity"
    files = table.scan().plan_files()
    assert {f.file.partition[0] for f in files} == set(CONCEPTS)  # one partition per concept
    assert cat_files <= {f.file.file_path for f in files}  # cat's data files untouched
    assert _keys() == _expected(images)


def test_the_table_carries_the_schema_provenance_and_each_commits_shard_and_digest(scene, fake_model):
    from jobs.storage.schema import MASK_SCHEMA

    images, concepts = scene
    shards = run_segment(_spec(concepts, images), log=lambda line: None).shards_run
    table = _pyiceberg_table()
    assert table.schema().as_arrow().names == MASK_SCHEMA.names
    assert table.scan().to_arrow().schema.remove_metadata() == MASK_SCHEMA
    properties = table.properties
    record = json.loads(properties[JOB_PROPERTY])
    assert {"persam_version", "model_type", "model_fingerprint", "input", "created", "num_shards"} <= set(record)
    committed_keys = {k: v for k, v in properties.items() if k.startswith(SHARD_PROPERTY)}
    assert len(committed_keys) == 2 * shards  # each concept's shards, each with its digest
    summaries = [s.summary.additional_properties for s in table.snapshots()]
    committed = {(s["persam.concept"], int(s["persam.shard"]), s["persam.digest"]) for s in summaries}
    assert {(k[len(SHARD_PROPERTY):].rsplit(".", 1)[0], int(k.rsplit(".", 1)[1]), v) for k, v in committed_keys.items()} \
        == committed
    assert all("persam.model_fingerprint" in s for s in summaries)


def test_a_changed_image_replaces_its_shard_in_one_commit(scene, fake_model, monkeypatch):
    """After every catalog commit of the rerun, a reader sees each image exactly once per
    concept and instance: the changed one old or new (never both, never neither), the
    removed one until its shard is committed, the added one from its shard's commit on."""
    images, concepts = scene
    run_segment(_spec(concepts, images), log=lambda line: None)
    write_image(images / "a.png", 999)
    (images / "e.png").unlink()
    write_image(images / "f.png", 77)
    states: list[Counter] = []
    real = Transaction.commit_transaction

    def watched(self):
        result = real(self)
        states.append(_keys())
        return result

    with monkeypatch.context() as patch:
        patch.setattr(Transaction, "commit_transaction", watched)
        summary = run_segment(_spec(concepts, images), log=lambda line: None)
    assert summary.removed == 1 and states
    steady = {str(images / n) for n in ("b.png", "c-two.png", "d.png", "a.png")}
    for keys in states:
        assert max(keys.values()) == 1
        for url in steady:
            assert {c for u, c, _ in keys if u == url} == set(CONCEPTS), url
    assert _keys() == _expected(images)
    new_sha = _version(str(images / "a.png"))
    rows = mask_output(None, TABLE).rows([IMAGE_URI, CONTENT_SHA256]).to_pylist()
    assert {r[CONTENT_SHA256] for r in rows if r[IMAGE_URI] == str(images / "a.png")} == {new_sha}


def test_two_racing_commits_of_one_shard_end_with_one_copy(scene, fake_model, monkeypatch):
    """B builds its transaction on the snapshot before A's commit: the catalog refuses B's,
    B reloads and finds the digest committed (identical work) or replaces A's version."""
    images, concepts = scene
    run_segment(_spec(concepts[:1], images), log=lambda line: None)
    output = mask_output(None, TABLE)
    rows = output.rows()
    count = json.loads(_pyiceberg_table().properties[JOB_PROPERTY])["num_shards"]
    number = shard_of(rows.column(IMAGE_URI)[0].as_py(), count)  # a shard holding rows
    shard = rows.filter(pa.array([shard_of(u, count) == number for u in rows.column(IMAGE_URI).to_pylist()]))
    shard_rows = table_output.shard_rows
    # the same version twice (B finds it committed), then two versions (B's replaces A's)
    for theirs, digest in (("0123456789ab", "0123456789ab"), ("ba9876543210", "00000000000a")):
        racer = mask_output(None, TABLE)
        raced = []

        def late(table, concept, shard_number, columns=None, raced=raced, theirs=theirs):
            if not raced:  # A commits between B's load and B's commit
                raced.append(True)
                racer.commit_shard(number, theirs, shard, "cat")
            return shard_rows(table, concept, shard_number, columns)

        with monkeypatch.context() as patch:
            patch.setattr(table_output, "shard_rows", late)
            output.commit_shard(number, digest, shard, "cat")
        assert raced
        properties = _pyiceberg_table().properties
        assert properties[f"{SHARD_PROPERTY}cat.{number:05d}"] == digest
        keys = _keys()
        assert max(keys.values()) == 1 and sum(keys.values()) == rows.num_rows


def test_two_identical_runs_at_once_end_with_one_copy(scene, fake_model):
    images, concepts = scene
    errors = []

    def run():
        try:
            run_segment(_spec(concepts, images), log=lambda line: None)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert _keys() == _expected(images)


def test_a_different_job_on_the_table_is_refused_before_work(scene, fake_model, tiny_fingerprint):
    images, concepts = scene
    run_segment(_spec(concepts[:1], images), log=lambda line: None)
    before = fake_pipeline.calls
    with pytest.raises(OutputError, match="masks.cats .*holds a job of model"):
        run_segment(_spec(concepts[:1], images, max_instances=3), log=lambda line: None)
    refitted = concepts[0].parent / "refit" / "cat.json"
    refitted.parent.mkdir()
    feature = np.random.default_rng(7).standard_normal(256).astype(np.float32)
    feature /= np.linalg.norm(feature)
    refitted.write_text(Concept("cat", "persam", feature, feature, tiny_fingerprint).to_json())
    with pytest.raises(OutputError, match="concept 'cat' there has other contents"):
        run_segment(_spec([refitted], images), log=lambda line: None)
    assert fake_pipeline.calls == before  # refused before any work


def test_the_dry_run_plans_against_the_table_and_writes_nothing(scene, fake_model):
    images, concepts = scene
    lines: list[str] = []
    assert run_segment(_spec(concepts, images, dry_run=True), log=lines.append) is None
    assert "new output" in lines[-2] and _pyiceberg_table_or_none() is None
    shards = run_segment(_spec(concepts[:1], images), log=lambda line: None).shards_run
    write_image(images / "a.png", 999)
    snapshot = _pyiceberg_table().current_snapshot().snapshot_id
    lines.clear()
    run_segment(_spec(concepts, images, dry_run=True), log=lines.append)
    assert "table masks.cats (catalog embedded)" in lines[-2]
    assert (f"dry run: {shards} shards to run ({shards - 1} new, 1 to recompute: images changed), "
            "0 already committed") in lines[-1], lines
    assert _pyiceberg_table().current_snapshot().snapshot_id == snapshot


def _pyiceberg_table_or_none():
    from jobs.storage.iceberg_table import load_table

    return load_table(open_catalog(None), TABLE)


def test_a_manifest_of_several_waves_is_refused_after_its_first(scene, fake_model, monkeypatch, tmp_path):
    import jobs.storage.listing as listing

    images, concepts = scene
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(images.iterdir())))
    monkeypatch.setattr(listing, "MANIFEST_WAVE_IMAGES", 3)
    with pytest.raises(OutputError, match="more than one wave"):
        run_segment(_spec(concepts[:1], images, input=str(manifest)), log=lambda line: None)
    keys = _keys()
    assert keys and max(keys.values()) == 1  # the first wave committed, once


@pytest.mark.parametrize("name", ["cats", "masks..cats", "masks.cats;drop", "1masks.cats", ""])
def test_a_bad_table_name_is_one_line(name):
    with pytest.raises(OutputError, match="give NAMESPACE.TABLE"):
        mask_output(None, name)


def test_an_emptied_shard_loses_its_rows(scene, fake_model):
    """Every image of one shard deleted: the shard is not rerun, its rows go (output.remove)."""
    images, concepts = scene
    run_segment(_spec(concepts, images), log=lambda line: None)
    count = json.loads(_pyiceberg_table().properties[JOB_PROPERTY])["num_shards"]
    by_shard: dict[int, list[Path]] = {}
    for path in sorted(images.iterdir()):
        by_shard.setdefault(shard_of(str(path), count), []).append(path)
    emptied, gone = next((s, paths) for s, paths in sorted(by_shard.items()) if len(by_shard) > 1)
    for path in gone:
        path.unlink()
    summary = run_segment(_spec(concepts, images), log=lambda line: None)
    assert summary.shards_run == 0 and summary.removed == len(gone)
    assert _keys() == _expected(images)
    assert not any(k.endswith(f".{emptied:05d}") for k in _pyiceberg_table().properties if k.startswith(SHARD_PROPERTY))


def test_a_concept_recorded_meanwhile_with_other_contents_stops_the_commit(scene, fake_model, tiny_fingerprint):
    """Two runs of two contents under one name recorded at the same instant: each shard commit
    checks the partition's record on the snapshot it builds on, so the later one stops."""
    images, concepts = scene
    run_segment(_spec(concepts[:1], images), log=lambda line: None)
    output = mask_output(None, TABLE)
    rows = output.rows()
    table = _pyiceberg_table()
    with table.transaction() as transaction:  # another run's record of `cat`, written over ours
        record = json.loads(table.properties["persam.concept.cat"])
        transaction.set_properties({"persam.concept.cat": json.dumps({**record, "digest": "0" * 12})})
    ours = json.dumps({"cat": record["digest"]})
    with pytest.raises(OutputError, match="recorded by another run meanwhile"):
        output.commit_shard(0, "a" * 12, rows.slice(0, 1), "cat", {"persam.concept_digests": ours})
    assert _keys() == Counter(_expected(images, ("cat",)))
