"""Outputs partitioned by concept (`concept=<name>/part-…`): provenance in every part file and
in the records, a concept added to an existing output computed alone while the others'
files stay byte-identical, the output read as one table by pyarrow, pandas and DuckDB,
and exactly once after a kill between a staged write and the removal.

Every run uses `--runner local` (the product's stages in this process): no Ray starts."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.commands.segment import run_segment
from jobs.pipeline import commit
from jobs.pipeline.supersede import PENDING_FOLDER
from jobs.spec import JobSpec, ModelSpec, SpeedSpec
from jobs.storage.outputs import OutputError
from jobs.storage.schema import CONCEPT, IMAGE_URI

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu"]
SECRET = "sEcReT-KeY-9876"
METADATA_KEYS = {"persam.version", "persam.model_type", "persam.model_fingerprint", "persam.concept_digests",
                 "persam.settings", "persam.created"}
PROVENANCE_KEYS = {"persam_version", "model_type", "model_fingerprint", "settings", "created", "input", "checkpoint"}


@pytest.fixture(scope="module")
def concepts(perseg_sample, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("concepts")
    for name in ("cat", "duck_toy"):
        assert main(["fit", *MODEL, "--image", str(perseg_sample / f"Images/{name}/00.jpg"),
                     "--mask", str(perseg_sample / f"Annotations/{name}/00.png"), "--name", name,
                     "--out", str(folder / f"{name}.json")]) == 0
    return {name: folder / f"{name}.json" for name in ("cat", "duck_toy")}


@pytest.fixture()
def images(perseg_sample, tmp_path) -> Path:
    """Three photos whose URLs fill both shards of --shard-size 2 (the hash of a URL includes
    the temp path: the folder's name is picked so that neither shard stays empty)."""
    names = (("a.jpg", "cat/01.jpg"), ("b.jpg", "cat/02.jpg"), ("c.jpg", "duck_toy/01.jpg"))
    folder = next(tmp_path / f"images{i}" for i in range(100)
                  if {commit.shard_of(str(tmp_path / f"images{i}" / n), 2) for n, _ in names} == {0, 1})
    folder.mkdir()
    for name, source in names:
        shutil.copyfile(perseg_sample / "Images" / source, folder / name)
    return folder


def _spec(concepts: dict[str, Path], names: tuple[str, ...], images: Path, output: Path) -> JobSpec:
    return JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), SpeedSpec(), concepts=tuple(str(concepts[n]) for n in names),
                   input=str(images), output=str(output), shard_size=2, runner="local")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _keys(output: Path) -> list[tuple[str, str]]:
    """(image, concept) of every row, read through the product's reader."""
    return [(row[IMAGE_URI], row[CONCEPT]) for table in commit.output_tables(str(output)) for row in table.to_pylist()]


def test_part_files_and_records_carry_provenance_without_credentials(concepts, perseg_sample, tmp_path, capsys):
    memory = fsspec.filesystem("memory")
    photos = [f"memory://lake/{n}.jpg" for n in ("a", "b")]
    for url in photos:
        memory.pipe(url, (perseg_sample / "Images/cat/01.jpg").read_bytes())
    manifest = f"memory://reader:{SECRET}@lake/list.txt"  # the input URL itself holds credentials
    memory.pipe(manifest, ("\n".join(photos) + "\n").encode())
    output = tmp_path / "masks"
    try:
        assert main(["segment", *MODEL, "--runner", "local", "--concept", str(concepts["cat"]),
                     "--concept", str(concepts["duck_toy"]), "--input", manifest, "--output", str(output)]) == 0
    finally:
        memory.rm([*photos, manifest])
    parts = sorted(output.rglob("part-*.parquet"))
    assert {p.parent.name for p in parts} == {"concept=cat", "concept=duck_toy"}
    for part in parts:
        meta = {k.decode(): v.decode() for k, v in pq.read_metadata(part).metadata.items()}
        assert METADATA_KEYS <= set(meta), part
        concept = part.parent.name.split("=", 1)[1]
        assert list(json.loads(meta["persam.concept_digests"])) == [concept]  # the file's own concept
        assert json.loads(meta["persam.settings"])["precision"] == "fp32" and meta["persam.model_type"] == "tiny"
        assert CONCEPT not in pq.read_schema(part).names  # Hive style: the folder names it

    record = commit.read_job_record(str(output))
    assert PROVENANCE_KEYS <= set(record) and record["layout"] == commit.BY_CONCEPT
    assert record["input"] == "memory://lake/list.txt"  # redacted
    assert set(record["concepts"]) == {"cat", "duck_toy"}
    for name, concept_record in record["concepts"].items():
        assert PROVENANCE_KEYS <= set(concept_record) and len(concept_record["digest"]) == 12
    written = b"".join(_files(output).values())
    assert SECRET.encode() not in written and SECRET not in "".join(capsys.readouterr())


def test_a_new_concept_is_computed_alone_and_the_output_reads_as_one_table(concepts, images, tmp_path):
    output = tmp_path / "masks"
    first = run_segment(_spec(concepts, ("cat",), images, output), log=lambda line: None)
    assert first.shards_run == 2 and first.rows == 3
    cat_files = {k: v for k, v in _files(output).items() if k.startswith("concept=cat/")}

    second = run_segment(_spec(concepts, ("cat", "duck_toy"), images, output), log=lambda line: None)
    assert second.rows == 3 and second.encoded == 3  # duck_toy's rows only; each image encoded once
    assert second.per_concept["cat"] == {"shards_skipped": 2}
    assert second.per_concept["duck_toy"] == {"shards_skipped": 0, "shards_run": 2, "rows": 3}
    assert {k: v for k, v in _files(output).items() if k.startswith("concept=cat/")} == cat_files  # byte-identical

    expected = Counter({"cat": 3, "duck_toy": 3})
    table = ds.dataset(output, format="parquet", partitioning="hive").to_table()
    assert Counter(table.column(CONCEPT).to_pylist()) == expected
    frame = pd.read_parquet(output)
    assert Counter(frame[CONCEPT].astype(str)) == expected and frame[IMAGE_URI].nunique() == 3
    assert sorted(_keys(output)) == sorted((str(images / n), c) for n in ("a.jpg", "b.jpg", "c.jpg") for c in expected)

    third = run_segment(_spec(concepts, ("duck_toy", "cat"), images, output), log=lambda line: None)
    assert third.shards_run == 0 and third.shards_skipped == 2  # every partition is complete


def test_duckdb_reads_the_partitioned_output_as_one_table(concepts, images, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    output = tmp_path / "masks"
    run_segment(_spec(concepts, ("cat", "duck_toy"), images, output), log=lambda line: None)
    counts = duckdb.sql(f"SELECT {CONCEPT}, count(*) FROM read_parquet('{output}/**/*.parquet', hive_partitioning = true, "
                        f"hive_types = {{'{CONCEPT}': VARCHAR}}) GROUP BY 1 ORDER BY 1").fetchall()
    assert counts == [("cat", 3), ("duck_toy", 3)]


def test_a_new_image_and_a_new_concept_encode_each_image_once(concepts, images, perseg_sample, tmp_path):
    output = tmp_path / "masks"
    (images / "c.jpg").unlink()
    run_segment(_spec(concepts, ("cat",), images, output), log=lambda line: None)
    shutil.copyfile(perseg_sample / "Images/duck_toy/01.jpg", images / "c.jpg")
    summary = run_segment(_spec(concepts, ("cat", "duck_toy"), images, output), log=lambda line: None)
    # c.jpg's shard lacks both concepts, the other shard only duck_toy: two groups, one encode per image
    assert summary.encoded == 3 - summary.carried and summary.per_concept["duck_toy"]["rows"] == 3
    keys = _keys(output)
    assert len(keys) == len(set(keys)) == 6


def test_exactly_once_after_a_kill_between_publish_and_removal(concepts, images, perseg_sample, tmp_path, monkeypatch):
    output = tmp_path / "masks"
    spec = _spec(concepts, ("cat", "duck_toy"), images, output)
    run_segment(spec, log=lambda line: None)
    (images / "b.jpg").write_bytes((perseg_sample / "Images/duck_toy/02.jpg").read_bytes())  # b.jpg's shard changes
    with monkeypatch.context() as patch:  # killed after each staged write, before the old files go
        patch.setattr(commit, "remove_files", lambda *args, **kwargs: None)
        run_segment(spec, log=lambda line: None)
    # readers see one version of each shard (the old one) while the new one waits, staged, unlisted
    assert len(list(output.rglob("part-*.parquet"))) == 4
    assert len(list(output.glob(f"concept=*/{PENDING_FOLDER}/part-*"))) == 2
    keys = _keys(output)
    assert len(keys) == len(set(keys)) == 6 and len(pd.read_parquet(output)) == 6
    repaired = run_segment(spec, log=lambda line: None)
    assert repaired.shards_run == 0  # nothing to compute: the next run only drops the superseded files
    keys = _keys(output)
    assert len(keys) == len(set(keys)) == 6
    assert len(list(output.rglob("part-*.parquet"))) == 4  # 2 shards x 2 concepts


def test_concept_names_that_cannot_name_a_folder_and_refitted_concepts_are_refused(tmp_path):
    output = str(tmp_path / "masks")
    record = commit.JobRecord(1, ("my cat",), "tiny:0", {}, {"my cat": "0" * 12})
    with pytest.raises(OutputError, match="partition folder"):
        commit.open_output(output, record)
    assert not (tmp_path / "masks" / commit.JOB_FILE).exists()  # refused before anything was written

    cat = commit.JobRecord(1, ("cat",), "tiny:0", {}, {"cat": "0" * 12})
    commit.open_output(output, cat)
    with pytest.raises(OutputError, match="other contents"):
        commit.open_output(output, replace(cat, concept_digests={"cat": "1" * 12}))
    with pytest.raises(OutputError, match="another --output"):
        commit.open_output(output, replace(cat, model_fingerprint="tiny:1"))
