"""The job's stages: decode a shard on CPU workers, segment it in a model actor.

Shards travel between stages as single rows whose payload is an `.npz` of the resized
uint8 images (no pickle), so a shard's images stay together until its commit.
"""

from __future__ import annotations

import io
import json
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from persam_core.concept import Concept
from persam_core.masks import area_px, bbox_xywh, encode_rle
from persam_core.instances import InstanceResult, segment_instances
from persam_core.persam import ConceptTensors
from persam_core.predictor import encode_images
from persam_core.preprocess import ResizedImage, resize_longest_side

from .checkpoints import load_model, redact
from .runtime import resolve_device
from .images import DEFAULT_MAX_PIXELS, decode_image
from .inputs import read_bytes
from .schema import rows_to_table


def _short_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:500] if text else type(error).__name__


def pack_shard(urls: Sequence[str], images: Sequence[ResizedImage | None], errors: Sequence[str | None]) -> bytes:
    arrays = {f"pixels_{i}": image.pixels for i, image in enumerate(images) if image is not None}
    meta = [
        {"url": url, "original_size": None if image is None else list(image.original_size), "error": error}
        for url, image, error in zip(urls, images, errors)
    ]
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def unpack_shard(payload: bytes) -> list[tuple[str, ResizedImage | None, str | None]]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
        meta = json.loads(archive["meta"].tobytes())
        return [
            (
                item["url"],
                None if item["original_size"] is None else ResizedImage(archive[f"pixels_{i}"], tuple(item["original_size"])),
                item["error"],
            )
            for i, item in enumerate(meta)
        ]


def load_and_resize(url: str, storage_options: dict | None, max_pixels: int) -> tuple[ResizedImage | None, str | None]:
    """Read + decode + resize one image; any failure becomes its error text."""
    try:
        data = read_bytes(url, storage_options)
    except Exception as error:  # missing object, permission, timeout: the job goes on
        return None, f"read failed: {_short_reason(error)}"
    try:
        return resize_longest_side(decode_image(data, redact(url), max_pixels)), None
    except Exception as error:
        return None, f"decode failed: {_short_reason(error)}"


def decode_shard_row(row: dict, storage_options: dict | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """{"shard", "urls"} -> {"shard", "payload"}: CPU stage, so the model never waits on JPEGs."""
    urls = list(row["urls"])
    decoded = [load_and_resize(url, storage_options, max_pixels) for url in urls]
    return {"shard": int(row["shard"]), "payload": pack_shard(urls, [d[0] for d in decoded], [d[1] for d in decoded])}


def error_row(url: str, concept: Concept, reason: str, fingerprint: str, size: tuple[int, int] | None = None) -> dict:
    return {
        "image_uri": url, "concept": concept.name, "method": concept.method, "instance": 0, "present": False,
        "width": None if size is None else size[1], "height": None if size is None else size[0],
        "mask_rle": None, "bbox": None, "area": 0, "score": None, "similarity": None, "point": None,
        "error": reason, "model_fingerprint": fingerprint,
    }


def result_row(url: str, concept: Concept, found: InstanceResult, fingerprint: str) -> dict:
    result = found.result
    height, width = result.mask.shape
    return {
        "image_uri": url, "concept": concept.name, "method": concept.method, "instance": found.instance,
        "present": found.present, "width": width, "height": height, "mask_rle": encode_rle(result.mask),
        "bbox": bbox_xywh(result.mask), "area": area_px(result.mask),
        "score": result.score if found.present else None, "similarity": result.similarity,
        "point": list(result.point), "error": None, "model_fingerprint": fingerprint,
    }


def segment_items(
    sam,
    fingerprint: str,
    concepts: Sequence[ConceptTensors],
    items,
    batch_size: int,
    max_instances: int = 1,
    min_similarity: float | None = None,
) -> list[dict]:
    """items: [(url, ResizedImage | None, error | None)] -> rows (images x concepts x instances).

    Each image is encoded once (in batches of `batch_size`); every concept decodes from it.
    """
    rows: list[dict] = []
    good = [(url, image) for url, image, _ in items if image is not None]
    for url, image, error in items:
        if image is None:
            rows.extend(error_row(url, c.concept, error or "unknown error", fingerprint) for c in concepts)
    for start in range(0, len(good), max(1, batch_size)):
        chunk = good[start : start + batch_size]
        try:
            encoded = encode_images(sam, [image for _, image in chunk])
        except Exception as error:  # e.g. out of memory on one batch: record, go on
            for url, image in chunk:
                rows.extend(error_row(url, c.concept, f"encode failed: {_short_reason(error)}", fingerprint, image.original_size) for c in concepts)
            continue
        for (url, image), features in zip(chunk, encoded):
            for tensors in concepts:
                try:
                    found = segment_instances(sam, features, tensors, max_instances, min_similarity)
                    rows.extend(result_row(url, tensors.concept, f, fingerprint) for f in found)
                except Exception as error:
                    rows.append(error_row(url, tensors.concept, f"segment failed: {_short_reason(error)}", fingerprint, image.original_size))
    order = {url: i for i, (url, _, _) in enumerate(items)}
    names = {c.concept.name: i for i, c in enumerate(concepts)}
    return sorted(rows, key=lambda r: (order[r["image_uri"]], names[r["concept"]], r["instance"]))


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


class SegmentActor:
    """Ray Data UDF: SAM + concepts loaded once in __init__; __call__ segments shards."""

    def __init__(
        self,
        model_type: str,
        checkpoint: str,
        expected_fingerprint: str,
        concepts_box: list,
        device: str,
        batch_size: int,
        threads: int,
        storage_options: dict | None = None,
        max_instances: int = 1,
        min_similarity: float | None = None,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        loaded = load_model(model_type, checkpoint, storage_options)
        if loaded.fingerprint != expected_fingerprint:
            raise RuntimeError(
                f"{loaded.source}: this node loaded weights {loaded.fingerprint}, the job expects "
                f"{expected_fingerprint}; the checkpoint changed under the job"
            )
        # "auto" resolves here, on the actor's node: a GPU-scheduled actor without a
        # visible CUDA device (a fake GPU resource) still runs, on CPU.
        device = resolve_device(device)
        self.sam = loaded.sam.to(device)
        self.fingerprint = loaded.fingerprint
        texts = ray.get(concepts_box[0])  # broadcast once through the object store
        self.concepts = [ConceptTensors.on(Concept.from_json(text), device) for text in texts]
        self.batch_size = batch_size
        self.max_instances, self.min_similarity = max_instances, min_similarity

    def __call__(self, batch: dict) -> dict:
        shards, tables, seconds = [], [], []
        for shard, payload in zip(batch["shard"], batch["payload"]):
            started = time.perf_counter()
            rows = segment_items(self.sam, self.fingerprint, self.concepts, unpack_shard(payload), self.batch_size,
                                 self.max_instances, self.min_similarity)
            shards.append(int(shard))
            tables.append(table_to_ipc(rows_to_table(rows)))
            seconds.append(time.perf_counter() - started)
        return {"shard": np.array(shards), "table": np.array(tables, dtype=object), "seconds": np.array(seconds)}
