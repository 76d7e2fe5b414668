"""The sync-free prompt encoder equals SAM's own, bit for bit, for every prompt kind."""

from __future__ import annotations

import pytest
import torch

from persam_core.prompts import encode_prompts


@pytest.mark.parametrize("with_box,with_mask", [(False, False), (True, False), (False, True), (True, True)])
def test_encode_prompts_is_sams_prompt_encoder(tiny_sam, with_box, with_mask):
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(5, 3, 2, generator=generator) * 1024
    labels = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, -1, 0], [-1, 1, 0]], dtype=torch.int)
    boxes = torch.rand(5, 4, generator=generator) * 1024 if with_box else None
    masks = torch.randn(5, 1, 256, 256, generator=generator) if with_mask else None
    with torch.no_grad():
        ours = encode_prompts(tiny_sam.prompt_encoder, points, labels, boxes, masks)
        sams = tiny_sam.prompt_encoder(points=(points, labels), boxes=boxes, masks=masks)
    assert torch.equal(ours[0], sams[0]) and torch.equal(ours[1], sams[1])
