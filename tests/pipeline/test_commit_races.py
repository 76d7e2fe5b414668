"""Concurrent runs and odd names: jobs.pipeline.commit under races (tolerant removals, stale temp
sweeping, foreign files left alone), literal --input paths, redaction of local paths, and
the decoder allowlist of jobs.storage.images. No Ray: the functions are called directly."""

from __future__ import annotations

import io
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.pipeline import commit
from jobs.storage.redaction import redact
from jobs.storage.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from jobs.storage.files import read_bytes
from jobs.storage.listing import is_image_name, list_image_urls
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


def test_our_schema_accepts_older_runs_without_the_hash_column():
    assert schema.is_our_schema(_table().schema)
    assert schema.is_our_schema(_table().drop_columns(["content_sha256"]).schema)
    assert not schema.is_our_schema(pa.schema([("image_uri", pa.string()), ("concept", pa.int64())]))


# ---------------------------------------------------------------------------- literal inputs


@pytest.mark.parametrize("directory", ["photos [2024]", "what?", "a*b", "[ab]"])
def test_existing_directories_are_never_glob_expanded(tmp_path, directory):
    literal = tmp_path / directory
    literal.mkdir()
    (literal / "x.jpg").write_bytes(b"x")
    (literal / "odd [1]?.png").write_bytes(b"x")
    for decoy in ("photos 2", "whatX", "aXXb", "a"):  # what the same name matches as a glob
        (tmp_path / decoy).mkdir(exist_ok=True)
        (tmp_path / decoy / "decoy.jpg").write_bytes(b"x")
    urls = list(list_image_urls(str(literal)))
    assert urls == [str(literal / "odd [1]?.png"), str(literal / "x.jpg")]
    assert all(read_bytes(u) == b"x" for u in urls)
    assert list(list_image_urls(str(literal / "odd [1]?.png"))) == [str(literal / "odd [1]?.png")]


def test_a_missing_path_with_a_wildcard_is_a_glob(tmp_path):
    for name in ("a1.jpg", "a2.gif", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert list(list_image_urls(str(tmp_path / "a*"))) == [str(tmp_path / "a1.jpg"), str(tmp_path / "a2.gif")]


def test_redact_keeps_local_paths_whole():
    assert redact("/data/what?.jpg") == "/data/what?.jpg"
    assert redact("photos/a@b?c.png") == "photos/a@b?c.png"
    assert redact("file:///data/what?.jpg") == "file:///data/what?.jpg"
    assert redact("s3://key:secret@bucket/x.jpg?X-Amz-Signature=abc") == "s3://bucket/x.jpg"
    assert redact("https://user:pw@host/img.png?token=1") == "https://host/img.png"


# ---------------------------------------------------------------------------- decoder allowlist


def test_gif_is_listed_and_decodes_its_first_frame():
    assert ".gif" in IMAGE_EXTENSIONS and is_image_name("anim.GIF")
    buffer = io.BytesIO()
    first, second = Image.new("RGB", (5, 4), (255, 0, 0)), Image.new("RGB", (5, 4), (0, 255, 0))
    first.save(buffer, "GIF", save_all=True, append_images=[second])
    assert decode_image(buffer.getvalue(), "anim.gif")[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("fmt", ["PCX", "PPM", "TGA", "ICO", "EPS_HEADER"])
def test_other_formats_named_jpg_never_reach_their_decoder(fmt):
    if fmt == "EPS_HEADER":  # Pillow writes EPS only with Ghostscript: the header is what matters
        data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, fmt)
        data = buffer.getvalue()
        assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would decode it
    with pytest.raises(ImageDecodeError, match="not a decodable image") as error:
        decode_image(data, "s3://bucket/photo.jpg")
    assert str(error.value).startswith("s3://bucket/photo.jpg:") and "\n" not in str(error.value)


def test_a_pcx_named_jpg_becomes_an_error_row_in_the_prepare_stage(tmp_path):
    from jobs.pipeline.job import PreparedJob
    from jobs.pipeline.payload import unpack_chunk
    from jobs.pipeline.prepare import prepare_chunk
    from jobs.spec import JobSpec, ModelSpec

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path, "PCX")
    job = PreparedJob(JobSpec("segment", ModelSpec("tiny")), "fingerprint", ())
    prepared = prepare_chunk({"shard": 0, "chunk": 0, "urls": [str(path)], "previous": []}, job)
    item = unpack_chunk(prepared["meta"], prepared["arrays"]).items[0]
    assert item.error.startswith("decode failed:") and "not a decodable image" in item.error


def test_camera_mpo_files_still_decode_through_the_jpeg_opener():
    buffer = io.BytesIO()
    frame = Image.new("RGB", (4, 4), (9, 9, 9))
    frame.save(buffer, "MPO", save_all=True, append_images=[frame])
    assert decode_image(buffer.getvalue(), "camera.jpg").shape == (4, 4, 3)
