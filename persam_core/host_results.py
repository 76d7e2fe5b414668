"""What a method's pass over a batch produces, on the host: plain numpy, so that a CPU stage
can turn it into rows (RLE, Arrow) while the device works on the next batch, and so that
the CPU stages import neither torch nor the models.

Results leave the device in one transfer: every final mask is packed to bits on the
device (8x less to copy than bool) and concatenated; per-row numbers travel as one
stacked tensor (see `cascade._to_host`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class HostResults:
    """R rows (one per image x concept x instance, ordered that way), as numpy.

    image_index, concept_index, instance: [R] int32 (indices into the batch / concept list);
    present: [R] bool; score: [R] float32 (NaN when absent); similarity: [R] float32;
    point: [R, 2] int32 (x, y); bbox: [R, 4] int32 COCO xywh; area: [R] int64;
    object_score: [R] float32, SAM 2's object-score logit of the final decode (> 0: object
    present by SAM 2's own judgement); NaN for SAM and for absent rows;
    mask_bits: packed masks (numpy.packbits, row-major, each mask padded to whole bytes);
    mask_offsets: [R + 1] int64 byte offsets of each row's mask; mask_sizes: [R, 2] (h, w).
    """

    image_index: np.ndarray
    concept_index: np.ndarray
    instance: np.ndarray
    present: np.ndarray
    score: np.ndarray
    similarity: np.ndarray
    point: np.ndarray
    bbox: np.ndarray
    area: np.ndarray
    object_score: np.ndarray
    mask_bits: np.ndarray
    mask_offsets: np.ndarray
    mask_sizes: np.ndarray

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def mask(self, row: int) -> np.ndarray:
        """-> [h, w] bool mask of `row`."""
        height, width = (int(v) for v in self.mask_sizes[row])
        packed = self.mask_bits[self.mask_offsets[row] : self.mask_offsets[row + 1]]
        return np.unpackbits(packed, count=height * width).reshape(height, width).astype(bool)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """-> named arrays (e.g. for np.savez: no pickle)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> "HostResults":
        return cls(**{f.name: np.asarray(arrays[f.name]) for f in fields(cls)})

    @classmethod
    def concatenate(cls, parts: Sequence["HostResults"], image_offsets: Sequence[int]) -> "HostResults":
        """Join results of consecutive batches; image_offsets[i] is added to part i's image_index."""
        if not parts:
            return empty_host_results()
        joined = {}
        for f in fields(cls):
            if f.name == "mask_offsets":
                continue
            values = [getattr(p, f.name) for p in parts]
            if f.name == "image_index":
                values = [v + np.int32(o) for v, o in zip(values, image_offsets)]
            joined[f.name] = np.concatenate(values)
        starts = np.cumsum([0] + [int(p.mask_offsets[-1]) for p in parts[:-1]])
        joined["mask_offsets"] = np.concatenate(
            [np.zeros(1, np.int64)] + [p.mask_offsets[1:] + s for p, s in zip(parts, starts)]
        )
        return cls(**joined)


def empty_host_results() -> HostResults:
    z = lambda dtype, *shape: np.zeros((0, *shape), dtype=dtype)  # noqa: E731
    return HostResults(z(np.int32), z(np.int32), z(np.int32), z(bool), z(np.float32), z(np.float32),
                       z(np.int32, 2), z(np.int32, 4), z(np.int64), z(np.float32), z(np.uint8), np.zeros(1, np.int64),
                       z(np.int32, 2))


def host_results_of(masks: Sequence[np.ndarray], image_index: Sequence[int], concept_index: Sequence[int],
                    present: Sequence[bool], score: Sequence[float], similarity: Sequence[float],
                    point: Sequence[Sequence[int]], instance: Sequence[int] | None = None) -> HostResults:
    """Host rows of a method that computes one mask per row ([H, W] bool numpy each) -> HostResults
    (boxes and areas measured here, object_score NaN). For methods whose masks are already on
    the host; the PerSAM cascade packs on the device instead (cascade._to_host)."""
    count = len(masks)
    if count == 0:
        return empty_host_results()
    packed = [np.packbits(np.asarray(m, bool).reshape(-1)) for m in masks]
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([0, 0, 0, 0] if xs.size == 0 else
                     [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
    return HostResults(
        image_index=np.asarray(image_index, np.int32), concept_index=np.asarray(concept_index, np.int32),
        instance=np.zeros(count, np.int32) if instance is None else np.asarray(instance, np.int32),
        present=np.asarray(present, bool), score=np.asarray(score, np.float32),
        similarity=np.asarray(similarity, np.float32), point=np.asarray(point, np.int32).reshape(count, 2),
        bbox=np.asarray(boxes, np.int32), area=np.array([int(np.count_nonzero(m)) for m in masks], np.int64),
        object_score=np.full(count, np.nan, np.float32), mask_bits=np.concatenate(packed).astype(np.uint8),
        mask_offsets=np.concatenate([[0], np.cumsum([p.size for p in packed])]).astype(np.int64),
        mask_sizes=np.array([m.shape for m in masks], np.int32).reshape(count, 2),
    )
