"""What the methods need from a model, whatever its family: the `Backbone` protocol.

The cascade (prior, passes, boxes, presence, instances) is written once, over `Backbone`:
encode images, map pixel coordinates to the model's input, decode prompts (with PerSAM's
guidance), upsample low-res logits to the image. Each model family adapts its models to it
(`SamBackbone` in sam_backbone.py, `Sam2Backbone` in sam2_backbone.py);
`families.as_backbone` picks the adapter, so every function of persam_core that takes a
model accepts any family's.

Geometry differs: SAM resizes the longest side to 1024 and pads (input_size is the resized
size); SAM 2 resizes to 1024 x 1024 (input_size is (1024, 1024)). Both give a 64 x 64 grid of
256-d features and 256 x 256 low-res mask logits.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from persam_core.modeling.resized import ResizedImage


Model = torch.nn.Module  # a model of any registered family (families.py)


class Decoded(NamedTuple):
    """One decode of P prompts: low_res [P, M, 256, 256] logits, scores [P, M] predicted IoU,
    object_score [P] (SAM 2's object-score logit; NaN for SAM, which has none)."""

    low_res: Tensor
    scores: Tensor
    object_score: Tensor


class PredictorEncoding(NamedTuple):
    """One image as an official predictor holds it: features [256, 64, 64], the resized
    (input) and original sizes, high-resolution levels (SAM 2's; none for SAM)."""

    features: Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    high_res: tuple[Tensor, ...] = ()


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

    def predictor_encoder(self) -> "Callable[[np.ndarray], PredictorEncoding]":
        """The family's official predictor's own per-image encode (the reference-style
        baseline `bench` times): [H, W, 3] uint8 -> what the predictor holds."""

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
