"""Faster encoder paths are options measured against fp32, never silent replacements."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persam_core.acceleration import encoder_precision, enable_fused_attention
from persam_core.predictor import encode_images
from persam_core.preprocess import resize_longest_side


@pytest.fixture(scope="module")
def resized():
    generator = np.random.default_rng(0)
    coarse = generator.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    return resize_longest_side(np.kron(coarse, np.ones((48, 48, 1), dtype=np.uint8)))


def test_fused_attention_matches_the_encoder(tiny_sam, resized):
    reference = encode_images(tiny_sam, [resized])[0].features
    fused_model = copy.deepcopy(tiny_sam)
    assert enable_fused_attention(fused_model) == len(fused_model.image_encoder.blocks)
    fused = encode_images(fused_model, [resized])[0].features
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4)


def test_bf16_features_come_back_fp32_and_close(tiny_sam, resized):
    reference = encode_images(tiny_sam, [resized])[0].features
    reduced = encode_images(tiny_sam, [resized], "bf16")[0].features
    assert reduced.dtype == torch.float32
    relative = (reduced - reference).norm() / reference.norm()
    assert 0 < relative < 0.05  # different (it is an option), yet close


def test_fp32_is_the_default_and_unknown_precisions_are_refused():
    with encoder_precision("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="--precision"):
        with encoder_precision("int3", "cpu"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_fused_encoder_close_to_fp32(tiny_sam, resized):
    model = copy.deepcopy(tiny_sam).cuda()
    reference = encode_images(model, [resized])[0].features
    enable_fused_attention(model)
    fast = encode_images(model, [resized], "bf16")[0].features
    assert (fast - reference).norm() / reference.norm() < 0.05
