"""jobs.pipeline.commit under concurrent runs: tolerant removals, stale temp sweeping, foreign
files reported and left alone. No Ray: the functions are called directly. (Odd names and
formats: storage/test_names_and_formats.py.)"""

from __future__ import annotations

import json
import os
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.pipeline import commit
from jobs.storage import schema
from jobs.storage.outputs import OutputError
from jobs.storage.schema import rows_to_table


def _record(num_shards: int = 4) -> commit.JobRecord:
    return commit.JobRecord(num_shards, ("cat",), "tiny:0123456789abcdef")


def _table(url: str = "a.jpg") -> pa.Table:
    return rows_to_table([{"image_uri": url, "concept": "cat", "area": 0, "error": "x"}])


# ---------------------------------------------------------------------------- commit races


def test_removal_tolerates_a_file_another_run_removed_first(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_output(output, _record())
    old = commit.commit_shard(output, 1, commit.urls_digest(["a.jpg"]), _table(), None, "cat")
    new = commit.commit_shard(output, 1, commit.urls_digest(["a.jpg", "b.jpg"]), _table(), None, "cat")
    _, committed = commit.open_output(output, _record())  # both runs list the old file ...
    assert old in committed["cat"][1].values()
    os.remove(old)  # ... the other run removes it between the listing and our removal
    lines: list[str] = []
    commit.remove_files(output, [old], log=lines.append)  # used to raise FileNotFoundError
    assert lines == [] and os.path.exists(new) and not os.path.exists(old)
    commit.remove_files(output, [old, old])  # removed twice over: still nothing to say


def test_stale_temp_files_are_swept_fresh_ones_kept(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_output(output, _record())
    root = tmp_path / "masks"
    stale = root / "concept=cat" / f".part-00001-{'a' * 12}.parquet.tmp-{'b' * 32}"
    stale_job = root / f".{commit.JOB_FILE}.tmp-{'c' * 32}"
    fresh = root / "concept=cat" / f".part-00002-{'a' * 12}.parquet.tmp-{'d' * 32}"  # a live writer may own it
    other_tool = root / "upload.tmp-x"  # not our temp name: foreign, never swept
    for path in (stale, stale_job, fresh, other_tool):
        path.write_bytes(b"half")
    hours_ago = time.time() - commit.STALE_TEMP_SECONDS - 60
    for path in (stale, stale_job, other_tool):
        os.utime(path, (hours_ago, hours_ago))
    lines: list[str] = []
    _, committed = commit.open_output(output, _record(), log=lines.append)
    assert committed == {"cat": {}}
    assert not stale.exists() and not stale_job.exists()
    assert fresh.exists() and other_tool.exists()
    assert len(lines) == 1 and "upload.tmp-x" in lines[0] and "left alone" in lines[0]


def test_foreign_files_are_reported_never_read_nor_deleted(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_output(output, _record(num_shards=1))
    root = tmp_path / "masks"
    partition = root / "concept=cat"
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "label": ["x"]}), partition / "notes.parquet")
    lookalike = partition / f"part-00000-{'f' * 12}.parquet"  # a part name, another schema
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "label": [1]}), lookalike)
    garbage = partition / f"part-00000-{'e' * 12}.parquet"  # a part name, not Parquet at all
    garbage.write_bytes(b"not parquet")
    ours = commit.commit_shard(output, 0, commit.urls_digest(["z.jpg"]), _table("z.jpg"), None, "cat")

    lines: list[str] = []
    _, committed = commit.open_output(output, _record(num_shards=1), log=lines.append)
    assert len(lines) == 1 and "notes.parquet" in lines[0] and "\n" not in lines[0]
    assert set(committed["cat"][0].values()) == {str(lookalike), str(garbage), ours}

    # The image set changed: all three part-named files are superseded, only ours is ours.
    plan = commit.plan_shards(["a.jpg"], 1, committed["cat"])
    assert sorted(plan.superseded) == sorted([str(lookalike), str(garbage), ours])
    table = schema.read_parts(plan.superseded)
    assert table.column("image_uri").to_pylist() == ["z.jpg"]  # the look-alike's rows are not ours
    lines.clear()
    commit.remove_files(output, plan.superseded, log=lines.append)
    assert not os.path.exists(ours) and lookalike.exists() and garbage.exists()
    assert (partition / "notes.parquet").exists()
    assert len(lines) == 1 and lookalike.name in lines[0] and garbage.name in lines[0]


def test_foreign_note_shows_base_names_only():
    lines: list[str] = []
    paths = [f"bucket/masks/extra-{i}.txt" for i in range(8)]
    commit.report_foreign(paths, lines.append)
    assert lines == ["note: the output holds 8 files persam did not write, left alone: "
                     "extra-0.txt, extra-1.txt, extra-2.txt, extra-3.txt, extra-4.txt and 3 more"]


def test_a_publish_in_flight_is_hidden_from_whole_output_readers(tmp_path, monkeypatch):
    """The temp file of a publish starts with a dot: pandas / pyarrow.dataset read the folder
    as before while it exists, and the next run sweeps it once stale."""
    import pandas as pd

    from jobs.storage import files

    output = tmp_path / "out"
    commit.commit_shard(str(output), 0, "a" * 12, _table(), None, "cat")
    names = []
    real_replace = files.os.replace

    def interrupted(source, target):
        names.append(os.path.basename(source))
        assert len(pd.read_parquet(output)) == _table().num_rows  # the temp file is there, and invisible
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", interrupted)
    commit.commit_shard(str(output), 1, "b" * 12, _table(), None, "cat")
    assert names and names[0].startswith(".part-00001-") and commit.TEMP_FILE.match(names[0])


# ---------------------------------------------------------------------------- records created by two runs at once


def _by_concept(digest: str, settings: dict | None = None) -> commit.JobRecord:
    return commit.JobRecord(1, ("cat",), "tiny:0123456789abcdef", settings or {"max_instances": 1}, {"cat": digest})


def _race(output: str, record_name: str, storage_options: dict | None = None):
    """Patch the store so that right after the first run finds `record_name` absent (its check),
    before it writes it, a second run opens the output with its own record -> a switch that arms it."""
    from fsspec.core import url_to_fs

    fs, _ = url_to_fs(output, **(storage_options or {}))
    real_exists, state = fs.exists, {"armed": None}

    def exists(path, **kwargs):
        found = real_exists(path, **kwargs)
        second = state["armed"]
        if second is not None and not found and str(path).endswith(record_name):
            state["armed"] = None
            commit.open_output(output, second, storage_options)  # the other run, inside our window
        return found

    fs.exists = exists
    return fs, state


@pytest.fixture(params=["local", "memory", "s3"])
def race_output(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "masks"), None
    elif request.param == "memory":
        yield f"memory://persam-race-{tmp_path.name}/masks", None
        fsspec.filesystem("memory").rm(f"/persam-race-{tmp_path.name}", recursive=True)
    else:
        s3 = request.getfixturevalue("s3")
        bucket = f"persam-race-{uuid.uuid4().hex[:12]}"
        s3.mkdir(bucket)
        yield f"s3://{bucket}/masks", None


@pytest.mark.parametrize("record_name, first, second, refusal", [
    ("_persam_concept.json", _by_concept("a" * 12), _by_concept("b" * 12), "other contents"),
    ("_persam_job.json", _by_concept("a" * 12), _by_concept("a" * 12, {"max_instances": 3}), "with settings"),
])
def test_of_two_runs_racing_to_create_a_record_the_loser_is_refused(race_output, record_name, first, second, refusal):
    output, options = race_output
    fs, state = _race(output, record_name, options)
    try:
        state["armed"] = second
        with pytest.raises(OutputError, match=refusal):
            commit.open_output(output, first, options)
    finally:
        del fs.exists
    # the winner's record stands, and the part file it publishes agrees with it
    stored = commit.read_job_record(output, options)
    assert stored["settings"] == second.settings and stored["concepts"]["cat"]["digest"] == second.concept_digests["cat"]
    record, _ = commit.open_output(output, second, options)
    path = commit.commit_shard(output, 0, "0" * 12, _table(), options, "cat", record.parquet_metadata(["cat"]))
    with fs.open(path, "rb") as handle:  # (commit_shard returns the store's own path)
        meta = pq.ParquetFile(handle).schema_arrow.metadata
    assert json.loads(meta[b"persam.concept_digests"]) == {"cat": stored["concepts"]["cat"]["digest"]}
    with pytest.raises(OutputError, match=refusal):  # and the loser stays refused
        commit.open_output(output, first, options)


def test_a_shard_is_replaced_and_recovered_on_every_store(race_output, monkeypatch):
    """supersede.py's protocol on a local folder, fsspec's memory store and S3 (moto): the new
    version replaces the old; staged and left behind by a kill, the next run finishes it."""
    from fsspec.core import url_to_fs

    output, options = race_output
    record = _by_concept("a" * 12)
    commit.open_output(output, record, options)
    first = commit.commit_shard(output, 0, "1" * 12, _table("a.jpg"), options, "cat")
    second = commit.commit_shard(output, 0, "2" * 12, _table("b.jpg"), options, "cat", previous=[first])
    assert commit.part_files(output, options) == [commit.part_path(output, 0, "2" * 12, options, "cat")]
    with monkeypatch.context() as patch:  # killed after staging the third version, before the removal
        patch.setattr(commit, "remove_files", lambda *args, **kwargs: [])
        assert commit.commit_shard(output, 0, "3" * 12, _table("c.jpg"), options, "cat", previous=[second]) is None
    assert [t.column("image_uri").to_pylist() for t in commit.output_tables(output, options)] == [["b.jpg"]]
    _, committed = commit.open_output(output, record, options)  # the next run recovers first
    assert list(committed["cat"][0]) == ["3" * 12]
    assert [t.column("image_uri").to_pylist() for t in commit.output_tables(output, options)] == [["c.jpg"]]
    fs, root = url_to_fs(output, **(options or {}))
    assert not [p for p in fs.find(root.rstrip("/")) if "/_pending/" in p]
