"""Training-free PerSAM: location prior, guided first decode, two cascaded refinements.

Pass 1: positive + negative point, target-guided attention, target-semantic prompt,
single mask. Pass 2: same points + pass-1 logits, multimask, best predicted IoU.
Pass 3: + tight box of that mask + its logits, multimask, best predicted IoU.
Unlike the reference (which crashes), an empty pass-2 mask skips the box refinement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from .concept import Concept, ConceptTensors  # noqa: F401  (re-exported)
from .predictor import EncodedImage, Prediction, predict, tight_box
from .prior import LocationPrior, location_prior


@dataclass(frozen=True)
class Result:
    """One concept in one image. mask: [H, W] bool; point/negative_point: (x, y) pixels."""

    mask: np.ndarray
    score: float
    similarity: float
    point: tuple[int, int]
    negative_point: tuple[int, int] | None = None


def prior_for(sam: Sam, encoded: EncodedImage, concept: ConceptTensors) -> LocationPrior:
    return location_prior(sam, encoded.features, concept.target_feature, encoded.input_size, encoded.original_size)


def refine_with_box(
    sam: Sam, encoded: EncodedImage, points: np.ndarray, labels: np.ndarray, previous: Prediction, index: int
) -> tuple[np.ndarray, float, Prediction, int]:
    """Cascaded refinement: box of `previous`'s mask `index` + its logits -> best new mask.

    Returns (mask [H, W] bool, score, prediction, index); an empty mask is returned as is.
    """
    mask = (previous.high_res(index) > sam.mask_threshold).cpu().numpy()
    box = tight_box(mask)
    if box is None:
        return mask, float(previous.scores[index]), previous, index
    refined = predict(sam, encoded, points, labels, box_xyxy=box, mask_input=previous.low_res[index : index + 1])
    best = refined.best_index()
    return (refined.high_res(best) > sam.mask_threshold).cpu().numpy(), float(refined.scores[best]), refined, best


@torch.no_grad()
def segment_persam(
    sam: Sam, encoded: EncodedImage, concept: ConceptTensors, prior: LocationPrior | None = None
) -> Result:
    """PerSAM's three passes for one concept on one encoded image."""
    prior = prior if prior is not None else prior_for(sam, encoded, concept)
    positive, negative = prior.positive_point(), prior.negative_point()
    points, labels = np.array([positive, negative]), np.array([1, 0])

    first = predict(
        sam,
        encoded,
        points,
        labels,
        multimask_output=False,
        attention_bias=prior.attention_bias(),
        target_embedding=concept.target_embedding.reshape(1, 1, -1),
    )
    second = predict(sam, encoded, points, labels, mask_input=first.low_res[0:1], multimask_output=True)
    mask, score, _, _ = refine_with_box(sam, encoded, points, labels, second, second.best_index())
    return Result(mask, score, prior.presence, positive, negative)
