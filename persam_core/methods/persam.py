"""PerSAM (training-free) as a registry method, and the engine it shares with PerSAM-F.

The engine is the batched cascade (persam_core.cascade) over SAM's own input frame: one
location prior for every PerSAM and PerSAM-F pair of an encoder batch, their decoder passes
side by side. The concept is persam_core.concept's (target feature and embedding, plus
PerSAM-F's mask weights).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from persam_core.modeling.families import as_backbone
from ..batch import EncodedBatch
from ..host_results import HostResults
from ..cascade import score_batch, segment_batch
from ..concept import Concept, ConceptTensors, persam_f_target_feature, persam_targets, reference_cells
from ..persam_f import DEFAULT_EPOCHS, fit_mask_weights
from persam_core.modeling.predictor import encode_images
from .frames import FrameImage
from .registry import FRAME_MODEL, FitModels, Shots


class PerSAMEngine:
    """Every PerSAM / PerSAM-F pair of a batch of SAM-frame images (persam_core.cascade)."""

    frame = FRAME_MODEL
    needs_dinov2 = False
    ranks = True
    score_reads_sam = True  # the location prior is over SAM's features

    def on_device(self, concepts: Sequence[Concept], device: torch.device | str) -> list[ConceptTensors]:
        return [ConceptTensors.on(concept, device) for concept in concepts]

    def segment(self, sam, images: Sequence[FrameImage], concepts: list[ConceptTensors], max_instances: int,
                min_similarity: float | None) -> HostResults:
        return segment_batch(sam, EncodedBatch.of([i.encoded for i in images]), concepts, max_instances, min_similarity)

    def score(self, sam, images: Sequence[FrameImage], concepts: list[ConceptTensors]) -> tuple[np.ndarray, np.ndarray]:
        return score_batch(sam, EncodedBatch.of([i.encoded for i in images]), concepts)


ENGINE = PerSAMEngine()


def fit_persam(shots: Shots, sam, fingerprint: str, method: str, mask_weights: bool,
               log: Callable[[str], None]) -> Concept:
    """Shots -> a PerSAM concept (cells of all shots pooled); with `mask_weights`, PerSAM-F's
    pooled target and fitted weights. `sam`: a SAM or SAM 2 model, whose own transform
    resizes the images and the masks."""
    encoded = encode_images(sam, [as_backbone(sam).resize(image) for image in shots.images])
    cells = reference_cells(encoded, shots.masks, shots.mask_sources, model=sam)
    target_feature, target_embedding = persam_targets(cells)
    weights = None
    if mask_weights:
        epochs = shots.epochs or DEFAULT_EPOCHS
        target_feature = persam_f_target_feature(cells)
        started = time.perf_counter()
        sizes = ", ".join(f"{m.shape[1]}x{m.shape[0]}" for m in shots.masks)
        log(f"PerSAM-F: fitting {epochs} epochs on {len(shots.masks)} shot(s) ({sizes} px)")
        weights, losses = fit_mask_weights(sam, encoded, shots.masks, target_feature, epochs=epochs,
                                           on_epoch=None if shots.progress is None else shots.progress(epochs))
        log(f"PerSAM-F: {epochs} epochs in {time.perf_counter() - started:.1f} s, "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, weights {[round(float(w), 4) for w in weights]}")
    return Concept(
        name=shots.name,
        method=method,
        target_feature=target_feature.detach().cpu().numpy().astype(np.float32),
        target_embedding=target_embedding.detach().cpu().numpy().astype(np.float32),
        model_fingerprint=fingerprint,
        mask_weights=weights,
        references=tuple(shots.image_sources),
    )


class PerSAMMethod:
    """PerSAM (`mask_weights` False) or PerSAM-F (True): one concept class, one engine."""

    engine = ENGINE

    def __init__(self, name: str, mask_weights: bool) -> None:
        self.name, self.mask_weights = name, mask_weights

    def fit(self, shots: Shots, models: FitModels, log: Callable[[str], None]) -> Concept:
        sam, fingerprint = models.sam()
        return fit_persam(shots, sam, fingerprint, self.name, self.mask_weights, log)

    def concept_from_document(self, document: Mapping[str, Any], source: str) -> Concept:
        return Concept.from_document(dict(document), source)

    def accepts(self, concept: Any) -> bool:
        return isinstance(concept, Concept) and (concept.mask_weights is not None) == self.mask_weights


METHOD = PerSAMMethod("persam", mask_weights=False)
