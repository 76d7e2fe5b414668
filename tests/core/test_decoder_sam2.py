"""SAM 2 decoding: guidance off it *is* SAM2ImagePredictor; each PerSAM addition as the reference.

Guidance off (no attention bias, no target embedding): features, masks, scores and the
fed-back low-res logits are bit-identical to sam2's own SAM2ImagePredictor on the same
prompts. Guidance on: the reference's guided transformer (`sam2_oracle.reference_guidance`)
inside SAM2ImagePredictor is the oracle; ours attends through SAM 2's fused attention where the
reference multiplies out the softmax, so the comparison allows float rounding (1e-4).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from persam_core.modeling.families import as_backbone
from persam_core.modeling.predictor import encode_images, predict
from persam_core.prior import attention_biases, upsample_similarities, similarity_map
from sam2_oracle import Sam2Reference

IMAGE_SIZE = (300, 500)  # not square: SAM 2 stretches it to 1024 x 1024
POINTS, LABELS = np.array([[120, 80], [400, 250]]), np.array([1, 0])
BOX = np.array([60, 40, 330, 260])


def picture(height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, np.ones((25, 25, 1), np.uint8))[:height, :width])


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return picture(*IMAGE_SIZE, seed=3)


@pytest.fixture(scope="module")
def reference(tiny_sam2, image) -> Sam2Reference:
    ref = Sam2Reference(tiny_sam2)
    ref.set_image(image)
    return ref


@pytest.fixture(scope="module")
def encoded(tiny_sam2, image):
    return encode_images(tiny_sam2, [as_backbone(tiny_sam2).resize(image)])[0]


@pytest.fixture(scope="module")
def guidance(tiny_sam2, encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """A real attention bias (prior of a target cell) and target embedding (that cell's feature)."""
    target = encoded.features[:, 20, 30]
    similarity = similarity_map(encoded.features, target / target.norm())
    upsampled = upsample_similarities(tiny_sam2, similarity[None], encoded.input_size, encoded.original_size)
    return attention_biases(upsampled), target.reshape(1, 1, -1)


def test_features_equal_sam2_image_predictor(encoded, reference):
    predictor = reference.predictor
    assert encoded.input_size == (1024, 1024) and encoded.original_size == IMAGE_SIZE
    assert torch.equal(encoded.features, predictor._features["image_embed"][0])
    assert len(encoded.high_res) == 2
    for ours, theirs in zip(encoded.high_res, predictor._features["high_res_feats"]):
        assert torch.equal(ours, theirs[0])


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["points", "points+box", "points+box+mask"])
def test_plain_decode_equals_sam2_image_predictor(tiny_sam2, encoded, reference, prompt, multimask):
    box = BOX if "box" in prompt else None
    mask = None
    if "mask" in prompt:  # the predictor's own low-res output, fed back as its users do
        _, _, low = reference.predictor.predict(POINTS, LABELS, multimask_output=True)
        mask = low[1:2]
    masks, scores, low_res = reference.predictor.predict(POINTS, LABELS, box=box, mask_input=mask,
                                                         multimask_output=multimask, return_logits=True)
    ours = predict(tiny_sam2, encoded, POINTS, LABELS, box_xyxy=box,
                   mask_input=None if mask is None else torch.as_tensor(mask), multimask_output=multimask)
    assert np.array_equal(ours.high_res().numpy(), masks)
    assert np.array_equal(ours.scores.numpy(), scores)
    assert np.array_equal(as_backbone(tiny_sam2).mask_feedback(ours.low_res).numpy(), low_res)
    assert ours.scores.shape == ((3,) if multimask else (1,))
    assert torch.isfinite(ours.object_score)


def test_object_score_is_sam2_object_score_head(tiny_sam2, encoded):
    """The reported object score is SAM 2's own MaskDecoder output (its object-score token)."""
    ours = predict(tiny_sam2, encoded, POINTS, LABELS)
    coords = torch.as_tensor(POINTS, dtype=torch.float32)[None] / torch.tensor([IMAGE_SIZE[1], IMAGE_SIZE[0]]) * 1024
    sparse, dense = tiny_sam2.sam_prompt_encoder(points=(coords, torch.as_tensor(LABELS, dtype=torch.int)[None]),
                                                 boxes=None, masks=None)
    *_, object_score = tiny_sam2.sam_mask_decoder(
        encoded.features[None], tiny_sam2.sam_prompt_encoder.get_dense_pe(), sparse, dense, True, False,
        [level[None] for level in encoded.high_res])
    assert torch.equal(ours.object_score, object_score[0, 0])


@pytest.mark.parametrize("bias, embedding", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("multimask", [False, True])
def test_guided_decode_matches_reference(tiny_sam2, encoded, reference, guidance, bias, embedding, multimask):
    attention_bias = guidance[0] if bias else None
    target_embedding = guidance[1] if embedding else None
    ours = predict(tiny_sam2, encoded, POINTS, LABELS, multimask_output=multimask,
                   attention_bias=attention_bias, target_embedding=target_embedding)
    _, scores, _, high = reference.predict(POINTS, LABELS, multimask_output=multimask, attn_sim=attention_bias,
                                           target_embedding=target_embedding)
    assert torch.allclose(ours.high_res(), high, atol=1e-4), float((ours.high_res() - high).abs().max())
    np.testing.assert_allclose(ours.scores.numpy(), scores, atol=1e-5)
    plain = predict(tiny_sam2, encoded, POINTS, LABELS, multimask_output=multimask)
    assert float((ours.high_res() - plain.high_res()).abs().max()) > 1e-3, "guidance changed nothing"


def test_guidance_does_not_leak_into_later_decodes_or_sam2s_own_callers(tiny_sam2, image, guidance):
    model = copy.deepcopy(tiny_sam2)
    ref = Sam2Reference(model)
    ref.set_image(image)
    before = ref.predictor.predict(POINTS, LABELS, return_logits=True)
    state_keys = list(model.state_dict())
    encoded = encode_images(model, [as_backbone(model).resize(image)])[0]
    predict(model, encoded, POINTS, LABELS, attention_bias=guidance[0], target_embedding=guidance[1])
    after = ref.predictor.predict(POINTS, LABELS, return_logits=True)  # the transformer is wrapped now
    assert all(np.array_equal(b, a) for b, a in zip(before, after))
    assert list(model.state_dict()) == state_keys
    assert np.array_equal(predict(model, encoded, POINTS, LABELS).high_res().numpy(), before[0])


def test_our_path_emits_no_warnings(tiny_sam2, image):
    """sam2's CUDA extension is absent here; nothing on our path asks for it or warns."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoded = encode_images(tiny_sam2, [as_backbone(tiny_sam2).resize(image)])[0]
        predict(tiny_sam2, encoded, POINTS, LABELS, box_xyxy=BOX)
    assert [str(w.message) for w in caught] == []
