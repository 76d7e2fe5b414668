"""The benchmarks' mask metrics: PerSeg mIoU / bIoU and DAVIS 2017 J / F.

PerSeg (the paper's protocol, the reference's eval_mioU.py): per concept, IoU = Σ
intersection / Σ union over its target images; mIoU = mean over concepts. bIoU is the
same with Boundary IoU (Cheng et al. 2021): each mask is reduced to the band of its
pixels within d of its contour (mask minus its erosion by d, the image border counting
as contour), d = round(0.02 x image diagonal), at least 1 px. 0.02 is the ratio of the
Boundary IoU paper and of its reference code's default (the one PerSAM's bIoU cites):
wide enough that a contour off by a few pixels on a large image is not scored as a miss,
narrow enough that the band stays a boundary, not the whole object, on PerSeg's objects.

DAVIS 2017 (davis2017-evaluation, semi-supervised): per object and frame,
J = region IoU (1 when both masks are empty) and F = boundary F-measure: 1-px boundary
maps by seg2bmap, each side matched within a disk of radius ceil(0.008 x diagonal) of
the other (dilation, no bipartite matching), precision/recall -> F. Per object, the
means over the frames between the first and the last (both excluded); J&F overall =
(mean J + mean F) / 2 over all objects of all sequences.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

BOUNDARY_DILATION_RATIO = 0.02
DAVIS_BOUND_TH = 0.008


def region_counts(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    """[H, W] bool x2 -> (intersection, union) pixel counts."""
    _check_shapes(prediction, truth)
    return int(np.count_nonzero(prediction & truth)), int(np.count_nonzero(prediction | truth))


def _check_shapes(prediction: np.ndarray, truth: np.ndarray) -> None:
    if prediction.shape != truth.shape or prediction.ndim != 2:
        raise ValueError(f"masks differ in shape: prediction {prediction.shape}, annotation {truth.shape}")


def _window_sums(values: np.ndarray, radius: int) -> np.ndarray:
    """[H, W] int -> [H, W] sums over the (2r+1)^2 window at each pixel, zeros outside."""
    padded = np.pad(values, radius + 1)
    table = padded.cumsum(0).cumsum(1)
    size = 2 * radius + 1
    height, width = values.shape
    # Summed-area table: S[y+size] - S[y] over both axes gives the window's total.
    return (
        table[size : size + height, size : size + width]
        - table[0:height, size : size + width]
        - table[size : size + height, 0:width]
        + table[0:height, 0:width]
    )


def erode_square(mask: np.ndarray, radius: int) -> np.ndarray:
    """[H, W] bool -> eroded by a (2r+1)^2 square, outside the image counting as background.

    The same as cv2.erode with a 3x3 kernel r times on the mask padded by one zero pixel,
    which is what the Boundary IoU code does.
    """
    if radius < 1:
        return mask.copy()
    return _window_sums(mask.astype(np.int32), radius) == (2 * radius + 1) ** 2


def boundary_dilation(shape: tuple[int, int], ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Boundary width d in pixels: round(ratio x diagonal), at least 1 (as the reference code)."""
    return max(1, int(round(ratio * math.hypot(shape[0], shape[1]))))


def boundary_band(mask: np.ndarray, ratio: float = BOUNDARY_DILATION_RATIO) -> np.ndarray:
    """[H, W] bool -> the mask's pixels within d of its contour (or of the image border)."""
    return mask & ~erode_square(mask, boundary_dilation(mask.shape, ratio))


def boundary_counts(
    prediction: np.ndarray, truth: np.ndarray, ratio: float = BOUNDARY_DILATION_RATIO
) -> tuple[int, int]:
    """[H, W] bool x2 -> (intersection, union) of their boundary bands."""
    _check_shapes(prediction, truth)
    return region_counts(boundary_band(prediction, ratio), boundary_band(truth, ratio))


def ratio_or_one(intersection: float, union: float) -> float:
    """intersection / union; 1.0 when the union is empty (nothing to find, nothing found)."""
    return 1.0 if union == 0 else float(intersection) / float(union)


def boundary_iou(prediction: np.ndarray, truth: np.ndarray, ratio: float = BOUNDARY_DILATION_RATIO) -> float:
    """Boundary IoU of one pair of [H, W] bool masks (1.0 when both are empty)."""
    return ratio_or_one(*boundary_counts(prediction, truth, ratio))


# --- DAVIS 2017 -------------------------------------------------------------------------


def davis_j(truth: np.ndarray, prediction: np.ndarray) -> float:
    """Region similarity J of [H, W] bool masks; 1.0 when both are empty (as db_eval_iou)."""
    return ratio_or_one(*region_counts(prediction, truth))


def seg2bmap(mask: np.ndarray) -> np.ndarray:
    """[H, W] bool -> 1-px boundary map, offset half a pixel towards the origin (seg2bmap).

    A pixel is boundary where it differs from its east, south or south-east neighbour;
    the last row compares east only, the last column south only, the corner never.
    """
    seg = mask.astype(bool)
    east, south, south_east = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    east[:, :-1] = seg[:, 1:]
    south[:-1, :] = seg[1:, :]
    south_east[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ east) | (seg ^ south) | (seg ^ south_east)
    boundary[-1, :] = seg[-1, :] ^ east[-1, :]
    boundary[:, -1] = seg[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def dilate_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """[H, W] bool -> dilated by the disk x^2 + y^2 <= r^2 (skimage's disk(r)), zeros outside.

    Row decomposition: the disk is, for each dy, a horizontal run of half-width
    floor(sqrt(r^2 - dy^2)); each run is a 1-D window test on row prefix sums.
    """
    if radius < 1:
        return mask.copy()
    height, width = mask.shape
    prefix = np.pad(mask.astype(np.int32), ((0, 0), (radius + 1, radius))).cumsum(1)
    horizontal: dict[int, np.ndarray] = {}
    result = np.zeros_like(mask, dtype=bool)
    for dy in range(-radius, radius + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in horizontal:
            # window [x - half, x + half] of the original row, via the padded prefix sums
            start = radius - half
            horizontal[half] = (prefix[:, start + 2 * half + 1 : start + 2 * half + 1 + width] - prefix[:, start : start + width]) > 0
        row = horizontal[half]
        # output row y takes input row y + dy
        if dy >= 0:
            result[: height - dy] |= row[dy:]
        else:
            result[-dy:] |= row[: height + dy]
    return result


def davis_f(truth: np.ndarray, prediction: np.ndarray, bound_th: float = DAVIS_BOUND_TH) -> float:
    """Boundary F-measure of [H, W] bool masks, as davis2017's f_measure."""
    _check_shapes(prediction, truth)
    radius = int(bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*truth.shape)))
    predicted_boundary, true_boundary = seg2bmap(prediction), seg2bmap(truth)
    n_predicted, n_true = int(predicted_boundary.sum()), int(true_boundary.sum())
    if n_predicted == 0 and n_true == 0:
        precision, recall = 1.0, 1.0
    elif n_predicted == 0:
        precision, recall = 1.0, 0.0
    elif n_true == 0:
        precision, recall = 0.0, 1.0
    else:
        precision = np.count_nonzero(predicted_boundary & dilate_disk(true_boundary, radius)) / n_predicted
        recall = np.count_nonzero(true_boundary & dilate_disk(predicted_boundary, radius)) / n_true
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def davis_statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """Per-frame values of one object -> (mean, recall (> 0.5), decay), as db_statistics.

    Decay: mean of the first quarter of the frames minus mean of the last quarter.
    """
    values = np.asarray(per_frame, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # no frames: NaN, as the toolkit
        mean = float(np.nanmean(values))
        recall = float(np.nanmean(values > 0.5))
        bins = np.round(np.linspace(1, len(values), 5) + 1e-10).astype(int) - 1
        first = values[bins[0] : bins[1] + 1]
        last = values[bins[3] : bins[4] + 1]
        decay = float(np.nanmean(first) - np.nanmean(last))
    return mean, recall, decay
