"""PerSAM-F: fit two mask weights on the reference (SAM frozen), then a weighted cascade.

Fit: location prior of the reference itself (positive point only); one multimask decode;
w = (1 - w1 - w2, w1, w2), w1 = w2 = 1/3; loss = dice(+1 smoothing) + sigmoid focal
(alpha 0.25, gamma 2) of sigmoid(sum_i w_i * logit_i) against the mask; AdamW (lr 1e-3,
eps 1e-4), cosine schedule. SAM is frozen and its inputs fixed, so the decode is the same
every epoch: it runs once and only the 2-parameter optimisation loops (same numbers as
the reference's per-epoch decode, a thousand decodes cheaper).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from persam_core.modeling.backbone import Model
from .concept import ConceptTensors
from .pairs import PairBatch, boxes_of
from .persam import Result, prior_for
from .refine import CascadeOutput, final_mask, refine_with_box
from persam_core.modeling.predictor import EncodedImage, predict
from .prior import LocationPrior, location_prior, positive_points

DEFAULT_EPOCHS = 1000


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """logits, targets: [1, P] -> scalar dice loss with +1 smoothing."""
    probabilities = logits.sigmoid().flatten(1)
    numerator = 2 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum()


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2) -> Tensor:
    """logits, targets: [1, P] -> scalar focal loss, mean over pixels."""
    probability = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probability * targets + (1 - probability) * (1 - targets)
    loss = cross_entropy * ((1 - p_t) ** gamma)
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum()


def _shot_loss(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """logits: [3, P] of one shot; target: [1, P]; weights: [3, 1] -> dice + focal."""
    combined = (logits * weights).sum(0).unsqueeze(0)
    return dice_loss(combined, target) + sigmoid_focal_loss(combined, target)


def full_weights(learned: Tensor) -> Tensor:
    """learned: [2, 1] -> w: [3, 1] = (1 - w1 - w2, w1, w2)."""
    return torch.cat((1 - learned.sum(0).unsqueeze(0), learned), dim=0)


def fit_mask_weights(
    sam: Model,
    encoded: Sequence[EncodedImage],
    masks: Sequence[np.ndarray],
    target_feature: Tensor,
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = 1e-3,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, list[float]]:
    """Fit PerSAM-F's weights on every shot together (mean loss over shots).

    encoded[i]: a reference image; masks[i]: [H, W] bool; target_feature: [256].
    Returns (w: [3] summing to 1, loss per epoch).
    """
    shots = []
    for image, mask in zip(encoded, masks):
        prior = location_prior(sam, image.features, target_feature, image.input_size, image.original_size)
        decoded = predict(sam, image, np.array([prior.positive_point()]), np.array([1]), multimask_output=True)
        logits = decoded.high_res().flatten(1).detach()  # [3, H*W]
        target = torch.as_tensor(mask, device=logits.device).float().unsqueeze(0).flatten(1)
        shots.append((logits, target))

    weights, losses = optimise_mask_weights(shots, epochs, learning_rate, on_epoch, record_losses=True)
    return weights.cpu().numpy().astype(np.float32), losses


def optimise_mask_weights(
    shots: Sequence[tuple[Tensor, Tensor]],
    epochs: int,
    learning_rate: float,
    on_epoch: Callable[[int, float], None] | None = None,
    record_losses: bool = False,
) -> tuple[Tensor, list[float]]:
    """PerSAM-F's optimisation (also the video mode's): w1 = w2 = 1/3, AdamW (eps 1e-4), cosine.

    shots: (logits [3, P], target [1, P]) each; the loss is their mean. -> (w [3], loss per epoch
    when record_losses or on_epoch; reading a loss is a host sync, so it is skipped otherwise).
    """
    device = shots[0][0].device
    learned = torch.nn.Parameter(torch.ones(2, 1, device=device) / 3)
    optimizer = torch.optim.AdamW([learned], lr=learning_rate, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    losses: list[float] = []
    for epoch in range(epochs):
        with torch.enable_grad():
            weights = full_weights(learned)
            loss = sum(_shot_loss(logits, target, weights) for logits, target in shots) / len(shots)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        scheduler.step()
        if record_losses or on_epoch is not None:
            losses.append(float(loss.detach()))
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    return full_weights(learned).detach()[:, 0], losses


def persam_f_passes(pairs: PairBatch, positive: Tensor, mask_weights: Tensor) -> CascadeOutput:
    """PerSAM-F's cascade for P pairs: three mask-decoder calls whatever P (up to pairs.DECODER_PAIRS).

    positive: [P, 2] (x, y); mask_weights: [P, 3]. Pass 1's mask is (sum_i w_i * logit_i > 0)
    with the logits upsampled to the original size first, as the reference does.
    """
    points = positive[:, None]  # [P, 1, 2]
    labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
    decoded = pairs.decode(points, labels, multimask=True)
    first, first_scores = decoded.low_res, decoded.scores
    weights = mask_weights.to(first)
    threshold = pairs.backbone.mask_threshold

    def weighted_box(high: Tensor, rows: Tensor) -> Tensor:  # high: [p, 3, H, W]
        return boxes_of((high * weights[rows][:, :, None, None]).sum(1) > threshold)

    packed = pairs.per_chunk(first, weighted_box, (5,), torch.long)
    box, empty = packed[:, :4], packed[:, 4].bool()
    # The reference weights the logits the predictor returns (SAM 2's: clamped to +-32).
    low_res = (pairs.feedback(first) * weights[:, :, None, None]).sum(1)  # [P, 256, 256]
    second = pairs.decode(points, labels, box=box, mask_input=low_res, multimask=True)
    refined = refine_with_box(pairs, points, labels, second.low_res, second.scores, second.object_score)
    # An empty weighted mask has nothing to refine (the reference crashes here): score = sum w_i * iou_i.
    return CascadeOutput(
        refined.low_res,
        torch.where(empty, (first_scores * weights).sum(1), refined.score),
        empty | refined.empty,
        torch.where(empty, decoded.object_score, refined.object_score),
    )


@torch.no_grad()
def segment_persam_f(
    sam: Model, encoded: EncodedImage, concept: ConceptTensors, prior: LocationPrior | None = None
) -> Result:
    """PerSAM-F's cascade for one concept on one encoded image (the batch of one)."""
    if concept.mask_weights is None:
        raise ValueError(f"concept {concept.concept.name!r} has no PerSAM-F mask weights")
    prior = prior if prior is not None else prior_for(sam, encoded, concept)
    positive = positive_points(prior.upsampled[None])
    pairs = PairBatch.of_image(sam, encoded)
    output = persam_f_passes(pairs, positive, concept.mask_weights.reshape(1, 3))
    return Result(final_mask(pairs, output), float(output.score[0]), prior.presence,
                  tuple(int(v) for v in positive[0]), object_score=float(output.object_score[0]))
