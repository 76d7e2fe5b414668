"""Metrics on shapes whose answers are known, and against literal transcriptions of the
reference code (Boundary IoU's mask_to_boundary, davis2017's f_measure / db_statistics)
with scipy/skimage standing in for cv2 (same operations)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.morphology import disk

from persam_core.evaluation.scores import (
    boundary_band,
    boundary_dilation,
    boundary_iou,
    davis_f,
    davis_j,
    davis_statistics,
    dilate_disk,
    erode_square,
    region_counts,
    seg2bmap,
)


def square(shape, top, left, size_y, size_x) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size_y, left : left + size_x] = True
    return mask


def random_blobs(rng: np.random.Generator, shape, count: int = 3) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    for _ in range(count):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(5, max(6, shape[0] // 3))
        mask |= (ys - cy) ** 2 + (xs - cx) ** 2 < r * r
    return mask


# ---- region IoU and Boundary IoU -------------------------------------------------------


def test_region_counts_of_two_rectangles() -> None:
    a, b = square((100, 100), 20, 20, 40, 40), square((100, 100), 21, 20, 40, 40)
    assert region_counts(a, b) == (39 * 40, 41 * 40)


def test_boundary_width_is_two_percent_of_the_diagonal() -> None:
    assert boundary_dilation((100, 100)) == 3  # round(0.02 * 141.4) = round(2.83)
    assert boundary_dilation((480, 854)) == 20  # round(19.59)
    assert boundary_dilation((10, 10)) == 1  # never below one pixel


def test_boundary_band_areas_by_hand() -> None:
    inner = square((100, 100), 20, 20, 40, 40)
    assert boundary_band(inner).sum() == 40 * 40 - 34 * 34  # a 3-px ring
    whole = np.ones((100, 100), dtype=bool)
    assert boundary_band(whole).sum() == 100 * 100 - 94 * 94  # the image border counts as contour
    assert boundary_band(np.zeros((100, 100), dtype=bool)).sum() == 0


def test_boundary_iou_of_a_one_pixel_shift_is_five_sevenths() -> None:
    # Rings of 444 px each; shared: 6 side columns x 39 rows + 4 rows x 34 columns = 370.
    a, b = square((100, 100), 20, 20, 40, 40), square((100, 100), 21, 20, 40, 40)
    assert boundary_iou(a, b) == pytest.approx(370 / (444 + 444 - 370))
    assert boundary_iou(a, b) == pytest.approx(5 / 7)
    assert boundary_iou(a, a) == 1.0
    assert boundary_iou(a, np.zeros_like(a)) == 0.0
    assert boundary_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0


def _reference_mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """boundary_iou_api's mask_to_boundary: pad by 1 zero px, 3x3 erosion `dilation` times."""
    h, w = mask.shape
    dilation = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
    padded = np.pad(mask.astype(np.uint8), 1)
    # cv2.erode's default border never erodes: border_value=1 reproduces it
    eroded = ndimage.binary_erosion(padded, structure=np.ones((3, 3)), iterations=dilation, border_value=1)
    return mask.astype(np.uint8) - eroded[1 : h + 1, 1 : w + 1].astype(np.uint8)


@pytest.mark.parametrize("shape", [(37, 53), (120, 90), (200, 311)])
def test_boundary_band_matches_the_boundary_iou_code(shape) -> None:
    rng = np.random.default_rng(shape[0])
    for _ in range(3):
        mask = random_blobs(rng, shape)
        assert np.array_equal(boundary_band(mask), _reference_mask_to_boundary(mask).astype(bool))


def test_erode_square_matches_scipy() -> None:
    mask = random_blobs(np.random.default_rng(1), (60, 70))
    expected = ndimage.binary_erosion(mask, structure=np.ones((7, 7)), border_value=0)
    assert np.array_equal(erode_square(mask, 3), expected)


# ---- DAVIS J and F ---------------------------------------------------------------------


def test_davis_j_on_simple_shapes_and_empty_masks() -> None:
    a, b = square((64, 96), 10, 10, 20, 20), square((64, 96), 10, 20, 20, 20)
    assert davis_j(a, b) == pytest.approx(200 / 600)
    empty = np.zeros((64, 96), dtype=bool)
    assert davis_j(empty, empty) == 1.0
    assert davis_j(a, empty) == 0.0
    assert davis_j(empty, a) == 0.0


def test_seg2bmap_marks_pixels_half_a_pixel_towards_the_origin() -> None:
    mask = square((4, 4), 1, 1, 2, 2)
    expected = np.array([[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(seg2bmap(mask), expected)
    assert not seg2bmap(np.ones((5, 5), dtype=bool)).any()


def test_davis_f_known_values() -> None:
    a = square((64, 96), 10, 10, 20, 30)
    empty = np.zeros_like(a)
    assert davis_f(a, a) == 1.0
    assert davis_f(empty, empty) == 1.0
    assert davis_f(a, empty) == 0.0  # nothing predicted: precision 1, recall 0
    assert davis_f(empty, a) == 0.0  # nothing to find: precision 0, recall 1
    # 64x96: tolerance ceil(0.008 * 115.4) = 1 px, so a 1-px shift is still a perfect match
    assert davis_f(a, square((64, 96), 11, 10, 20, 30)) == 1.0
    # With a 0-px tolerance, the shifted box shares only its two vertical sides' common rows.
    shifted = square((64, 96), 10, 15, 20, 30)  # 5 px right
    gt_b, pred_b = seg2bmap(a), seg2bmap(shifted)
    precision, recall = (pred_b & gt_b).sum() / pred_b.sum(), (gt_b & pred_b).sum() / gt_b.sum()
    assert davis_f(a, shifted, bound_th=0.0) == pytest.approx(2 * precision * recall / (precision + recall))
    assert 0 < davis_f(a, shifted, bound_th=0.0) < 1


def _reference_f_measure(foreground_mask: np.ndarray, gt_mask: np.ndarray, bound_th: float = 0.008) -> float:
    """davis2017 metrics.f_measure, cv2.dilate(disk) as scipy binary_dilation(disk)."""
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(foreground_mask.shape))
    fg_boundary, gt_boundary = seg2bmap(foreground_mask), seg2bmap(gt_mask)
    structure = disk(bound_pix).astype(bool)
    fg_dil = ndimage.binary_dilation(fg_boundary, structure=structure)
    gt_dil = ndimage.binary_dilation(gt_boundary, structure=structure)
    gt_match, fg_match = gt_boundary * fg_dil, fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("radius", [1, 3, 8])
def test_dilate_disk_matches_skimage_disk(radius: int) -> None:
    mask = np.zeros((40, 50), dtype=bool)
    mask[[0, 5, 20, 39], [0, 25, 49, 10]] = True
    expected = ndimage.binary_dilation(mask, structure=disk(radius).astype(bool))
    assert np.array_equal(dilate_disk(mask, radius), expected)


def test_davis_f_matches_the_toolkit_at_480p() -> None:
    rng = np.random.default_rng(7)
    for _ in range(4):
        truth = random_blobs(rng, (480, 854))
        prediction = ndimage.shift(truth, (rng.integers(-12, 12), rng.integers(-12, 12)), order=0)
        prediction &= ~random_blobs(rng, (480, 854), 1)
        assert davis_f(truth, prediction) == pytest.approx(_reference_f_measure(prediction, truth), abs=1e-12)


def _reference_db_statistics(per_frame_values: np.ndarray) -> tuple[float, float, float]:
    M = np.nanmean(per_frame_values)
    O = np.nanmean(per_frame_values > 0.5)
    ids = np.round(np.linspace(1, len(per_frame_values), 4 + 1) + 1e-10) - 1
    ids = ids.astype(np.uint8)
    D_bins = [per_frame_values[ids[i] : ids[i + 1] + 1] for i in range(0, 4)]
    D = np.nanmean(D_bins[0]) - np.nanmean(D_bins[3])
    return M, O, D


@pytest.mark.parametrize("frames", [1, 2, 5, 23, 80])
def test_davis_statistics_matches_db_statistics(frames: int) -> None:
    values = np.random.default_rng(frames).random(frames)
    assert davis_statistics(values) == pytest.approx(_reference_db_statistics(values))


def test_davis_statistics_known_values() -> None:
    mean, recall, decay = davis_statistics(np.array([1.0, 1.0, 0.2, 0.2]))
    assert (mean, recall) == (pytest.approx(0.6), 0.5)
    assert decay == pytest.approx(0.8)  # first quarter-bin [1, 1] minus last [0.2, 0.2]
    assert math.isnan(davis_statistics(np.array([]))[0])
