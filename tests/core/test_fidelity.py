"""persam_core against SAM's own predictor and against the reference PerSAM.

The reference is `reference_oracle`, a literal transcription of ZrrSkywalker/Personalize-SAM.
Fidelity bar (fp32, CPU, same weights and inputs): points within 1 px, final-mask IoU >= 0.98.
Random weights make the masks meaningless but the arithmetic identical, which is the point.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

import reference_oracle as oracle
from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
from persam_core.evaluation.metrics import iou
from persam_core.persam import ConceptTensors, Result, prior_for, segment_persam
from persam_core.persam_f import fit_mask_weights, segment_persam_f
from persam_core.modeling.predictor import EncodedImage, encode_images, predict
from persam_core.modeling.preprocess import reference_mask_grid
from persam_core.modeling.resize import resize_longest_side
from persam_core.prior import LocationPrior

CONCEPTS = ("cat", "colorful_sneaker", "duck_toy")
TARGETS = ("01", "02")
MIN_IOU = 0.98
DECODER_ATOL = 1e-5
# A quirk "matters" when switching it off moves the logits far beyond numerical agreement
# (random weights give logits of ~0.1, so this is several percent of their scale).
QUIRK_EFFECT = 100 * DECODER_ATOL
PERSAM_F_EPOCHS = 20


def load_image(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB, EXIF orientation applied."""
    return np.array(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def load_mask(path: Path) -> np.ndarray:
    """[H, W] bool: palette index > 0."""
    return np.array(Image.open(path)) > 0


def load_mask_as_cv2(path: Path) -> np.ndarray:
    """[H, W, 3] uint8 palette colours: what the reference's cv2.imread + BGR2RGB gives."""
    return np.array(Image.open(path).convert("RGB"))


@dataclass(frozen=True)
class Sample:
    """One PerSeg concept: reference 00 (+ mask in both forms) and the target images."""

    ref_image: np.ndarray
    ref_mask: np.ndarray
    ref_mask_rgb: np.ndarray
    targets: tuple[np.ndarray, ...]


@pytest.fixture(scope="module")
def samples(perseg_sample: Path) -> dict[str, Sample]:
    def sample(name: str) -> Sample:
        images, masks = perseg_sample / "Images" / name, perseg_sample / "Annotations" / name
        return Sample(
            load_image(images / "00.jpg"), load_mask(masks / "00.png"), load_mask_as_cv2(masks / "00.png"),
            tuple(load_image(images / f"{t}.jpg") for t in TARGETS),
        )

    return {name: sample(name) for name in CONCEPTS}


@pytest.fixture(scope="module")
def encoded(tiny_sam: Sam, samples: dict[str, Sample]) -> dict[str, list[EncodedImage]]:
    """Our encodes, as the pipeline batches them: [reference, *targets] per concept."""
    return {
        name: encode_images(tiny_sam, [resize_longest_side(i) for i in (s.ref_image, *s.targets)])
        for name, s in samples.items()
    }


def predictor_encoder(sam: Sam) -> Callable[[np.ndarray], torch.Tensor]:
    """SamPredictor.set_image's features, cached by image content (one encode per image)."""
    predictor, cache = SamPredictor(sam), {}

    def encode(image: np.ndarray) -> torch.Tensor:
        key = (image.shape, hashlib.blake2b(image.tobytes(), digest_size=16).digest())
        if key not in cache:
            predictor.set_image(image)
            cache[key] = predictor.features
        return cache[key]

    return encode


@pytest.fixture(scope="module")
def reference_encode(tiny_sam: Sam) -> Callable[[np.ndarray], torch.Tensor]:
    return predictor_encoder(tiny_sam)


def persam_concept(encoded_ref: EncodedImage, mask: np.ndarray) -> ConceptTensors:
    """PerSAM's concept exactly as `persam fit` builds it (float32 round trip included)."""
    t, e = persam_targets(reference_cells([encoded_ref], [mask], ["reference"]))
    return ConceptTensors.on(Concept("c", "persam", t.numpy(), e.numpy(), "test"), "cpu")


def max_diff(first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor) -> float:
    return float(np.abs(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)).max())


def assert_same_points(ours: tuple[int, int], theirs: tuple[int, int]) -> None:
    assert max(abs(ours[0] - theirs[0]), abs(ours[1] - theirs[1])) <= 1, (ours, theirs)


# ---- plain SAM decoding: bit-identical to segment_anything's SamPredictor ---------------


@dataclass(frozen=True)
class Plain:
    predictor: SamPredictor
    encoded: EncodedImage
    low_res_input: np.ndarray  # [1, 256, 256] logits of an earlier pass, as the cascade feeds them


POINTS, LABELS = np.array([[120, 80], [400, 250]]), np.array([1, 0])


@pytest.fixture(scope="module")
def plain(tiny_sam: Sam) -> Plain:
    """A non-square image (padding and cropping in play) set on both sides."""
    image = np.random.default_rng(0).integers(0, 256, size=(300, 500, 3), dtype=np.uint8)
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(image)
    _, scores, logits = predictor.predict(POINTS, LABELS, multimask_output=True)
    encoded = encode_images(tiny_sam, [resize_longest_side(image)])[0]
    return Plain(predictor, encoded, logits[np.argmax(scores)][None])


def test_encoder_input_and_features_match_sam_predictor(plain: Plain) -> None:
    predictor, ours = plain.predictor, plain.encoded
    assert ours.original_size == predictor.original_size and ours.input_size == predictor.input_size
    assert torch.equal(ours.features, predictor.features[0])


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("prompt", ["points", "points+box", "points+mask", "points+box+mask"])
def test_plain_predict_matches_sam_predictor(plain: Plain, prompt: str, multimask: bool) -> None:
    """No bias, no target embedding: SAM's decode, bit for bit (our predict always has points)."""
    box = np.array([60, 40, 330, 210]) if "box" in prompt else None
    low_in = plain.low_res_input if "mask" in prompt else None
    masks, scores, low_res = plain.predictor.predict(POINTS, LABELS, box, low_in, multimask_output=multimask)

    sam = plain.predictor.model
    result = predict(sam, plain.encoded, POINTS, LABELS, box_xyxy=box,
                     mask_input=None if low_in is None else torch.as_tensor(low_in), multimask_output=multimask)
    assert np.array_equal(result.low_res.numpy(), low_res)
    assert np.array_equal(result.scores.numpy(), scores)
    assert np.array_equal((result.high_res() > sam.mask_threshold).numpy(), masks)


# ---- the guided decoder against the reference's, quirks included ------------------------


@dataclass(frozen=True)
class GuidedInputs:
    encoded: EncodedImage
    points: np.ndarray
    labels: np.ndarray
    bias: torch.Tensor  # [1, 1, 1, 4096]
    embedding: torch.Tensor  # [1, 1, 256]


@pytest.fixture(scope="module")
def guided(tiny_sam: Sam, encoded: dict[str, list[EncodedImage]], samples: dict[str, Sample]) -> GuidedInputs:
    """Pass-1 inputs of PerSAM on cat/01 (our prior; the comparison is of the decoders)."""
    concept = persam_concept(encoded["cat"][0], samples["cat"].ref_mask)
    target = encoded["cat"][1]
    prior = prior_for(tiny_sam, target, concept)
    points = np.array([prior.positive_point(), prior.negative_point()])
    embedding = concept.target_embedding.reshape(1, 1, -1)
    return GuidedInputs(target, points, np.array([1, 0]), prior.attention_bias(), embedding)


def decode_both(sam: Sam, g: GuidedInputs, bias: bool, embedding: bool, multimask: bool = False,
                quirks: oracle.Quirks = oracle.REFERENCE) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (our low-res logits, our scores, reference low-res logits, reference scores)."""
    attn, e = (g.bias if bias else None), (g.embedding if embedding else None)
    ours = predict(sam, g.encoded, g.points, g.labels, multimask_output=multimask,
                   attention_bias=attn, target_embedding=e)
    _, scores, low, _ = oracle.reference_predict(
        sam, g.encoded.features[None], g.encoded.original_size, g.encoded.input_size, g.points, g.labels,
        multimask_output=multimask, attn_sim=attn, target_embedding=e, quirks=quirks,
    )
    return ours.low_res.numpy(), ours.scores.numpy(), low, scores


@pytest.mark.parametrize("multimask", [False, True])
def test_guided_decoder_matches_reference_pass1(tiny_sam: Sam, guided: GuidedInputs, multimask: bool) -> None:
    low, scores, ref_low, ref_scores = decode_both(tiny_sam, guided, bias=True, embedding=True, multimask=multimask)
    print(f"pass 1 (multimask={multimask}): max |ours - ref| logits {max_diff(low, ref_low):.2e}")
    assert max_diff(low, ref_low) <= DECODER_ATOL
    assert max_diff(scores, ref_scores) <= DECODER_ATOL


def test_inplace_positional_encoding_quirk(tiny_sam: Sam, guided: GuidedInputs) -> None:
    """The reference's `queries += e` also shifts the tokens' positional encoding; it matters."""
    low, _, ref_low, _ = decode_both(tiny_sam, guided, bias=False, embedding=True)
    _, _, naive_low, _ = decode_both(tiny_sam, guided, bias=False, embedding=True,
                                     quirks=oracle.Quirks(inplace_pe=False))
    print(f"in-place PE: max |ref - naive| {max_diff(ref_low, naive_low):.2e}, "
          f"|ours - ref| {max_diff(low, ref_low):.2e}")
    assert max_diff(ref_low, naive_low) > QUIRK_EFFECT, "the quirk should change the logits"
    assert max_diff(low, ref_low) <= DECODER_ATOL


def test_double_softmax_quirk(tiny_sam: Sam, guided: GuidedInputs) -> None:
    """softmax(softmax(QK^T/sqrt(d)) + A), not softmax(QK^T/sqrt(d) + A)."""
    low, _, ref_low, _ = decode_both(tiny_sam, guided, bias=True, embedding=False)
    _, _, single_low, _ = decode_both(tiny_sam, guided, bias=True, embedding=False,
                                      quirks=oracle.Quirks(double_softmax=False))
    print(f"double softmax: max |ref - single| {max_diff(ref_low, single_low):.2e}, "
          f"|ours - ref| {max_diff(low, ref_low):.2e}")
    assert max_diff(ref_low, single_low) > QUIRK_EFFECT, "one softmax instead of two should change the logits"
    assert max_diff(low, ref_low) <= DECODER_ATOL


# ---- reference mask -> grid cells, location-prior ties -----------------------------------


@pytest.mark.parametrize("crop", [False, True], ids=["full", "non-square"])
@pytest.mark.parametrize("name", CONCEPTS)
def test_reference_mask_grid_matches_reference(tiny_sam: Sam, samples: dict[str, Sample], name: str,
                                                crop: bool) -> None:
    mask, mask_rgb = samples[name].ref_mask, samples[name].ref_mask_rgb
    if crop:  # a non-square mask exercises the resize + zero padding
        width = mask.shape[1] * 2 // 3
        mask, mask_rgb = mask[:, :width], mask_rgb[:, :width]
    ours = reference_mask_grid(mask)
    assert ours.any()
    assert torch.equal(ours, oracle.reference_mask_grid(tiny_sam, mask_rgb))
    # The quirk matters: a {0,1} mask through the same normalisation keeps no cell at all.
    ones = np.repeat(mask.astype(np.uint8)[..., None], 3, axis=2)
    assert not oracle.reference_mask_grid(tiny_sam, ones).any()


def test_prior_ties_go_to_first_row_major_index() -> None:
    upsampled = torch.zeros(5, 7)
    upsampled[1, 4] = upsampled[3, 2] = 1.0
    upsampled[0, 6] = upsampled[2, 0] = upsampled[4, 6] = -1.0
    prior = LocationPrior(torch.zeros(64, 64), upsampled)
    assert prior.positive_point() == (4, 1)
    assert prior.negative_point() == (6, 0)
    flat = LocationPrior(torch.zeros(64, 64), torch.full((5, 7), 0.5))
    assert flat.positive_point() == (0, 0) and flat.negative_point() == (0, 0)


# ---- end to end on the sample concepts --------------------------------------------------


def report(kind: str, name: str, target: str, ours: Result, theirs: oracle.RefResult) -> float:
    score = iou(ours.mask, theirs.mask)
    print(f"{kind} {name}/{target}: point ours {ours.point} ref {theirs.point}, "
          f"negative ours {ours.negative_point} ref {theirs.negative}, IoU {score:.6f}")
    return score


@pytest.mark.parametrize("name", CONCEPTS)
def test_persam_end_to_end_matches_reference(tiny_sam: Sam, samples: dict[str, Sample],
                                             encoded: dict[str, list[EncodedImage]], reference_encode,
                                             name: str) -> None:
    sample, images = samples[name], encoded[name]
    concept = persam_concept(images[0], sample.ref_mask)
    theirs = oracle.reference_persam_many(tiny_sam, sample.ref_image, sample.ref_mask_rgb, sample.targets,
                                          encode=reference_encode)
    for target, image, ref in zip(TARGETS, images[1:], theirs):
        ours = segment_persam(tiny_sam, image, concept)
        score = report("persam", name, target, ours, ref)
        assert_same_points(ours.point, ref.point)
        assert_same_points(ours.negative_point, ref.negative)
        assert score >= MIN_IOU


def test_persam_non_square_target_matches_reference(tiny_sam: Sam, samples: dict[str, Sample],
                                                    encoded: dict[str, list[EncodedImage]], reference_encode) -> None:
    """PerSeg images are square; a cropped target exercises padding and the crop in postprocess."""
    sample = samples["cat"]
    target = np.ascontiguousarray(sample.targets[0][:, : sample.targets[0].shape[1] * 3 // 4])
    ours = segment_persam(tiny_sam, encode_images(tiny_sam, [resize_longest_side(target)])[0],
                          persam_concept(encoded["cat"][0], sample.ref_mask))
    theirs = oracle.reference_persam(tiny_sam, sample.ref_image, sample.ref_mask_rgb, target, encode=reference_encode)
    score = report("persam", "cat", "01-cropped", ours, theirs)
    assert_same_points(ours.point, theirs.point)
    assert_same_points(ours.negative_point, theirs.negative)
    assert score >= MIN_IOU


@pytest.mark.parametrize("name", CONCEPTS)
def test_persam_f_end_to_end_matches_reference(tiny_sam: Sam, samples: dict[str, Sample],
                                               encoded: dict[str, list[EncodedImage]], reference_encode,
                                               name: str) -> None:
    sample, images = samples[name], encoded[name]
    cells = reference_cells([images[0]], [sample.ref_mask], ["reference"])
    target_feature = persam_f_target_feature(cells)
    weights, losses = fit_mask_weights(tiny_sam, [images[0]], [sample.ref_mask], target_feature,
                                       epochs=PERSAM_F_EPOCHS)
    _, embedding = persam_targets(cells)
    concept = ConceptTensors.on(
        Concept("c", "persam-f", target_feature.numpy(), embedding.numpy(), "test", mask_weights=weights), "cpu"
    )
    theirs = oracle.reference_persam_f_many(tiny_sam, sample.ref_image, sample.ref_mask_rgb, sample.targets,
                                            PERSAM_F_EPOCHS, encode=reference_encode)
    print(f"persam-f {name}: weights ours {weights} ref {theirs[0].weights}, "
          f"max |dw| {max_diff(weights, theirs[0].weights):.2e}, max |dloss| {max_diff(losses, theirs[0].losses):.2e}")
    np.testing.assert_allclose(weights, theirs[0].weights, rtol=0, atol=1e-5)
    np.testing.assert_allclose(losses, theirs[0].losses, rtol=0, atol=1e-5)
    for target, image, ref in zip(TARGETS, images[1:], theirs):
        ours = segment_persam_f(tiny_sam, image, concept)
        score = report("persam-f", name, target, ours, ref)
        assert_same_points(ours.point, ref.point)
        assert score >= MIN_IOU


def test_persam_f_fit_lowers_loss_and_weights_sum_to_one(tiny_sam: Sam, samples: dict[str, Sample],
                                                         encoded: dict[str, list[EncodedImage]]) -> None:
    """50 epochs on duck_toy's reference. The loss is over every pixel, so the fit runs at a
    quarter of the resolution (same features, 320x320 output) to keep 50 epochs cheap."""
    sample, full = samples["duck_toy"], encoded["duck_toy"][0]
    target_feature = persam_f_target_feature(reference_cells([full], [sample.ref_mask], ["reference"]))
    mask = np.array(Image.fromarray(sample.ref_mask).resize((320, 320), Image.NEAREST))
    reference = EncodedImage(full.features, full.input_size, (320, 320))
    weights, losses = fit_mask_weights(tiny_sam, [reference], [mask], target_feature, epochs=50)
    print(f"persam-f 50 epochs: loss {losses[0]:.6f} -> {losses[-1]:.6f}, weights {weights}")
    assert len(losses) == 50 and losses[-1] < losses[0]
    assert weights.shape == (3,) and abs(float(weights.astype(np.float64).sum()) - 1.0) <= 1e-6


@pytest.mark.slow
def test_persam_vit_b_matches_reference(vit_b_sam: Sam, samples: dict[str, Sample]) -> None:
    """The real vit_b architecture (random weights), cat 00 -> 01, three encodes in all."""
    sample = samples["cat"]
    target = sample.targets[0]
    reference, encoded_target = encode_images(vit_b_sam, [resize_longest_side(i) for i in (sample.ref_image, target)])
    predictor_features = predictor_encoder(vit_b_sam)

    def encode(image: np.ndarray) -> torch.Tensor:
        # The reference's own encode of the target (checks our batched encode too); its
        # reference features are ours, to stay at three vit_b encodes.
        return reference.features[None] if image is sample.ref_image else predictor_features(image)

    ours = segment_persam(vit_b_sam, encoded_target, persam_concept(reference, sample.ref_mask))
    theirs = oracle.reference_persam(vit_b_sam, sample.ref_image, sample.ref_mask_rgb, target, encode=encode)
    feature_diff = max_diff(encoded_target.features, predictor_features(target)[0])
    print(f"vit_b features: max |ours (batched) - SamPredictor| {feature_diff:.2e}")
    score = report("persam vit_b", "cat", "01", ours, theirs)
    assert_same_points(ours.point, theirs.point)
    assert_same_points(ours.negative_point, theirs.negative)
    assert score >= MIN_IOU
