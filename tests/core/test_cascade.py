"""The batched cascade equals the one-at-a-time cascade, and its decoder calls do not grow with B or K.

One-at-a-time = `segment_batch` on a batch of one image and one concept (the one-image
functions are that batch of one; their fidelity to the reference is test_fidelity.py's).
Images are synthetic (mixed sizes), concepts are fitted on them with the tiny random SAM.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persam_core.batch import EncodedBatch
from persam_core.host_results import HostResults
from persam_core.cascade import score_batch, segment_batch
from persam_core.concept import Concept, ConceptTensors, persam_f_target_feature, persam_targets, reference_cells
from persam_core.evaluation.metrics import iou
from persam_core.persam import prior_for, segment_persam
from persam_core.persam_f import segment_persam_f
from persam_core.modeling.predictor import encode_images, predict
from persam_core.modeling.resize import resize_longest_side

SIZES = [(480, 640), (640, 480), (480, 640), (300, 500)]  # two images share a size
MIN_IOU = 0.999


def blocky(height: int, width: int, seed: int) -> np.ndarray:
    coarse = np.random.default_rng(seed).integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.kron(coarse, np.ones((32, 32, 1), np.uint8))[:height, :width])


@pytest.fixture(scope="module")
def encoded(tiny_sam):
    return encode_images(tiny_sam, [resize_longest_side(blocky(h, w, i)) for i, (h, w) in enumerate(SIZES)])


@pytest.fixture(scope="module")
def concepts(encoded) -> list[ConceptTensors]:
    """K = 3 concepts of each method (PerSAM-F with hand-set weights summing to 1)."""
    made = []
    for k in range(3):
        mask = np.zeros(SIZES[0], dtype=bool)
        mask[40 + 60 * k : 240 + 60 * k, 80 + 90 * k : 300 + 90 * k] = True
        cells = reference_cells([encoded[0]], [mask], [f"mask {k}"])
        feature, embedding = persam_targets(cells)
        made.append(ConceptTensors.on(Concept(f"p{k}", "persam", feature.numpy(), embedding.numpy(), "t"), "cpu"))
        weights = np.array([0.5 - 0.2 * k, 0.25 + 0.1 * k, 0.25 + 0.1 * k], dtype=np.float32)
        made.append(ConceptTensors.on(Concept(f"f{k}", "persam-f", persam_f_target_feature(cells).numpy(),
                                              embedding.numpy(), "t", weights), "cpu"))
    return made


def one_at_a_time(sam, encoded, concepts, **options) -> list[tuple[int, int, HostResults]]:
    return [(i, k, segment_batch(sam, EncodedBatch.of([image]), [concept], **options))
            for i, image in enumerate(encoded) for k, concept in enumerate(concepts)]


def assert_batched_equals_single(sam, encoded, concepts, **options) -> HostResults:
    batched = segment_batch(sam, EncodedBatch.of(encoded), concepts, **options)
    row = 0
    for image, concept, single in one_at_a_time(sam, encoded, concepts, **options):
        for r in range(len(single)):
            assert (batched.image_index[row], batched.concept_index[row]) == (image, concept)
            assert batched.instance[row] == single.instance[r]
            assert tuple(batched.point[row]) == tuple(single.point[r]), (image, concept, r)
            assert batched.present[row] == single.present[r]
            assert iou(batched.mask(row), single.mask(r)) >= MIN_IOU
            np.testing.assert_allclose(batched.score[row], single.score[r], atol=1e-4)  # NaN == NaN (absent)
            np.testing.assert_allclose(batched.similarity[row], single.similarity[r], atol=1e-6)
            row += 1
    assert row == len(batched), "the batch has rows the single runs do not"
    return batched


@pytest.mark.slow
def test_mixed_sizes_both_methods_equal_one_at_a_time(tiny_sam, encoded, concepts):
    batched = assert_batched_equals_single(tiny_sam, encoded, concepts)
    assert len(batched) == len(encoded) * len(concepts)
    # bbox / area of the packed masks are those of the mask itself
    for row in range(len(batched)):
        mask = batched.mask(row)
        assert batched.area[row] == mask.sum()
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert list(batched.bbox[row]) == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def test_one_image_functions_are_the_batch_of_one(tiny_sam, encoded, concepts):
    for concept in concepts[:2]:
        single = segment_batch(tiny_sam, EncodedBatch.of([encoded[1]]), [concept])
        segment = segment_persam_f if concept.concept.method == "persam-f" else segment_persam
        result = segment(tiny_sam, encoded[1], concept)
        assert np.array_equal(result.mask, single.mask(0)) and result.point == tuple(single.point[0])


@pytest.mark.slow
def test_empty_pass_two_masks_skip_the_box_pass(tiny_sam, encoded, concepts):
    """A threshold between the pairs' best pass-2 logits empties some pass-2 masks, not all."""
    peaks = []
    for image in encoded:
        for concept in concepts[::2]:  # PerSAM pairs: pass 1 guided, pass 2 from its logits
            prior = prior_for(tiny_sam, image, concept)
            points, labels = np.array([prior.positive_point(), prior.negative_point()]), np.array([1, 0])
            first = predict(tiny_sam, image, points, labels, multimask_output=False,
                            attention_bias=prior.attention_bias(), target_embedding=concept.target_embedding.reshape(1, 1, -1))
            second = predict(tiny_sam, image, points, labels, mask_input=first.low_res[0:1])
            peaks.append(float(second.high_res(second.best_index()).max()))
    peaks = sorted(peaks)
    sam = copy.deepcopy(tiny_sam)
    sam.mask_threshold = (peaks[len(peaks) // 2 - 1] + peaks[len(peaks) // 2]) / 2
    batched = assert_batched_equals_single(sam, encoded, concepts)
    persam_rows = [r for r in range(len(batched)) if batched.concept_index[r] % 2 == 0]
    empty = [r for r in persam_rows if batched.area[r] == 0]
    assert 0 < len(empty) < len(persam_rows)


def test_absent_concepts_under_min_similarity(tiny_sam, encoded, concepts):
    presence, _ = score_batch(tiny_sam, EncodedBatch.of(encoded), concepts)
    threshold = float(np.median(presence))
    batched = assert_batched_equals_single(tiny_sam, encoded, concepts, min_similarity=threshold)
    absent = ~batched.present
    assert absent.any() and not absent.all()
    assert (batched.area[absent] == 0).all() and np.isnan(batched.score[absent]).all()


@pytest.mark.slow
def test_three_instances_equal_one_at_a_time(tiny_sam, encoded, concepts):
    batched = assert_batched_equals_single(tiny_sam, encoded, concepts[:4], max_instances=3)
    assert (batched.instance > 0).any()
    for image, concept in {(i, k) for i, k in zip(batched.image_index, batched.concept_index)}:
        rows = np.flatnonzero((batched.image_index == image) & (batched.concept_index == concept))
        assert list(batched.instance[rows]) == list(range(len(rows))) and len(rows) <= 3


def test_score_batch_is_the_prior(tiny_sam, encoded, concepts):
    presence, points = score_batch(tiny_sam, EncodedBatch.of(encoded), concepts)
    for i, image in enumerate(encoded):
        for k, concept in enumerate(concepts):
            prior = prior_for(tiny_sam, image, concept)
            assert presence[i, k] == pytest.approx(prior.presence, abs=1e-6)
            assert tuple(points[i, k]) == prior.positive_point()


@pytest.mark.parametrize("images,concept_slice,expected", [(1, slice(0, 1), 3), (4, slice(0, 6, 2), 3),
                                                          (4, slice(1, 6, 2), 3), (4, slice(0, 6), 6)])
def test_decoder_calls_do_not_grow_with_batch_or_concepts(tiny_sam, encoded, concepts, images, concept_slice, expected):
    """3 mask-decoder calls per method present, whatever B and K (counted on SAM's own module)."""
    calls = []
    handle = tiny_sam.mask_decoder.iou_prediction_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        segment_batch(tiny_sam, EncodedBatch.of(encoded[:images]), concepts[concept_slice])
    finally:
        handle.remove()
    assert len(calls) == expected


def test_more_pairs_than_one_call_holds_decode_in_several(tiny_sam, encoded, concepts, monkeypatch):
    """Beyond pairs.DECODER_PAIRS (memory) the decoder runs in calls of that many pairs: the
    same points and masks as one call."""
    from persam_core import pairs

    persam = concepts[0::2]  # K = 3 PerSAM concepts, P = 4 x 3 = 12
    whole = segment_batch(tiny_sam, EncodedBatch.of(encoded), persam)
    monkeypatch.setattr(pairs, "DECODER_PAIRS", 5)
    calls = []
    handle = tiny_sam.mask_decoder.iou_prediction_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        sliced = segment_batch(tiny_sam, EncodedBatch.of(encoded), persam)
    finally:
        handle.remove()
    assert len(calls) == 3 * 3  # three passes, ceil(12 / 5) calls each
    assert len(sliced) == len(whole) == 12
    for row in range(len(whole)):
        assert tuple(sliced.point[row]) == tuple(whole.point[row])
        assert iou(sliced.mask(row), whole.mask(row)) >= MIN_IOU
        np.testing.assert_allclose(sliced.score[row], whole.score[row], atol=1e-4)


def test_results_travel_as_plain_arrays(tiny_sam, encoded, concepts):
    batched = segment_batch(tiny_sam, EncodedBatch.of(encoded[:2]), concepts[:2])
    copied = HostResults.from_arrays(batched.to_arrays())
    joined = HostResults.concatenate([batched, copied], [0, 2])
    assert len(joined) == 2 * len(batched)
    assert list(joined.image_index[len(batched):]) == list(batched.image_index + 2)
    for row in range(len(batched)):
        assert np.array_equal(joined.mask(len(batched) + row), batched.mask(row))
    assert torch.is_tensor(encoded[0].features)  # inputs untouched


def test_several_pairs_get_their_features_token_major(tiny_sam, encoded):
    """The decoder's transformer reads image tokens contiguous: several pairs get each image's
    features channels-last (same values), so no pass copies [P, 4096, 256] again; one pair
    keeps SAM's layout (bit for bit with its predictor)."""
    from persam_core.pairs import PairBatch

    features = torch.stack([e.features for e in encoded[:2]])
    sizes = [tuple(e.input_size) for e in encoded[:2]], [tuple(e.original_size) for e in encoded[:2]]
    several = PairBatch.build(tiny_sam, features, [0, 0, 1], *sizes).pair_features()
    assert torch.equal(several, features[[0, 0, 1]])
    assert several.is_contiguous(memory_format=torch.channels_last)
    assert several.flatten(2).permute(0, 2, 1).is_contiguous()  # what the transformer makes of it: no copy
    one = PairBatch.build(tiny_sam, features, [1], *sizes).pair_features()
    assert torch.equal(one, features[[1]]) and one.is_contiguous()
    # a subset (PerSAM-F's pairs, further instances) reuses the batch's channels-last copy
    batch = PairBatch.build(tiny_sam, features, [0, 0, 1], *sizes)
    batch.pair_features()
    assert batch.subset([0, 2])._channels_last_features is batch._channels_last_features
