"""The embedding cache: each image is encoded once per model, whatever job reads it.

Key: the SHA-256 of the image's bytes (content, not URL: a re-uploaded identical photo
hits, a changed photo under the same URL misses) within one model fingerprint; a
cache written with other weights lives under another fingerprint and is never mixed.

Layout: `<cache>/<fingerprint>/<dtype>/shard-<shard>.parquet`, shards by a stable hash
of the URL with the shard count fixed in `layout.json` when the cache is created. Jobs
created with a cache adopt that count, so a job shard is one cache file and a worker
reads its features back in one request (other jobs still hit, in a few requests). Files
only gain entries (jobs never evict each other's); delete the folder to reclaim space.
Rows: `content_sha256`, `input_h/w`, `original_h/w`, `dtype`, `features`
(raw bytes of [256, 64, 64]) and `features_sha1` (checked on read: a corrupt entry is
recomputed and reported, never trusted). fp16 halves the size (2 MiB per image against
4 MiB for fp32); its accuracy cost against fp32 is measured in the README.
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

from .commit import publish_bytes, shard_of

FEATURE_SHAPE = (256, 64, 64)
DTYPES = {"fp16": np.float16, "fp32": np.float32}
CACHE_SCHEMA = pa.schema([
    ("content_sha256", pa.string()), ("input_h", pa.int32()), ("input_w", pa.int32()),
    ("original_h", pa.int32()), ("original_w", pa.int32()), ("dtype", pa.string()),
    ("features", pa.binary()), ("features_sha1", pa.string()),
])


class CacheError(ValueError):
    """A --cache that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class CachedFeatures:
    """features: [256, 64, 64] (fp16 or fp32) with the sizes SamPredictor would record."""

    features: np.ndarray
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FeatureCache:
    def __init__(self, url: str, fingerprint: str, dtype: str = "fp16", storage_options: dict | None = None,
                 num_shards: int | None = None) -> None:
        if dtype not in DTYPES:
            raise CacheError(f"--cache-dtype {dtype}: choose fp16 or fp32")
        self.url, self.dtype, self.num_shards = url, dtype, num_shards
        self.fs, root = url_to_fs(url, **(storage_options or {}))
        self.root = f"{root.rstrip('/')}/{fingerprint.replace(':', '-')}/{dtype}"

    def check_writable(self) -> None:
        """Fail before any work when the cache cannot be written."""
        probe = f"{self.root}/.probe-{uuid.uuid4().hex}"
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as error:
            raise CacheError(f"{self.url}: --cache is not writable ({type(error).__name__}); pass a writable location") from None

    def adopt_layout(self, proposed_shards: int) -> int:
        """The cache's shard count (recorded by its first job) -> set and returned."""
        path = f"{self.root}/layout.json"
        if not self.fs.exists(path):
            publish_bytes(self.fs, path, json.dumps({"num_shards": proposed_shards}).encode())
        self.num_shards = int(json.loads(self.fs.cat_file(path))["num_shards"])
        return self.num_shards

    def shard_path(self, shard: int) -> str:
        return f"{self.root}/shard-{shard:05d}.parquet"

    def _shard(self, url: str) -> int:
        if self.num_shards is None:
            raise CacheError("cache layout not adopted")
        return shard_of(url, self.num_shards)

    def _load_file(self, path: str) -> tuple[dict[str, CachedFeatures], list[str]]:
        try:
            if not self.fs.exists(path):
                return {}, []
            table = pq.read_table(io.BytesIO(self.fs.cat_file(path)))
        except Exception as error:
            return {}, [f"cache file {path} unreadable ({type(error).__name__}): recomputed"]
        entries, problems = {}, []
        for row in table.to_pylist():
            blob = row["features"] or b""
            dtype = DTYPES.get(row["dtype"])
            expected_size = int(np.prod(FEATURE_SHAPE)) * (np.dtype(dtype).itemsize if dtype else 0)
            if dtype is None or len(blob) != expected_size or hashlib.sha1(blob).hexdigest() != row["features_sha1"]:
                problems.append(f"cache entry {row['content_sha256'][:12]} corrupt: recomputed")
                continue
            entries[row["content_sha256"]] = CachedFeatures(
                np.frombuffer(blob, dtype=dtype).reshape(FEATURE_SHAPE),
                (row["input_h"], row["input_w"]), (row["original_h"], row["original_w"]),
            )
        return entries, problems

    def load(self, urls: list[str]) -> tuple[dict[str, CachedFeatures], list[str]]:
        """Entries of the cache files that `urls` map to -> ({content_sha256: features}, problems)."""
        entries, problems = {}, []
        for shard in sorted({self._shard(u) for u in urls}):
            found, trouble = self._load_file(self.shard_path(shard))
            entries.update(found)
            problems += trouble
        return entries, problems

    def _write_file(self, path: str, entries: dict[str, CachedFeatures]) -> None:
        rows = []
        for sha, entry in sorted(entries.items()):
            blob = np.ascontiguousarray(entry.features.astype(DTYPES[self.dtype])).tobytes()
            rows.append({
                "content_sha256": sha, "input_h": entry.input_size[0], "input_w": entry.input_size[1],
                "original_h": entry.original_size[0], "original_w": entry.original_size[1],
                "dtype": self.dtype, "features": blob, "features_sha1": hashlib.sha1(blob).hexdigest(),
            })
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA), buffer, compression="none")
        self.fs.makedirs(self.root, exist_ok=True)
        publish_bytes(self.fs, path, buffer.getvalue())

    def store(self, new: dict[str, tuple[str, CachedFeatures]]) -> None:
        """new: {url: (content_sha256, features)} -> merged into their cache files (atomic each)."""
        by_shard: dict[int, dict[str, CachedFeatures]] = {}
        for url, (sha, entry) in new.items():
            by_shard.setdefault(self._shard(url), {})[sha] = entry
        for shard, entries in by_shard.items():
            path = self.shard_path(shard)
            existing, _ = self._load_file(path)  # concurrent writers: the last wins; a lost entry is a miss
            self._write_file(path, {**existing, **entries})
