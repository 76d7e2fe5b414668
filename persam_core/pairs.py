"""P (image, concept) pairs of one encoder batch, decoded together.

Everything the model does at low resolution (prompt encoder, mask decoder: [P, ..., 256, 256])
is one call for all pairs, up to `DECODER_PAIRS` of them (more pairs: one call per that
many, so that many concepts never run a card out of memory). What happens at each image's
original size (the prior's S', a mask's tight box, the final mask) differs in shape from
image to image, so it runs per *size group* (the pairs whose images share input and
original size), in chunks of at most `FULL_RES_CHUNK` pairs to bound memory. Sizes are
host metadata known before any GPU work, so grouping never reads the device.

The model is a `Backbone` (SAM or SAM 2, see backbone.py). Prompt coordinates are mapped as
its predictor does (SAM: float64 pixels x (new / old), then float32; SAM 2: float32 pixels /
original size x 1024), so a batch of one is bit-identical to SamPredictor / SAM2ImagePredictor.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from persam_core.modeling.backbone import Backbone, Decoded
from persam_core.modeling.families import as_backbone
from persam_core.modeling.preprocess import tensor_to_device

FULL_RES_CHUNK = 32  # pairs upsampled at once: 32 x 3 masks x 1024^2 fp32 = 384 MiB
# Pairs per mask-decoder call. The decoder's working memory grows with them: 16-27 MiB per
# pair in fp32 (peak of one vit_b decode, the same decoder in every SAM size; measured on
# CPU), so a call of 128 stays near 3 GiB. A whole batch of 16 images x 8 concepts is one
# call; 16 x 100 concepts would want ~40 GiB in one call, and runs as 13 calls instead.
DECODER_PAIRS = 128


@dataclass(frozen=True)
class SizeGroup:
    """The pairs (indices into the batch's P) whose images share one size; rows: [p] long."""

    rows: Tensor
    rows_host: tuple[int, ...]
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass(frozen=True)
class PairBatch:
    """P pairs: image_index [P] (device) of features [B, 256, 64, 64] (and, for SAM 2, of the
    high-res features per level, [B, C, h, w] each); groups by image size.

    coordinates: [P, 2], what the backbone needs to map each pair's pixels to its input.
    """

    backbone: Backbone
    features: Tensor
    image_index: Tensor
    groups: tuple[SizeGroup, ...]
    coordinates: Tensor
    image_of_pair: tuple[int, ...]
    input_sizes: tuple[tuple[int, int], ...]
    original_sizes: tuple[tuple[int, int], ...]
    high_res: tuple[Tensor, ...] = ()

    @classmethod
    def build(
        cls,
        model,
        features: Tensor,
        image_of_pair: Sequence[int],
        input_sizes: Sequence[tuple[int, int]],
        original_sizes: Sequence[tuple[int, int]],
        high_res: Sequence[Tensor] = (),
    ) -> "PairBatch":
        """model: Sam, SAM2Base or Backbone; image_of_pair: host list [P] of image indices; sizes
        per image ((h, w) each); high_res: SAM 2's high-res features of the B images."""
        backbone = as_backbone(model)
        device = features.device
        by_size: dict[tuple, list[int]] = {}
        for row, image in enumerate(image_of_pair):
            by_size.setdefault((tuple(input_sizes[image]), tuple(original_sizes[image])), []).append(row)
        groups = tuple(
            SizeGroup(to_device(rows, torch.long, device), tuple(rows), size[0], size[1])
            for size, rows in by_size.items()
        )
        table = backbone.coordinate_table([input_sizes[i] for i in image_of_pair], [original_sizes[i] for i in image_of_pair])
        return cls(
            backbone,
            features,
            to_device(list(image_of_pair), torch.long, device),
            groups,
            tensor_to_device(table, device),
            tuple(image_of_pair),
            tuple(tuple(s) for s in input_sizes),
            tuple(tuple(s) for s in original_sizes),
            tuple(high_res),
        )

    @classmethod
    def of_image(cls, model, encoded) -> "PairBatch":
        """The batch of one pair on one EncodedImage (the one-image functions)."""
        return cls.build(model, encoded.features[None], [0], [encoded.input_size], [encoded.original_size],
                         tuple(level[None] for level in encoded.high_res))

    def subset(self, rows: Sequence[int]) -> "PairBatch":
        """The pairs `rows` (host indices into this batch) as a batch of their own (sharing
        the same images' channels-last features, see `pair_features`, made at most once)."""
        subset = PairBatch.build(
            self.backbone, self.features, [self.image_of_pair[r] for r in rows], self.input_sizes, self.original_sizes,
            self.high_res,
        )
        if "_channels_last_features" in self.__dict__:  # cached_property's own slot
            subset.__dict__["_channels_last_features"] = self._channels_last_features
        return subset

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.features.device

    def chunks(self) -> Iterator[tuple[SizeGroup, Tensor, tuple[int, ...]]]:
        """-> (group, rows [p <= FULL_RES_CHUNK] on the device, the same rows on the host), group by group."""
        for group in self.groups:
            for start in range(0, len(group.rows_host), FULL_RES_CHUNK):
                end = start + FULL_RES_CHUNK
                yield group, group.rows[start:end], group.rows_host[start:end]

    def to_original(self, low: Tensor, group: SizeGroup) -> Tensor:
        """low: [p, M, 256, 256] logits of pairs of `group` -> [p, M, H, W] at the original size."""
        return self.backbone.postprocess(low, group.input_size, group.original_size)

    def per_chunk(self, low: Tensor, reduce: Callable[[Tensor, Tensor], Tensor], out_shape: tuple, dtype) -> Tensor:
        """Upsample low [P, M, 256, 256] chunk by chunk and reduce each [p, M, H, W] to [p, *out_shape]."""
        out = torch.empty((len(self), *out_shape), dtype=dtype, device=self.device)
        for group, rows, _ in self.chunks():
            out[rows] = reduce(self.to_original(low[rows], group), rows).to(dtype)
        return out

    def mask_boxes(self, low: Tensor) -> tuple[Tensor, Tensor]:
        """low: [P, 256, 256] logits -> (tight box [P, 4] xyxy of the mask at original size, empty [P] bool)."""
        threshold = self.backbone.mask_threshold
        packed = self.per_chunk(low[:, None], lambda high, rows: boxes_of(high[:, 0] > threshold), (5,), torch.long)
        return packed[:, :4], packed[:, 4].bool()

    def decode(
        self,
        points: Tensor,
        labels: Tensor,
        *,
        box: Tensor | None = None,
        mask_input: Tensor | None = None,
        multimask: bool = True,
        attention_bias: Tensor | None = None,
        target_embedding: Tensor | None = None,
    ) -> Decoded:
        """The predictor's predict for every pair in one prompt-encoder and one mask-decoder call
        (one per `DECODER_PAIRS` pairs).

        points: [P, N, 2] (x, y) original pixels; labels: [P, N]; box: [P, 4] xyxy pixels;
        mask_input: [P, 256, 256] low-res logits (see `feedback`); attention_bias: [P, 1, 1, 4096];
        target_embedding: [P, 1, 256]. -> Decoded (low-res logits [P, M, 256, 256], predicted IoU
        [P, M], object score [P]).
        """
        coords = self.backbone.input_coordinates(points, self.coordinates)
        boxes = None
        if box is not None:
            boxes = self.backbone.input_coordinates(box.reshape(-1, 2, 2), self.coordinates).reshape(-1, 4)
        masks = None if mask_input is None else mask_input[:, None].to(torch.float32)
        parts = []
        for start in range(0, len(self), DECODER_PAIRS):
            part = slice(start, start + DECODER_PAIRS)
            parts.append(self.backbone.decode(
                self.pair_features(part),
                tuple(level[self.image_index[part]] for level in self.high_res),
                _rows(coords, part),
                _rows(labels, part),
                _rows(boxes, part),
                _rows(masks, part),
                multimask,
                _rows(attention_bias, part),
                _rows(target_embedding, part),
            ))
        return parts[0] if len(parts) == 1 else Decoded(*(torch.cat(field) for field in zip(*parts)))

    def pair_features(self, part: slice = slice(None)) -> Tensor:
        """The image features of the pairs `part` (all by default): [p, 256, 64, 64]. Several
        pairs get them channels-last (token-major, as the decoder's transformer reads them): the
        gather, and the add of the dense prompt after it, then write that layout directly, where
        SAM's layout costs the decoder one more copy of [P, 4096, 256] per pass. Same values; one
        pair keeps SAM's layout (bit for bit with its predictor)."""
        if len(self) == 1:
            return self.features[self.image_index]
        return self._channels_last_features[self.image_index[part]]  # indexing keeps the memory format

    @cached_property
    def _channels_last_features(self) -> Tensor:
        """features in channels-last memory, once per batch of B images (not per pair or pass)."""
        return self.features.contiguous(memory_format=torch.channels_last)

    def feedback(self, low_res: Tensor) -> Tensor:
        """Low-res logits of a decode, as the model's predictor returns them for a next pass."""
        return self.backbone.mask_feedback(low_res)


def _rows(tensor: Tensor | None, part: slice) -> Tensor | None:
    """[P, ...] -> [p, ...], the pairs `part` (None stays None)."""
    return None if tensor is None else tensor[part]


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host values -> a device tensor without waiting (see preprocess.tensor_to_device)."""
    return tensor_to_device(torch.tensor(values, dtype=dtype), device)


def boxes_of(masks: Tensor) -> Tensor:
    """masks: [p, H, W] bool -> [p, 5] long: x_min, y_min, x_max, y_max (pixels), empty (0/1).

    First/last True row and column by argmax over 0/1 (first index on ties), on the device.
    """
    rows = masks.any(dim=2).to(torch.uint8)  # [p, H]
    cols = masks.any(dim=1).to(torch.uint8)  # [p, W]
    height, width = masks.shape[1], masks.shape[2]
    y_min = torch.argmax(rows, dim=1)
    y_max = height - 1 - torch.argmax(rows.flip(1), dim=1)
    x_min = torch.argmax(cols, dim=1)
    x_max = width - 1 - torch.argmax(cols.flip(1), dim=1)
    empty = rows.amax(dim=1) == 0
    box = torch.stack([x_min, y_min, x_max, y_max], dim=1)
    return torch.cat([torch.where(empty[:, None], torch.zeros_like(box), box), empty[:, None].long()], dim=1)


def pick(values: Tensor, index: Tensor) -> Tensor:
    """values: [P, M, ...], index: [P] -> values[p, index[p]]: [P, ...]."""
    return values[torch.arange(values.shape[0], device=values.device), index]
