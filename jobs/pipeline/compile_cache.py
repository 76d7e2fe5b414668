"""Warm starts: the compiled encoder's artifacts kept between runs, so that a scheduled run's
actors load them instead of compiling (persam_core.speed.compile_cache owns the key and torch's
serialisation; this module owns where the bytes live and what a run says about them).

Where: `--compile-cache LOCATION` (JobSpec.compile_cache, the one owner): a folder or any
fsspec URL (s3://, gs://, ...: one location a cluster's nodes share, read with the job's
--storage-option settings); by default the folder `compile` under PERSAM_CACHE
(~/.cache/persam), one per node; `off` keeps nothing. One file per key,
`<model type>-<digest>.bin`: a header line naming the whole key, then torch's bytes. A file
whose header names another key (copied, renamed, foreign) or that torch cannot read is
ignored with one log line and the actor compiles cold; nothing in the cache ever stops a run.

Writes are whole or nothing: a local file is written under a temporary name and renamed
into place, an object store's PUT publishes the whole object at once, so an actor never
reads half an entry. An entry is written only by an actor that found none it could use;
actors racing on the same key write the same key's artifacts, and the last rename wins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from fsspec.core import url_to_fs
from persam_core.speed.acceleration import EncoderSpeed, prepare_encoder
from persam_core.modeling.backbone import Model
from persam_core.speed.compile_cache import CacheKey, cache_key, compile_counts, load_artifacts, save_artifacts
from persam_core.errors import describe

from jobs.pipeline.job_record import persam_version
from jobs.storage.checkpoints import cache_dir
from jobs.storage.redaction import redact

logger = logging.getLogger(__name__)

OFF = "off"
MAGIC = b"persam-compile-cache\n"


def location(setting: str | None) -> str | None:
    """--compile-cache as given -> the folder or URL the entries live under; None: off."""
    if setting == OFF:
        return None
    return setting or str(cache_dir() / "compile")


def _is_local(where: str) -> bool:
    return "://" not in where or where.startswith("file://")


def _local_path(where: str) -> Path:
    return Path(where.split("://", 1)[-1] if where.startswith("file://") else where).expanduser()


def entry_bytes(key: CacheKey, blob: bytes) -> bytes:
    """What one entry holds: the magic line, the key as one JSON line, torch's bytes."""
    return MAGIC + json.dumps(asdict(key), sort_keys=True).encode() + b"\n" + blob


def artifacts_of(key: CacheKey, data: bytes) -> bytes:
    """An entry's torch bytes, or ValueError saying why the entry is not this key's."""
    if not data.startswith(MAGIC):
        raise ValueError("not a persam compile-cache entry")
    header, _, blob = data[len(MAGIC):].partition(b"\n")
    try:
        found = json.loads(header)
    except ValueError:
        raise ValueError("unreadable key line") from None
    if found != json.loads(json.dumps(asdict(key), sort_keys=True)):
        raise ValueError("written for another torch / device / model / settings")
    return blob


class CompileCache:
    """The entries under one location (a folder or fsspec URL)."""

    def __init__(self, where: str, storage_options: dict[str, Any] | None = None) -> None:
        self.where = where.rstrip("/")
        self.storage_options = dict(storage_options or {})

    def shown(self, key: CacheKey) -> str:
        """The entry's address for logs: never credentials or signed query strings."""
        return f"{redact(self.where)}/{key.name()}.bin"

    def read(self, key: CacheKey) -> bytes | None:
        """The entry's bytes, None when there is none (OSError for a storage that failed)."""
        name = f"{key.name()}.bin"
        if _is_local(self.where):
            path = _local_path(self.where) / name
            return path.read_bytes() if path.is_file() else None
        fs, root = url_to_fs(self.where, **self.storage_options)
        try:
            return fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            return None

    def write(self, key: CacheKey, data: bytes) -> None:
        """Publish the entry whole (see the module docstring)."""
        name = f"{key.name()}.bin"
        if _is_local(self.where):
            folder = _local_path(self.where)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f".{name}.part{os.getpid()}"
            try:
                partial.write_bytes(data)
                os.replace(partial, folder / name)
            finally:
                partial.unlink(missing_ok=True)
            return
        fs, root = url_to_fs(self.where, **self.storage_options)
        fs.pipe_file(f"{root}/{name}", data)


def _load(cache: CompileCache, key: CacheKey, log: Callable[[str], None]) -> bool:
    """The entry's artifacts into this process's compile caches -> whether any were loaded."""
    try:
        data = cache.read(key)
        if data is None:
            return False
        return load_artifacts(artifacts_of(key, data)) > 0
    except Exception as error:  # a foreign, truncated or unreadable entry only costs the warm start
        log(f"encoder compile: ignoring the cache entry {cache.shown(key)} ({describe(error)}); compiling cold")
        return False


def prepare_warm(sam: Model, speed: EncoderSpeed, model_type: str, setting: str | None,
                 storage_options: dict[str, Any] | None = None, log: Callable[[str], None] = logger.info) -> EncoderSpeed:
    """`prepare_encoder` with the compiled encoder's artifacts loaded from the cache before it
    compiles, and saved there after a cold compile -> the settings in effect. Logs one line:
    warm or cold, and the seconds compile + warm-up took."""
    where = location(setting) if speed.compile else None
    if where is None:
        return prepare_encoder(sam, speed, log=log)
    cache = CompileCache(where, storage_options)
    key = cache_key(model_type, speed, next(sam.parameters()).device, persam_version())
    loaded = _load(cache, key, log)
    before = compile_counts()
    started = time.perf_counter()
    effective = prepare_encoder(sam, speed, log=log)
    seconds = time.perf_counter() - started
    if not effective.compile:  # compilation failed and the encoder runs eagerly: nothing to keep
        return effective
    built = compile_counts()["miss"] - before["miss"]
    if loaded and built == 0:
        log(f"encoder compile: warm (cache {key.name()}), compile + warm-up {seconds:.1f} s")
        return effective
    try:
        blob = save_artifacts()
        if blob is None:
            log(f"encoder compile: cold, compile + warm-up {seconds:.1f} s; torch produced nothing to cache")
            return effective
        cache.write(key, entry_bytes(key, blob))
        log(f"encoder compile: cold, compile + warm-up {seconds:.1f} s; saved to {cache.shown(key)}")
    except Exception as error:  # a read-only or unreachable cache only costs the next run's warm start
        log(f"encoder compile: cold, compile + warm-up {seconds:.1f} s; not saved to {cache.shown(key)} "
            f"({describe(error)})")
    return effective
