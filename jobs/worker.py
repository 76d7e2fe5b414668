"""The model actor: SAM and the concepts loaded once; each call segments whole shards.

Per shard: images with cached features skip the encoder; the others are encoded once
(in batches of --batch-size) and their features go to the cache; every concept decodes
from the same features. Rows carried over from the previous commit pass through.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from persam_core.acceleration import compile_encoder as compile_image_encoder
from persam_core.acceleration import enable_fused_attention
from persam_core.concept import Concept
from persam_core.instances import InstanceResult, segment_instances
from persam_core.masks import area_px, bbox_xywh, encode_rle
from persam_core.persam import ConceptTensors, prior_for
from persam_core.predictor import EncodedImage, encode_images

from .cache import CachedFeatures, FeatureCache
from .checkpoints import load_model
from .runtime import resolve_device
from .schema import RANK_SCHEMA, rows_to_table
from .shard_payload import Shard, ShardItem, short_reason, table_to_ipc, unpack_shard


def error_row(item: ShardItem, concept: Concept, reason: str, fingerprint: str, size: tuple[int, int] | None = None) -> dict:
    return {
        "image_uri": item.url, "concept": concept.name, "method": concept.method, "instance": 0, "present": False,
        "width": None if size is None else size[1], "height": None if size is None else size[0],
        "mask_rle": None, "bbox": None, "area": 0, "score": None, "similarity": None, "point": None,
        "error": reason, "model_fingerprint": fingerprint, "content_sha256": item.sha256,
    }


def result_row(item: ShardItem, concept: Concept, found: InstanceResult, fingerprint: str) -> dict:
    result = found.result
    height, width = result.mask.shape
    return {
        "image_uri": item.url, "concept": concept.name, "method": concept.method, "instance": found.instance,
        "present": found.present, "width": width, "height": height, "mask_rle": encode_rle(result.mask),
        "bbox": bbox_xywh(result.mask), "area": area_px(result.mask),
        "score": result.score if found.present else None, "similarity": result.similarity,
        "point": list(result.point), "error": None, "model_fingerprint": fingerprint,
        "content_sha256": item.sha256,
    }


def score_row(item: ShardItem, concept: Concept, similarity: float | None, point, error: str | None, fingerprint: str) -> dict:
    return {"image_uri": item.url, "concept": concept.name, "similarity": similarity,
            "point": None if point is None else list(point), "error": error,
            "model_fingerprint": fingerprint, "content_sha256": item.sha256}


def encode_shard(
    sam, items: Sequence[ShardItem], batch_size: int, precision: str = "fp32"
) -> tuple[dict[int, EncodedImage], dict[int, str]]:
    """Features for every item that has pixels or cached features -> ({index: encoded}, {index: error})."""
    device = next(sam.parameters()).device
    encoded, failures = {}, {}
    for index, item in enumerate(items):
        if item.cached is not None:
            features = torch.as_tensor(np.asarray(item.cached.features, dtype=np.float32), device=device)
            encoded[index] = EncodedImage(features, item.cached.input_size, item.cached.original_size)
    pending = [i for i, item in enumerate(items) if item.image is not None]
    for start in range(0, len(pending), max(1, batch_size)):
        chunk = pending[start : start + batch_size]
        try:
            for index, features in zip(chunk, encode_images(sam, [items[i].image for i in chunk], precision)):
                encoded[index] = features
        except Exception as error:  # e.g. out of memory on one batch: record, go on
            failures.update({i: f"encode failed: {short_reason(error)}" for i in chunk})
    return encoded, failures


def segment_shard(
    sam, fingerprint: str, concepts: Sequence[ConceptTensors], shard: Shard, batch_size: int,
    max_instances: int = 1, min_similarity: float | None = None, precision: str = "fp32",
) -> tuple[list[dict], dict[int, EncodedImage]]:
    """-> (rows: images x concepts x instances, features computed or read per item index)."""
    encoded, failures = encode_shard(sam, shard.items, batch_size, precision)
    rows: list[dict] = []
    for index, item in enumerate(shard.items):
        if item.carried:
            continue
        size = item.image.original_size if item.image is not None else None
        if index not in encoded:
            reason = item.error or failures.get(index, "unknown error")
            rows.extend(error_row(item, c.concept, reason, fingerprint, size) for c in concepts)
            continue
        for tensors in concepts:
            try:
                found = segment_instances(sam, encoded[index], tensors, max_instances, min_similarity)
                rows.extend(result_row(item, tensors.concept, f, fingerprint) for f in found)
            except Exception as error:
                rows.append(error_row(item, tensors.concept, f"segment failed: {short_reason(error)}", fingerprint,
                                      encoded[index].original_size))
    return rows, encoded


def score_shard(
    sam, fingerprint: str, concept: ConceptTensors, shard: Shard, batch_size: int, precision: str = "fp32"
) -> tuple[list[dict], dict[int, EncodedImage]]:
    """Presence score (max of S) and positive point per image: no mask decoding."""
    encoded, failures = encode_shard(sam, shard.items, batch_size, precision)
    rows = []
    for index, item in enumerate(shard.items):
        if index not in encoded:
            rows.append(score_row(item, concept.concept, None, None, item.error or failures.get(index), fingerprint))
            continue
        prior = prior_for(sam, encoded[index], concept)
        rows.append(score_row(item, concept.concept, prior.presence, prior.positive_point(), None, fingerprint))
    return rows, encoded


def ordered(rows: list[dict], items: Sequence[ShardItem], concepts: Sequence[Concept]) -> list[dict]:
    order = {item.url: i for i, item in enumerate(items)}
    names = {c.name: i for i, c in enumerate(concepts)}
    return sorted(rows, key=lambda r: (order.get(r["image_uri"], -1), names.get(r["concept"], -1), r.get("instance") or 0))


class SegmentActor:
    """Ray Data UDF: SAM + concepts loaded once in __init__; __call__ processes shards.

    task "segment" writes mask rows; task "score" (persam rank) only the presence score.
    """

    def __init__(
        self, model_type: str, checkpoint: str, expected_fingerprint: str, concepts_box: list, device: str,
        batch_size: int, threads: int, storage_options: dict | None = None, max_instances: int = 1,
        min_similarity: float | None = None, task: str = "segment", cache: dict | None = None,
        precision: str = "fp32", fused_attention: bool = False, compile_encoder: bool = False,
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
        self.sam = loaded.sam.to(resolve_device(device))
        self.fingerprint = loaded.fingerprint
        if fused_attention:
            enable_fused_attention(self.sam)
        if compile_encoder:
            compile_image_encoder(self.sam)
        self.precision = precision
        texts = ray.get(concepts_box[0])  # broadcast once through the object store
        self.concepts = [ConceptTensors.on(Concept.from_json(text), self.sam.device) for text in texts]
        self.batch_size, self.task = batch_size, task
        self.max_instances, self.min_similarity = max_instances, min_similarity
        self.cache = (FeatureCache(cache["url"], self.fingerprint, cache["dtype"], storage_options, cache["num_shards"])
                      if cache else None)

    def _store_cache(self, shard: Shard, encoded: dict[int, EncodedImage]) -> int:
        """Add the features encoded for this shard to the cache -> how many were encoded."""
        fresh = [i for i, item in enumerate(shard.items) if item.image is not None and i in encoded]
        if self.cache is not None and fresh:
            self.cache.store({
                shard.items[i].url: (shard.items[i].sha256, CachedFeatures(
                    encoded[i].features.detach().cpu().numpy(), encoded[i].input_size, encoded[i].original_size))
                for i in fresh
            })
        return len(fresh)

    def __call__(self, batch: dict) -> dict:
        out = {"shard": [], "table": [], "seconds": [], "encoded": [], "cache_hits": [], "carried": [], "removed": [],
               "problems": []}
        for payload in batch["payload"]:
            started = time.perf_counter()
            shard = unpack_shard(payload)
            if self.task == "score":
                rows, encoded = score_shard(self.sam, self.fingerprint, self.concepts[0], shard, self.batch_size,
                                            self.precision)
                table = pa.Table.from_pylist(rows, schema=RANK_SCHEMA)
            else:
                rows, encoded = segment_shard(self.sam, self.fingerprint, self.concepts, shard, self.batch_size,
                                              self.max_instances, self.min_similarity, self.precision)
                table = rows_to_table(ordered(rows, shard.items, [c.concept for c in self.concepts]))
                if shard.carried_rows is not None and shard.carried_rows.num_rows:
                    table = pa.concat_tables([shard.carried_rows.select(table.column_names).cast(table.schema), table])
            out["encoded"].append(self._store_cache(shard, encoded))
            out["cache_hits"].append(sum(item.cached is not None for item in shard.items))
            out["carried"].append(sum(item.carried for item in shard.items))
            out["removed"].append(shard.removed)
            out["problems"].append("\n".join(shard.cache_problems))
            out["shard"].append(shard.shard)
            out["table"].append(table_to_ipc(table))
            out["seconds"].append(time.perf_counter() - started)
        return {key: np.array(values, dtype=object if key in ("table", "problems") else None) for key, values in out.items()}
