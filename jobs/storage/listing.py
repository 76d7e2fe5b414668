"""`--input` -> image URLs: a directory/prefix (recursive), a glob, or a manifest.

Paths are literal first: an existing directory, prefix or file is listed as is, whatever
characters its name holds (`photos [2024]`, `what?`, `a*b`); a path is a glob only when
it does not exist literally and holds a wildcard (`*`, `?`, `[`).

Listing streams directory by directory (fsspec `walk`), so the driver never asks a
bucket for everything at once; for lakes of hundreds of millions of objects, pass a
manifest (`.parquet` / `.csv` / `.txt` of URLs) instead of listing every run.
"""

from __future__ import annotations

import csv
import itertools
from typing import Iterator

import fsspec
from fsspec.core import url_to_fs

from jobs.storage.files import as_given
from jobs.storage.redaction import redact
from jobs.storage.schema import IMAGE_URI
from jobs.storage.images import IMAGE_EXTENSIONS

MANIFEST_EXTENSIONS = (".parquet", ".csv", ".txt")
URL_COLUMNS = (IMAGE_URI, "uri", "url", "path")  # a persam output or a ranking is a manifest too


class InputError(ValueError):
    """An --input that cannot be listed; the message says what to do."""


def is_manifest(url: str) -> bool:
    return url.lower().endswith(MANIFEST_EXTENSIONS)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _manifest_entries(url: str, storage_options: dict) -> Iterator[tuple[str, str]]:
    """Stream (url, version) from a manifest: Parquet record batches or text lines, never whole."""
    lower = url.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = url_to_fs(url, **storage_options)
        with fs.open(path, "rb") as handle:
            manifest = pq.ParquetFile(handle)
            names = manifest.schema_arrow.names
            column = next((c for c in URL_COLUMNS if c in names), names[0])
            columns = [column] + (["version"] if "version" in names else [])
            for batch in manifest.iter_batches(batch_size=65_536, columns=columns):
                versions = batch.column("version").to_pylist() if "version" in names else [""] * batch.num_rows
                yield from ((str(u), str(v or "")) for u, v in zip(batch.column(column).to_pylist(), versions) if u)
        return
    with fsspec.open(url, "rt", **storage_options) as handle:
        if lower.endswith(".csv"):
            rows = csv.reader(handle)
            header = [h.strip() for h in next(rows, [])]
            index = next((header.index(c) for c in URL_COLUMNS if c in header), None)
            version = header.index("version") if "version" in header else None
            if index is None:  # no header: the first column of every row, the first row included
                rows, index = itertools.chain([header], rows), 0
            for row in rows:
                if len(row) > index and row[index].strip():
                    yield row[index].strip(), (row[version].strip() if version is not None and len(row) > version else "")
            return
        for line in handle:
            if line.strip() and not line.startswith("#"):
                yield line.strip(), ""


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
    none unless the manifest has a `version` column (e.g. the object's ETag). Manifests
    are read as a stream.
    """
    options = storage_options or {}
    if is_manifest(url):
        yield from _manifest_entries(url, options)
        return
    fs, path = url_to_fs(url, **options)
    name = as_given(fs, url)
    # Literal first: an existing directory/prefix/file named `photos [2024]` or `what?` is
    # never glob-expanded; only a path that does not exist and has a wildcard is a glob.
    if not fs.exists(path):
        if any(char in path for char in "*?["):
            found = fs.glob(path, detail=True)
            yield from ((name(p), version_token(found[p])) for p in sorted(found) if is_image_name(p))
            return
        raise InputError(f"{redact(url)}: input not found; pass an existing directory, prefix, glob or manifest")
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


# A manifest is planned and run in waves of this many images (bounded driver memory).
MANIFEST_WAVE_IMAGES = 500_000
# Named in "no images found" errors; the list itself is owned by jobs/storage/images.py.
EXTENSIONS_NOTE = " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def no_images(url: str) -> InputError:
    return InputError(f"{redact(url)}: no images found (extensions: {EXTENSIONS_NOTE})")


def list_all_images(url: str, storage_options: dict | None = None) -> dict[str, str]:
    """{image url: version token} of the whole input (see waves() for manifests)."""
    images = dict(list_images(url, storage_options))
    if not images:
        raise no_images(url)
    return images


def waves(url: str, storage_options: dict | None = None) -> Iterator[dict[str, str]]:
    """The input in planning waves of {url: version}: everything at once for a listing;
    consecutive chunks of MANIFEST_WAVE_IMAGES for a manifest, so the driver never holds
    more than one chunk of a lake-sized manifest (shards are hashed within each chunk)."""
    if not is_manifest(url):
        yield list_all_images(url, storage_options)
        return
    chunk: dict[str, str] = {}
    for image, version in list_images(url, storage_options):
        chunk[image] = version
        if len(chunk) == MANIFEST_WAVE_IMAGES:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


def credential_free(versions: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """{url: version} as listed -> ({name: version}, {name: reading URL}): each image is
    named by its redacted URL (no userinfo, no signed query string) wherever it is hashed,
    printed or stored; the reading URL, credentials and all, is kept aside for the read
    only. A manifest may hold such URLs; names stay stable when signatures are renewed."""
    named, sources = {}, {}
    for url, version in versions.items():
        name = redact(url)
        named[name] = version
        if name != url:
            sources[name] = url
    return named, sources
