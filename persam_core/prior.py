"""PerSAM's location prior: similarity map, positive/negative points, attention bias.

Operation order follows the reference so that points match it exactly in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from segment_anything.modeling import Sam


@dataclass(frozen=True)
class LocationPrior:
    """similarity: [64, 64] cosine map S; upsampled: [H, W] map S' at original size."""

    similarity: torch.Tensor
    upsampled: torch.Tensor

    @property
    def presence(self) -> float:
        """max of S: how strongly the concept is present anywhere in the image."""
        return float(self.similarity.max())

    def positive_point(self) -> tuple[int, int]:
        """(x, y) of argmax S' in original pixels; ties go to the first row-major index."""
        return _flat_to_xy(int(torch.argmax(self.upsampled)), self.upsampled.shape[1])

    def negative_point(self) -> tuple[int, int]:
        """(x, y) of argmin S'; ties go to the first row-major index."""
        return _flat_to_xy(int(torch.argmin(self.upsampled)), self.upsampled.shape[1])

    def attention_bias(self) -> torch.Tensor:
        """-> [1, 1, 1, 4096]: sigmoid(resize_64((S' - mean) / std)), std with Bessel."""
        standardised = (self.upsampled - self.upsampled.mean()) / torch.std(self.upsampled)
        grid = F.interpolate(standardised[None, None], size=tuple(self.similarity.shape), mode="bilinear")
        return grid.sigmoid().unsqueeze(0).flatten(3)


def _flat_to_xy(index: int, width: int) -> tuple[int, int]:
    return index % width, index // width


def similarity_map(features: torch.Tensor, target_feature: torch.Tensor) -> torch.Tensor:
    """features: [256, 64, 64], target_feature: [256] unit -> S: [64, 64] cosine similarity."""
    channels, height, width = features.shape
    normalised = features / features.norm(dim=0, keepdim=True)
    return (target_feature[None] @ normalised.reshape(channels, height * width)).reshape(height, width)


def upsample_to_image(
    sam: Sam, similarity: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """S: [64, 64] -> S': [H, W] (x4 bilinear, then SAM's postprocess_masks)."""
    upsampled = F.interpolate(similarity[None, None], scale_factor=4, mode="bilinear")
    return sam.postprocess_masks(upsampled, input_size=input_size, original_size=original_size)[0, 0]


def location_prior(
    sam: Sam,
    features: torch.Tensor,
    target_feature: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> LocationPrior:
    """features: [256, 64, 64] of one image; target_feature: [256] -> its LocationPrior."""
    similarity = similarity_map(features, target_feature.to(features))
    return LocationPrior(similarity, upsample_to_image(sam, similarity, input_size, original_size))
