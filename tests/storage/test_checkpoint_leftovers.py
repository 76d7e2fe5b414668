"""A killed checkpoint download leaves a `.part<pid>` file; the next fetch removes it."""

from __future__ import annotations

import hashlib

import fsspec

from jobs.storage import checkpoints


def test_a_killed_downloads_partial_file_is_removed_by_the_next_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    url = "memory://weights/leftover-test.pth"
    fsspec.filesystem("memory").pipe(url, b"weights")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = tmp_path / "cache" / "checkpoints" / key
    folder.mkdir(parents=True)
    (folder / "leftover-test.pth.part4242").write_bytes(b"half a download")
    try:
        path = checkpoints.fetch(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert path.read_bytes() == b"weights"
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "leftover-test.pth"]
