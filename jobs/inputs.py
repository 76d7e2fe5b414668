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


def list_image_urls(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """Yield image URLs under `url` in a deterministic order (sorted per directory)."""
    options = storage_options or {}
    if url.lower().endswith(MANIFEST_EXTENSIONS):
        yield from _manifest_urls(url, options)
        return
    fs, path = url_to_fs(url, **options)
    if any(char in path for char in "*?["):
        yield from (fs.unstrip_protocol(p) if "://" in url else p for p in sorted(fs.glob(path)) if is_image_name(p))
        return
    if not fs.exists(path):
        raise InputError(f"{url}: input not found; pass an existing directory, prefix, glob or manifest")
    if fs.isfile(path):
        yield url
        return
    for directory, subdirectories, files in fs.walk(path):
        subdirectories.sort()  # fsspec walks in the order of this list: keep it deterministic
        for name in sorted(files):
            if is_image_name(name):
                full = f"{directory.rstrip('/')}/{name}"
                yield fs.unstrip_protocol(full) if "://" in url else full


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with fsspec.open(url, "rb", **(storage_options or {})) as handle:
        return handle.read()
