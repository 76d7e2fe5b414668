"""GF-SAM as a registry method: fit (DINOv2 on the shots' stretch frames) and the engine that
runs gfsam_batch.segment_gfsam over every GF-SAM pair of an encoder batch.

The engine reads the stretch frame: SAM's features of the 1024 x 1024 stretched image and
DINOv2's tokens of the same frame. Its rows: `similarity` is the presence (max of Apos x Mpos,
the GF-SAM contract §5), `score` the prob score, `point` where the presence was measured. One instance
per (image, concept): GF-SAM's output is already the union of every instance it kept, so
`max_instances` > 1 changes nothing for its rows. Below `min_similarity` a pair is absent:
present false, empty mask, nothing decoded.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..host_results import HostResults, empty_host_results, host_results_of
from ..modeling.dinov2 import frame_tokens
from .frames import FrameImage, frame_tensor
from .gfsam_batch import PATH_ABSENT, presence_points, segment_gfsam
from .gfsam_concept import GFSAMConcept
from .gfsam_frames import frame_mask, stretch_frame
from .gfsam_reference import ConceptStack, fit_reference
from .registry import FRAME_STRETCH, ConceptError, FitModels, Shots


class GFSAMEngine:
    """Every GF-SAM pair of a batch of stretch-frame images, batched on the device (gfsam_batch)."""

    frame = FRAME_STRETCH
    needs_dinov2 = True
    ranks = True
    score_reads_sam = False  # presence is DINOv2's alone (the GF-SAM contract §5)

    def on_device(self, concepts: Sequence[GFSAMConcept], device: torch.device | str) -> ConceptStack:
        return ConceptStack.of([c.reference for c in concepts], device)

    def segment(self, sam, images: Sequence[FrameImage], concepts: ConceptStack, max_instances: int,
                min_similarity: float | None) -> HostResults:
        embeddings = torch.stack([i.encoded.features for i in images])
        tokens = torch.stack([i.tokens for i in images])
        sizes = [tuple(int(v) for v in i.encoded.original_size) for i in images]
        results = segment_gfsam(sam, embeddings, tokens, concepts, sizes, min_presence=min_similarity)
        return to_host_results(results, len(concepts), sizes)

    def score(self, sam, images: Sequence[FrameImage], concepts: ConceptStack) -> tuple[np.ndarray, np.ndarray]:
        tokens = torch.stack([i.tokens for i in images])
        sizes = [tuple(int(v) for v in i.original_size) for i in images]
        presence, point = presence_points(tokens, concepts, sizes)
        return presence.cpu().numpy().astype(np.float32), point.cpu().numpy().astype(np.int32)


def to_host_results(results: Sequence, count_concepts: int, sizes: Sequence[tuple[int, int]]) -> HostResults:
    """segment_gfsam's results (pairs image-major) -> HostResults; masks and numbers leave the
    device in one copy each."""
    if not results:
        return empty_host_results()
    flat = torch.cat([r.mask.flatten() for r in results])
    numbers = torch.stack([torch.stack([r.presence.float(), r.score.float(), r.point[0].float(), r.point[1].float()])
                           for r in results]).cpu().numpy()
    host, masks, start = flat.cpu().numpy(), [], 0
    for pair in range(len(results)):
        height, width = sizes[pair // count_concepts]
        masks.append(host[start:start + height * width].reshape(height, width))
        start += height * width
    present = [r.path != PATH_ABSENT for r in results]
    pairs = np.arange(len(results))
    return host_results_of(masks, pairs // count_concepts, pairs % count_concepts, present,
                           np.where(present, numbers[:, 1], np.nan), numbers[:, 0], numbers[:, 2:4])


ENGINE = GFSAMEngine()


def fit_gfsam(shots: Shots, dinov2_kind: str, dinov2, fingerprint: str, method: str) -> GFSAMConcept:
    """Shots -> a GF-SAM concept: DINOv2 tokens of every shot's stretch frame (one batch) and
    the weight maps of its mask in the same frame. Refuses masks of another size than their
    image, and shots whose masks miss every sample of the 37 x 37 grid (an empty reference)."""
    for image, mask, source in zip(shots.images, shots.masks, shots.mask_sources):
        if tuple(mask.shape) != tuple(image.shape[:2]):
            raise ConceptError(f"{source}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                               f"{image.shape[1]}x{image.shape[0]}; give a mask of the image's size")
    device = next(dinov2.parameters()).device
    frames = torch.from_numpy(np.stack([stretch_frame(image) for image in shots.images])).to(device)
    with torch.no_grad():
        tokens = frame_tokens(dinov2, frame_tensor(frames))
    masks = torch.stack([frame_mask(mask) for mask in shots.masks]).to(device)
    reference = fit_reference(tokens, masks)
    if not np.any(reference.wpos > 0):
        raise ConceptError(f"{', '.join(shots.mask_sources)}: the masks miss every sample of GF-SAM's 37x37 grid "
                           f"(a sample every ~28 px of the 1024x1024 stretched image); give masks that cover the object")
    return GFSAMConcept(shots.name, method, dinov2_kind, fingerprint, reference, tuple(shots.image_sources))


class GFSAMMethod:
    """GF-SAM (NeurIPS 2024): DINOv2 priors, SAM point prompts, a graph of masks."""

    engine = ENGINE

    def __init__(self, name: str) -> None:
        self.name = name

    def fit(self, shots: Shots, models: FitModels, log: Callable[[str], None]) -> GFSAMConcept:
        kind, dinov2, fingerprint = models.dinov2()
        concept = fit_gfsam(shots, kind, dinov2, fingerprint, self.name)
        log(f"GF-SAM: {len(shots.images)} shot(s) through DINOv2 {kind}, "
            f"{int((concept.reference.wpos > 0).sum())} positive grid cells")
        return concept

    def concept_from_document(self, document: Mapping[str, Any], source: str) -> GFSAMConcept:
        return GFSAMConcept.from_document(document, source)

    def accepts(self, concept: Any) -> bool:
        return isinstance(concept, GFSAMConcept)


METHOD = GFSAMMethod("gf-sam")
