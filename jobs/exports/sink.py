"""Where an export writes: any fsspec URL, every file whole or not at all.

`atomic_file(url)`: a file written as a stream (COCO, Label Studio tasks: larger than
memory at lake scale) goes to a temporary file first and is published at once when the
export finished: renamed into place locally (the temp file sits in the target folder),
uploaded in one go on object stores (S3 completes a large multipart upload at once), so
no reader ever sees part of it and a failed export leaves nothing behind, not even the
folders it would have created.

`Folder(url)`: the files of a folder export (gallery, subjects, hf-dataset), each
published with storage.files.publish_bytes (temp + rename locally, one PUT remotely).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from jobs.storage.files import local_atomic_writer, publish_bytes


def _missing_folders(folder: str) -> list[Path]:
    """The folders makedirs(folder) would create, deepest first."""
    missing = []
    for candidate in (Path(folder), *Path(folder).parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


@contextmanager
def atomic_file(url: str, storage_options: dict | None = None) -> Iterator[BinaryIO]:
    """A binary stream that becomes the file at `url` only when the block ends without error."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    if not isinstance(fs, LocalFileSystem):
        with tempfile.NamedTemporaryFile(prefix="persam-export-") as spool:
            yield spool
            spool.flush()
            fs.put_file(spool.name, path)
        return
    created = _missing_folders(os.path.dirname(path) or ".")
    try:
        with local_atomic_writer(path) as handle:
            yield handle
    except BaseException:
        for empty in created:  # deepest first; a folder someone else filled meanwhile stays
            try:
                empty.rmdir()
            except OSError:
                break
        raise


class Folder:
    """A folder URL that export files are published into, one atomic write each."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.fs, root = url_to_fs(url, **(storage_options or {}))
        self.root = root.rstrip("/") or root

    def write(self, name: str, data: bytes) -> None:
        """name: a relative path of safe parts (names.safe_file_name), e.g. `thumbs/x.jpg`."""
        publish_bytes(self.fs, f"{self.root}/{name}", data)
