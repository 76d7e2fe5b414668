"""GF-SAM's graph of masks, mask growth, consistency vote and labels (the GF-SAM contract §4.6-4.10),
for P pairs at once on the device.

Every pair's n <= 128 points sit in a padded [P, n] layout (`valid` marks the real ones;
padding is always at the end, so a pair's real points keep their indices). Groups are the
weakly connected components of the coverage graph, computed as boolean reachability by
repeated squaring of the [P, n, n] adjacency (log2 n matrix products), numbered by their
smallest member as scipy does. The growth is sequential within a group (each mask sees what
the earlier ones took), so it runs as n steps over all pairs and groups at once: step t
visits the t-th mask of every group in score order.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import gfsam_quirks

FOOTPRINT_EPS = 1e-6
COSINE_EPS = 1e-7


class Graph(NamedTuple):
    """groups [P, n] long (0-based, by smallest member; padding: own group after the real ones);
    count [P] long groups per pair; member [P, n(groups), n(points)] bool."""

    groups: Tensor
    count: Tensor
    member: Tensor


class Votes(NamedTuple):
    """fg [P, n] bool (grown), cls [P, n] float cls_score, labels [P, n] long (0, 1, 2)."""

    fg: Tensor
    cls: Tensor
    labels: Tensor


def adjacency(near: Tensor, flat_cells: Tensor, valid: Tensor) -> Tensor:
    """near: [P, n, N] bool, each mask nearest-sampled on the grid; flat_cells: [P, n] long
    (y * 37 + x) -> A [P, n, n] bool, A[i, j]: mask i covers point j (real points only)."""
    covered = near.gather(2, flat_cells[:, None, :].expand(-1, near.shape[1], -1))
    return covered & valid[:, :, None] & valid[:, None, :]


def components(edges: Tensor, valid: Tensor) -> Graph:
    """edges: [P, n, n] bool directed -> the weakly connected components (strongly, with quirk 11 off)."""
    count_points = edges.shape[1]
    eye = torch.eye(count_points, dtype=torch.bool, device=edges.device)[None]
    weak = gfsam_quirks.FAITHFUL.weak_components
    reach = ((edges | edges.transpose(1, 2)) if weak else edges) | eye
    reach = reach.float()
    for _ in range(max(1, math.ceil(math.log2(max(count_points, 2))))):  # paths up to n - 1 edges
        reach = (torch.bmm(reach, reach) > 0).float()
    connected = reach > 0
    if not weak:  # quirk 11 off (tests only): strongly connected (mutually reachable)
        connected = connected & connected.transpose(1, 2)
    root = connected.to(torch.uint8).argmax(2)  # first reachable index: the component's smallest member
    index = torch.arange(count_points, device=edges.device)[None]
    is_root = root == index
    numbers = torch.cumsum(is_root.long(), 1) - 1
    groups = numbers.gather(1, root)
    member = (groups[:, None, :] == index[:, :, None]) & valid[:, None, :]
    return Graph(groups, (is_root & valid).sum(1), member)


def _rank_in_group(score: Tensor, groups: Tensor, valid: Tensor) -> Tensor:
    """-> [P, n] long: each point's place in its group's visit order (descending score, ties
    by lower index: stable sorts; the GF-SAM contract §8)."""
    keyed = torch.where(valid, score, torch.full_like(score, float("-inf")))
    by_score = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    group_sorted = groups.gather(1, by_score)
    by_group = torch.sort(group_sorted, dim=1, stable=True).indices
    order = by_score.gather(1, by_group)  # group-major, then descending score, then index
    sorted_groups = groups.gather(1, order)
    position = torch.arange(groups.shape[1], device=groups.device).expand_as(groups)
    first = torch.full_like(groups, groups.shape[1]).scatter_reduce(1, sorted_groups, position, "amin")
    rank_sorted = position - first.gather(1, sorted_groups)
    return torch.empty_like(rank_sorted).scatter_(1, order, rank_sorted)


def grow(foot: Tensor, apos: Tensor, aneg: Tensor, graph: Graph, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground by mask growth (§4.7). foot: [P, n, N] bilinear footprints; apos, aneg: [P, N]
    -> (fg [P, n] bool, cls [P, n] float)."""
    quirks = gfsam_quirks.FAITHFUL
    half = (apos.amax(1) + apos.amin(1)) / 2
    positive_map = apos * apos
    negative_map = aneg * half[:, None]
    pos = (positive_map > negative_map if quirks.strict else positive_map >= negative_map).float()
    diff = positive_map - negative_map
    score = (foot * diff[:, None, :]).sum(-1) / (foot.sum(-1) + FOOTPRINT_EPS)
    groups = graph.groups
    rank = _rank_in_group(score, groups, valid)
    grown = torch.zeros_like(foot)  # [P, groups, N]: what each group has taken so far
    index = groups[:, :, None].expand_as(foot)
    fg = torch.zeros_like(valid)
    visited = torch.zeros_like(score)  # each mask's p - q when its group visits it
    for step in range(foot.shape[1]):
        active = valid & (rank == step)
        current = foot * (1 - grown.gather(1, index))
        p = (pos[:, None, :] * current).sum(-1)
        q = ((1 - pos)[:, None, :] * current).sum(-1)
        accept = active & ((p > q) if quirks.strict else (p >= q))
        fg = fg | accept
        visited = torch.where(active, p - q, visited)
        # one active mask per group per step: the other rows add exact zeros
        grown = grown.scatter_add(1, index, current * accept[:, :, None])
    if not quirks.last_cls_score:  # quirk 12 off (tests only): each mask its own p - q
        return fg, visited
    size = graph.member.sum(2)  # [P, groups]
    last = valid & (rank == size.gather(1, groups) - 1)
    shared = torch.zeros_like(visited).scatter_add(1, groups, torch.where(last, visited, torch.zeros_like(visited)))
    return fg, shared.gather(1, groups)


def consistency(union_37: Tensor, cos_at: Tensor, cells: Tensor, graph: Graph, valid: Tensor) -> Tensor:
    """The consistency vote (§4.8). union_37: [P, groups, N] bilinear group unions; cos_at:
    [P, N, n] target-to-target cosine of every token against each point's token; cells: [P, n, 2]
    -> selected [P, n] bool (consistent, in a group that is not outvoted)."""
    quirks = gfsam_quirks.FAITHFUL
    tokens = union_37.shape[2]
    # G_c at each point: mean over support tokens of cos * U_c, over mean(U_c) + 1e-7
    at_points = torch.bmm(union_37, cos_at) / tokens
    at_points = at_points / (union_37.sum(2) / tokens + COSINE_EPS)[:, :, None]  # [P, groups, n]
    xy = cells.float()
    squared = ((xy[:, :, None, :] - xy[:, None, :, :]) ** 2).sum(-1)  # [P, j, i], exact integers
    squared = torch.where(valid[:, None, :], squared, torch.full_like(squared, float("inf")))
    nearest = torch.full_like(squared, float("inf")).scatter_reduce(
        2, graph.groups[:, None, :].expand_as(squared), squared, "amin")  # [P, j, group]
    distance = nearest.sqrt()
    # a point's own group is at distance 0: upstream makes it 1 (quirk 13; off, tests only: 1e-6)
    distance = torch.where(distance == 0, torch.full_like(distance, 1.0 if quirks.distance_zero_is_one else 1e-6),
                           distance)
    score = at_points.transpose(1, 2) / distance  # [P, j, group]
    exists = graph.member.any(2)[:, None, :]
    score = torch.where(exists, score, torch.full_like(score, float("-inf")))
    consistent = (score.argmax(2) == graph.groups) & valid  # argmax: first on ties
    agree = (graph.member & consistent[:, None, :]).sum(2)
    size = graph.member.sum(2)
    outvoted = agree < size - agree if quirks.strict else agree <= size - agree
    return consistent & ~outvoted.gather(1, graph.groups)


def point_labels(selected: Tensor, fg: Tensor, valid: Tensor) -> Tensor:
    """-> [P, n] long: 1 consistent and grown, 2 exactly one of them, 0 neither (or padding)."""
    labels = torch.where(selected & fg, 1, torch.where(selected | fg, 2, 0))
    return torch.where(valid, labels, torch.zeros_like(labels))


def choose_masks(labels: Tensor, cls: Tensor, nonempty: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The output's masks (§4.10) -> (chosen [P, n] bool, fallback [P] bool).

    The union of the label-1 masks; if it is empty, the first argmax of cls_score after the
    scores of the points not labelled 2 are set to 0 (even if every score is <= 0)."""
    union = ((labels == 1) & nonempty).any(1)
    scores = torch.where(labels == 2, cls, torch.zeros_like(cls)) if gfsam_quirks.FAITHFUL.fallback_zeroes else cls
    scores = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    best = torch.nn.functional.one_hot(scores.argmax(1), labels.shape[1]).bool()
    chosen = torch.where(union[:, None], labels == 1, best)
    return chosen, ~union
