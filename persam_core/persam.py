"""Training-free PerSAM: location prior, guided first decode, two cascaded refinements.

Pass 1: positive + negative point, target-guided attention, target-semantic prompt,
single mask. Pass 2: same points + pass-1 logits, multimask, best predicted IoU.
Pass 3: + tight box of that mask + its logits, multimask, best predicted IoU.
Unlike the reference (which crashes), an empty pass-2 mask skips the box refinement:
every pair runs pass 3 (one batched call) and an empty pair keeps its pass-2 result.

`persam_passes` is the cascade for P pairs at once; `segment_persam` is its batch of one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from persam_core.modeling.backbone import Model
from .concept import Concept, ConceptTensors  # noqa: F401  (re-exported)
from .pairs import PairBatch
from .refine import CascadeOutput, final_mask, refine_with_box
from persam_core.modeling.predictor import EncodedImage
from .prior import LocationPrior, attention_biases, location_prior, negative_points, positive_points


@dataclass(frozen=True)
class Result:
    """One concept in one image. mask: [H, W] bool; point/negative_point: (x, y) pixels;
    object_score: SAM 2's object-score logit of the final decode (NaN for SAM)."""

    mask: np.ndarray
    score: float
    similarity: float
    point: tuple[int, int]
    negative_point: tuple[int, int] | None = None
    object_score: float = float("nan")


def prior_for(sam: Model, encoded: EncodedImage, concept: ConceptTensors) -> LocationPrior:
    return location_prior(sam, encoded.features, concept.target_feature, encoded.input_size, encoded.original_size)


def persam_passes(
    pairs: PairBatch, positive: Tensor, negative: Tensor, attention_bias: Tensor, target_embedding: Tensor
) -> CascadeOutput:
    """PerSAM's three passes for P pairs: three mask-decoder calls whatever P (up to pairs.DECODER_PAIRS).

    positive/negative: [P, 2] (x, y); attention_bias: [P, 1, 1, 4096]; target_embedding: [P, 1, 256].
    """
    points = torch.stack([positive, negative], dim=1)  # [P, 2, 2]
    labels = torch.zeros(points.shape[:2], dtype=torch.long, device=points.device)
    labels[:, 0] = 1  # positive, negative (built on the device: no host copy to wait for)
    first = pairs.decode(
        points, labels, multimask=False, attention_bias=attention_bias, target_embedding=target_embedding
    )
    second = pairs.decode(points, labels, mask_input=pairs.feedback(first.low_res[:, 0]), multimask=True)
    return refine_with_box(pairs, points, labels, second.low_res, second.scores, second.object_score)


@torch.no_grad()
def segment_persam(
    sam: Model, encoded: EncodedImage, concept: ConceptTensors, prior: LocationPrior | None = None
) -> Result:
    """PerSAM's three passes for one concept on one encoded image (the batch of one)."""
    prior = prior if prior is not None else prior_for(sam, encoded, concept)
    upsampled = prior.upsampled[None]
    positive, negative = positive_points(upsampled), negative_points(upsampled)
    pairs = PairBatch.of_image(sam, encoded)
    output = persam_passes(
        pairs, positive, negative, attention_biases(upsampled, tuple(prior.similarity.shape)),
        concept.target_embedding.reshape(1, 1, -1),
    )
    point = tuple(int(v) for v in positive[0])
    return Result(final_mask(pairs, output), float(output.score[0]), prior.presence, point,
                  tuple(int(v) for v in negative[0]), float(output.object_score[0]))
