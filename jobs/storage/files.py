"""Bytes in and out of any fsspec URL: read, publish atomically, join, list one folder.

One owner for each storage move that several commands make, so that "put the protocol
back on a listed path" or "write the whole file or nothing" is written once.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from contextlib import contextmanager
from typing import BinaryIO, Iterator

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


# OSErrors of the machine, not of the input: a full disk or quota. They keep their type on
# the way up (no "bad input" wrapping); the CLI exits 1 for them, not 3 (jobs/cli.py).
MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_machine_failure(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in MACHINE_ERRNOS


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        return handle.read()


class NotAFileError(OSError):
    """Something that is not a regular file, or larger than the byte limit, where an image
    was expected; the message names it and what to do."""


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _too_large(shown: str, size: int | str, max_bytes: int) -> NotAFileError:
    return NotAFileError(f"{shown}: {size} bytes, over the limit of {max_bytes} bytes per image; "
                         "raise --max-image-bytes if this file is legitimate")


def read_file_bytes(url: str, storage_options: dict | None, max_bytes: int, shown: str | None = None) -> bytes:
    """The bytes of a regular file, at most `max_bytes`: anything else (a FIFO, a device such
    as /dev/zero, a directory) or a larger file raises NotAFileError naming `shown` (the
    URL as it may be printed) without reading it; nothing blocks or reads without bound.

    Locally the file is opened non-blocking (a FIFO without writer would block) and checked
    with fstat on the open descriptor (no race with a rename); object stores give the size
    their open (HEAD) reported, and the read stops one byte past the limit whatever it said."""
    shown = shown or url
    fs, path = url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            status = os.fstat(descriptor)
            if not stat.S_ISREG(status.st_mode):
                kind = next((name for test, name in _KINDS if test(status.st_mode)), "not a regular file")
                raise NotAFileError(f"{shown}: {kind}, not a regular file; only regular files are read as images")
        except BaseException:
            os.close(descriptor)
            raise
        with os.fdopen(descriptor, "rb") as handle:  # closes the descriptor, also on errors below
            if status.st_size > max_bytes:
                raise _too_large(shown, status.st_size, max_bytes)
            data = handle.read(max_bytes + 1)
    else:
        with fs.open(path, "rb") as handle:
            size = getattr(handle, "size", None)
            if isinstance(size, int) and size > max_bytes:
                raise _too_large(shown, size, max_bytes)
            data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(shown, f"more than {max_bytes}", max_bytes)
    return data


@contextmanager
def local_atomic_writer(path: str) -> Iterator[BinaryIO]:
    """A stream that becomes the local file `path` only when the block ends without error:
    a hidden temp file `.<name>.tmp-<hex>` beside it, fsync'ed and renamed over `path`;
    removed on any failure or kill signal. Hidden, because pyarrow, pandas and Spark skip
    `.`-files when they read a folder as a dataset: a write in flight never breaks a read."""
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # a full disk or a kill must not leave the temp file behind
        if os.path.exists(temporary):
            os.remove(temporary)
        raise _naming(error, path) from None


def _naming(error: BaseException, path: str) -> BaseException:
    """A write or fsync failing (ENOSPC, EIO) names no file: the same error naming `path`."""
    if isinstance(error, OSError) and error.filename is None and error.errno is not None:
        return type(error)(error.errno, error.strerror, path)
    return error


def publish_bytes(fs, path: str, data: bytes) -> None:
    """Make `path` appear with `data` atomically: local_atomic_writer locally, one
    whole-object PUT on object stores (readers never see a partial object)."""
    if isinstance(fs, LocalFileSystem):
        with local_atomic_writer(path) as handle:
            handle.write(data)
    else:
        fs.pipe_file(path, data)


def create_only(fs, path: str, data: bytes) -> bool:
    """Make `path` appear with `data` only if nothing is there, the check and the write in one
    step -> False when something was. Locally a complete temp file hard-linked to `path`
    (link() refuses an existing name); on object stores a conditional PUT (If-None-Match: *,
    fsspec's mode="create"), which AWS S3 and fsspec's memory store honour; a store that
    ignores it overwrites, so callers read the file back and check it."""
    if not isinstance(fs, LocalFileSystem):
        try:
            fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True
    folder, name = os.path.split(path)
    os.makedirs(folder or ".", exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    except OSError as error:
        raise _naming(error, path) from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return True


def make_folder(fs, path: str) -> None:
    """Create the local folder `path`. Object stores have no folders to create, and a
    makedirs there is harmful: on s3fs it creates a missing *bucket*."""
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)


def move_file(fs, source: str, target: str) -> None:
    """Make `source` appear at `target` in one step, replacing what is there: a rename
    locally (atomic), a copy then a delete on object stores (the copy creates the whole
    object at once; a kill between the two leaves `source` behind as well)."""
    if isinstance(fs, LocalFileSystem):
        os.replace(source, target)
    else:
        fs.mv(source, target)


def write_atomically(url: str, data: bytes, storage_options: dict | None = None) -> None:
    """The whole file or nothing at `url` (see publish_bytes)."""
    fs, path = url_to_fs(url, **(storage_options or {}))
    publish_bytes(fs, path, data)


def join_url(base: str, name: str) -> str:
    """`base` (folder URL or path) / `name`."""
    return f"{base.rstrip('/')}/{name}"


def as_given(fs, given: str):
    """-> a function turning paths `fs` lists back into URLs of the same form as `given`:
    fsspec drops the protocol (`bucket/key`), a remote URL needs it back; local paths stay.

    Paths under `given` are re-rooted on `given` itself: a store that keeps userinfo as part
    of its paths (fsspec's memory://) would otherwise list `memory:///user:secret@…`, a form
    in which `redact` cannot see the credentials (they are no longer after the `://`)."""
    if "://" not in given:
        return lambda path: path
    root, base = fs._strip_protocol(given).rstrip("/"), given.rstrip("/")

    def to_url(path: str) -> str:
        if root and (path == root or path.startswith(root + "/")):
            return base + path[len(root):]
        return fs.unstrip_protocol(path)

    return to_url


def folder_entries(fs, path: str) -> tuple[list[str], list[str]]:
    """-> (sub-folder names, file names) directly under `path`, sorted."""
    folders, files = [], []
    for entry in fs.ls(path, detail=True):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        (folders if entry["type"] == "directory" else files).append(name)
    return sorted(folders), sorted(files)
