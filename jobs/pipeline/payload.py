"""What travels between the job's stages: one owner per format, and no pickle anywhere.

    driver ──{"shard", "chunk", "urls", "previous"}──► prepare (CPU task)
           ──{"meta", "arrays"}──► SegmentActor (GPU) ──{"meta", "results"}──► finish (CPU task)
           ──FinishedChunk.to_row()──► driver (gathers a shard's chunks, commits it)

A *chunk* is a few images of one shard (the unit of work of the model actor); a shard is
what becomes one Parquet file. `meta` is the chunk's JSON header (per image: URL, content
hash, error, sizes, where its features come from) and passes the actor untouched; `arrays`
(an array bundle) holds only what the actor needs on the device: resized pixels or cached
features; `results` (an array bundle) is what the actor computed, host numpy only, without
rows; a `FinishedChunk` is the chunk's rows (Arrow IPC) and counts, as the driver receives them.

An array bundle is a JSON header (names, dtypes, shapes, offsets) followed by the arrays'
raw bytes, each 64-byte aligned: packing is one copy; the model actor unpacks its chunk as
read-only views (no copy), the finish stage its results as one copy. It replaced npz, whose
zip framing (a CRC over every byte, a copy per member) cost host time in the actor on every
chunk. For 16 images of 1024 x 768 x 3 uint8 (37 MiB) on the 2-vCPU development machine:
npz save 25.0 ms / load 19.1 ms; bundle pack 16.0 ms / unpack 0.3 ms as views, 16.8 ms
as a copy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa

from persam_core.host_results import HostResults
from persam_core.modeling.resized import ResizedImage


@dataclass
class ChunkItem:
    """One image of a chunk. `source`: "pixels" (to encode) or "cached" (features from the
    cache); None when `error` is set or the image is `carried` (its rows are copied from the
    shard's previous commit: same URL, same content)."""

    url: str
    sha256: str | None = None
    error: str | None = None
    carried: bool = False
    source: str | None = None
    original_size: tuple[int, int] | None = None  # (H, W) as displayed (EXIF applied)
    input_size: tuple[int, int] | None = None  # (h, w) after the model's resize (SAM 2: always 1024 x 1024)


@dataclass
class Chunk:
    """pixels: item index -> the resized pixels (source "pixels"): SAM [h, w, 3] uint8, SAM 2
    [1024, 1024, 3] float32 (persam_core.modeling.inputs);
    features: item index -> [256, 64, 64] fp16/fp32 from the cache (source "cached");
    high_res: item index -> SAM 2's cached high-resolution levels, same dtype (absent for SAM);
    stretch: item index -> the 1024 x 1024 stretch frame [1024, 1024, 3] uint8, for methods
    that read it (GF-SAM; persam_core.methods.frames); stretch_features / stretch_tokens: item
    index -> that frame's cached SAM features [256, 64, 64] and DINOv2 tokens [1369, C] (tokens
    alone, no features, for a pass that reads no SAM features: PreparedJob.needs_sam)."""

    shard: int
    index: int
    items: list[ChunkItem]
    cache_problems: tuple[str, ...] = ()
    pixels: dict[int, np.ndarray] = field(default_factory=dict)
    features: dict[int, np.ndarray] = field(default_factory=dict)
    high_res: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)
    stretch: dict[int, np.ndarray] = field(default_factory=dict)
    stretch_features: dict[int, np.ndarray] = field(default_factory=dict)
    stretch_tokens: dict[int, np.ndarray] = field(default_factory=dict)

    def resized(self, item: int) -> ResizedImage:
        return ResizedImage(self.pixels[item], tuple(self.items[item].original_size))

    def stretched(self, item: int) -> ResizedImage:
        return ResizedImage(self.stretch[item], tuple(self.items[item].original_size))


@dataclass
class ChunkResults:
    """What the model actor computed for one chunk: numbers and packed masks, no rows.

    failures: item index -> reason ("encode failed: ...", "segment failed: ...");
    encoded: item indices that went through the encoder in this call;
    masks (task "segment"): HostResults whose image_index is the item index;
    similarity / point (task "score"): [N, K] float32 (NaN where not scored) / [N, K, 2] int32 (x, y);
    fresh: item index -> [256, 64, 64] features just encoded, in the cache's dtype (for the cache);
    fresh_high_res: item index -> SAM 2's high-resolution levels just encoded, same dtype;
    fresh_stretch: item index -> (SAM features, DINOv2 tokens) of the stretch frame just encoded;
    fresh_tokens: item index -> DINOv2 tokens just encoded by a pass that runs no SAM.
    """

    failures: dict[int, str] = field(default_factory=dict)
    encoded: list[int] = field(default_factory=list)
    masks: HostResults | None = None
    similarity: np.ndarray | None = None
    point: np.ndarray | None = None
    fresh: dict[int, np.ndarray] = field(default_factory=dict)
    fresh_high_res: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)
    fresh_stretch: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fresh_tokens: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FinishedChunk:
    """One chunk's rows and counts, from the CPU stage after the actor to the driver.

    table: the rows as Arrow IPC (table_to_ipc); carried: URLs whose rows the committer
    copies from the shard's previous file; problems: cache problems, one line each."""

    shard: int
    chunk: int
    images: int
    table: bytes
    encoded: int = 0
    cache_hits: int = 0
    carried: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    def to_row(self) -> dict:
        """-> a Ray Data row: numbers and bytes, lists as JSON (no pickled objects)."""
        return {"shard": self.shard, "chunk": self.chunk, "images": self.images, "table": self.table,
                "encoded": self.encoded, "cache_hits": self.cache_hits,
                "carried": json.dumps(list(self.carried)), "problems": json.dumps(list(self.problems))}

    @classmethod
    def from_row(cls, row: dict) -> "FinishedChunk":
        return cls(int(row["shard"]), int(row["chunk"]), int(row["images"]), bytes(row["table"]),
                   int(row["encoded"]), int(row["cache_hits"]), tuple(json.loads(row["carried"])),
                   tuple(json.loads(row["problems"])))

    def rows(self) -> pa.Table:
        return ipc_to_table(self.table)


_ALIGN = 64
_LENGTH = struct.Struct("<Q")  # the JSON header's length, first in a bundle


def _aligned(size: int) -> int:
    """size rounded up to the next multiple of _ALIGN."""
    return -(-size // _ALIGN) * _ALIGN


def bundle(arrays: dict[str, np.ndarray], header: dict) -> bytes:
    """Arrays + a JSON-able header -> bytes: [length][JSON][pad][array 0][pad][array 1]..."""
    contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    entries, offset = [], 0
    for name, array in contiguous.items():
        entries.append({"name": name, "dtype": array.dtype.str, "shape": list(array.shape), "offset": offset})
        offset += _aligned(array.nbytes)
    text = json.dumps({"header": header, "arrays": entries}).encode()
    head = _LENGTH.pack(len(text)) + text
    parts: list = [head, bytes(_aligned(len(head)) - len(head))]
    for array in contiguous.values():
        parts.append(memoryview(array.reshape(-1).view(np.uint8)))
        parts.append(bytes(_aligned(array.nbytes) - array.nbytes))
    return b"".join(parts)


def unbundle(data: bytes | np.ndarray, copy: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """bytes of `bundle` -> (header, {name: array}): writable views of one copy, or with
    copy=False read-only views of `data` itself (the model actor's pixels: the device copy
    is the only one it needs, see persam_core.modeling.preprocess.array_to_device). `data`: bytes or
    a uint8 array (pack_chunk's)."""
    buffer = bytearray(data) if copy else data
    (length,) = _LENGTH.unpack_from(buffer)
    layout = json.loads(bytes(buffer[_LENGTH.size : _LENGTH.size + length]))
    start = _aligned(_LENGTH.size + length)
    arrays = {}
    for entry in layout["arrays"]:
        dtype, shape = np.dtype(entry["dtype"]), tuple(entry["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        arrays[entry["name"]] = np.frombuffer(buffer, dtype, count, start + entry["offset"]).reshape(shape)
    return layout["header"], arrays


def _size(value) -> tuple[int, int] | None:
    return None if value is None else (int(value[0]), int(value[1]))


def _level_arrays(prefix: str, levels: dict[int, tuple[np.ndarray, ...]]) -> dict[str, np.ndarray]:
    """{item: (level 0, level 1, ...)} -> bundle entries "<prefix><level>_<item>"."""
    return {f"{prefix}{level}_{i}": array for i, arrays in levels.items() for level, array in enumerate(arrays)}


def _levels_of(arrays: dict[str, np.ndarray], prefix: str) -> dict[int, tuple[np.ndarray, ...]]:
    """The inverse of _level_arrays: entries "<prefix><level>_<item>" -> {item: levels in order}."""
    found: dict[int, dict[int, np.ndarray]] = {}
    for name, array in arrays.items():
        if name.startswith(prefix):
            level, _, item = name[len(prefix):].partition("_")
            found.setdefault(int(item), {})[int(level)] = array
    return {item: tuple(levels[level] for level in sorted(levels)) for item, levels in found.items()}


def pack_chunk(chunk: Chunk) -> tuple[bytes, np.ndarray]:
    """-> (meta: JSON bytes, arrays: the bundle as a uint8 array). As an array, Ray Data stores
    it as a tensor column and hands the actor a read-only view of its object store (bytes
    would be copied into a new Python object on every call)."""
    items = [{"url": i.url, "sha256": i.sha256, "error": i.error, "carried": i.carried, "source": i.source,
              "original_size": i.original_size, "input_size": i.input_size} for i in chunk.items]
    meta = {"shard": chunk.shard, "chunk": chunk.index, "items": items, "cache_problems": list(chunk.cache_problems)}
    arrays = {f"pixels_{i}": a for i, a in chunk.pixels.items()}
    arrays.update({f"features_{i}": a for i, a in chunk.features.items()})
    arrays.update({f"stretch_{i}": a for i, a in chunk.stretch.items()})
    arrays.update({f"sfeatures_{i}": a for i, a in chunk.stretch_features.items()})
    arrays.update({f"stokens_{i}": a for i, a in chunk.stretch_tokens.items()})
    arrays.update(_level_arrays("level", chunk.high_res))
    return json.dumps(meta).encode(), np.frombuffer(bundle(arrays, {}), np.uint8)


def unpack_chunk(meta: bytes, arrays: bytes | np.ndarray | None = None) -> Chunk:
    """The chunk of `meta`; with `arrays`, also its pixels and cached features."""
    header = json.loads(bytes(meta))
    items = [ChunkItem(e["url"], e["sha256"], e["error"], e["carried"], e["source"], _size(e["original_size"]),
                       _size(e["input_size"])) for e in header["items"]]
    chunk = Chunk(int(header["shard"]), int(header["chunk"]), items, tuple(header["cache_problems"]))
    if arrays is not None:
        _, unpacked = unbundle(arrays, copy=False)
        for name, array in unpacked.items():
            kind, _, index = name.rpartition("_")
            if kind == "pixels":
                chunk.pixels[int(index)] = array
            elif kind == "features":
                chunk.features[int(index)] = array
            elif kind == "stretch":
                chunk.stretch[int(index)] = array
            elif kind == "sfeatures":
                chunk.stretch_features[int(index)] = array
            elif kind == "stokens":
                chunk.stretch_tokens[int(index)] = array
        chunk.high_res = _levels_of(unpacked, "level")
    return chunk


def pack_results(results: ChunkResults) -> bytes:
    arrays: dict[str, np.ndarray] = {f"fresh_{i}": a for i, a in results.fresh.items()}
    arrays.update(_level_arrays("freshlevel", results.fresh_high_res))
    arrays.update(_level_arrays("freshstretch", results.fresh_stretch))
    arrays.update({f"freshtokens_{i}": a for i, a in results.fresh_tokens.items()})
    if results.masks is not None:
        arrays.update({f"masks_{k}": v for k, v in results.masks.to_arrays().items()})
    if results.similarity is not None:
        arrays.update(similarity=results.similarity, point=results.point)
    header = {"failures": {str(i): r for i, r in results.failures.items()}, "encoded": results.encoded}
    return bundle(arrays, header)


def unpack_results(data: bytes) -> ChunkResults:
    header, arrays = unbundle(data)
    results = ChunkResults({int(i): r for i, r in header["failures"].items()}, list(header["encoded"]))
    if "masks_image_index" in arrays:
        results.masks = HostResults.from_arrays({f.name: arrays[f"masks_{f.name}"] for f in fields(HostResults)})
    if "similarity" in arrays:
        results.similarity, results.point = arrays["similarity"], arrays["point"]
    results.fresh = {int(n.rpartition("_")[2]): a for n, a in arrays.items() if n.startswith("fresh_")}
    results.fresh_high_res = _levels_of(arrays, "freshlevel")
    results.fresh_stretch = _levels_of(arrays, "freshstretch")  # type: ignore[assignment]
    results.fresh_tokens = {int(n.rpartition("_")[2]): a for n, a in arrays.items() if n.startswith("freshtokens_")}
    return results


def table_to_ipc(table: pa.Table) -> bytes:
    """A table as Arrow IPC stream bytes (how rows travel from the CPU stage to the driver)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()
