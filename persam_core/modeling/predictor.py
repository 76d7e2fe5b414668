"""Encode once per image, decode many times: the predictor's contract without its state.

`EncodedImage` is what the encoder produced for one image; every concept (and every
cascade pass) decodes from it, so K concepts cost one encode. The model is a SAM or a SAM 2
(see backbone.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from persam_core.speed.acceleration import encoder_precision
from persam_core.modeling.backbone import Model
from persam_core.modeling.families import as_backbone
from persam_core.pairs import PairBatch
from persam_core.modeling.resized import ResizedImage


@dataclass(frozen=True)
class EncodedImage:
    """features: [256, 64, 64] encoder output; sizes as in the predictor ((h, w) each);
    high_res: SAM 2's high-resolution features ([32, 256, 256], [64, 128, 128]); () for SAM."""

    features: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    high_res: tuple[Tensor, ...] = ()


@torch.no_grad()
def encode_images(
    sam: Model, images: Sequence[ResizedImage], precision: str = "fp32", pad_to: int | None = None
) -> list[EncodedImage]:
    """Run the image encoder once over a batch of resized images -> one EncodedImage each.

    precision: "fp32" (the reference path), "bf16" or "fp16" (autocast; features back in fp32).
    pad_to: encode zero images up to this batch size (a compiled encoder then sees one shape).
    """
    if not images:
        return []
    backbone = as_backbone(sam)
    batch = torch.cat([backbone.encoder_input(image) for image in images], dim=0)
    if pad_to is not None and pad_to > batch.shape[0]:
        batch = torch.cat([batch, batch.new_zeros(pad_to - batch.shape[0], *batch.shape[1:])])
    with encoder_precision(precision, batch.device):
        features, high_res = backbone.encode(batch)
    count = len(images)
    features = features[:count].float()  # [B, 256, 64, 64]
    high_res = tuple(level[:count].float() for level in high_res)
    return [
        EncodedImage(features[i], image.input_size, image.original_size, tuple(level[i] for level in high_res))
        for i, image in enumerate(images)
    ]


@dataclass(frozen=True)
class Prediction:
    """One decode: low_res: [M, 256, 256] logits; scores: [M] predicted IoU (M = 3 or 1);
    object_score: SAM 2's object-score logit (a 0-d tensor; NaN for SAM)."""

    low_res: Tensor
    scores: Tensor
    encoded: EncodedImage
    sam: Model
    object_score: Tensor | None = None

    def high_res(self, index: int | None = None) -> Tensor:
        """Logits at the original size: [H, W] for one output, [M, H, W] for all."""
        low = self.low_res if index is None else self.low_res[index : index + 1]
        high = as_backbone(self.sam).postprocess(low[None], self.encoded.input_size, self.encoded.original_size)[0]
        return high if index is None else high[0]

    def best_index(self) -> int:
        """Highest predicted IoU; the first on ties (numpy.argmax, as the reference)."""
        return int(torch.argmax(self.scores))


@torch.no_grad()
def predict(
    sam: Model,
    encoded: EncodedImage,
    points_xy: np.ndarray,
    labels: np.ndarray,
    box_xyxy: np.ndarray | None = None,
    mask_input: Tensor | None = None,
    multimask_output: bool = True,
    attention_bias: Tensor | None = None,
    target_embedding: Tensor | None = None,
) -> Prediction:
    """SamPredictor.predict (SAM2ImagePredictor.predict for SAM 2) over an EncodedImage, with
    PerSAM's optional guidance: the batched `PairBatch.decode` on a batch of one.

    points_xy: [N, 2] original pixels (x, y); labels: [N]; box_xyxy: [4] original pixels;
    mask_input: [1, 256, 256] low-res logits of an earlier pass.
    """
    device = encoded.features.device
    pairs = PairBatch.of_image(sam, encoded)
    box = None if box_xyxy is None else torch.as_tensor(np.asarray(box_xyxy, dtype=np.float64), device=device)[None]
    decoded = pairs.decode(
        torch.as_tensor(np.asarray(points_xy, dtype=np.float64), device=device)[None],
        torch.as_tensor(np.asarray(labels), device=device)[None],
        box=box,
        mask_input=None if mask_input is None else mask_input.to(device),
        multimask=multimask_output,
        attention_bias=attention_bias,
        target_embedding=target_embedding,
    )
    return Prediction(decoded.low_res[0], decoded.scores[0], encoded, sam, decoded.object_score[0])

