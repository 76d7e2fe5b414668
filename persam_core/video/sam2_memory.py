"""PerSAM on SAM 2's video predictor: its memory bank propagates, PerSAM's prior re-prompts.

One clip, frames in order (`MemoryTracker`):

  start    semi-supervised (DAVIS, `from_masks`): each object's frame-0 mask is its prompt
           (`add_new_mask`), and its target feature t is pooled under that mask from frame 0's
           image embedding (normalise(max / 2 + mean / 2), as the SAM video mode; the target
           embedding e is the mean). From a concept (`from_concept`): the first frame where
           the prior's presence (max of S) reaches `min_similarity` is prompted with the
           prior's positive and negative points (argmax / argmin of S'); frames before it are
           background.
  track    `propagate_in_video`: SAM 2's memory attention over the prompted frames and the
           latest frames' memories, one frame at a time.
  lost     an object whose object-score logit on frame i is below `object_threshold` is lost;
           the prior over frame i's image embedding (the frame features SAM 2 has just
           computed, not a second encode) looks for it, and where its presence reaches
           `min_similarity` the object is re-prompted on frame i with the prior's points as a
           correction click (`add_new_points_or_box`; with `guidance`, that decode also gets
           PerSAM's attention bias and target embedding). Propagation resumes at i + 1 from
           frame i's corrected memory.
  labels   each frame's objects merged per pixel by the highest logit; none > 0: background.

Frames arrive decoded ([H, W, 3] uint8, from any indexable sequence, read on demand: a clip in
object storage never needs a local folder). sam2's `init_state` reads a JPEG folder or an MP4,
so it runs here with its own code and a `FrameSource` in place of its loader; the source
applies the loader's transform (PIL resize to the square input, / 255, ImageNet mean / std).
With no re-prompt (a threshold no object score is below), the tracker *is* sam2's
`SAM2VideoPredictor` driven as its README drives it on the same frames' JPEG folder.

The predictor is built with hole filling off (`fill_hole_area` 0): it needs sam2's optional
CUDA extension, and without it sam2 skips the step with a warning, so masks would depend on
the machine.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from persam_core.concept import persam_f_target_feature
from persam_core.decoder_sam2 import guidance
from persam_core.modeling.preprocess import GRID_SIZE
from persam_core.prior import attention_biases, negative_points, positive_points, similarity_maps, upsample_similarities
from persam_core.modeling.sam2_backbone import PIXEL_MEAN, PIXEL_STD, Sam2Backbone
from persam_core.modeling.sam2_models import build_sam2_video_model
from persam_core.video.reference_mode import VIDEO_MASK_VALUE


@dataclass(frozen=True)
class MemorySettings:
    """object_threshold: SAM 2's object-score logit below which an object is lost (SAM 2 itself
    shows an object from > 0); min_similarity: the prior's presence (max cosine of S) from which a
    lost object (or a concept not yet seen) counts as found; guidance: PerSAM's attention bias
    and target embedding on the prior's prompts."""

    object_threshold: float = 0.0
    min_similarity: float = 0.6
    guidance: bool = True


def video_predictor(model: torch.nn.Module, model_type: str) -> torch.nn.Module:
    """A SAM2Base's weights in sam2's SAM2VideoPredictor of the same config, on the model's
    device, hole filling off (see the module docstring)."""
    predictor = build_sam2_video_model(model_type)
    predictor.load_state_dict(model.state_dict(), strict=True)
    predictor.fill_hole_area = 0
    return predictor.to(next(model.parameters()).device).eval()


class FrameSource:
    """What sam2's inference state keeps as its frames: `len()` and `[i]` -> [3, S, S] float32,
    normalised, as `load_video_frames` makes them from a JPEG folder; height / width of the clip.

    frames: any sequence of [H, W, 3] uint8 RGB frames of one size, read one index at a time.
    """

    def __init__(self, frames: Sequence[np.ndarray], image_size: int) -> None:
        self.frames, self.image_size = frames, image_size
        self._last: tuple[int, np.ndarray] | None = None  # sam2 and the tracker both read frame 0 first
        self.height, self.width = self.frame(0).shape[:2]
        self._mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(PIXEL_STD, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.frames)

    def frame(self, index: int) -> np.ndarray:
        if self._last is None or self._last[0] != index:
            frame = self.frames[index]
            if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
                raise ValueError(f"frame {index}: expected [H, W, 3] uint8 RGB, got {frame.shape} {frame.dtype}")
            self._last = (index, frame)
        return self._last[1]

    def __getitem__(self, index: int) -> Tensor:
        frame = self.frame(index)
        if frame.shape[:2] != (self.height, self.width):
            raise ValueError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]}, frame 0 is "
                             f"{self.width}x{self.height}: every frame of a clip must have one size")
        # load_video_frames' steps: PIL's default resize of the RGB frame, / 255 in float64, then
        # float32 mean / std (the same arithmetic, so the same features)
        resized = np.asarray(Image.fromarray(frame).resize((self.image_size, self.image_size))) / 255.0
        return (torch.from_numpy(resized).permute(2, 0, 1).float() - self._mean) / self._std


def init_state(predictor: torch.nn.Module, source: FrameSource) -> dict:
    """sam2's own `init_state`, its frame loader resolved to `source` instead of a folder read.

    The function object is sam2's code with one global rebound (nothing of sam2 is patched,
    so other callers and threads keep the original), so the state is exactly sam2's.
    """
    plain = inspect.unwrap(type(predictor).init_state)
    names = {**plain.__globals__, "load_video_frames": lambda **_: (source, source.height, source.width)}
    rebound = types.FunctionType(plain.__code__, names, plain.__name__, plain.__defaults__, plain.__closure__)
    with torch.inference_mode():
        return rebound(predictor, video_path=None)


def covered_cells(backbone: Sam2Backbone, mask: np.ndarray) -> Tensor:
    """mask: [H, W] bool (non-empty) -> [64, 64] bool: PerSAM's kept cells (the video mode's
    215 scale), else, for a mask too small to keep any, the cells it covers most."""
    keep = backbone.mask_grid(mask, VIDEO_MASK_VALUE)
    if keep.any():
        return keep
    # SAM 2 stretches the frame to a square, so area pooling of the mask itself finds its cells
    coverage = F.interpolate(torch.as_tensor(mask, dtype=torch.float32)[None, None], size=(GRID_SIZE, GRID_SIZE),
                             mode="area")[0, 0]
    return coverage == coverage.max()


class MemoryTracker:
    """One clip through SAM 2's video predictor; `from_masks` or `from_concept` yields every frame."""

    def __init__(self, predictor: torch.nn.Module, frames: Sequence[np.ndarray],
                 settings: MemorySettings = MemorySettings()) -> None:
        """predictor: a sam2 SAM2VideoPredictor (`video_predictor`); frames: [H, W, 3] uint8 RGB."""
        self.predictor, self.settings = predictor, settings
        self.backbone = Sam2Backbone(predictor)
        self.source = FrameSource(frames, predictor.image_size)
        self.state = init_state(predictor, self.source)
        self.targets: dict[int, tuple[Tensor, Tensor]] = {}  # label -> (t [256] unit, e [256])
        self.prompted: list[tuple[int, int]] = []  # (frame, label) of every prompt from the prior
        self._prompt_frames: set[int] = set()

    @property
    def size(self) -> tuple[int, int]:
        return self.source.height, self.source.width

    @torch.inference_mode()
    def from_masks(self, first_labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """first_labels: [H, W] object ids of frame 0 (0 background) -> (i, [H, W] uint8 labels) for
        every frame, frame 0 first (its labels as SAM 2 decodes the masks)."""
        if tuple(first_labels.shape) != self.size:
            raise ValueError(f"first-frame labels are {first_labels.shape[1]}x{first_labels.shape[0]}, "
                             f"the frames {self.size[1]}x{self.size[0]}")
        features, _ = self._embedding(0)
        for label in (int(v) for v in np.unique(first_labels) if v != 0):
            mask = first_labels == label
            cells = features[0].permute(1, 2, 0)[covered_cells(self.backbone, mask).to(features.device)]
            self.targets[label] = (persam_f_target_feature(cells), cells.mean(0))
            self.predictor.add_new_mask(self.state, 0, label, mask)
        if not self.targets:
            raise ValueError("the first frame's labels hold no object")
        self._prompt_frames.add(0)
        yield from self._propagate(0)

    @torch.inference_mode()
    def from_concept(self, target_feature: Tensor, target_embedding: Tensor,
                     label: int = 1) -> Iterator[tuple[int, np.ndarray]]:
        """A concept's t, e: [256] -> (i, [H, W] uint8 labels, `label` where found) for every frame."""
        device = self.backbone.device
        self.targets[label] = (target_feature.to(device, torch.float32), target_embedding.to(device, torch.float32))
        for index in range(len(self.source)):
            presence, upsampled = self._prior(index, [label])
            if float(presence[0]) >= self.settings.min_similarity:  # host read: the branch of this frame
                self._prompt(index, label, upsampled[0])
                self._prompt_frames.add(index)
                yield from self._propagate(index)
                return
            yield index, np.zeros(self.size, dtype=np.uint8)

    def _embedding(self, index: int) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Frame `index`'s image embedding [1, 256, 64, 64] (+ high-res levels) through the
        predictor's own frame features: cached by sam2 for the frame it last touched, so the
        prior on a frame being tracked costs no second encode."""
        _, _, levels, _, _ = self.predictor._get_image_feature(self.state, index, 1)
        return self.backbone.embed_levels(levels)

    def _prior(self, index: int, labels: Sequence[int]) -> tuple[Tensor, Tensor]:
        """-> presence [K] (max of S) and S' [K, H, W] of `labels`' targets on frame `index`."""
        features, _ = self._embedding(index)
        targets = torch.stack([self.targets[label][0] for label in labels])
        similarity = similarity_maps(features, targets)[0]  # [K, 64, 64]
        side = self.backbone.image_size
        upsampled = upsample_similarities(self.backbone, similarity, (side, side), self.size)
        return similarity.flatten(1).amax(1), upsampled

    def _prompt(self, index: int, label: int, upsampled: Tensor) -> Tensor:
        """Prompt `label` on frame `index` with the prior's points (upsampled: its S' [H, W])
        -> every object's logits on that frame, [N, 1, H, W]."""
        points = torch.cat([positive_points(upsampled[None]), negative_points(upsampled[None])])  # [2, 2] x, y
        bias, embedding = (attention_biases(upsampled[None]), self.targets[label][1].reshape(1, 1, -1)) \
            if self.settings.guidance else (None, None)
        with guidance(self.predictor.sam_mask_decoder, bias, embedding):
            _, _, logits = self.predictor.add_new_points_or_box(
                self.state, index, label, points=points.float(), labels=torch.tensor([1, 0], dtype=torch.int32))
        self.prompted.append((index, label))
        return logits

    def _object_scores(self, index: int) -> Tensor:
        """Every object's object-score logit on a tracked frame: [N] (host: one read per frame)."""
        scores = []
        for outputs in self.state["output_dict_per_obj"].values():
            out = outputs["cond_frame_outputs"].get(index) or outputs["non_cond_frame_outputs"][index]
            scores.append(out["object_score_logits"].reshape(-1)[:1])
        return torch.cat(scores).float().cpu()

    def _relocate(self, index: int, object_ids: Sequence[int]) -> Tensor | None:
        """Re-prompt the objects lost on frame `index` that the prior finds -> the frame's
        logits [N, 1, H, W] after the last re-prompt, or None if none was re-prompted."""
        lost = [label for label, score in zip(object_ids, self._object_scores(index).tolist())
                if score < self.settings.object_threshold]
        if not lost:
            return None
        presence, upsampled = self._prior(index, lost)
        logits = None
        for label, present, prior in zip(lost, (presence >= self.settings.min_similarity).tolist(), upsampled):
            if present:
                logits = self._prompt(index, label, prior)
        return logits

    def _propagate(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
        """propagate_in_video from `start`; after a re-prompt on frame i, again from i + 1
        (sam2's preflight then encodes frame i's corrected memory)."""
        while start < len(self.source):
            resume = None
            for index, object_ids, logits in self.predictor.propagate_in_video(self.state, start_frame_idx=start):
                if index not in self._prompt_frames:
                    relocated = self._relocate(index, object_ids)
                    if relocated is not None:
                        logits, resume = relocated, index + 1
                        self._prompt_frames.add(index)
                yield index, self._labels(object_ids, logits)
                if resume is not None:
                    break  # closes sam2's generator; its state holds every frame so far
            if resume is None:
                return
            start = resume

    @staticmethod
    def _labels(object_ids: Sequence[int], logits: Tensor) -> np.ndarray:
        """logits: [N, 1, H, W] -> [H, W] uint8: the id of the highest logit > 0, else 0."""
        stacked = torch.cat([torch.zeros_like(logits[:1, 0]), logits[:, 0]])  # [N + 1, H, W]
        lookup = np.array([0, *object_ids], dtype=np.uint8)
        return lookup[torch.argmax(stacked, dim=0).cpu().numpy()]
