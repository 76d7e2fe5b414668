"""PerSAM's video mode (the reference's persam_video.py / persam_video_f.py), one sequence.

Frame 0's mask of each object is its reference: t = normalise(max(T)/2 + mean(T)/2) over
the kept grid cells T. The reference feeds that mask scaled to 215 (not 128) through
SAM's pixel normalisation, so a cell is kept from about 58% coverage (see `_grid_values`).
Every later frame is encoded once, then for each object (plain SAM decoding, no attention
bias or semantic prompt):

  points   the top-k cells of the upsampled similarity S' (k = 2; PerSAM-F: 1), all
           positive, plus the centre of the object's box in the previous frame's merged
           mask, that box expanded by 10 px (clamped to the image), as another positive;
  PerSAM   pass 1: points + box, multimask, the largest mask; pass 2: points + its
           low-res logits, multimask, best predicted IoU; pass 3: points + its tight box
           + its logits, multimask, best predicted IoU -> that mask's logits;
  PerSAM-F pass 1: points + box, multimask, mask = Σ w_i logit_i > 0 (best-IoU mask if
           empty); pass 2: its tight box + Σ w_i low-res logit_i; pass 3 as PerSAM's.
           w is fitted per object on frame 0 with the same prompts (dice + focal).

Objects are merged per pixel by the highest logit; a pixel whose logits are all <= 0 is
background. Where the reference crashes or mislabels, this departs from it: an empty
intermediate mask skips the box refinement; an object missing from the previous merged
mask keeps its last box (the reference shifts the other objects' boxes onto it); the
largest pass-1 mask is chosen by its true area (the reference stores areas as uint8,
wrapping at 256); an object too small to keep any cell uses its best-covered cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from persam_core.methods.registry import get_method, method_names
from persam_core.persam_f import optimise_mask_weights
from persam_core.pairs import PairBatch, boxes_of
from persam_core.refine import refine_with_box
from persam_core.modeling.predictor import EncodedImage, Prediction, encode_images, predict
from persam_core.modeling.preprocess import GRID_SIZE, reference_mask_grid
from persam_core.modeling.resize import ENCODER_SIZE, resize_longest_side
from persam_core.prior import similarity_maps, upsample_similarities

VIDEO_MASK_VALUE = 215  # the reference's --exp
BOX_MARGIN = 10  # the reference's --threshold


def video_methods() -> tuple[str, ...]:
    """The methods the video mode runs: PerSAM's family (methods that say whether they fit
    mask weights, persam_core.methods.persam)."""
    return tuple(name for name in method_names() if hasattr(get_method(name), "mask_weights"))


def fits_mask_weights(method: str) -> bool:
    """Whether the video mode fits mask weights for `method` (PerSAM-F); ValueError for a
    method it does not run."""
    if method not in video_methods():
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(video_methods())}")
    return bool(get_method(method).mask_weights)


@dataclass(frozen=True)
class VideoSettings:
    """The reference's defaults: PerSAM top-2 points; PerSAM-F top-1, 800 epochs at 4e-4."""

    method: str = "persam"
    top_k: int | None = None
    box_margin: int = BOX_MARGIN
    epochs: int = 800
    learning_rate: float = 4e-4

    @property
    def points(self) -> int:
        return self.top_k if self.top_k is not None else (1 if fits_mask_weights(self.method) else 2)


def kept_cells(mask: np.ndarray) -> Tensor:
    """mask: [H, W] bool (non-empty) -> [64, 64] bool: the reference's cells, else the best-covered."""
    keep = reference_mask_grid(mask, VIDEO_MASK_VALUE)
    if keep.any():
        return keep
    # Too small for the bilinear samples: take the cells the mask covers most (area pooling).
    resized = ResizeLongestSide(ENCODER_SIZE).apply_image(mask.astype(np.uint8) * 255)
    height, width = resized.shape
    padded = F.pad(torch.as_tensor(resized, dtype=torch.float32)[None, None], (0, ENCODER_SIZE - width, 0, ENCODER_SIZE - height))
    coverage = F.adaptive_avg_pool2d(padded, GRID_SIZE)[0, 0]
    if float(coverage.max()) <= 0:  # vanished in the resize: the cell of its first pixel
        ys, xs = np.nonzero(mask)
        scale = GRID_SIZE / max(mask.shape)
        coverage = torch.zeros(GRID_SIZE, GRID_SIZE)
        coverage[min(int(ys[0] * scale), GRID_SIZE - 1), min(int(xs[0] * scale), GRID_SIZE - 1)] = 1
    return coverage == coverage.max()


def video_target_feature(features: Tensor, mask: np.ndarray) -> Tensor:
    """features: [256, 64, 64]; mask: [H, W] bool -> t: [256] = normalise(max/2 + mean/2)."""
    cells = features.permute(1, 2, 0)[kept_cells(mask).to(features.device)]
    pooled = torch.max(cells, dim=0)[0] / 2 + cells.mean(0) / 2
    return pooled / pooled.norm()


def expanded_box(mask: np.ndarray, margin: int = BOX_MARGIN) -> tuple[np.ndarray, np.ndarray] | None:
    """mask: [H, W] bool -> (centre [1, 2] (x, y), box [4] x0 y0 x1 y1), expanded, or None if empty.

    As the reference's get_box_prompt: clamped to [0, W] x [0, H] (W, H themselves included).
    """
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    height, width = mask.shape
    x0, y0 = max(0, int(xs.min()) - margin), max(0, int(ys.min()) - margin)
    x1 = width if int(xs.max()) + margin >= width else int(xs.max()) + margin
    y1 = height if int(ys.max()) + margin >= height else int(ys.max()) + margin
    return np.array([[(x0 + x1) // 2, (y0 + y1) // 2]]), np.array([x0, y0, x1, y1])


def top_points(upsampled: Tensor, k: int) -> np.ndarray:
    """S': [H, W] -> [k, 2] (x, y) of its k highest pixels, highest first."""
    flat = torch.topk(upsampled.flatten(), k).indices.cpu().numpy()
    width = upsampled.shape[1]
    return np.stack([flat % width, flat // width], axis=1)


def _box_refine(sam: Sam, encoded: EncodedImage, points: np.ndarray, labels: np.ndarray, previous: Prediction) -> Tensor:
    """Best mask of `previous` -> its tight box + logits -> best new mask's logits [H, W]
    (PerSAM's `refine_with_box` on a batch of one; an empty best mask is returned as is)."""
    pairs = PairBatch.build(sam, encoded.features[None], [0], [encoded.input_size], [encoded.original_size])
    device = encoded.features.device
    refined = refine_with_box(
        pairs,
        torch.as_tensor(points, dtype=torch.float64, device=device)[None],
        torch.as_tensor(labels, device=device)[None],
        previous.low_res[None],
        previous.scores[None],
    )
    return pairs.to_original(refined.low_res[:, None], pairs.groups[0])[0, 0]


class VideoObject:
    """One object of a sequence: its target feature, PerSAM-F weights, its last box."""

    def __init__(self, label: int, target_feature: Tensor, box: tuple[np.ndarray, np.ndarray]) -> None:
        self.label = label
        self.target_feature = target_feature
        self.box = box
        self.weights: Tensor | None = None


class SequenceTracker:
    """Segment a sequence frame by frame: construct with frame 0, then `step` each later frame."""

    def __init__(self, sam: Sam, first_frame: np.ndarray, first_labels: np.ndarray, settings: VideoSettings) -> None:
        """first_frame: [H, W, 3] uint8 RGB; first_labels: [H, W] object ids (0 background)."""
        weights = fits_mask_weights(settings.method)  # refuses a method the video mode does not run
        self.sam, self.settings = sam, settings
        self._frame_priors: dict[int, Tensor] = {}
        encoded = self._encode(first_frame)
        self.objects: list[VideoObject] = []
        for label in (int(v) for v in np.unique(first_labels) if v != 0):
            mask = first_labels == label
            target = video_target_feature(encoded.features, mask)
            obj = VideoObject(label, target, expanded_box(mask, settings.box_margin))
            if weights:
                obj.weights = self._fit(encoded, obj, mask)
            self.objects.append(obj)

    def _encode(self, frame: np.ndarray) -> EncodedImage:
        return encode_images(self.sam, [resize_longest_side(frame)])[0]

    def _priors(self, encoded: EncodedImage, objects: list[VideoObject]) -> Tensor:
        """S' of every object in one batched prior: [N, H, W]."""
        targets = torch.stack([obj.target_feature for obj in objects]).to(encoded.features)
        similarity = similarity_maps(encoded.features[None], targets)[0]  # [N, 64, 64]
        return upsample_similarities(self.sam, similarity, encoded.input_size, encoded.original_size)

    def _prompts(self, upsampled: Tensor, obj: VideoObject) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """upsampled: the object's S' [H, W] -> points [k+1, 2], labels [k+1] (all positive), box [4]."""
        centre, box = obj.box
        points = np.concatenate([top_points(upsampled, self.settings.points), centre], axis=0)
        return points, np.ones(len(points), dtype=np.int64), box

    @torch.no_grad()
    def _fit(self, encoded: EncodedImage, obj: VideoObject, mask: np.ndarray) -> Tensor:
        """PerSAM-F's weights on frame 0 with the tracking prompts: w [3]."""
        points, labels, box = self._prompts(self._priors(encoded, [obj])[0], obj)
        logits = predict(self.sam, encoded, points, labels, box_xyxy=box).high_res().flatten(1)  # [3, H*W]
        target = torch.as_tensor(mask, device=logits.device).float().flatten()[None]
        weights, _ = optimise_mask_weights([(logits, target)], self.settings.epochs, self.settings.learning_rate)
        return weights

    def _object_logits(self, encoded: EncodedImage, obj: VideoObject) -> Tensor:
        """-> [H, W] high-res logits of the object's final mask in this frame (its S' from `step`)."""
        sam = self.sam
        points, labels, box = self._prompts(self._frame_priors[obj.label], obj)
        first = predict(sam, encoded, points, labels, box_xyxy=box)
        if obj.weights is None:
            areas = (first.high_res() > sam.mask_threshold).flatten(1).sum(1)
            largest = int(torch.argmax(areas))
            second = predict(sam, encoded, points, labels, mask_input=first.low_res[largest : largest + 1])
            return _box_refine(sam, encoded, points, labels, second)
        weights = obj.weights.to(first.low_res).reshape(3, 1, 1)
        mask = (first.high_res() * weights).sum(0) > sam.mask_threshold
        low_res = (first.low_res * weights).sum(0)[None]
        # One host read per object and frame: the video mode follows the reference's branches.
        if not bool(mask.any()):  # the reference falls back to the best-scored mask
            mask = first.high_res(first.best_index()) > sam.mask_threshold
        tight = boxes_of(mask[None])[0]  # x_min, y_min, x_max, y_max, empty
        if bool(tight[4]):
            return (first.high_res() * weights).sum(0)
        second = predict(sam, encoded, points, labels, box_xyxy=tight[:4].cpu().numpy(), mask_input=low_res)
        return _box_refine(sam, encoded, points, labels, second)

    @torch.no_grad()
    def step(self, frame: np.ndarray) -> np.ndarray:
        """frame: [H, W, 3] uint8 RGB -> [H, W] uint8 merged labels (0 background)."""
        encoded = self._encode(frame)
        height, width = encoded.original_size
        if not self.objects:
            return np.zeros((height, width), dtype=np.uint8)
        # every object's S' in one batched prior, then each object's cascade
        self._frame_priors = dict(zip((obj.label for obj in self.objects), self._priors(encoded, self.objects)))
        logits = torch.stack([self._object_logits(encoded, obj) for obj in self.objects])  # [N, H, W]
        # argmax over [0, logit_1 .. logit_N]: background unless some logit is > 0 (first on ties)
        best = torch.argmax(torch.cat([torch.zeros_like(logits[:1]), logits]), dim=0).cpu().numpy()
        lookup = np.array([0] + [obj.label for obj in self.objects], dtype=np.uint8)
        merged = lookup[best]
        for obj in self.objects:
            box = expanded_box(merged == obj.label, self.settings.box_margin)
            if box is not None:
                obj.box = box
        return merged
