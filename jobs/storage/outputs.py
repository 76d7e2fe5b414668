"""Where a command writes, checked before any work: --out / --output / --cache that cannot
take the result fail before a model is loaded (README "Bad input"); writes are atomic."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from jobs.storage.files import make_folder
from jobs.storage.redaction import redact


class OutputError(ValueError):
    """An --output that cannot hold this job; the message says what to do."""


def _blocker(url: str, storage_options: dict | None) -> tuple[object, str, str | None]:
    """-> (fs, path, reason the location cannot be created, or None). Creates nothing, so a
    refused job leaves no folder behind."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    path = path.rstrip("/") or path
    if not isinstance(fs, LocalFileSystem):
        return fs, path, None  # object stores have no parent folders to get in the way; the write itself tells
    for ancestor in (Path(path), *Path(path).parents):
        if ancestor.exists():
            if ancestor != Path(path) and not ancestor.is_dir():
                return fs, path, f"{ancestor} is a file, so nothing can be created under it"
            folder = ancestor if ancestor.is_dir() else ancestor.parent
            if not os.access(folder, os.W_OK | os.X_OK):
                return fs, path, f"{folder} is not writable"
            break
    return fs, path, None


def check_output_file(url: str, flag: str, storage_options: dict | None = None, example: str = "result.json") -> None:
    """A file the command will write: not an existing folder, its folder creatable."""
    fs, path, reason = _blocker(url, storage_options)
    if fs.isdir(path):
        raise OutputError(f"{redact(url)}: {flag} is an existing folder; pass a file path such as "
                          f"{redact(url).rstrip('/')}/{example}")
    if reason:
        raise OutputError(f"{redact(url)}: {flag} is not writable ({reason}); pass a writable path")


def check_output_folder(url: str, flag: str, storage_options: dict | None = None) -> None:
    """A folder the command will write into: not an existing file, creatable; on an object
    store a probe object is written and removed under it (its bucket is never created)."""
    fs, path, reason = _blocker(url, storage_options)
    try:
        is_file = fs.isfile(path)
    except Exception as error:  # e.g. Forbidden on the bucket
        raise OutputError(f"{redact(url)}: {flag} cannot be read ({type(error).__name__}); pass a location "
                          "these credentials can read and write") from None
    if is_file:
        raise OutputError(f"{redact(url)}: {flag} is an existing file; pass a folder path (it holds several files)")
    if reason:
        raise OutputError(f"{redact(url)}: {flag} is not writable ({reason}); pass a writable path")
    if not isinstance(fs, LocalFileSystem):
        probe_writable(fs, path, url, flag)


def probe_writable(fs, folder: str, shown: str, flag: str, error_type: type[ValueError] = OutputError) -> None:
    """Write + remove an empty probe file in `folder` (created first if local): the one test
    of write permission that holds for every store (object stores have no permission bits
    to read). A missing bucket is reported, never created (make_folder)."""
    probe = f"{folder.rstrip('/')}/.persam-probe-{uuid.uuid4().hex}"
    try:
        make_folder(fs, folder)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:
        raise error_type(f"{redact(shown)}: {flag} is not writable (its bucket does not exist; persam never creates "
                         "one): create the bucket or pass another location") from None
    except Exception as error:
        raise error_type(f"{redact(shown)}: {flag} is not writable ({type(error).__name__}); pass a writable location") from None
