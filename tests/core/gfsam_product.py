"""Test helpers: GF-SAM through the product's API (persam_core.methods), shaped like the oracle's
calls (`oracle_fit` / `oracle_predict` in gfsam_oracle.py), and the comparisons between them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from persam_core.methods.gfsam_batch import GFSAMResult, segment_gfsam
from persam_core.methods.gfsam_frames import stretch_frame, frame_mask
from persam_core.methods.gfsam_reference import GFSAMReference, fit_reference
from persam_core.modeling.dinov2 import dinov2_input, frame_tokens, normalise_tokens
from persam_core.modeling.preprocess import to_encoder_input
from persam_core.modeling.resize import resize_longest_side


def frame_pixels(frames: Sequence[np.ndarray]) -> Tensor:
    """uint8 frames -> [B, 3, 1024, 1024] float in [0, 1] (ToTensor)."""
    return torch.stack([torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float() / 255 for f in frames])


def tokens_of(dinov2: nn.Module, frames: Sequence[np.ndarray]) -> Tensor:
    """Normalised tokens [B, 1369, C]: a DINOv2 module, or a stand-in called on DINOv2's pixels."""
    pixels = frame_pixels(frames)
    if getattr(dinov2, "is_token_standin", False):
        return normalise_tokens(dinov2(dinov2_input(pixels)).float())
    return frame_tokens(dinov2, pixels)


def product_fit(dinov2: nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> GFSAMReference:
    frames = [stretch_frame(image) for image in images]
    return fit_reference(tokens_of(dinov2, frames), torch.stack([frame_mask(mask) for mask in masks]))


@torch.no_grad()
def sam_embeddings(sam, frames: Sequence[np.ndarray]) -> Tensor:
    """[B, 256, 64, 64] SAM features of stretched frames (SamPredictor's own preprocessing)."""
    return sam.image_encoder(torch.cat([to_encoder_input(sam, resize_longest_side(f)) for f in frames]))


def product_predict(sam, dinov2: nn.Module, references: Sequence[GFSAMReference], images: Sequence[np.ndarray],
                    embeddings: Tensor | None = None, **options) -> list[GFSAMResult]:
    """All images x all references (image-major); embeddings None: the SAM encoder's; zeros do
    for the stand-in decoder, which ignores them."""
    frames = [stretch_frame(image) for image in images]
    if embeddings is None:
        embeddings = sam_embeddings(sam, frames)
    return segment_gfsam(sam, embeddings, tokens_of(dinov2, frames), references,
                         [image.shape[:2] for image in images], **options)


def iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_matches_oracle(result: GFSAMResult, expected: dict, min_iou: float = 0.98) -> None:
    """Identical points, groups and labels; masks at IoU >= min_iou at 1024 and at the original size."""
    assert result.path == expected["path"]
    np.testing.assert_array_equal(result.points.cpu().numpy(), expected["grid_points"])
    np.testing.assert_array_equal(result.groups.cpu().numpy(), expected["groups"])
    np.testing.assert_array_equal(result.labels.cpu().numpy(), expected["labels"])
    assert result.mask.shape == expected["mask"].shape
    assert iou(result.mask_1024.cpu(), expected["mask_1024"]) >= min_iou
    assert iou(result.mask.cpu(), expected["mask"]) >= min_iou
    assert float(result.presence) == pytest_approx(expected["presence"])
    assert float(result.score) == pytest_approx(expected["prob_score"])


def pytest_approx(value: float):
    import pytest

    return pytest.approx(value, rel=1e-4, abs=1e-5)
