"""GF-SAM's location map and prompt points (the GF-SAM contract §4.3-4.4), for P pairs at once.

`X = minmax(Apos * Mpos)`, `Nn = minmax(Aneg)`, `Fm = X` where `Nn <= X`, else 0. The number
of points is `k = min(int(sum Fm), 128)` (1 if the sum is in (0, 1)): it follows the map, so
it differs from pair to pair. The k largest cells (ties: lower flat index first) are listed
x-major (by column x, then row y), as upstream's `argwhere(hot.T)`. Each pair's points sit in
a fixed [P, 128] layout with a validity mask, so nothing here reads the device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import gfsam_quirks
from .registry import FRAME_SIDE
from .gfsam_priors import Priors
from .gfsam_reference import GRID_SIDE

MAX_POINTS = 128
MINMAX_EPS = 1e-6


class Points(NamedTuple):
    """P pairs: cells [P, 128, 2] long grid (x, y), x-major; valid [P, 128] bool; count [P] long;
    prompts [P, 128, 2] long, the SAM frame pixels (x, y) of each cell."""

    cells: Tensor
    valid: Tensor
    count: Tensor
    prompts: Tensor


def minmax(values: Tensor) -> Tensor:
    """values: [P, N] -> (v - min) / (max - min + 1e-6) per row."""
    low, high = values.amin(1, keepdim=True), values.amax(1, keepdim=True)
    return (values - low) / (high - low + MINMAX_EPS)


def location_map(priors: Priors) -> Tensor:
    """-> Fm [P, N]: the min-max cross map with the cells where the negative map wins zeroed."""
    cross = minmax(priors.apos * priors.mpos)
    negative = minmax(priors.aneg)
    region = negative > cross if gfsam_quirks.FAITHFUL.strict else negative >= cross
    return cross * ~region


def point_count(fm: Tensor) -> Tensor:
    """fm: [P, N] -> k [P] long: min(int(sum), 128), and 1 for a sum in (0, 1)."""
    total = fm.sum(1)
    if not gfsam_quirks.FAITHFUL.topk_from_sum:  # quirk 8 off (tests only): every non-zero cell
        return (fm > 0).sum(1).clamp(max=MAX_POINTS)
    count = total.floor().clamp(max=MAX_POINTS).long()
    return torch.where((count == 0) & (total > 0), torch.ones_like(count), count)


def prompt_pixels(cells: Tensor) -> Tensor:
    """cells: [..., 2] grid (x, y) -> SAM frame pixels: the cell's corner x * 1024 / 37, truncated
    (exact in integers: x * 1024 / 37 is never within float error of an integer for x < 37)."""
    if gfsam_quirks.FAITHFUL.corner_points:
        return torch.div(cells * FRAME_SIDE, GRID_SIDE, rounding_mode="floor")
    # quirk 9 off (tests only): the cell's centre
    return torch.div((2 * cells + 1) * FRAME_SIDE, 2 * GRID_SIDE, rounding_mode="floor")


def find_points(fm: Tensor) -> Points:
    """fm: [P, N] location maps -> the points of every pair (see the module docstring)."""
    count = point_count(fm)
    order = torch.sort(fm, dim=1, descending=True, stable=True).indices  # ties: lower flat index first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(fm.shape[1], device=fm.device).expand_as(order))
    hot = rank < count[:, None]  # [P, N] on the row-major grid
    flat = torch.arange(fm.shape[1], device=fm.device)
    x_major = (flat % GRID_SIDE) * GRID_SIDE + flat // GRID_SIDE  # sort key: x, then y
    keys = torch.where(hot, x_major.expand_as(hot), torch.full_like(order, fm.shape[1]))
    keys = torch.sort(keys, dim=1).values[:, :MAX_POINTS]
    valid = torch.arange(MAX_POINTS, device=fm.device)[None] < count[:, None]
    keys = torch.where(valid, keys, torch.zeros_like(keys))
    cells = torch.stack([keys // GRID_SIDE, keys % GRID_SIDE], dim=-1)  # (x, y)
    return Points(cells, valid, count, prompt_pixels(cells))
