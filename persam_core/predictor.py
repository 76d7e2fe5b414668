"""Encode once per image, decode many times: SamPredictor's contract without its state.

`EncodedImage` is what the encoder produced for one image; every concept (and every
cascade pass) decodes from it, so K concepts cost one encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from segment_anything.modeling import Sam

from .acceleration import encoder_precision
from .pairs import PairBatch
from .preprocess import ResizedImage, to_encoder_input


@dataclass(frozen=True)
class EncodedImage:
    """features: [256, 64, 64] encoder output; sizes as in SamPredictor ((h, w) each)."""

    features: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@torch.no_grad()
def encode_images(
    sam: Sam, images: Sequence[ResizedImage], precision: str = "fp32", pad_to: int | None = None
) -> list[EncodedImage]:
    """Run the image encoder once over a batch of resized images -> one EncodedImage each.

    precision: "fp32" (the reference path), "bf16" or "fp16" (autocast; features back in fp32).
    pad_to: encode zero images up to this batch size (a compiled encoder then sees one shape).
    """
    if not images:
        return []
    batch = torch.cat([to_encoder_input(sam, image) for image in images], dim=0)
    if pad_to is not None and pad_to > batch.shape[0]:
        batch = torch.cat([batch, batch.new_zeros(pad_to - batch.shape[0], *batch.shape[1:])])
    with encoder_precision(precision, batch.device):
        features = sam.image_encoder(batch)[: len(images)].float()  # [B, 256, 64, 64]
    return [
        EncodedImage(features[i], image.input_size, image.original_size) for i, image in enumerate(images)
    ]


@dataclass(frozen=True)
class Prediction:
    """One decode: low_res: [M, 256, 256] logits; scores: [M] predicted IoU (M = 3 or 1)."""

    low_res: Tensor
    scores: Tensor
    encoded: EncodedImage
    sam: Sam

    def high_res(self, index: int | None = None) -> Tensor:
        """Logits at the original size: [H, W] for one output, [M, H, W] for all."""
        low = self.low_res if index is None else self.low_res[index : index + 1]
        high = self.sam.postprocess_masks(low[None], self.encoded.input_size, self.encoded.original_size)[0]
        return high if index is None else high[0]

    def best_index(self) -> int:
        """Highest predicted IoU; the first on ties (numpy.argmax, as the reference)."""
        return int(torch.argmax(self.scores))


@torch.no_grad()
def predict(
    sam: Sam,
    encoded: EncodedImage,
    points_xy: np.ndarray,
    labels: np.ndarray,
    box_xyxy: np.ndarray | None = None,
    mask_input: Tensor | None = None,
    multimask_output: bool = True,
    attention_bias: Tensor | None = None,
    target_embedding: Tensor | None = None,
) -> Prediction:
    """SamPredictor.predict over an EncodedImage, with PerSAM's optional guidance: the
    batched `PairBatch.decode` on a batch of one.

    points_xy: [N, 2] original pixels (x, y); labels: [N]; box_xyxy: [4] original pixels;
    mask_input: [1, 256, 256] low-res logits of an earlier pass.
    """
    device = encoded.features.device
    pairs = PairBatch.build(sam, encoded.features[None], [0], [encoded.input_size], [encoded.original_size])
    box = None if box_xyxy is None else torch.as_tensor(np.asarray(box_xyxy, dtype=np.float64), device=device)[None]
    low_res, scores = pairs.decode(
        torch.as_tensor(np.asarray(points_xy, dtype=np.float64), device=device)[None],
        torch.as_tensor(np.asarray(labels), device=device)[None],
        box=box,
        mask_input=None if mask_input is None else mask_input.to(device),
        multimask=multimask_output,
        attention_bias=attention_bias,
        target_embedding=target_embedding,
    )
    return Prediction(low_res[0], scores[0], encoded, sam)


def tight_box(mask: np.ndarray) -> np.ndarray | None:
    """mask: [H, W] bool -> [x_min, y_min, x_max, y_max] pixels, or None when empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()])
