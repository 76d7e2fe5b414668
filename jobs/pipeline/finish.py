"""The CPU stage after the model actor: a chunk's results become rows, its features the cache's.

Runs as Ray Data tasks beside the actor, so RLE encoding, Arrow building and cache writes
never hold the GPU. Rows per image in item order, then concept order, then instance:
- computed: mask as COCO RLE, bbox / area from the actor, score null when absent;
- error (read, decode, encode or segment failed): one row per concept, `error` set;
- carried: no row here; the committer copies them from the shard's previous file.

Cache writes happen here, per chunk, each chunk adding its own file (see cache.py): the
chunks of a shard run in parallel, and storing per shard in the driver would route every
image's features (2-4 MiB) through the driver.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from persam_core.host_results import HostResults
from persam_core.masks import encode_rle
from persam_core.methods.registry import FRAME_SIDE

from jobs.pipeline.cache import CachedFeatures, FeatureCache
from jobs.pipeline.job import PreparedJob
from jobs.pipeline.payload import Chunk, ChunkItem, ChunkResults, FinishedChunk, table_to_ipc, unpack_chunk, unpack_results
from jobs.storage.schema import mask_row, rank_rows_to_table, rows_to_table, score_row

ConceptLabel = tuple[str, str]  # (name, method) of a concept, in the job's concept order


def error_row(item: ChunkItem, concept: ConceptLabel, reason: str, fingerprint: str) -> dict:
    return mask_row(item.url, concept[0], concept[1], fingerprint, item.sha256, size=item.original_size, error=reason)


def result_row(item: ChunkItem, concept: ConceptLabel, masks: HostResults, row: int, fingerprint: str) -> dict:
    mask = masks.mask(row)
    score = float(masks.score[row])
    return mask_row(
        item.url, concept[0], concept[1], fingerprint, item.sha256, size=mask.shape, instance=int(masks.instance[row]),
        present=bool(masks.present[row]), mask_rle=encode_rle(mask), bbox=[int(v) for v in masks.bbox[row]],
        area=int(masks.area[row]), score=None if math.isnan(score) else score,
        similarity=float(masks.similarity[row]), point=[int(v) for v in masks.point[row]],
    )


def mask_rows(chunk: Chunk, results: ChunkResults, concepts: Sequence[ConceptLabel], fingerprint: str,
              concepts_for: Callable[[str], Sequence[int]] | None = None) -> list[dict]:
    """-> rows of every image that is not carried: images x concepts x instances; with
    `concepts_for` (url -> concept positions: PreparedJob.concepts_for), only its concepts'."""
    masks = results.masks
    by_image: dict[int, list[int]] = {}
    if masks is not None and len(masks):
        for row in np.lexsort((masks.instance, masks.concept_index, masks.image_index)):
            by_image.setdefault(int(masks.image_index[row]), []).append(int(row))
    rows = []
    for index, item in enumerate(chunk.items):
        if item.carried:
            continue
        found = by_image.get(index)
        if item.error is not None or index in results.failures or not found:
            reason = item.error or results.failures.get(index, "no result for this image")
            chosen = range(len(concepts)) if concepts_for is None else concepts_for(item.url)
            rows.extend(error_row(item, concepts[k], reason, fingerprint) for k in chosen)
            continue
        rows.extend(result_row(item, concepts[int(masks.concept_index[r])], masks, r, fingerprint) for r in found)
    return rows


def score_rows(chunk: Chunk, results: ChunkResults, concepts: Sequence[ConceptLabel], fingerprint: str) -> list[dict]:
    """-> one row per (image, concept): similarity and point, or the error."""
    rows = []
    for index, item in enumerate(chunk.items):
        for k, concept in enumerate(concepts):
            similarity = None if results.similarity is None else float(results.similarity[index, k])
            error = item.error or results.failures.get(index)
            if error is None and (similarity is None or math.isnan(similarity)):
                error = "no result for this image"
            good = error is None
            rows.append(score_row(item.url, concept[0], fingerprint, item.sha256, similarity if good else None,
                                  [int(v) for v in results.point[index, k]] if good else None, error))
    return rows


def store_fresh(cache: FeatureCache, chunk: Chunk, results: ChunkResults) -> None:
    """Add the features the actor encoded for this chunk to the cache."""
    if results.fresh:
        cache.store({chunk.items[i].url: (chunk.items[i].sha256, CachedFeatures(
            features, chunk.items[i].input_size, chunk.items[i].original_size, results.fresh_high_res.get(i, ())))
            for i, features in results.fresh.items()})


def store_fresh_stretch(cache: FeatureCache, chunk: Chunk, results: ChunkResults) -> None:
    """Add the stretch frames the actor encoded (SAM features, DINOv2 tokens as the extra level)."""
    if results.fresh_stretch:
        cache.store({chunk.items[i].url: (chunk.items[i].sha256, CachedFeatures(
            features, (FRAME_SIDE, FRAME_SIDE), chunk.items[i].original_size, (tokens,)))
            for i, (features, tokens) in results.fresh_stretch.items()})


def store_fresh_tokens(cache: FeatureCache, chunk: Chunk, results: ChunkResults) -> None:
    """Add the DINOv2 tokens a presence-only pass encoded (the tokens as each entry's features)."""
    if results.fresh_tokens:
        cache.store({chunk.items[i].url: (chunk.items[i].sha256, CachedFeatures(
            tokens, (FRAME_SIDE, FRAME_SIDE), chunk.items[i].original_size))
            for i, tokens in results.fresh_tokens.items()})


def finish_chunk(row: dict, job: PreparedJob, scores_only: bool = False) -> dict:
    """{"meta", "results"} -> FinishedChunk.to_row() for the driver: mask rows, or with
    `scores_only` (rank's first pass) one score row per (image, concept)."""
    chunk, results = unpack_chunk(row["meta"]), unpack_results(row["results"])
    cache = job.cache()
    if cache is not None:
        store_fresh(cache, chunk, results)
    stretch_cache = job.stretch_cache()
    if stretch_cache is not None:
        store_fresh_stretch(stretch_cache, chunk, results)
    token_cache = job.token_cache()
    if token_cache is not None:
        store_fresh_tokens(token_cache, chunk, results)
    if scores_only:
        table = rank_rows_to_table(score_rows(chunk, results, job.labels(), job.fingerprint))
    else:
        table = rows_to_table(mask_rows(chunk, results, job.labels(), job.fingerprint, job.concepts_for))
    return FinishedChunk(
        chunk.shard, chunk.index, len(chunk.items), table_to_ipc(table), len(results.encoded),
        sum(item.source == "cached" for item in chunk.items), tuple(item.url for item in chunk.items if item.carried),
        tuple(chunk.cache_problems),
    ).to_row()
