"""GF-SAM batched over (image, concept) pairs: B = 2 images x K = 2 concepts in one call give what
each pair gives alone; pair subsets; presence without SAM; min_presence skips the decoder."""

from __future__ import annotations

import math

import pytest
import torch

from gfsam_product import iou, product_fit, sam_embeddings, tokens_of
from gfsam_standins import TokenStandIn, disc_around_point, standin_decoder
from persam_core import pairs as pairs_module
from persam_core.methods.gfsam_batch import gfsam_presence, presence_points, segment_gfsam
from persam_core.methods.gfsam_frames import stretch_frame
from test_gfsam_oracle_match import REFERENCES, TARGETS, scene

IMAGES = [TARGETS["wide"], TARGETS["tall"]]
SIZES = [image.shape[:2] for image in IMAGES]


@pytest.fixture(scope="module")
def standin_inputs():
    """Two concepts (1 and 2 shots) and two targets through the colour-token stand-in."""
    dinov2 = TokenStandIn(0)
    references = [product_fit(dinov2, [REFERENCES[0][0]], [REFERENCES[0][1]]),
                  product_fit(dinov2, [image for image, _ in REFERENCES], [mask for _, mask in REFERENCES])]
    tokens = tokens_of(dinov2, [stretch_frame(image) for image in IMAGES])
    return references, tokens, torch.zeros(len(IMAGES), 256, 64, 64)  # the stand-in decoder ignores features


def assert_same(batched, alone, min_iou: float = 0.999) -> None:
    assert batched.path == alone.path
    for field in ("points", "groups", "labels"):
        assert torch.equal(getattr(batched, field), getattr(alone, field)), field
    assert iou(batched.mask_1024, alone.mask_1024) >= min_iou and iou(batched.mask, alone.mask) >= min_iou
    assert float(batched.presence) == pytest.approx(float(alone.presence), abs=1e-6)
    assert float(batched.score) == pytest.approx(float(alone.score), abs=1e-5)
    assert torch.equal(batched.point, alone.point)


def test_two_images_by_two_concepts_equal_one_pair_at_a_time(sam, standin_inputs):
    references, tokens, embeddings = standin_inputs
    with standin_decoder(sam, disc_around_point(60)):
        batched = segment_gfsam(sam, embeddings, tokens, references, SIZES)
        assert len(batched) == 4
        for row, (b, k) in enumerate((b, k) for b in range(2) for k in range(2)):
            alone = segment_gfsam(sam, embeddings[b : b + 1], tokens[b : b + 1], [references[k]], [SIZES[b]])[0]
            assert_same(batched[row], alone)
            assert batched[row].mask.shape == SIZES[b]
        # a subset of the pairs, in another order, is the same rows
        subset = segment_gfsam(sam, embeddings, tokens, references, SIZES, pairs=[(1, 0), (0, 1)])
    assert_same(subset[0], batched[2])
    assert_same(subset[1], batched[1])


@pytest.mark.slow
def test_random_weights_batched_equal_one_pair_at_a_time(sam):
    """The tiny random SAM and DINOv2: prompts of four pairs decoded together (batching changes
    the decoder's float rounding only)."""
    from persam_core.modeling.dinov2 import build_random_dinov2

    dinov2 = build_random_dinov2("tiny", 0)
    references = [product_fit(dinov2, [REFERENCES[k][0]], [REFERENCES[k][1]]) for k in range(2)]
    frames = [stretch_frame(image) for image in IMAGES]
    tokens, embeddings = tokens_of(dinov2, frames), sam_embeddings(sam, frames)
    batched = segment_gfsam(sam, embeddings, tokens, references, SIZES)
    for row, (b, k) in enumerate((b, k) for b in range(2) for k in range(2)):
        alone = segment_gfsam(sam, embeddings[b : b + 1], tokens[b : b + 1], [references[k]], [SIZES[b]])[0]
        assert_same(batched[row], alone, min_iou=0.99)


def test_presence_needs_no_sam_and_min_presence_skips_the_decoder(sam, standin_inputs, monkeypatch):
    references, tokens, embeddings = standin_inputs
    dinov2 = TokenStandIn(0)
    other_image, other_mask = scene(64, 96, [(20, 40, 30, 60)], seed=5)
    other_image[other_mask > 0] = (40, 40, 230)  # a colour absent from the targets
    absent = product_fit(dinov2, [other_image], [other_mask])
    concepts = [references[0], absent]
    presence = gfsam_presence(tokens, concepts)
    assert presence.shape == (2, 2)
    threshold = float(presence[:, 1].max() + presence[:, 0].min()) / 2
    assert presence[:, 0].min() > threshold > presence[:, 1].max()  # the scene makes concept 1 absent

    decoded = []
    decode = pairs_module.PairBatch.decode

    def counting(self, points, *args, **kwargs):
        decoded.append(points.shape[0])
        return decode(self, points, *args, **kwargs)

    monkeypatch.setattr(pairs_module.PairBatch, "decode", counting)
    with standin_decoder(sam, disc_around_point(60)):
        full = segment_gfsam(sam, embeddings, tokens, concepts, SIZES)
        full_prompts = sum(decoded)
        decoded.clear()
        kept = segment_gfsam(sam, embeddings, tokens, concepts, SIZES, min_presence=threshold)
    present_prompts = sum(len(full[row].points) for row in (0, 2))
    assert sum(decoded) == present_prompts < full_prompts  # absent pairs never reach the decoder
    for row in (0, 2):
        assert_same(kept[row], full[row])
    for row, size in ((1, SIZES[0]), (3, SIZES[1])):
        result = kept[row]
        assert result.path == "absent" and math.isnan(float(result.score))
        assert result.mask.shape == size and not result.mask.any() and not result.mask_1024.any()
        assert float(result.presence) == pytest.approx(float(presence.flatten()[row]), abs=1e-6)
    for row in range(4):
        assert float(full[row].presence) == pytest.approx(float(presence.flatten()[row]), abs=1e-6)

    scores, points = presence_points(tokens, concepts, SIZES)
    assert torch.allclose(scores, presence)
    assert torch.equal(points.view(4, 2), torch.stack([result.point for result in full]))
    for (b, _), point in zip(((b, k) for b in range(2) for k in range(2)), points.view(4, 2)):
        height, width = SIZES[b]
        assert 0 <= int(point[0]) < width and 0 <= int(point[1]) < height


def test_sam_2_and_mismatched_inputs_are_refused(sam, standin_inputs):
    references, tokens, embeddings = standin_inputs
    with pytest.raises(ValueError, match="SAM \\(segment_anything\\) models only"):
        segment_gfsam(torch.nn.Linear(1, 1), embeddings, tokens, references, SIZES)
    with pytest.raises(ValueError, match="one each per image"):
        segment_gfsam(sam, embeddings, tokens[:1], references, SIZES)
    with pytest.raises(ValueError, match="width"):
        segment_gfsam(sam, embeddings, tokens[..., :8], references, SIZES)
    assert segment_gfsam(sam, embeddings, tokens, references, SIZES, pairs=[]) == []
