"""jobs.storage.files.read_file_bytes: only regular files are read as images, never more than
the byte limit (issue 29 item 8); a write that fails names its file (item 15)."""

from __future__ import annotations

import errno
import os
import threading

import fsspec
import pytest

from input_tools import fit_concept, output_rows, scene_bytes, segment
from jobs.storage import files
from jobs.storage.files import NotAFileError, local_atomic_writer, read_file_bytes


@pytest.fixture()
def odd_files(tmp_path):
    """{kind: path} of things named like images that are no regular files."""
    fifo, folder, link = tmp_path / "x.jpg", tmp_path / "a.jpg", tmp_path / "link.jpg"
    os.mkfifo(fifo)
    folder.mkdir()
    link.symlink_to(fifo)
    return {"FIFO": str(fifo), "directory": str(folder), "character device": "/dev/zero",
            "character device ": "/dev/null", "FIFO ": str(link)}


def test_only_regular_files_are_read(odd_files):
    for kind, path in odd_files.items():
        with pytest.raises(NotAFileError, match=f"{path}: (a|an) {kind.strip()}"):
            read_file_bytes(path, {}, 1 << 20)


@pytest.mark.parametrize("size,limit", [(5, 4), (1000, 999), (1 << 16, 1)])
def test_a_file_over_the_limit_is_refused_unread(tmp_path, size, limit):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * size)
    with pytest.raises(NotAFileError, match=f"{size} bytes, over the limit of {limit} bytes"):
        read_file_bytes(str(path), {}, limit)
    assert read_file_bytes(str(path), {}, size) == b"x" * size  # at the limit: read
    store = fsspec.filesystem("memory")
    store.pipe(f"memory://files-test/{size}.jpg", b"y" * size)
    with pytest.raises(NotAFileError, match="over the limit"):
        read_file_bytes(f"memory://files-test/{size}.jpg", {}, limit, shown="memory://files-test/shown.jpg")
    assert read_file_bytes(f"memory://files-test/{size}.jpg", {}, size) == b"y" * size


def test_a_stream_longer_than_it_said_stops_at_the_limit(monkeypatch):
    """An object store whose size was wrong (or unknown): the read stops one byte past the limit."""
    store = fsspec.filesystem("memory")
    store.pipe("memory://files-test/liar.jpg", b"z" * 100)
    opened = store.open

    class Unsized:  # a stream whose length nobody said (HTTP without Content-Length)
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def read(self, count=-1):
            return self.handle.read(count)

    def lying_open(path, mode="rb", **kwargs):
        return Unsized(opened(path, mode, **kwargs))

    monkeypatch.setattr(store, "open", lying_open)
    with pytest.raises(NotAFileError, match="more than 10 bytes"):
        read_file_bytes("memory://files-test/liar.jpg", {}, 10)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_a_failed_write_names_its_file(tmp_path, monkeypatch, code):
    def full(descriptor):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fsync", full)
    target = tmp_path / "out" / "part.parquet"
    with pytest.raises(OSError) as raised:
        with local_atomic_writer(str(target)) as handle:
            handle.write(b"rows")
    assert raised.value.errno == code and raised.value.filename == str(target)
    assert os.listdir(target.parent) == []  # no temp file left behind


def _unblock_later(fifo: str) -> threading.Thread:
    """Without the fix a reader blocks on the FIFO: feed it junk after a while so that such a
    run ends (with the wrong row) instead of hanging the test suite."""
    def feed():
        threading.Event().wait(30)
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no reader: nothing blocks
            return
        os.write(descriptor, b"junk")
        os.close(descriptor)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return thread


def test_a_job_reads_regular_files_only_and_at_most_max_image_bytes(tmp_path):
    concept = fit_concept(tmp_path / "concept")
    lake = tmp_path / "lake"
    lake.mkdir()
    for i in range(4):
        (lake / f"{i}.jpg").write_bytes(scene_bytes(i))
    big = lake / "big.jpg"
    big.write_bytes(scene_bytes(5) + b"\0" * 200_000)  # a valid JPEG with trailing bytes, over the limit below
    fifo, folder = lake / "x.jpg", lake / "a.jpg"
    os.mkfifo(fifo)
    folder.mkdir()
    _unblock_later(str(fifo))
    manifest = tmp_path / "images.txt"
    odd = [str(fifo), str(folder), "/dev/null", str(big)]
    manifest.write_text("\n".join([*(str(lake / f"{i}.jpg") for i in range(4)), *odd]) + "\n")
    result = segment(concept, str(manifest), tmp_path / "out", "--max-image-bytes", "100000", "--max-error-rate", "1")
    assert result.rc == 0, result.err
    rows = {r["image_uri"]: r["error"] for r in output_rows(tmp_path / "out")}
    assert len(rows) == 8 and sorted(u for u, e in rows.items() if e) == sorted(odd)
    assert "a FIFO" in rows[str(fifo)] and "a directory" in rows[str(folder)]
    assert "a character device" in rows["/dev/null"] and "over the limit of 100000 bytes" in rows[str(big)]


def test_max_image_bytes_is_a_count(tmp_path):
    from cli_tools import run_cli

    result = run_cli(["segment", "--model-type", "tiny", "--checkpoint", "random:0", "--concept", "c.json",
                      "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--max-image-bytes", "0"])
    assert result.rc == 3 and "--max-image-bytes" in result.err


def test_a_concept_that_is_no_regular_file_is_one_line(tmp_path, monkeypatch):
    fifo = tmp_path / "c.json"
    os.mkfifo(fifo)
    _unblock_later(str(fifo))
    from jobs.storage import concept_files

    monkeypatch.setattr(concept_files, "MAX_CONCEPT_BYTES", 1 << 20)  # a GF-SAM concept may hold hundreds of MiB
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * (2 << 20) + b"}")
    for given, phrase in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (big, "over the limit")):
        result = segment(given, str(tmp_path), tmp_path / "out")
        lines = result.err.strip().splitlines()
        assert result.rc == 3 and len(lines) == 1 and str(given) in lines[0] and phrase in lines[0], result.err
