"""Shard commit protocol: every (image, concept) row lands exactly once.

1. The job's images are split into `num_shards` shards by a stable hash of the URL
   (sha1, not Python's salted hash), so a rerun regroups them identically. The shard
   count and the job's identity (concepts, model fingerprint) are recorded once in
   `<output>/_persam_job.json`; a rerun reads them back instead of recomputing.
2. A shard is committed by publishing `<output>/part-<shard>.parquet` in one atomic
   step: temp file + rename on local file systems, a single whole-object PUT on object
   stores (readers never see a partial object).
3. A rerun lists the committed part files and schedules only the other shards. A shard
   interrupted before its publish left nothing visible, so it is recomputed whole: no
   row is lost or duplicated, whichever process died.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

JOB_FILE = "_persam_job.json"
DEFAULT_SHARD_SIZE = 32


class OutputError(ValueError):
    """An --output that cannot hold this job; the message says what to do."""


def shard_of(url: str, num_shards: int) -> int:
    return int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % num_shards


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def shard_count(num_images: int, shard_size: int = DEFAULT_SHARD_SIZE) -> int:
    return max(1, math.ceil(num_images / max(1, shard_size)))


@dataclass(frozen=True)
class JobRecord:
    """What makes two runs the same job: a rerun must agree on all of it."""

    num_shards: int
    concepts: tuple[str, ...]
    model_fingerprint: str
    settings: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"num_shards": self.num_shards, "concepts": list(self.concepts),
                           "model_fingerprint": self.model_fingerprint, "settings": self.settings})


def publish_bytes(fs, path: str, data: bytes) -> None:
    """Make `path` appear with `data` atomically (rename locally, one PUT remotely)."""
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    else:
        fs.pipe_file(path, data)


def open_job(output: str, record: JobRecord, storage_options: dict | None = None) -> tuple[JobRecord, set[int]]:
    """Record the job (or read back an earlier run's record) -> (record, committed shards)."""
    fs, root = url_to_fs(output, **(storage_options or {}))
    job_path = f"{root.rstrip('/')}/{JOB_FILE}"
    try:
        fs.makedirs(root, exist_ok=True)
        if fs.exists(job_path):
            previous = json.loads(fs.cat_file(job_path))
            same = (
                sorted(previous["concepts"]) == sorted(record.concepts)
                and previous["model_fingerprint"] == record.model_fingerprint
                and previous.get("settings", {}) == record.settings
            )
            if not same:
                raise OutputError(
                    f"{output}: holds a job with concepts {previous['concepts']}, model "
                    f"{previous['model_fingerprint']} and settings {previous.get('settings', {})}; "
                    "use another --output for a different job"
                )
            record = JobRecord(int(previous["num_shards"]), record.concepts, record.model_fingerprint, record.settings)
        else:
            publish_bytes(fs, job_path, record.to_json().encode())
        committed = {
            int(os.path.basename(p)[5:10]) for p in fs.glob(f"{root.rstrip('/')}/part-*.parquet")
        }
    except OutputError:
        raise
    except (OSError, PermissionError, ValueError) as error:
        raise OutputError(f"{output}: cannot write the output ({type(error).__name__}: {error}); pass a writable --output") from None
    return record, committed


def commit_shard(output: str, shard: int, table: pa.Table, storage_options: dict | None = None) -> str:
    """Write one shard's rows as one Parquet file, published atomically -> its path."""
    fs, root = url_to_fs(output, **(storage_options or {}))
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    path = f"{root.rstrip('/')}/{shard_name(shard)}"
    publish_bytes(fs, path, buffer.getvalue())
    return path
