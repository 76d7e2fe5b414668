"""GF-SAM's masks at 1024 x 1024 and what the graph reads of them (the GF-SAM contract §4.5-4.6, §4.11).

Each prompt's low-res logits [256, 256] become a boolean 1024 mask (SamPredictor's
postprocess with input and original size 1024: one bilinear upsample, then > 0). The graph
needs three small things per mask, taken in one pass, chunk by chunk, so that at most
`FULL_RES_CHUNK` 1024 masks exist at once:
- `near`: the mask nearest-sampled on the 37 x 37 grid (which points it covers);
- `foot`: its bilinear 37 x 37 footprint (the growth's weights);
- `probe`: its values at the pixels that a bilinear 1024 -> 37 resize reads (2 per output
  row and column); the union of a group's masks, resized, depends on these pixels only, so
  group unions are built from them without keeping any 1024 mask.
The output's masks are upsampled again at the end, only those chosen.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import gfsam_quirks
from .registry import FRAME_SIDE
from .gfsam_reference import GRID_SIDE

FULL_RES_CHUNK = 32  # 1024 masks at once: 32 x (4 B logits + 4 B float mask + 1 B bool) x 1024^2 = 288 MiB
FRAME = (FRAME_SIDE, FRAME_SIDE)
GRID = (GRID_SIDE, GRID_SIDE)


class MaskFacts(NamedTuple):
    """Per prompt: near [T, 1369] bool, foot [T, 1369] float, probe [T, R * R] bool, nonempty [T] bool."""

    near: Tensor
    foot: Tensor
    probe: Tensor
    nonempty: Tensor


@lru_cache(maxsize=8)
def _resize_weights(device: torch.device) -> tuple[Tensor, Tensor]:
    """torch's bilinear 1024 -> 37 weights along one axis (align_corners False, no antialias),
    taken from F.interpolate itself on unit rows -> (rows read [R] long, weights [37, R])."""
    unit = torch.eye(FRAME_SIDE, device=device).view(FRAME_SIDE, 1, FRAME_SIDE, 1)
    weights = F.interpolate(unit, size=(GRID_SIDE, 1), mode="bilinear", align_corners=False)
    weights = weights.view(FRAME_SIDE, GRID_SIDE).T  # [37, 1024]
    rows = torch.nonzero(weights.abs().sum(0) > 0).flatten()
    return rows, weights[:, rows].contiguous()


@lru_cache(maxsize=8)
def _upsample_weights(device: torch.device) -> Tensor:
    """torch's bilinear 37 -> 1024 weights along one axis (align_corners False): [1024, 37]."""
    unit = torch.eye(GRID_SIDE, device=device).view(GRID_SIDE, 1, GRID_SIDE, 1)
    weights = F.interpolate(unit, size=(FRAME_SIDE, 1), mode="bilinear", align_corners=False)
    return weights.view(GRID_SIDE, FRAME_SIDE).T.contiguous()


def upsample(low: Tensor) -> Tensor:
    """low: [c, 1, 256, 256] logits -> [c, 1, 1024, 1024] logits: postprocess_masks with input and
    original size 1024 (its crop and its second resize, to the same size, change nothing)."""
    return F.interpolate(low, FRAME, mode="bilinear", align_corners=False)


def mask_facts(low: Tensor, threshold: float) -> MaskFacts:
    """low: [T, 1, 256, 256] logits of every prompt -> MaskFacts, FULL_RES_CHUNK masks at a time."""
    rows, _ = _resize_weights(low.device)
    parts = []
    for start in range(0, low.shape[0], FULL_RES_CHUNK):
        masks = upsample(low[start : start + FULL_RES_CHUNK]) > threshold  # [c, 1, 1024, 1024]
        values = masks.float()
        foot = F.interpolate(values, GRID, mode="bilinear", align_corners=False).flatten(1)
        if gfsam_quirks.FAITHFUL.nearest_adjacency:
            near = F.interpolate(values, GRID, mode="nearest").flatten(1) > 0
        else:  # quirk 10 off (tests only): edges from the bilinear footprint
            near = foot > 0
        probe = masks[:, 0].index_select(1, rows).index_select(2, rows).flatten(1)
        parts.append(MaskFacts(near, foot, probe, masks.flatten(1).any(1)))
    return MaskFacts(*(torch.cat(field) for field in zip(*parts)))


def union_footprints(probe: Tensor, member: Tensor) -> Tensor:
    """probe: [P, n, R * R] bool of each point's mask; member: [P, groups, n] bool ->
    [P, groups, 1369]: each group's union mask, bilinearly resized to 37 x 37."""
    _, weights = _resize_weights(probe.device)
    side = weights.shape[1]
    union = torch.bmm(member.float(), probe.float()) > 0  # [P, groups, R * R]
    grid = union.float().view(*union.shape[:2], side, side)
    return (weights @ grid @ weights.T).flatten(2)


class Outputs(NamedTuple):
    """Per pair (of `pair_of_prompt`'s numbering): mask_1024 [P, 1024, 1024] bool, masks at the
    original sizes (one [H, W] bool per pair), score [P] (best mean of Apos inside a chosen mask)."""

    mask_1024: Tensor
    masks: list[Tensor]
    score: Tensor


def chosen_outputs(low: Tensor, chosen: Sequence[int], pair_of_prompt: Sequence[int], pairs: int,
                   original_sizes: Sequence[tuple[int, int]], apos: Tensor, threshold: float) -> Outputs:
    """The union of each pair's chosen masks, at 1024 and at its original size (§4.11: each
    chosen low-res logit post-processed to (H, W), > 0, united), and its prob score.

    low: [T, 1, 256, 256] logits; chosen: host prompt indices; pair_of_prompt: host pair of
    every prompt; original_sizes: per pair; apos: [P, 1369] mean positive prior."""
    device = low.device
    counts_1024 = torch.zeros(pairs, *FRAME, dtype=torch.uint8, device=device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for pair in range(pairs):
        by_size.setdefault(tuple(original_sizes[pair]), []).append(pair)
    counts = {size: torch.zeros(len(members), *size, dtype=torch.uint8, device=device)
              for size, members in by_size.items()}
    slot = {pair: position for members in by_size.values() for position, pair in enumerate(members)}
    score = torch.full((pairs,), float("-inf"), device=device)
    apos_grid = apos.view(-1, GRID_SIDE, GRID_SIDE)
    up_weights = _upsample_weights(device)
    for size, members in by_size.items():
        wanted = set(members)
        prompts = [t for t in chosen if pair_of_prompt[t] in wanted]
        for start in range(0, len(prompts), FULL_RES_CHUNK):
            part = prompts[start : start + FULL_RES_CHUNK]
            index = torch.tensor(part, device=device)
            owners = torch.tensor([pair_of_prompt[t] for t in part], device=device)
            logits = upsample(low[index])  # [c, 1, 1024, 1024]
            masks = logits[:, 0] > threshold
            counts_1024.index_add_(0, owners, masks.to(torch.uint8))
            # postprocess_masks' second resize, to the original size, from the shared first one
            high = F.interpolate(logits, size, mode="bilinear", align_corners=False)[:, 0] > threshold
            local = torch.tensor([slot[pair_of_prompt[t]] for t in part], device=device)
            counts[size].index_add_(0, local, high.to(torch.uint8))
            # sum of Apos upsampled to 1024 inside each mask, as the mask projected onto the
            # grid through the upsampling's own weights (no [c, 1024, 1024] prior map)
            projected = up_weights.T @ masks.float() @ up_weights  # [c, 37, 37]
            inside = (projected * apos_grid[owners]).flatten(1).sum(1)
            area = masks.flatten(1).sum(1)
            mean = inside / area.clamp(min=1)
            mean = torch.where(area > 0, mean, torch.full_like(mean, float("-inf")))  # empty masks skipped
            score = score.scatter_reduce(0, owners, mean, "amax")
    score = torch.where(torch.isinf(score), torch.zeros_like(score), score)
    masks_out: list[Tensor] = [None] * pairs  # type: ignore[list-item]
    for size, members in by_size.items():
        for position, pair in enumerate(members):
            masks_out[pair] = counts[size][position] > 0
    return Outputs(counts_1024 > 0, masks_out, score)
