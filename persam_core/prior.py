"""PerSAM's location prior: similarity map, positive/negative points, attention bias.

Every function works on a batch of pairs (P maps at once, on the device, no host reads);
`LocationPrior` is the view of one pair.

Operation order follows the reference so that points match it exactly in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from persam_core.modeling.families import as_backbone


@dataclass(frozen=True)
class LocationPrior:
    """One (image, concept): similarity: [64, 64] cosine map S; upsampled: [H, W] map S'.

    A view of one pair; its methods are the batched functions below on a batch of one.
    """

    similarity: torch.Tensor
    upsampled: torch.Tensor

    @property
    def presence(self) -> float:
        """max of S: how strongly the concept is present anywhere in the image."""
        return float(self.similarity.max())

    def positive_point(self) -> tuple[int, int]:
        """(x, y) of argmax S' in original pixels; ties go to the first row-major index."""
        return tuple(int(v) for v in positive_points(self.upsampled[None])[0])

    def negative_point(self) -> tuple[int, int]:
        """(x, y) of argmin S'; ties go to the first row-major index."""
        return tuple(int(v) for v in negative_points(self.upsampled[None])[0])

    def attention_bias(self) -> torch.Tensor:
        """-> [1, 1, 1, 4096] (see `attention_biases`)."""
        return attention_biases(self.upsampled[None], tuple(self.similarity.shape))


def _flat_to_xy(flat: torch.Tensor, width: int) -> torch.Tensor:
    """flat: [P] row-major indices -> [P, 2] (x, y), on the device (no host read)."""
    return torch.stack([flat % width, flat // width], dim=1)


def positive_points(upsampled: torch.Tensor) -> torch.Tensor:
    """S': [P, H, W] -> [P, 2] (x, y) of each argmax; ties to the first row-major index."""
    return _flat_to_xy(torch.argmax(upsampled.flatten(1), dim=1), upsampled.shape[2])


def negative_points(upsampled: torch.Tensor) -> torch.Tensor:
    """S': [P, H, W] -> [P, 2] (x, y) of each argmin; ties to the first row-major index."""
    return _flat_to_xy(torch.argmin(upsampled.flatten(1), dim=1), upsampled.shape[2])


def attention_biases(upsampled: torch.Tensor, grid: tuple[int, int] = (64, 64)) -> torch.Tensor:
    """S': [P, H, W] -> [P, 1, 1, 4096]: sigmoid(resize_64((S' - mean) / std)), std with Bessel."""
    flat = upsampled.flatten(1)
    mean = flat.mean(dim=1)[:, None, None]
    std = flat.std(dim=1)[:, None, None]
    standardised = (upsampled - mean) / std
    resized = F.interpolate(standardised[:, None], size=grid, mode="bilinear")
    return resized.sigmoid().flatten(2)[:, :, None]


def similarity_maps(features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """features: [B, 256, 64, 64]; target_features: [K, 256] unit -> S: [B, K, 64, 64] cosine."""
    batch, channels, height, width = features.shape
    normalised = features / features.norm(dim=1, keepdim=True)
    flat = normalised.reshape(batch, channels, height * width)
    return (target_features.to(features)[None] @ flat).reshape(batch, -1, height, width)


def similarity_map(features: torch.Tensor, target_feature: torch.Tensor) -> torch.Tensor:
    """features: [256, 64, 64], target_feature: [256] unit -> S: [64, 64] cosine similarity."""
    return similarity_maps(features[None], target_feature[None])[0, 0]


def upsample_similarities(
    sam, similarity: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """S: [P, 64, 64] of images of one size -> S': [P, H, W]: x4 bilinear to the low-res mask
    grid, then the model's own mask upsampling (sam: Sam, SAM2Base or Backbone)."""
    upsampled = F.interpolate(similarity[:, None], scale_factor=4, mode="bilinear")
    return as_backbone(sam).postprocess(upsampled, input_size, original_size)[:, 0]


def upsample_to_image(
    sam, similarity: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
) -> torch.Tensor:
    """S: [64, 64] -> S': [H, W]."""
    return upsample_similarities(sam, similarity[None], input_size, original_size)[0]


def location_prior(
    sam,
    features: torch.Tensor,
    target_feature: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> LocationPrior:
    """features: [256, 64, 64] of one image; target_feature: [256] -> its LocationPrior."""
    similarity = similarity_map(features, target_feature.to(features))
    return LocationPrior(similarity, upsample_to_image(sam, similarity, input_size, original_size))
