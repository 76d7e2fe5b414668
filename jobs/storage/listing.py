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

from persam_core.errors import describe

from jobs.storage.files import as_given
from jobs.storage.redaction import image_name, redact
from jobs.storage.seen_images import SeenImages
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
    # utf-8-sig: a BOM (Excel's "CSV UTF-8") is not part of the first header or line; a
    # line that is not UTF-8 keeps its bytes (surrogate-escaped) and becomes an error row
    with fsspec.open(url, "rt", encoding="utf-8-sig", errors="surrogateescape", **storage_options) as handle:
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
    try:
        if is_manifest(url):
            yield from _manifest_entries(url, options)
        else:
            yield from _listed_images(url, options)
    except InputError:
        raise
    except PermissionError as error:
        raise InputError(f"{redact(url)}: access denied ({describe(error)}); check the credentials "
                         "(--storage-options or the environment) and the bucket's policy") from None
    except FileNotFoundError:
        raise InputError(f"{redact(url)}: input not found; pass an existing directory, prefix, glob or manifest") from None
    except (OSError, ValueError, csv.Error) as error:  # e.g. a `.parquet` that is not Parquet
        what = "manifest" if is_manifest(url) else "input"
        raise InputError(f"{redact(url)}: cannot read the {what} ({describe(error)}); pass a Parquet, CSV or text "
                         "manifest, a directory, a prefix or a glob") from None


def _listed_images(url: str, options: dict) -> Iterator[tuple[str, str]]:
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
    consecutive chunks of MANIFEST_WAVE_IMAGES manifest lines for a manifest, so the driver
    never holds more than one chunk of a lake-sized manifest (shards are hashed within each
    chunk). Each image (by its identity, image_name) is in one wave only, the first that
    lists it: a SeenImages set (16 bytes per image) drops the repeats of later waves."""
    if not is_manifest(url):
        yield list_all_images(url, storage_options)
        return
    seen, chunk = SeenImages(), {}
    for image, version in list_images(url, storage_options):
        chunk.setdefault(image, version)
        if len(chunk) == MANIFEST_WAVE_IMAGES:
            yield from _first_seen(chunk, seen)
            chunk = {}
    yield from _first_seen(chunk, seen)


def _first_seen(chunk: dict[str, str], seen: SeenImages) -> Iterator[dict[str, str]]:
    """The chunk without the images of earlier chunks (or of earlier lines); none if empty."""
    fresh = seen.first_seen([image_name(u) for u in chunk])
    kept = {u: v for (u, v), keep in zip(chunk.items(), fresh) if keep}
    if kept:
        yield kept


# The reading URL of an image whose URL cannot travel to the stages (a file name that is not
# UTF-8): the image becomes an error row (prepare.py) named by its escaped name.
UNREADABLE = ""


def shown_name(url: str) -> str:
    """A file name as its bytes can be shown: a name that is not UTF-8 (os.listdir gives its
    bytes as surrogates) with those bytes as `\\xNN`; any other name unchanged."""
    try:
        url.encode("utf-8")
        return url
    except UnicodeEncodeError:
        try:
            return url.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that stands for no byte
            return url.encode("utf-8", "backslashreplace").decode("utf-8")


def credential_free(versions: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """{url: version} as listed -> ({name: version}, {name: reading URL}): each image is
    named by its identity (redaction.image_name: no userinfo, no signing parameters, the
    rest of a query as a digest) wherever it is hashed, printed or stored; the reading URL,
    credentials and all, is kept aside for the read only (UNREADABLE for a name that is not
    UTF-8). Names stay stable when signatures are renewed; URLs that differ in anything
    else stay distinct images. The first URL of a name is the one read."""
    named, sources = {}, {}
    for url, version in versions.items():
        name = shown_name(image_name(url))
        if name in named:
            continue
        named[name] = version
        if name != url:
            sources[name] = url if shown_name(url) == url else UNREADABLE
    return named, sources
