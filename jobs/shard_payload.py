"""The CPU stage: read, hash and decode one shard, and pack it for the model actor.

A shard travels as one row whose payload is an `.npz` (no pickle): per image either
resized uint8 pixels (to encode), cached encoder features (to decode only), or nothing
because its rows are carried over unchanged from the previous commit of this output.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from persam_core.preprocess import ResizedImage, resize_longest_side

from .cache import CachedFeatures, FeatureCache, content_sha256
from .checkpoints import redact
from .images import DEFAULT_MAX_PIXELS, decode_image
from .inputs import read_bytes


@dataclass
class ShardItem:
    """One image of a shard: exactly one of error / image / cached / carried is set."""

    url: str
    sha256: str | None = None
    error: str | None = None
    image: ResizedImage | None = None
    cached: CachedFeatures | None = None
    carried: bool = False


@dataclass
class Shard:
    shard: int
    items: list[ShardItem]
    carried_rows: pa.Table | None = None
    cache_problems: tuple[str, ...] = ()
    removed: int = 0  # images of the previous commit no longer in the input


def short_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (how rows travel between the job's stages)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def pack_shard(shard: Shard) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for i, item in enumerate(shard.items):
        entry = {"url": item.url, "sha256": item.sha256, "error": item.error, "carried": item.carried}
        if item.image is not None:
            arrays[f"pixels_{i}"] = item.image.pixels
            entry["original_size"] = list(item.image.original_size)
        if item.cached is not None:
            arrays[f"features_{i}"] = item.cached.features
            entry["cached_sizes"] = [list(item.cached.input_size), list(item.cached.original_size)]
        meta.append(entry)
    header = {"shard": shard.shard, "items": meta, "cache_problems": list(shard.cache_problems), "removed": shard.removed}
    arrays["meta"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    carried = b"" if shard.carried_rows is None else table_to_ipc(shard.carried_rows)
    arrays["carried_rows"] = np.frombuffer(carried, dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_shard(payload: bytes) -> Shard:
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        header = json.loads(archive["meta"].tobytes())
        items = []
        for i, entry in enumerate(header["items"]):
            item = ShardItem(entry["url"], entry["sha256"], entry["error"], carried=entry["carried"])
            if "original_size" in entry:
                item.image = ResizedImage(archive[f"pixels_{i}"], tuple(entry["original_size"]))
            if "cached_sizes" in entry:
                input_size, original_size = (tuple(s) for s in entry["cached_sizes"])
                item.cached = CachedFeatures(archive[f"features_{i}"], input_size, original_size)
            items.append(item)
        carried = archive["carried_rows"].tobytes()
    table = ipc_to_table(carried) if carried else None
    return Shard(header["shard"], items, table, tuple(header["cache_problems"]), header["removed"])


def _previous_rows(paths: list[str], storage_options: dict | None) -> pa.Table | None:
    """The rows this shard published before (files it is about to supersede)."""
    tables = []
    for path in paths:
        fs, root = url_to_fs(path, **(storage_options or {}))
        try:
            tables.append(pq.read_table(io.BytesIO(fs.cat_file(root))))
        except Exception:  # unreadable: its images are simply recomputed
            continue
    return pa.concat_tables(tables, promote_options="default") if tables else None


def prepare_shard(
    row: dict,
    storage_options: dict | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    cache: FeatureCache | None = None,
) -> dict:
    """{"shard", "urls", "previous"} -> {"shard", "payload"} (see module docstring)."""
    shard = int(row["shard"])
    previous = _previous_rows(list(row.get("previous") or []), storage_options)
    unchanged: set[tuple[str, str]] = set()
    if previous is not None and "content_sha256" in previous.column_names:
        unchanged = {(u, s) for u, s, e in zip(previous.column("image_uri").to_pylist(),
                                               previous.column("content_sha256").to_pylist(),
                                               previous.column("error").to_pylist()) if s and e is None}
    cached, problems = cache.load(list(row["urls"])) if cache is not None else ({}, [])
    items, carried_urls = [], set()
    for url in row["urls"]:
        item = ShardItem(url)
        try:
            data = read_bytes(url, storage_options)
        except Exception as error:  # missing object, permission, timeout: the job goes on
            item.error = f"read failed: {short_reason(error)}"
            items.append(item)
            continue
        item.sha256 = content_sha256(data)
        if (url, item.sha256) in unchanged:
            item.carried = True
            carried_urls.add(url)
        elif item.sha256 in cached:
            item.cached = cached[item.sha256]
        else:
            try:
                item.image = resize_longest_side(decode_image(data, redact(url), max_pixels))
            except Exception as error:
                item.error = f"decode failed: {short_reason(error)}"
        items.append(item)
    carried_rows, removed = None, 0
    if previous is not None:
        previous_urls = previous.column("image_uri").to_pylist()
        removed = len(set(previous_urls) - set(row["urls"]))
        if carried_urls:
            carried_rows = previous.filter(pa.array([u in carried_urls for u in previous_urls]))
    return {"shard": shard, "payload": pack_shard(Shard(shard, items, carried_rows, tuple(problems), removed))}
