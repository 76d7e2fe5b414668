"""Reading a masks dataset for export: foreign Parquet files are skipped with one line (never
a KeyError traceback), concept partitions are read as one table, every kind's output check."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from export_data import ok, run_cli, small_lake
from jobs.exports import EXPORT_KINDS

KIND_OUTPUTS = {"coco": "coco.json", "label-studio": "tasks.json", "hf-dataset": "hf", "overlays": "review",
                "subjects": "subjects"}


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_foreign_parquet_files_are_skipped_with_one_line_each(kind, tmp_path):
    lake = small_lake(tmp_path)
    pq.write_table(pa.table({"note": ["not ours"]}), lake.masks / "notes.parquet")
    pq.write_table(pa.table({"image_uri": ["x.jpg"], "concept": ["cat"]}), lake.masks / "part-00007-0123456789ab.parquet")
    (lake.masks / "part-00008-0123456789ab.parquet").write_bytes(b"PAR1 but not really")
    result = run_cli(["export", kind, "--masks", str(lake.masks), "--output", str(tmp_path / KIND_OUTPUTS[kind])])
    skipped = sorted(line for line in ok(result).splitlines() if line.startswith("skipped: "))
    assert [line.split()[1] for line in skipped] == [
        "notes.parquet", "part-00007-0123456789ab.parquet", "part-00008-0123456789ab.parquet"]
    assert "lacks the columns" in skipped[0] and "unreadable: " in skipped[2]
    assert result.err == "" and "KeyError" not in result.out


def test_only_foreign_files_is_one_error_line_and_no_output(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    pq.write_table(pa.table({"note": ["not ours"]}), masks / "notes.parquet")
    out = tmp_path / "new" / "coco.json"
    result = run_cli(["export", "coco", "--masks", str(masks), "--output", str(out)])
    assert result.rc == 3 and len(result.err.strip().splitlines()) == 1
    assert "no masks Parquet of `persam segment` found (lacks the columns" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "new").exists()


def test_concept_partitions_read_as_one_table_one_task_per_image(tmp_path):
    """`concept=<name>/part-<shard>-….parquet` (the concept in the folder name, not the file):
    the shards of both concepts are read together, so an image is one Label Studio task."""
    lake = small_lake(tmp_path)
    partitioned = tmp_path / "partitioned"
    for path in lake.masks.glob("*.parquet"):
        table = pq.read_table(path)
        for concept in ("cat", "dog"):
            part = table.filter(pa.compute.equal(table.column("concept"), concept)).drop_columns(["concept"])
            (partitioned / f"concept={concept}").mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha1(concept.encode()).hexdigest()[:12]  # same shard number, another digest
            pq.write_table(part, partitioned / f"concept={concept}" / f"{path.name[:11]}{digest}.parquet")
    (partitioned / "_persam_job.json").write_text("{}")
    out = tmp_path / "tasks.json"
    ok(run_cli(["export", "label-studio", "--masks", str(partitioned), "--output", str(out)]))
    tasks = json.loads(out.read_text())
    assert len(tasks) == 3
    concepts = sorted(r["value"]["brushlabels"][0] for t in tasks for r in t["predictions"][0]["result"])
    assert concepts == ["cat", "cat", "cat", "dog", "dog"]
    coco = tmp_path / "coco.json"
    ok(run_cli(["export", "coco", "--masks", str(partitioned), "--output", str(coco)]))
    document = json.loads(coco.read_text())
    assert len(document["images"]) == 3 and len(document["annotations"]) == 5
    assert [c["name"] for c in document["categories"]] == ["cat", "dog"]


def test_a_single_parquet_file_is_a_masks_url_too(tmp_path):
    lake = small_lake(tmp_path)
    merged = tmp_path / "all.parquet"
    pq.write_table(pa.concat_tables([pq.read_table(p) for p in sorted(lake.masks.glob("*.parquet"))]), merged,
                   row_group_size=3)  # several row groups: read one at a time
    out = tmp_path / "coco.json"
    ok(run_cli(["export", "coco", "--masks", str(merged), "--output", str(out)]))
    assert len(json.loads(out.read_text())["annotations"]) == 5


@pytest.mark.parametrize("kind", EXPORT_KINDS)
def test_an_output_that_cannot_be_written_fails_before_reading(kind, tmp_path):
    target = tmp_path / "taken"
    if kind in ("coco", "label-studio"):
        target.mkdir()  # a file export given an existing folder
    else:
        target.write_text("x")  # a folder export given an existing file
    result = run_cli(["export", kind, "--masks", str(tmp_path / "no-such-masks"), "--output", str(target)])
    assert result.rc == 3 and str(target) in result.err and "no-such-masks" not in result.err
