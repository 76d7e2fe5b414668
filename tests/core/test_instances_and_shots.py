"""Several instances per (image, concept) and several shots per concept, at unit level.

Instances: persam_core.instances.segment_instances on the tiny random model; two copies of
a cat shot side by side give a real second instance. Shots: `persam fit` in-process against
persam_core's own computation (reference_cells + persam_targets).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cli_tools import fit_cli
from sample_tools import load_pair
from persam_core.concept import persam_f_target_feature, persam_targets, reference_cells
from persam_core.instances import segment_instances
from persam_core.persam import prior_for, segment_persam
from persam_core.modeling.predictor import encode_images
from persam_core.modeling.preprocess import reference_mask_grid
from persam_core.modeling.resize import resize_longest_side


@pytest.fixture(scope="module")
def single(perseg_sample, tiny_sam):
    """duck_toy/01 shrunk to 480 px, encoded."""
    with Image.open(perseg_sample / "Images/duck_toy/01.jpg") as picture:
        picture.thumbnail((480, 480))
        pixels = np.asarray(picture.convert("RGB"))
    return encode_images(tiny_sam, [resize_longest_side(pixels)])[0]


# ---------------------------------------------------------------------------- several instances


# Random weights make it the photo's content that decides whether two copies give a second
# instance: the bundled cat's shot 02 does, PerSeg's cat does on 00 ($PERSAM_SAMPLE_DATA).
DOUBLED_SHOT = "00" if os.environ.get("PERSAM_SAMPLE_DATA") else "02"


@pytest.fixture(scope="module")
def doubled(perseg_sample, tiny_sam):
    """Two copies of a cat shot side by side (with the tiny random model a second instance is found)."""
    image, _ = load_pair(perseg_sample, "cat", DOUBLED_SHOT)
    return encode_images(tiny_sam, [resize_longest_side(np.concatenate([image, image], axis=1))])[0]


@pytest.fixture(scope="module")
def doubled_instances(tiny_sam, concept_tensors, doubled):
    return segment_instances(tiny_sam, doubled, concept_tensors["cat"], max_instances=3)


def test_instance_zero_is_the_single_result(tiny_sam, concept_tensors, single, doubled, doubled_instances):
    single_image = single
    for concept, encoded, found in (
        (concept_tensors["cat"], doubled, doubled_instances),
        (concept_tensors["duck_f"], single_image, segment_instances(tiny_sam, single_image, concept_tensors["duck_f"], 3)),
    ):
        single = segment_instances(tiny_sam, encoded, concept, 1)
        assert len(single) == 1
        if concept.concept.method == "persam":
            reference = segment_persam(tiny_sam, encoded, concept)
            assert np.array_equal(single[0].result.mask, reference.mask)
            assert single[0].result.score == reference.score and single[0].result.point == reference.point
        first = found[0].result
        assert np.array_equal(first.mask, single[0].result.mask)
        assert first.score == single[0].result.score
        assert first.similarity == single[0].result.similarity == prior_for(tiny_sam, encoded, concept).presence


def test_instances_are_numbered_and_never_overlap_more_than_half(doubled_instances):
    assert [f.instance for f in doubled_instances] == list(range(len(doubled_instances)))
    assert 1 <= len(doubled_instances) <= 3
    union = np.zeros_like(doubled_instances[0].result.mask)
    for found in doubled_instances:
        mask = found.result.mask
        assert found.present and mask.any()
        assert np.logical_and(mask, union).sum() <= 0.5 * mask.sum()
        x, y = found.result.point
        assert not union[y, x]  # each later instance starts outside the masks found so far
        union |= mask


def test_second_instance_is_found_in_a_doubled_image(doubled_instances):
    assert len(doubled_instances) >= 2, f"tiny random:0 finds a 2nd instance in two copies of cat/{DOUBLED_SHOT}"
    first, second = doubled_instances[0].result, doubled_instances[1].result
    assert second.similarity <= first.similarity
    assert np.logical_and(second.mask, ~first.mask).sum() >= 0.5 * second.mask.sum()


def test_search_stops_at_the_presence_threshold(tiny_sam, concept_tensors, doubled, doubled_instances):
    assert len(doubled_instances) >= 2, "no second instance to threshold"
    presence, peak = doubled_instances[0].result.similarity, doubled_instances[1].result.similarity
    assert peak < presence
    stopped = segment_instances(tiny_sam, doubled, concept_tensors["cat"], 3, (presence + peak) / 2)
    assert [f.instance for f in stopped] == [0] and stopped[0].present
    assert np.array_equal(stopped[0].result.mask, doubled_instances[0].result.mask)
    going = segment_instances(tiny_sam, doubled, concept_tensors["cat"], 3, peak - 1e-6)
    assert len(going) >= 2
    assert np.array_equal(going[1].result.mask, doubled_instances[1].result.mask)


def test_max_instances_below_one_is_refused(tiny_sam, concept_tensors, doubled):
    with pytest.raises(ValueError):
        segment_instances(tiny_sam, doubled, concept_tensors["cat"], 0)


# ---------------------------------------------------------------------------- several shots


def _cells(sam, sample, shots):
    pairs = [load_pair(sample, c, n) for c, n in shots]
    encoded = encode_images(sam, [resize_longest_side(image) for image, _ in pairs])  # one batch, as fit does
    return reference_cells(encoded, [m for _, m in pairs], ["mask"] * len(pairs)), [m for _, m in pairs]


def test_one_shot_fit_is_bit_identical_to_persam_core(perseg_sample, tiny_sam, tmp_path):
    concept = fit_cli(perseg_sample, [("cat", "00")], tmp_path / "one.json")
    cells, _ = _cells(tiny_sam, perseg_sample, [("cat", "00")])
    feature, embedding = persam_targets(cells)
    assert concept.target_feature.dtype == np.float32
    assert np.array_equal(concept.target_feature, feature.numpy())
    assert np.array_equal(concept.target_embedding, embedding.numpy())


def test_two_shots_pool_the_cells_of_both(perseg_sample, tiny_sam, tmp_path):
    shots = [("cat", "00"), ("cat", "01")]
    both = fit_cli(perseg_sample, shots, tmp_path / "two.json")
    singles = [fit_cli(perseg_sample, [shot], tmp_path / f"{shot[1]}.json") for shot in shots]
    assert len(both.references) == 2
    cells, masks = _cells(tiny_sam, perseg_sample, shots)
    feature, embedding = persam_targets(cells)
    assert np.allclose(both.target_embedding, embedding.numpy(), atol=1e-6)
    assert np.allclose(both.target_feature, feature.numpy(), atol=1e-6)
    # mean over pooled cells = cell-count-weighted mean of the single-shot embeddings
    counts = [int(reference_mask_grid(m).sum()) for m in masks]
    assert cells.shape[0] == sum(counts)
    weighted = sum(n * s.target_embedding.astype(np.float64) for n, s in zip(counts, singles)) / sum(counts)
    assert np.allclose(both.target_embedding, weighted, atol=1e-4)
    for single in singles:
        assert not np.allclose(both.target_embedding, single.target_embedding, atol=1e-4)
    assert np.linalg.norm(both.target_feature) == pytest.approx(1.0, abs=1e-5)


def test_two_shots_persam_f_fits_on_both(perseg_sample, tiny_sam, tmp_path):
    shots = [("duck_toy", "00"), ("duck_toy", "01")]
    concept = fit_cli(perseg_sample, shots, tmp_path / "f.json", "--method", "persam-f", "--epochs", "3")
    cells, _ = _cells(tiny_sam, perseg_sample, shots)
    assert concept.method == "persam-f" and concept.mask_weights.shape == (3,)
    assert np.all(np.isfinite(concept.mask_weights)) and concept.mask_weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(concept.target_feature, persam_f_target_feature(cells).numpy(), atol=1e-6)
