"""persam_core.video.sam2_memory: without re-prompts it *is* sam2's SAM2VideoPredictor; lost objects are
re-prompted at the prior's points (guided); a concept starts where its presence passes.

The oracle is sam2's own video predictor driven as its README drives it: `init_state` on a
folder of JPEGs, `add_new_mask` per object, `propagate_in_video`. The tracker reads the same
JPEGs decoded to arrays. Seeded random weights (tiny_sam2); clips of 64 x 96 px.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from persam_core.prior import negative_points, positive_points, similarity_maps, upsample_similarities
from persam_core.modeling.sam2_backbone import Sam2Backbone
from persam_core.video.sam2_memory import FrameSource, MemorySettings, MemoryTracker, video_predictor

FRAMES = 3
STATE_KEYS = ("pred_masks", "object_score_logits", "obj_ptr", "maskmem_features")
NO_REPROMPT = MemorySettings(object_threshold=-math.inf)
ALWAYS_REPROMPT = MemorySettings(object_threshold=math.inf, min_similarity=-1.0)


def labels_of(frame: int) -> np.ndarray:
    """[64, 96] uint8: object 1 moves right, object 2 moves down, 4 px per frame."""
    labels = np.zeros((64, 96), dtype=np.uint8)
    labels[10:30, 8 + 4 * frame : 34 + 4 * frame] = 1
    labels[28 + 4 * frame : 52 + 4 * frame, 55:85] = 2
    return labels


@pytest.fixture(scope="module")
def predictor(tiny_sam2):
    return video_predictor(tiny_sam2, "tiny_sam2")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A JPEG folder (sam2's input) and the same JPEGs decoded (the tracker's)."""
    folder = tmp_path_factory.mktemp("clip")
    rng = np.random.default_rng(0)
    for index in range(FRAMES):
        image = rng.integers(80, 150, size=(64, 96, 3)).astype(np.uint8)
        image[labels_of(index) == 1], image[labels_of(index) == 2] = (220, 40, 40), (40, 60, 220)
        Image.fromarray(image).save(folder / f"{index:05d}.jpg", quality=95)
    return folder, [np.array(Image.open(folder / f"{i:05d}.jpg").convert("RGB")) for i in range(FRAMES)]


def merged(object_ids, logits: torch.Tensor) -> np.ndarray:
    best = torch.argmax(torch.cat([torch.zeros_like(logits[:1, 0]), logits[:, 0]]), dim=0).numpy()
    return np.array([0, *object_ids], dtype=np.uint8)[best]


def frame_output(state: dict, obj_idx: int, frame: int) -> dict:
    outputs = state["output_dict_per_obj"][obj_idx]
    return outputs["cond_frame_outputs"].get(frame) or outputs["non_cond_frame_outputs"][frame]


@pytest.fixture(scope="module")
def reference(predictor, clip) -> tuple[dict, dict[int, np.ndarray]]:
    folder, _ = clip
    state = predictor.init_state(str(folder))
    for label in (1, 2):
        predictor.add_new_mask(state, 0, label, labels_of(0) == label)
    return state, {index: merged(ids, masks) for index, ids, masks in predictor.propagate_in_video(state)}


def test_frames_are_sam2_loader_frames(predictor, clip, reference) -> None:
    source = FrameSource(clip[1], predictor.image_size)
    assert (source.height, source.width) == (64, 96) and len(source) == FRAMES
    for index in range(FRAMES):
        assert torch.equal(source[index], reference[0]["images"][index])


def test_without_reprompts_it_is_sam2_video_predictor(predictor, clip, reference) -> None:
    state, expected = reference
    tracker = MemoryTracker(predictor, clip[1], NO_REPROMPT)
    frames = dict(tracker.from_masks(labels_of(0)))
    assert list(frames) == list(range(FRAMES)) and tracker.prompted == []
    for index in range(FRAMES):
        assert frames[index].dtype == np.uint8 and np.array_equal(frames[index], expected[index]), index
        for obj_idx in (0, 1):  # every tensor SAM 2 keeps per frame, memories included, bit for bit
            ours, theirs = frame_output(tracker.state, obj_idx, index), frame_output(state, obj_idx, index)
            for key in STATE_KEYS:
                assert torch.equal(ours[key], theirs[key]), (index, obj_idx, key)
    assert set(np.unique(frames[0])) == {0, 1, 2}  # frame 0: the masks as SAM 2 decodes them


def prior_points(predictor, frames: list[np.ndarray], index: int, target: torch.Tensor) -> torch.Tensor:
    """The prior of `target` on frame `index`, computed apart from the tracker -> sam2's point inputs
    [1, 2, 2] (positive, negative; x, y scaled to the 1024 square input)."""
    backbone = Sam2Backbone(predictor)
    with torch.inference_mode():
        features, _ = backbone.encode(FrameSource(frames, predictor.image_size)[index][None])
        similarity = similarity_maps(features, target[None])[0]
        upsampled = upsample_similarities(backbone, similarity, (1024, 1024), (64, 96))
    points = torch.cat([positive_points(upsampled), negative_points(upsampled)]).float()
    return (points / torch.tensor([96.0, 64.0]) * 1024)[None]


@pytest.fixture(scope="module")
def reprompted(predictor, clip) -> MemoryTracker:
    tracker = MemoryTracker(predictor, clip[1], ALWAYS_REPROMPT)
    tracker.frames = dict(tracker.from_masks(labels_of(0)))
    return tracker


def test_lost_objects_are_reprompted_at_the_prior_points(predictor, clip, reprompted) -> None:
    # an object-score threshold above any score: every object is lost on every tracked frame
    assert reprompted.prompted == [(index, label) for index in range(1, FRAMES) for label in (1, 2)]
    assert list(reprompted.frames) == list(range(FRAMES))
    for index in range(1, FRAMES):
        for obj_idx, label in enumerate((1, 2)):
            inputs = reprompted.state["point_inputs_per_obj"][obj_idx][index]
            expected = prior_points(predictor, clip[1], index, reprompted.targets[label][0])
            assert torch.allclose(inputs["point_coords"], expected, atol=1e-3), (index, label)
            assert inputs["point_labels"].tolist() == [[1, 0]]
    assert 0 not in reprompted.state["point_inputs_per_obj"][0]  # frame 0 keeps its mask prompt


def test_guidance_changes_the_reprompt_decode(predictor, clip, reprompted) -> None:
    plain = MemoryTracker(predictor, clip[1], MemorySettings(object_threshold=math.inf, min_similarity=-1.0,
                                                             guidance=False))
    frames = iter(plain.from_masks(labels_of(0)))
    next(frames), next(frames)  # frame 1: the first re-prompts
    for obj_idx in (0, 1):
        assert torch.equal(plain.state["point_inputs_per_obj"][obj_idx][1]["point_coords"],
                           reprompted.state["point_inputs_per_obj"][obj_idx][1]["point_coords"])
        guided = frame_output(reprompted.state, obj_idx, 1)
        # the object score is the decoder's own output (masks and pointer are SAM 2's constants
        # for an absent object, which random weights give)
        assert not torch.equal(frame_output(plain.state, obj_idx, 1)["object_score_logits"],
                               guided["object_score_logits"])
    frames.close()


def test_found_objects_only_are_reprompted(predictor, clip) -> None:
    # lost everywhere, but the prior never finds them (presence <= 1 < 1.5): SAM 2 alone
    tracker = MemoryTracker(predictor, clip[1], MemorySettings(object_threshold=math.inf, min_similarity=1.5))
    frames = iter(tracker.from_masks(labels_of(0)))
    next(frames), next(frames)
    assert tracker.prompted == []
    frames.close()


def test_a_concept_starts_at_the_first_frame_where_it_is_present(predictor, clip) -> None:
    backbone = Sam2Backbone(predictor)
    with torch.inference_mode():
        features, _ = backbone.encode(FrameSource(clip[1], predictor.image_size)[2][None])
    cell = features[0, :, 15, 26]  # inside object 1 on frame 2: its presence there is 1
    target = cell / cell.norm()
    tracker = MemoryTracker(predictor, clip[1], MemorySettings(min_similarity=0.9999))
    frames = list(tracker.from_concept(target, cell))
    assert [index for index, _ in frames] == list(range(FRAMES))
    assert not frames[0][1].any() and not frames[1][1].any()  # before it is found: background
    assert tracker.prompted == [(2, 1)]
    inputs = tracker.state["point_inputs_per_obj"][0][2]
    assert torch.allclose(inputs["point_coords"], prior_points(predictor, clip[1], 2, target), atol=1e-3)
