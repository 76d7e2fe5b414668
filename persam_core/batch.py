"""What the batched cascade consumes: a batch of encoded images on the device. What it
produces on the host is `persam_core.host_results.HostResults`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from persam_core.modeling.predictor import EncodedImage


@dataclass(frozen=True)
class EncodedBatch:
    """features: [B, 256, 64, 64]; input_sizes / original_sizes: (h, w) per image;
    high_res: SAM 2's high-resolution features per level ([B, 32, 256, 256], [B, 64, 128, 128]), () for SAM."""

    features: Tensor
    input_sizes: tuple[tuple[int, int], ...]
    original_sizes: tuple[tuple[int, int], ...]
    high_res: tuple[Tensor, ...] = ()

    @classmethod
    def of(cls, images: Sequence[EncodedImage]) -> "EncodedBatch":
        levels = len(images[0].high_res) if images else 0
        return cls(
            torch.stack([image.features for image in images]),
            tuple(tuple(image.input_size) for image in images),
            tuple(tuple(image.original_size) for image in images),
            tuple(torch.stack([image.high_res[level] for image in images]) for level in range(levels)),
        )

    def __len__(self) -> int:
        return len(self.input_sizes)

    def image(self, index: int) -> EncodedImage:
        return EncodedImage(self.features[index], self.input_sizes[index], self.original_sizes[index],
                            tuple(level[index] for level in self.high_res))
