"""jobs.pipeline.commit, the shard commit protocol: stable shard hashing, the job record,
committed shards, and the rerun plan. Without Ray: the functions are called directly."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pyarrow.parquet as pq
import pytest

from jobs.pipeline import commit
from jobs.storage.outputs import OutputError
from jobs.storage.schema import MASK_SCHEMA, read_part, rows_to_table


# ---------------------------------------------------------------------------- shards


def test_shard_of_is_a_stable_hash():
    # Pinned values: changing the hash would regroup every existing job's shards on resume.
    assert commit.shard_of("s3://bucket/images/000001.jpg", 1000) == 527
    assert commit.shard_of("/data/a.png", 7) == 3
    url = "gs://lake/x/y.tif"
    expected = int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % 13
    assert commit.shard_of(url, 13) == expected


@pytest.mark.parametrize("num_shards", [1, 2, 7, 1000, 123_457])
def test_shard_of_is_in_range_and_spread(num_shards):
    urls = [f"s3://bucket/img/{i:06d}.jpg" for i in range(2000)]
    shards = [commit.shard_of(url, num_shards) for url in urls]
    assert all(0 <= shard < num_shards for shard in shards)
    if num_shards <= 7:
        assert set(shards) == set(range(num_shards))  # every shard gets images
        counts = [shards.count(s) for s in range(num_shards)]
        assert max(counts) < 2 * min(counts)


def test_shard_count():
    assert commit.shard_count(0, 32) == 1
    assert commit.shard_count(1, 32) == 1
    assert commit.shard_count(32, 32) == 1
    assert commit.shard_count(33, 32) == 2
    assert commit.shard_count(10, 0) == 10  # a non-positive shard size means one image per shard


def _record(concepts=("cat", "duck"), num_shards=4, fingerprint="tiny:0123456789abcdef"):
    return commit.JobRecord(num_shards, tuple(concepts), fingerprint)


def _table(url="a.jpg", concept="cat"):
    return rows_to_table([{"image_uri": url, "concept": concept, "area": 0, "error": "x"}])


def test_open_output_records_and_lists_committed_shards(tmp_path):
    output = str(tmp_path / "masks")
    record, committed = commit.open_output(output, _record())
    assert committed == {"cat": {}, "duck": {}} and record.num_shards == 4
    job = json.loads((tmp_path / "masks" / commit.JOB_FILE).read_text())
    assert job["num_shards"] == 4 and job["layout"] == commit.BY_CONCEPT
    assert job["model_fingerprint"] == "tiny:0123456789abcdef"
    for concept in ("cat", "duck"):  # one record per concept's partition
        assert json.loads((tmp_path / "masks" / f"concept={concept}" / "_persam_concept.json").read_text())["name"] == concept

    digest = commit.urls_digest(["a.jpg"])
    path = commit.commit_shard(output, 3, digest, _table(), None, "cat")
    assert path.endswith(f"concept=cat/part-00003-{digest}.parquet")
    assert pq.read_schema(path).names == [n for n in MASK_SCHEMA.names if n != "concept"]  # the folder names it
    assert read_part(path).schema.equals(MASK_SCHEMA)  # the concept column restored from the folder
    (tmp_path / "masks" / "concept=cat" / f".part-00001-{digest}.parquet.tmp-deadbeef").write_bytes(b"half")  # a crashed publish

    # A rerun with another shard count (e.g. more images) keeps the recorded grouping.
    record, committed = commit.open_output(output, _record(concepts=("duck", "cat"), num_shards=9))
    assert record.num_shards == 4
    assert committed == {"duck": {}, "cat": {3: {digest: path}}}


def test_open_output_refuses_other_model_weights(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_output(output, _record())
    with pytest.raises(OutputError, match="another --output"):
        commit.open_output(output, _record(fingerprint="tiny:ffffffffffffffff"))


def test_open_output_unwritable_output(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="writable"):
        commit.open_output(str(tmp_path / "a_file" / "masks"), _record())


def test_open_output_on_an_object_store():
    output = "memory://persam-test-job/masks"
    try:
        commit.open_output(output, _record())
        commit.commit_shard(output, 2, "0123456789ab", _table(), None, "cat")
        assert set(commit.open_output(output, _record())[1]["cat"]) == {2}
    finally:
        fsspec.filesystem("memory").rm("/persam-test-job", recursive=True)


def test_open_output_reads_shard_ids_past_five_digits(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_output(output, _record(num_shards=200_000))
    commit.commit_shard(output, 123_456, "0123456789ab", _table(), None, "cat")
    assert commit.shard_name(123_456, "0123456789ab") == "part-123456-0123456789ab.parquet"
    assert set(commit.open_output(output, _record(num_shards=200_000))[1]["cat"]) == {123_456}


def test_plan_reruns_changed_shards_and_supersedes_their_old_files():
    committed = {0: {commit.urls_digest(["a.jpg"]): "out/part-00000-old.parquet"}}
    urls = ["a.jpg", "b.jpg"]
    plan = commit.plan_shards(urls, 1, committed)
    assert [s.urls for s in plan.to_run] == [("a.jpg", "b.jpg")]
    assert plan.superseded == ["out/part-00000-old.parquet"] and plan.up_to_date == 0
    current = {0: {commit.urls_digest(urls): "out/part-00000-new.parquet", "aaaaaaaaaaaa": "out/stale.parquet"}}
    plan = commit.plan_shards(urls, 1, current)
    assert plan.to_run == [] and plan.up_to_date == 1 and plan.superseded == ["out/stale.parquet"]
