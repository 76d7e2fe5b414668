"""Presence and several instances per (image, concept), beyond the reference.

Presence: `similarity` (max of the location-prior map S) below `min_similarity` means the
concept is absent: an empty mask, and the decoder is skipped.
Several instances: after each instance the prior is searched again outside the union of
the masks found so far; it stops at `max_instances`, or when the next peak is below
`min_similarity`, or when nothing new is found. Instance 0 is exactly the single result.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from segment_anything.modeling import Sam

from .persam import ConceptTensors, Result, prior_for, segment_persam
from .persam_f import segment_persam_f
from .predictor import EncodedImage
from .prior import LocationPrior


@dataclass(frozen=True)
class InstanceResult:
    """One row's worth: `present` False means below the presence threshold (empty mask)."""

    result: Result
    instance: int
    present: bool


def _segment(sam: Sam, encoded: EncodedImage, concept: ConceptTensors, prior: LocationPrior) -> Result:
    if concept.concept.method == "persam-f":
        return segment_persam_f(sam, encoded, concept, prior)
    return segment_persam(sam, encoded, concept, prior)


def _excluding(prior: LocationPrior, found: np.ndarray) -> LocationPrior:
    """The prior with the found pixels lowered to the map's minimum (S' only)."""
    upsampled = prior.upsampled.clone()
    upsampled[torch.as_tensor(found, device=upsampled.device)] = upsampled.min()
    return LocationPrior(prior.similarity, upsampled)


def _absent(encoded: EncodedImage, prior: LocationPrior, similarity: float) -> Result:
    height, width = encoded.original_size
    return Result(np.zeros((height, width), dtype=bool), 0.0, similarity, prior.positive_point(), None)


@torch.no_grad()
def segment_instances(
    sam: Sam,
    encoded: EncodedImage,
    concept: ConceptTensors,
    max_instances: int = 1,
    min_similarity: float | None = None,
) -> list[InstanceResult]:
    """Instance 0 always (present or not), then further instances as found. max_instances >= 1."""
    if max_instances < 1:
        raise ValueError("max_instances must be at least 1")
    prior = prior_for(sam, encoded, concept)
    if min_similarity is not None and prior.presence < min_similarity:
        return [InstanceResult(_absent(encoded, prior, prior.presence), 0, False)]
    results = [InstanceResult(_segment(sam, encoded, concept, prior), 0, True)]
    found = results[0].result.mask.copy()
    while len(results) < max_instances and found.any() and not found.all():
        remaining = _excluding(prior, found)
        peak = float(remaining.upsampled.max())
        if min_similarity is not None and peak < min_similarity:
            break
        result = replace(_segment(sam, encoded, concept, remaining), similarity=peak)
        new_pixels = result.mask & ~found
        if not new_pixels.any() or new_pixels.sum() < 0.5 * max(1, result.mask.sum()):
            break  # the decoder came back to an instance already found
        results.append(InstanceResult(result, len(results), True))
        found |= result.mask
    return results
