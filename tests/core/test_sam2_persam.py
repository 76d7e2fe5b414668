"""PerSAM and PerSAM-F on SAM 2 (tiny_sam2): the reference flow on SAM2ImagePredictor, the batched
cascade, presence, instances, the prior alone (rank), PerSAM-F's fit, concept/model pairing.

The oracle is `sam2_oracle`: the reference's steps driven through SAM2ImagePredictor. PerSAM-F
uses no guidance, so there ours must equal it exactly; PerSAM's guided first pass goes through
fused attention in ours and multiplied-out softmax in the reference (float rounding only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persam_core.modeling.families import as_backbone
from persam_core.batch import EncodedBatch
from persam_core.cascade import score_batch, segment_batch
from persam_core.concept import Concept, ConceptError, ConceptTensors, persam_f_target_feature, persam_targets, reference_cells
from persam_core.evaluation.metrics import iou
from persam_core.modeling.models import model_fingerprint
from persam_core.persam import segment_persam
from persam_core.persam_f import fit_mask_weights, segment_persam_f
from persam_core.modeling.predictor import encode_images
from sam2_oracle import Sam2Reference, reference_persam, reference_persam_f, reference_targets

SIZES = [(300, 500), (500, 300), (300, 500), (400, 400)]  # two images share a size
WEIGHTS = np.array([0.2, 0.5, 0.3], dtype=np.float32)


def picture(height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 25 + 1, width // 25 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, np.ones((25, 25, 1), np.uint8))[:height, :width])


def box_mask(size: tuple[int, int], top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[top : top + height, left : left + width] = True
    return mask


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    return [picture(h, w, seed) for seed, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def encoded(tiny_sam2, images):
    backbone = as_backbone(tiny_sam2)
    return encode_images(tiny_sam2, [backbone.resize(image) for image in images])


@pytest.fixture(scope="module")
def reference(tiny_sam2) -> Sam2Reference:
    return Sam2Reference(tiny_sam2)


@pytest.fixture(scope="module")
def concepts(tiny_sam2, encoded) -> list[ConceptTensors]:
    """K = 2 concepts of each method, fitted on image 0 with tiny_sam2's own mask grid."""
    fingerprint = model_fingerprint(tiny_sam2, "tiny_sam2")
    made = []
    for k in range(2):
        mask = box_mask(SIZES[0], 30 + 80 * k, 40 + 150 * k, 120, 160)
        cells = reference_cells([encoded[0]], [mask], [f"mask {k}"], model=tiny_sam2)
        feature, embedding = persam_targets(cells)
        made.append(ConceptTensors.on(Concept(f"p{k}", "persam", feature.numpy(), embedding.numpy(), fingerprint), "cpu"))
        made.append(ConceptTensors.on(Concept(f"f{k}", "persam-f", persam_f_target_feature(cells).numpy(),
                                              embedding.numpy(), fingerprint, WEIGHTS), "cpu"))
    return made


def test_concept_targets_equal_the_reference(tiny_sam2, images, encoded, reference):
    mask = box_mask(SIZES[0], 30, 40, 120, 160)
    assert torch.equal(as_backbone(tiny_sam2).mask_grid(mask, 128), reference.mask_grid(mask))
    target_feat, target_embedding = reference_targets(reference, images[0], mask)
    feature, embedding = persam_targets(reference_cells([encoded[0]], [mask], ["mask"], model=tiny_sam2))
    assert torch.equal(embedding, target_embedding[0, 0]) and torch.equal(feature, target_feat[0])


@pytest.mark.parametrize("image_index", [1, 3])
def test_persam_matches_reference_on_sam2_image_predictor(tiny_sam2, images, encoded, reference, concepts, image_index):
    concept = concepts[0]
    ours = segment_persam(tiny_sam2, encoded[image_index], concept)
    theirs = reference_persam(reference, concept.target_feature[None], concept.target_embedding.reshape(1, 1, -1),
                              images[image_index])
    assert (ours.point, ours.negative_point) == (theirs.point, theirs.negative)
    assert iou(ours.mask, theirs.mask) >= 0.999
    assert abs(ours.score - theirs.score) < 1e-4
    assert np.isfinite(ours.object_score)


@pytest.mark.parametrize("image_index", [1, 3])
def test_persam_f_equals_reference_on_sam2_image_predictor(tiny_sam2, images, encoded, reference, concepts, image_index):
    concept = concepts[1]
    ours = segment_persam_f(tiny_sam2, encoded[image_index], concept)
    theirs = reference_persam_f(reference, concept.target_feature[None], WEIGHTS, images[image_index])
    assert ours.point == theirs.point
    assert np.array_equal(ours.mask, theirs.mask) and ours.score == theirs.score


def test_persam_f_weights_change_the_result(tiny_sam2, encoded, concepts):
    concept = concepts[1]
    other = ConceptTensors(concept.concept, concept.target_feature, concept.target_embedding,
                           torch.tensor([1.0, 0.0, 0.0]))
    assert not np.array_equal(segment_persam_f(tiny_sam2, encoded[1], concept).mask,
                              segment_persam_f(tiny_sam2, encoded[1], other).mask)


def assert_batched_equals_single(model, encoded, concepts, **options):
    batched = segment_batch(model, EncodedBatch.of(encoded), concepts, **options)
    row = 0
    for i, image in enumerate(encoded):
        for k, concept in enumerate(concepts):
            single = segment_batch(model, EncodedBatch.of([image]), [concept], **options)
            for r in range(len(single)):
                assert (batched.image_index[row], batched.concept_index[row]) == (i, k)
                assert batched.instance[row] == single.instance[r] and batched.present[row] == single.present[r]
                assert tuple(batched.point[row]) == tuple(single.point[r])
                assert iou(batched.mask(row), single.mask(r)) >= 0.999
                np.testing.assert_allclose(batched.score[row], single.score[r], atol=1e-4)
                np.testing.assert_allclose(batched.object_score[row], single.object_score[r], atol=1e-4)
                row += 1
    assert row == len(batched)
    return batched


def test_batched_cascade_k_concepts_mixed_sizes(tiny_sam2, encoded, concepts):
    batched = assert_batched_equals_single(tiny_sam2, encoded, concepts)
    assert len(batched) == len(encoded) * len(concepts)
    assert np.all(np.isfinite(batched.object_score))
    one = segment_persam(tiny_sam2, encoded[2], concepts[2])
    row = 2 * len(concepts) + 2
    assert np.array_equal(one.mask, batched.mask(row)) and one.point == tuple(batched.point[row])
    assert abs(one.object_score - batched.object_score[row]) < 1e-6


def test_presence_threshold(tiny_sam2, encoded, concepts):
    scores, _ = score_batch(tiny_sam2, EncodedBatch.of(encoded), concepts)
    batched = assert_batched_equals_single(tiny_sam2, encoded, concepts, min_similarity=float(np.median(scores)))
    assert 0 < batched.present.sum() < len(batched)
    absent = ~batched.present
    assert np.all(np.isnan(batched.score[absent])) and np.all(np.isnan(batched.object_score[absent]))
    assert np.all(batched.area[absent] == 0) and np.all(np.isfinite(batched.object_score[batched.present]))


def test_several_instances(tiny_sam2, encoded, concepts):
    """Further rounds run batched as one at a time; instance 0 is the single-instance result.
    (Random weights give masks that barely follow the prompt, so whether a further instance is
    accepted is up to the weights; the rule for accepting one is checked where one is.)"""
    batched = assert_batched_equals_single(tiny_sam2, encoded[:2], concepts, max_instances=3)
    single = segment_batch(tiny_sam2, EncodedBatch.of(encoded[:2]), concepts)
    first = np.flatnonzero(batched.instance == 0)
    assert np.array_equal(batched.point[first], single.point)
    assert all(np.array_equal(batched.mask(r), single.mask(i)) for i, r in enumerate(first))
    for row in np.flatnonzero(batched.instance > 0):  # a further instance is mostly new pixels
        earlier = (batched.image_index == batched.image_index[row]) & (batched.concept_index == batched.concept_index[row])
        before = np.any([batched.mask(r) for r in np.flatnonzero(earlier & (batched.instance < batched.instance[row]))], axis=0)
        mask = batched.mask(row)
        assert (mask & ~before).sum() >= 0.5 * mask.sum()


def test_score_batch_is_the_cascade_prior(tiny_sam2, encoded, concepts):
    similarity, points = score_batch(tiny_sam2, EncodedBatch.of(encoded), concepts)
    rows = segment_batch(tiny_sam2, EncodedBatch.of(encoded), concepts)
    assert similarity.shape == (len(encoded), len(concepts)) and points.shape == (len(encoded), len(concepts), 2)
    np.testing.assert_allclose(similarity.reshape(-1), rows.similarity, atol=1e-6)
    assert np.array_equal(points.reshape(-1, 2), rows.point)


def test_fit_mask_weights_on_sam2(tiny_sam2, encoded):
    mask = box_mask(SIZES[1], 100, 60, 200, 150)
    cells = reference_cells([encoded[1]], [mask], ["mask"], model=tiny_sam2)
    weights, losses = fit_mask_weights(tiny_sam2, [encoded[1]], [mask], persam_f_target_feature(cells), epochs=40)
    assert weights.shape == (3,) and abs(float(weights.astype(np.float64).sum()) - 1) < 1e-5
    assert losses[-1] < losses[0]


def test_concepts_refuse_the_other_model_family(tiny_sam, tiny_sam2, concepts):
    sam2_concept = concepts[0].concept
    with pytest.raises(ConceptError, match="tiny_sam2:.*but this job loads tiny:"):
        sam2_concept.require_fingerprint(model_fingerprint(tiny_sam, "tiny"))
    sam_concept = Concept("sam", "persam", sam2_concept.target_feature, sam2_concept.target_embedding,
                          model_fingerprint(tiny_sam, "tiny"))
    with pytest.raises(ConceptError, match="fitted with SAM weights tiny:"):
        sam_concept.require_fingerprint(model_fingerprint(tiny_sam2, "tiny_sam2"))
    sam2_concept.require_fingerprint(model_fingerprint(tiny_sam2, "tiny_sam2"))
