"""The embedding cache: each image is encoded once per model, whatever job reads it.

Key: the SHA-256 of the image's bytes (content, not URL: a re-uploaded identical photo
hits, a changed photo under the same URL misses) within one model fingerprint; a
cache written with other weights lives under another fingerprint and is never mixed.

Layout: `<cache>/<fingerprint>/<dtype>/shard-<shard>-<uuid>.parquet`, cache shards by a
stable hash of the URL with the shard count fixed in `layout.json` when the cache is
created; jobs created with a cache adopt that count, so a job shard's images sit in one
cache shard. Each chunk of a job that encoded new images adds its own file (see `store`:
the chunks of one shard run in parallel, and a read-merge-write of one shared file would
lose entries), with one row group per entry and the entries' hashes in the footer, so a
chunk reads a footer per file and then only the row groups of its own images. Files
only gain entries (jobs never evict each other's); delete the folder to reclaim space.
Rows: `content_sha256`, `input_h/w`, `original_h/w`, `dtype`, `features`
(raw bytes of [256, 64, 64]) and `features_sha1` (checked on read: a corrupt entry is
recomputed and reported, never trusted); for SAM 2 also `high_res` (its decoder's two
high-resolution levels, [32, 256, 256] then [64, 128, 128], raw bytes back to back) and
`high_res_sha1`, checked the same way (null for SAM). fp16 halves the size: SAM 2 MiB per image against 4 MiB for fp32,
SAM 2 8 MiB against 16 MiB; its accuracy cost against fp32 is measured in the README.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from jobs.pipeline.commit import shard_of
from jobs.pipeline.job_record import MAX_SHARDS
from jobs.storage.files import create_only, make_folder, publish_bytes
from jobs.storage.redaction import redact
from jobs.storage.outputs import probe_writable
from jobs.storage.schema import CONTENT_SHA256

FEATURE_SHAPE = (256, 64, 64)
INDEX_KEY = b"persam.content_sha256"  # footer metadata: the hashes of a file's entries, one per row group
DTYPES = {"fp16": np.float16, "fp32": np.float32}
CACHE_SCHEMA = pa.schema([
    (CONTENT_SHA256, pa.string()), ("input_h", pa.int32()), ("input_w", pa.int32()),
    ("original_h", pa.int32()), ("original_w", pa.int32()), ("dtype", pa.string()),
    ("features", pa.binary()), ("features_sha1", pa.string()),
    ("high_res", pa.binary()), ("high_res_sha1", pa.string()),
])
Shapes = tuple[tuple[int, ...], ...]


class CacheError(ValueError):
    """A --cache that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class CachedFeatures:
    """features: [256, 64, 64] (fp16 or fp32) with the sizes the model's predictor would record;
    high_res: SAM 2's high-resolution levels in the same dtype ([32, 256, 256], [64, 128, 128]),
    () for SAM."""

    features: np.ndarray
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    high_res: tuple[np.ndarray, ...] = ()


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    """high_res_shapes: the per-image shape of each high-resolution level the model's entries
    must hold (persam_core.modeling.families.input_format(model_type).high_res_shapes; () for SAM);
    feature_shape: the shape of each entry's `features` (SAM's [256, 64, 64]; a cache of
    DINOv2 tokens alone holds [1369, C] under DINOv2's fingerprint)."""

    def __init__(self, url: str, fingerprint: str, dtype: str = "fp16", storage_options: dict | None = None,
                 num_shards: int | None = None, high_res_shapes: Shapes = (),
                 feature_shape: tuple[int, ...] = FEATURE_SHAPE) -> None:
        if dtype not in DTYPES:
            raise CacheError(f"--cache-dtype {dtype}: choose fp16 or fp32")
        self.url, self.dtype, self.num_shards = url, dtype, num_shards
        self.high_res_shapes = tuple(tuple(shape) for shape in high_res_shapes)
        self.feature_shape = tuple(feature_shape)
        self.fs, root = url_to_fs(url, **(storage_options or {}))
        self.base = root.rstrip("/")
        self.root = f"{self.base}/{fingerprint.replace(':', '-')}/{dtype}"

    def check_writable(self) -> None:
        """Fail before any work when the cache cannot be written."""
        probe_writable(self.fs, self.root, self.url, "--cache", CacheError)

    def recorded_shards(self) -> int | None:
        """The shard count in the cache's record (`layout.json`), validated like a concept file
        (jobs check it before any weights load) -> None when the cache has no record yet."""
        path = f"{self.root}/layout.json"
        try:
            text = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            shards = json.loads(text).get("num_shards")
        except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
            shards = None
        if not isinstance(shards, int) or isinstance(shards, bool) or not 1 <= shards <= MAX_SHARDS:
            shown = f"{redact(self.url).rstrip('/')}/{path[len(self.base) + 1:]}"
            raise CacheError(f"{shown}: not a valid persam cache record ('num_shards' must be a whole number from 1 "
                             f"to {MAX_SHARDS}); it was changed or not written by persam: delete it (the next job "
                             "writes it anew) or use another --cache")
        return shards

    def adopt_layout(self, proposed_shards: int) -> int:
        """The cache's shard count (recorded by its first job) -> set and returned."""
        if self.recorded_shards() is None:
            create_only(self.fs, f"{self.root}/layout.json", json.dumps({"num_shards": proposed_shards}).encode())
        self.num_shards = self.recorded_shards()
        return self.num_shards

    def shard_files(self, shard: int) -> list[str]:
        """Every file of cache shard `shard` (one per chunk that stored entries)."""
        try:
            found = self.fs.glob(f"{self.root}/shard-{shard:05d}-*.parquet")
        except FileNotFoundError:
            return []
        return sorted(found)

    def _shard(self, url: str) -> int:
        if self.num_shards is None:
            raise CacheError("cache layout not adopted")
        return shard_of(url, self.num_shards)

    def _read_file(self, path: str, wanted: set[str] | None) -> list[dict]:
        """The rows of `path` whose content_sha256 is wanted (all when None), reading only
        their row groups: the footer's index says where (a file without one is not ours: unreadable)."""
        with self.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            index = (parquet.schema_arrow.metadata or {}).get(INDEX_KEY)
            if index is None:
                raise ValueError("no index of its entries")
            hashes = index.decode().split("\n") if index else []
            group_of_row = [g for g in range(parquet.num_row_groups) for _ in range(parquet.metadata.row_group(g).num_rows)]
            if len(group_of_row) != len(hashes):
                raise ValueError("index does not match the row groups")
            groups = sorted({g for g, sha in zip(group_of_row, hashes) if wanted is None or sha in wanted})
            return parquet.read_row_groups(groups).to_pylist() if groups else []

    def load(self, urls: list[str], wanted: set[str] | None = None) -> tuple[dict[str, CachedFeatures], list[str]]:
        """Entries (all, or those whose content_sha256 is `wanted`) of the cache shards that
        `urls` map to -> ({content_sha256: features}, problems)."""
        entries: dict[str, CachedFeatures] = {}
        problems, corrupt = [], []
        for shard in sorted({self._shard(u) for u in urls}):
            for path in self.shard_files(shard):
                try:
                    rows = self._read_file(path, wanted)
                except Exception as error:
                    problems.append(f"cache file {path} unreadable ({type(error).__name__}): recomputed")
                    continue
                for row in rows:
                    entry = _checked(row, self.high_res_shapes, self.feature_shape)
                    if entry is None:
                        corrupt.append(row[CONTENT_SHA256])
                    else:
                        entries[row[CONTENT_SHA256]] = entry
        # A corrupt copy is only a problem when no other file holds a good one (entries are
        # never rewritten in place: the rerun that recomputed it wrote a new file).
        problems += [f"cache entry {sha[:12]} corrupt: recomputed" for sha in dict.fromkeys(corrupt) if sha not in entries]
        return entries, problems

    def store(self, new: dict[str, tuple[str, CachedFeatures]]) -> None:
        """new: {url: (content_sha256, features)} -> one new file per cache shard they map to.

        Files are only ever added (never read, merged and rewritten), so the chunk tasks of
        one shard, running in parallel, cannot lose each other's entries. One row group per
        entry and the list of hashes in the file's metadata let `load` read just the entries
        it needs."""
        by_shard: dict[int, dict[str, CachedFeatures]] = {}
        for url, (sha, entry) in new.items():
            by_shard.setdefault(self._shard(url), {})[sha] = entry
        make_folder(self.fs, self.root)
        for shard, entries in by_shard.items():
            rows = []
            for sha, entry in sorted(entries.items()):
                blob = self._bytes(entry.features)
                high_res = b"".join(self._bytes(level) for level in entry.high_res) if entry.high_res else None
                rows.append({
                    CONTENT_SHA256: sha, "input_h": entry.input_size[0], "input_w": entry.input_size[1],
                    "original_h": entry.original_size[0], "original_w": entry.original_size[1],
                    "dtype": self.dtype, "features": blob, "features_sha1": hashlib.sha1(blob).hexdigest(),
                    "high_res": high_res, "high_res_sha1": None if high_res is None else hashlib.sha1(high_res).hexdigest(),
                })
            table = pa.Table.from_pylist(rows, schema=CACHE_SCHEMA).replace_schema_metadata(
                {INDEX_KEY: "\n".join(sorted(entries)).encode()})
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="none", row_group_size=1)
            publish_bytes(self.fs, f"{self.root}/shard-{shard:05d}-{uuid.uuid4().hex}.parquet", buffer.getvalue())

    def _bytes(self, array: np.ndarray) -> bytes:
        return np.ascontiguousarray(array.astype(DTYPES[self.dtype], copy=False)).tobytes()


def _checked(row: dict, high_res_shapes: Shapes = (), feature_shape: tuple[int, ...] = FEATURE_SHAPE) -> CachedFeatures | None:
    """A cache row -> its features, or None when a blob fails the checks (size, dtype, SHA-1)
    or a SAM 2 entry lacks its high-resolution levels."""
    dtype = DTYPES.get(row["dtype"])
    if dtype is None:
        return None
    features = _array(row["features"], row["features_sha1"], dtype, (feature_shape,))
    high_res = _array(row.get("high_res"), row.get("high_res_sha1"), dtype, high_res_shapes) if high_res_shapes else ()
    if features is None or high_res is None:
        return None
    return CachedFeatures(features[0], (row["input_h"], row["input_w"]), (row["original_h"], row["original_w"]),
                          high_res)


def _array(blob: bytes | None, sha1: str | None, dtype, shapes: Shapes) -> tuple[np.ndarray, ...] | None:
    """A blob holding arrays of `shapes` back to back -> the arrays (read-only views), or None
    when its size or SHA-1 is wrong."""
    sizes = [int(np.prod(shape)) for shape in shapes]
    if not blob or len(blob) != sum(sizes) * np.dtype(dtype).itemsize or hashlib.sha1(blob).hexdigest() != sha1:
        return None
    flat = np.frombuffer(blob, dtype=dtype)
    starts = np.cumsum([0] + sizes)
    return tuple(flat[start : start + size].reshape(shape) for start, size, shape in zip(starts, sizes, shapes))
