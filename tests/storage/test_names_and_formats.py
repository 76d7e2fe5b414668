"""Odd names and formats: the output schema of older runs, literal --input paths, redaction
of local paths, and the decoder allowlist of jobs.storage.images. No Ray: the functions are
called directly."""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from jobs.storage import schema
from jobs.storage.files import read_bytes
from jobs.storage.images import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from jobs.storage.listing import is_image_name, list_image_urls
from jobs.storage.redaction import redact
from jobs.storage.schema import rows_to_table


def _table(url: str = "a.jpg") -> pa.Table:
    return rows_to_table([{"image_uri": url, "concept": "cat", "area": 0, "error": "x"}])


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
