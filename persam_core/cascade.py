"""The batched PerSAM cascade: every (image, concept) pair of an encoder batch at once.

STUB (interface only): loops over the one-image functions; replaced by the batched
implementation. The signatures below are the contract.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from segment_anything.modeling import Sam

from .batch import EncodedBatch, HostResults, empty_host_results
from .concept import ConceptTensors


@torch.no_grad()
def segment_batch(
    sam: Sam,
    batch: EncodedBatch,
    concepts: Sequence[ConceptTensors],
    max_instances: int = 1,
    min_similarity: float | None = None,
) -> HostResults:
    """All B x K pairs -> rows ordered by (image, concept, instance); masks leave the device once."""
    from .instances import segment_instances

    rows = []
    for image_index in range(len(batch)):
        encoded = batch.image(image_index)
        for concept_index, concept in enumerate(concepts):
            for found in segment_instances(sam, encoded, concept, max_instances, min_similarity):
                rows.append((image_index, concept_index, found))
    if not rows:
        return empty_host_results()
    masks = [found.result.mask for _, _, found in rows]
    packed = [np.packbits(m.reshape(-1)) for m in masks]
    offsets = np.cumsum([0] + [p.size for p in packed]).astype(np.int64)
    from .masks import area_px, bbox_xywh

    return HostResults(
        image_index=np.array([r[0] for r in rows], np.int32),
        concept_index=np.array([r[1] for r in rows], np.int32),
        instance=np.array([r[2].instance for r in rows], np.int32),
        present=np.array([r[2].present for r in rows], bool),
        score=np.array([r[2].result.score if r[2].present else np.nan for r in rows], np.float32),
        similarity=np.array([r[2].result.similarity for r in rows], np.float32),
        point=np.array([r[2].result.point for r in rows], np.int32).reshape(-1, 2),
        bbox=np.array([bbox_xywh(m) for m in masks], np.int32).reshape(-1, 4),
        area=np.array([area_px(m) for m in masks], np.int64),
        mask_bits=np.concatenate(packed) if packed else np.zeros(0, np.uint8),
        mask_offsets=offsets,
        mask_sizes=np.array([m.shape for m in masks], np.int32).reshape(-1, 2),
    )


@torch.no_grad()
def score_batch(sam: Sam, batch: EncodedBatch, concepts: Sequence[ConceptTensors]) -> tuple[np.ndarray, np.ndarray]:
    """Location prior only (no decoding) -> (similarity [B, K] float32, point [B, K, 2] int32 (x, y))."""
    from .persam import prior_for

    similarity = np.zeros((len(batch), len(concepts)), np.float32)
    points = np.zeros((len(batch), len(concepts), 2), np.int32)
    for i in range(len(batch)):
        for k, concept in enumerate(concepts):
            prior = prior_for(sam, batch.image(i), concept)
            similarity[i, k] = prior.presence
            points[i, k] = prior.positive_point()
    return similarity, points
