"""jobs.pipeline.commit under concurrent runs: tolerant removals, stale temp sweeping, foreign
files reported and left alone. No Ray: the functions are called directly. (Odd names and
formats: storage/test_names_and_formats.py.)"""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.pipeline import commit
from jobs.storage import schema
from jobs.storage.schema import rows_to_table


def _record(num_shards: int = 4) -> commit.JobRecord:
    return commit.JobRecord(num_shards, ("cat",), "tiny:0123456789abcdef")


def _table(url: str = "a.jpg") -> pa.Table:
    return rows_to_table([{"image_uri": url, "concept": "cat", "area": 0, "error": "x"}])


# ---------------------------------------------------------------------------- commit races


def test_removal_tolerates_a_file_another_run_removed_first(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_job(output, _record())
    old = commit.commit_shard(output, 1, commit.urls_digest(["a.jpg"]), _table())
    new = commit.commit_shard(output, 1, commit.urls_digest(["a.jpg", "b.jpg"]), _table())
    _, committed = commit.open_job(output, _record())  # both runs list the old file ...
    assert old in committed[1].values()
    os.remove(old)  # ... the other run removes it between the listing and our removal
    lines: list[str] = []
    commit.remove_files(output, [old], log=lines.append)  # used to raise FileNotFoundError
    assert lines == [] and os.path.exists(new) and not os.path.exists(old)
    commit.remove_files(output, [old, old])  # removed twice over: still nothing to say


def test_stale_temp_files_are_swept_fresh_ones_kept(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_job(output, _record())
    root = tmp_path / "masks"
    stale = root / f"part-00001-{'a' * 12}.parquet.tmp-{'b' * 32}"
    stale_job = root / f"{commit.JOB_FILE}.tmp-{'c' * 32}"
    fresh = root / f"part-00002-{'a' * 12}.parquet.tmp-{'d' * 32}"  # a live writer may own it
    other_tool = root / "upload.tmp-x"  # not our temp name: foreign, never swept
    for path in (stale, stale_job, fresh, other_tool):
        path.write_bytes(b"half")
    hours_ago = time.time() - commit.STALE_TEMP_SECONDS - 60
    for path in (stale, stale_job, other_tool):
        os.utime(path, (hours_ago, hours_ago))
    lines: list[str] = []
    _, committed = commit.open_job(output, _record(), log=lines.append)
    assert committed == {}
    assert not stale.exists() and not stale_job.exists()
    assert fresh.exists() and other_tool.exists()
    assert len(lines) == 1 and "upload.tmp-x" in lines[0] and "left alone" in lines[0]


def test_foreign_files_are_reported_never_read_nor_deleted(tmp_path):
    output = str(tmp_path / "masks")
    commit.open_job(output, _record(num_shards=1))
    root = tmp_path / "masks"
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "label": ["x"]}), root / "notes.parquet")
    lookalike = root / f"part-00000-{'f' * 12}.parquet"  # a part name, another schema
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "concept": ["cat"], "label": [1]}), lookalike)
    garbage = root / f"part-00000-{'e' * 12}.parquet"  # a part name, not Parquet at all
    garbage.write_bytes(b"not parquet")
    ours = commit.commit_shard(output, 0, commit.urls_digest(["z.jpg"]), _table("z.jpg"))

    lines: list[str] = []
    _, committed = commit.open_job(output, _record(num_shards=1), log=lines.append)
    assert len(lines) == 1 and "notes.parquet" in lines[0] and "\n" not in lines[0]
    assert set(committed[0].values()) == {str(lookalike), str(garbage), ours}

    # The image set changed: all three part-named files are superseded, only ours is ours.
    plan = commit.plan_shards(["a.jpg"], 1, committed)
    assert sorted(plan.superseded) == sorted([str(lookalike), str(garbage), ours])
    table = schema.read_parts(plan.superseded)
    assert table.column("image_uri").to_pylist() == ["z.jpg"]  # the look-alike's rows are not ours
    lines.clear()
    commit.remove_files(output, plan.superseded, log=lines.append)
    assert not os.path.exists(ours) and lookalike.exists() and garbage.exists()
    assert (root / "notes.parquet").exists()
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
    commit.commit_shard(str(output), 0, "a" * 12, _table())
    names = []
    real_replace = files.os.replace

    def interrupted(source, target):
        names.append(os.path.basename(source))
        assert len(pd.read_parquet(output)) == _table().num_rows  # the temp file is there, and invisible
        real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", interrupted)
    commit.commit_shard(str(output), 1, "b" * 12, _table())
    assert names and names[0].startswith(".part-00001-") and commit.TEMP_FILE.match(names[0])
