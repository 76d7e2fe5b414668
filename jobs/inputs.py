"""`--input` -> image URLs: a directory/prefix (recursive), a glob, or a manifest.

Listing streams directory by directory (fsspec `walk`), so the driver never asks a
bucket for everything at once; for lakes of hundreds of millions of objects, pass a
manifest (`.parquet` / `.csv` / `.txt` of URLs) instead of listing every run.
"""

from __future__ import annotations

import csv
import io
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from .images import IMAGE_EXTENSIONS

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
URL_COLUMNS = ("image_uri", "uri", "url", "path")


class InputError(ValueError):
    """An --input that cannot be listed; the message says what to do."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _manifest_urls(url: str, storage_options: dict) -> Iterator[str]:
    lower = url.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = url_to_fs(url, **storage_options)
        table = pq.read_table(path, filesystem=fs)
        column = next((c for c in URL_COLUMNS if c in table.column_names), table.column_names[0])
        yield from (str(v) for v in table.column(column).to_pylist() if v)
        return
    with fsspec.open(url, "rt", **storage_options) as handle:
        text = handle.read()
    if lower.endswith(".csv"):
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            return
        header = [h.strip() for h in rows[0]]
        index = next((header.index(c) for c in URL_COLUMNS if c in header), None)
        body = rows[1:] if index is not None else rows
        yield from (row[index or 0].strip() for row in body if row and row[index or 0].strip())
        return
    yield from (line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def version_token(info: dict) -> str:
    """What changes when an object's content changes: its ETag, else size + mtime."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("generation")
    if etag:
        return str(etag).strip('"')
    modified = info.get("mtime") or info.get("LastModified") or info.get("updated") or info.get("last_modified") or ""
    return f"{info.get('size', '')}:{modified}"


def list_images(url: str, storage_options: dict | None = None) -> Iterator[tuple[str, str]]:
    """Yield (image URL, version token) under `url`, in a deterministic order (sorted per directory).

    The token comes from the listing itself (no extra request); manifest entries have
    none unless the manifest has a `version` column (e.g. the object's ETag).
    """
    options = storage_options or {}
    if url.lower().endswith(MANIFEST_EXTENSIONS):
        yield from ((u, "") for u in _manifest_urls(url, options))
        return
    fs, path = url_to_fs(url, **options)
    name = (lambda p: fs.unstrip_protocol(p)) if "://" in url else (lambda p: p)
    if any(char in path for char in "*?["):
        found = fs.glob(path, detail=True)
        yield from ((name(p), version_token(found[p])) for p in sorted(found) if is_image_name(p))
        return
    if not fs.exists(path):
        raise InputError(f"{url}: input not found; pass an existing directory, prefix, glob or manifest")
    if fs.isfile(path):
        yield url, version_token(fs.info(path))
        return
    for directory, subdirectories, files in fs.walk(path, detail=True):
        for key in sorted(subdirectories):  # fsspec walks in the order of this mapping: keep it deterministic
            subdirectories[key] = subdirectories.pop(key)
        for file_name in sorted(files):
            if is_image_name(file_name):
                yield name(f"{directory.rstrip('/')}/{file_name}"), version_token(files[file_name])


def list_image_urls(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """Image URLs under `url` (see list_images)."""
    return (image for image, _ in list_images(url, storage_options))


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        return handle.read()
