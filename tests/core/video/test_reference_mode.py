"""persam_core.video.reference_mode against a transcription of the reference's video loop, and its pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import video_oracle
from synthetic import frame_image, rectangles
from persam_core.evaluation.scores import davis_j
from persam_core.modeling.models import build_random
from persam_core.video.reference_mode import SequenceTracker, VideoSettings, expanded_box, kept_cells, top_points

FRAMES = 4


@pytest.fixture(scope="module")
def sequence() -> tuple[list[np.ndarray], list[np.ndarray]]:
    labels = [rectangles(i) for i in range(FRAMES)]
    return [frame_image(l, i) for i, l in enumerate(labels)], labels


def test_expanded_box_follows_the_reference_clamping() -> None:
    mask = np.zeros((64, 96), dtype=bool)
    mask[20:30, 40:50] = True
    centre, box = expanded_box(mask, 10)
    assert box.tolist() == [30, 10, 59, 39] and centre.tolist() == [[44, 24]]
    mask[:] = False
    mask[0:5, 90:96] = True  # near the corner: clamped to 0 and to W itself (as the reference)
    centre, box = expanded_box(mask, 10)
    assert box.tolist() == [80, 0, 96, 14] and centre.tolist() == [[88, 7]]
    assert expanded_box(np.zeros((4, 4), dtype=bool)) is None
    assert np.array_equal(expanded_box(mask, 10)[1], video_oracle.get_box_prompt(mask, 10)[1])


def test_top_points_are_x_y_highest_first() -> None:
    values = torch.zeros(5, 7)
    values[3, 6], values[1, 2] = 2.0, 1.0
    assert top_points(values, 2).tolist() == [[6, 3], [2, 1]]


def test_kept_cells_use_the_215_threshold_and_fall_back_for_specks() -> None:
    mask = np.zeros((1024, 1024), dtype=bool)
    mask[:, :600] = True  # a cell is kept from about 58% coverage: 600 / 16 = 37.5 columns
    keep = kept_cells(mask)
    assert keep[:, :37].all() and not keep[:, 38:].any()
    speck = np.zeros((480, 854), dtype=bool)
    speck[100:102, 200:202] = True  # too small for any bilinear sample
    keep = kept_cells(speck)
    assert 1 <= int(keep.sum()) <= 4
    assert keep[100 * 64 // 854 : 102 * 64 // 854 + 1, 200 * 64 // 854 : 202 * 64 // 854 + 1].any()


def test_tracker_matches_the_reference_video_loop(sequence) -> None:
    frames, labels = sequence
    sam = build_random("tiny", 0)
    expected = video_oracle.reference_video(sam, frames, labels[0])
    tracker = SequenceTracker(sam, frames[0], labels[0], VideoSettings())
    for index, frame in enumerate(frames[1:]):
        predicted = tracker.step(frame)
        reference = expected[index]
        assert predicted.dtype == np.uint8 and predicted.shape == labels[0].shape
        for label in (1, 2):
            assert (reference == label).any(), "the oracle lost an object: pick other data"
            assert davis_j(reference == label, predicted == label) >= 0.98, (index, label)


def test_persam_f_tracker_fits_weights_and_labels_objects(sequence) -> None:
    frames, labels = sequence
    tracker = SequenceTracker(build_random("tiny", 1), frames[0], labels[0], VideoSettings(method="persam-f", epochs=20))
    assert [obj.label for obj in tracker.objects] == [1, 2]
    for obj in tracker.objects:
        assert obj.weights is not None and float(obj.weights.sum()) == pytest.approx(1.0, abs=1e-5)
    predicted = tracker.step(frames[1])
    assert set(np.unique(predicted).tolist()) <= {0, 1, 2}


def test_tracker_keeps_the_last_box_of_a_vanished_object(sequence, monkeypatch) -> None:
    frames, labels = sequence
    tracker = SequenceTracker(build_random("tiny", 0), frames[0], labels[0], VideoSettings())
    first_box = tracker.objects[0].box[1].tolist()
    logits = {1: torch.full(labels[0].shape, -1.0), 2: torch.where(torch.as_tensor(labels[2] == 2), 1.0, -1.0)}
    monkeypatch.setattr(tracker, "_object_logits", lambda encoded, obj: logits[obj.label])
    merged = tracker.step(frames[2])
    assert np.array_equal(merged, np.where(labels[2] == 2, 2, 0))  # background where every logit <= 0
    assert tracker.objects[0].box[1].tolist() == first_box  # object 1 vanished: its box stays
    assert tracker.objects[1].box[1].tolist() == expanded_box(labels[2] == 2)[1].tolist()
