"""What the PerSAM cascade needs from a model, for SAM and SAM 2 alike.

The cascade (prior, passes, boxes, presence, instances) is written once, over `Backbone`:
encode images, map pixel coordinates to the model's input, decode prompts (with PerSAM's
guidance), upsample low-res logits to the image. `as_backbone` wraps a segment_anything
`Sam` (`SamBackbone`) or a sam2 `SAM2Base` (`Sam2Backbone`, in sam2_backbone.py); every
function of persam_core that takes a model accepts either.

Geometry differs: SAM resizes the longest side to 1024 and pads (input_size is the resized
size); SAM 2 resizes to 1024 x 1024 (input_size is (1024, 1024)). Both give a 64 x 64 grid of
256-d features and 256 x 256 low-res mask logits.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from segment_anything.modeling import Sam

from .decoder_speed import decode_prompts
from .preprocess import ResizedImage, reference_mask_grid, resize_longest_side, to_encoder_input


Model = torch.nn.Module  # a segment_anything Sam or a sam2 SAM2Base


class Decoded(NamedTuple):
    """One decode of P prompts: low_res [P, M, 256, 256] logits, scores [P, M] predicted IoU,
    object_score [P] (SAM 2's object-score logit; NaN for SAM, which has none)."""

    low_res: Tensor
    scores: Tensor
    object_score: Tensor


class Backbone(Protocol):
    model: torch.nn.Module
    mask_threshold: float
    image_size: int

    @property
    def device(self) -> torch.device: ...

    def resize(self, image: np.ndarray) -> ResizedImage:
        """[H, W, 3] uint8 RGB -> what `encoder_input` takes (the CPU-side step)."""

    def encoder_input(self, resized: ResizedImage) -> Tensor:
        """-> [1, 3, 1024, 1024] normalised on the model's device."""

    def encode(self, batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """[B, 3, 1024, 1024] -> (features [B, 256, 64, 64], high-res features per level)."""

    def mask_grid(self, mask: np.ndarray, value: int) -> Tensor:
        """[H, W] bool reference mask -> [64, 64] bool, the grid cells PerSAM keeps."""

    def coordinate_table(self, input_sizes: Sequence[tuple[int, int]],
                         original_sizes: Sequence[tuple[int, int]]) -> Tensor:
        """Per pair (sizes of its image), what `input_coordinates` needs: [P, 2] on the CPU."""

    def input_coordinates(self, xy: Tensor, table: Tensor) -> Tensor:
        """xy: [P, N, 2] original pixels -> [P, N, 2] float32 model-input pixels."""

    def mask_feedback(self, low_res: Tensor) -> Tensor:
        """Low-res logits as the model's predictor hands them back for a next pass."""

    def postprocess(self, low_res: Tensor, input_size: tuple[int, int], original_size: tuple[int, int]) -> Tensor:
        """[p, M, 256, 256] logits of images of one size -> [p, M, H, W]."""

    def decode(self, features: Tensor, high_res: tuple[Tensor, ...], coords: Tensor, labels: Tensor,
               boxes: Tensor | None, mask_input: Tensor | None, multimask: bool,
               attention_bias: Tensor | None, target_embedding: Tensor | None) -> Decoded:
        """One prompt-encoder and one mask-decoder call for P pairs (features: [P, 256, 64, 64],
        coords: [P, N, 2] input pixels, labels: [P, N], boxes: [P, 4] input pixels,
        mask_input: [P, 1, 256, 256], attention_bias: [P, 1, 1, 4096], target_embedding: [P, 1, 256])."""


class SamBackbone:
    """segment_anything's Sam, as SamPredictor drives it."""

    def __init__(self, sam: Sam) -> None:
        self.model = sam
        self.mask_threshold = sam.mask_threshold
        self.image_size = sam.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def resize(self, image: np.ndarray) -> ResizedImage:
        return resize_longest_side(image)

    def encoder_input(self, resized: ResizedImage) -> Tensor:
        return to_encoder_input(self.model, resized)

    def encode(self, batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.model.image_encoder(batch), ()

    def mask_grid(self, mask: np.ndarray, value: int) -> Tensor:
        return reference_mask_grid(mask, value)

    def coordinate_table(self, input_sizes, original_sizes) -> Tensor:
        """(new_w / old_w, new_h / old_h) as Python floats (float64), as ResizeLongestSide.apply_coords."""
        scale = [(i[1] / o[1], i[0] / o[0]) for i, o in zip(input_sizes, original_sizes)]
        return torch.tensor(scale, dtype=torch.float64).reshape(-1, 2)

    def input_coordinates(self, xy: Tensor, table: Tensor) -> Tensor:
        return (xy.to(torch.float64) * table[:, None]).to(torch.float32)

    def mask_feedback(self, low_res: Tensor) -> Tensor:
        return low_res

    def postprocess(self, low_res: Tensor, input_size, original_size) -> Tensor:
        return self.model.postprocess_masks(low_res, input_size, original_size)

    def decode(self, features, high_res, coords, labels, boxes, mask_input, multimask, attention_bias,
               target_embedding) -> Decoded:
        low_res, scores = decode_prompts(self.model, features, coords, labels.to(torch.int), boxes, mask_input,
                                         multimask, attention_bias, target_embedding)
        return Decoded(low_res, scores, torch.full(scores.shape[:1], float("nan"), device=scores.device))


def as_backbone(model: torch.nn.Module | Backbone) -> Backbone:
    """A `Sam` or `SAM2Base` (or an existing backbone) -> its Backbone (a thin view, no copy)."""
    if isinstance(model, Sam):
        return SamBackbone(model)
    if isinstance(model, torch.nn.Module):
        from .sam2_backbone import Sam2Backbone  # sam2 (and hydra) load only when a SAM 2 model is used

        return Sam2Backbone(model)
    return model

