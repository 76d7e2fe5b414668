"""GF-SAM's priors (the GF-SAM contract §4.2): cosine maps between reference and target DINOv2 tokens.

For a weight vector w over a reference's tokens (the mask's, or its complement's):
`max_w[q] = max_s cos[s, q] w[s]` and `mean_w[q] = mean_s cos[s, q] w[s] / (mean(w) + 1e-7)`,
each averaged over shots: Mpos = max_wpos, Apos = mean_wpos, Aneg = mean_wneg.

On one image, every shot of every concept is one matrix product ([Σ·1369, C] x [C, 1369]);
the reductions stay per shot, then per concept. The target-to-target cosine (the consistency
vote's support) is computed once per image, not once per group as upstream.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from . import gfsam_quirks
from .gfsam_reference import TOKENS, ConceptStack

COSINE_EPS = 1e-7
# Shots whose [1369, 1369] cosine maps are reduced at once: 16 x 7.5 MiB, times the few
# temporaries of the weighted maps, bounds the priors' working memory whatever K is.
SHOTS_PER_CALL = 16


class Priors(NamedTuple):
    """Per (image, concept): apos, aneg, mpos [..., 1369] on the grid (row-major, y * 37 + x)."""

    apos: Tensor
    aneg: Tensor
    mpos: Tensor


def token_norms(tokens: Tensor) -> Tensor:
    """tokens: [B, N, C] -> [B, N], each token's L2 norm over C, reduced as upstream reads the
    query (a [C, N] view, over C)."""
    return torch.norm(tokens.permute(0, 2, 1), 2, 1)


def cosine(support: Tensor, support_norms: Tensor, query: Tensor, query_norms: Tensor) -> Tensor:
    """support: [S, N, C], support_norms: [S, N]; query: [N, C], query_norms: [N] -> [S, N, N]
    cos[s, i, q] = <support_i, query_q> / (|support_i| |query_q| + 1e-7), one matrix product."""
    dots = torch.matmul(support, query.T)
    return dots / (support_norms[:, :, None] * query_norms[None, None, :] + COSINE_EPS)


def weighted_maps(cos: Tensor, weights: Tensor, with_max: bool) -> tuple[Tensor, Tensor | None]:
    """cos: [S, N, N] (support, query); weights: [S, N] on the support tokens ->
    (mean_w [S, N], max_w [S, N] or None)."""
    quirks = gfsam_quirks.FAITHFUL
    weighted = cos * weights[:, :, None]
    mean = weighted.mean(1)
    if quirks.mean_over_weight:
        mean = mean / (weights.sum(1) / weights.shape[1] + COSINE_EPS)[:, None]
    if not with_max:
        return mean, None
    if quirks.zero_in_max:
        return mean, weighted.amax(1)
    # quirk 5 off (tests only): tokens outside the mask take no part in the max
    return mean, weighted.masked_fill(weights[:, :, None] <= 0, float("-inf")).amax(1)


def concept_priors(stack: ConceptStack, concepts: Sequence[int], query: Tensor, query_norms: Tensor,
                   negative: bool = True) -> Priors:
    """The priors of `concepts` (indices into the stack) on one image.

    query: [N, C] normalised tokens; query_norms: [N] -> Priors of [k, N] each (aneg is
    empty, [k, 0], when `negative` is False: presence needs no negative map)."""
    shots = [(stack.offsets[k], stack.shots[k]) for k in concepts]
    rows = [o + s for o, count in shots for s in range(count)]
    per_shot = {name: [] for name in ("apos", "aneg", "mpos")}
    for start in range(0, len(rows), SHOTS_PER_CALL):
        chunk = rows[start : start + SHOTS_PER_CALL]
        index = torch.tensor(chunk, device=query.device) if len(chunk) != stack.tokens.shape[0] else None
        take = (lambda t: t) if index is None else (lambda t: t[index])  # noqa: E731
        cos = cosine(take(stack.tokens), take(stack.norms), query, query_norms)
        apos, mpos = weighted_maps(cos, take(stack.wpos), with_max=True)
        per_shot["apos"].append(apos)
        per_shot["mpos"].append(mpos)
        if negative:
            per_shot["aneg"].append(weighted_maps(cos, take(stack.wneg), with_max=False)[0])
    maps = {name: torch.cat(parts) if parts else None for name, parts in per_shot.items()}
    out = {name: [] for name in maps}
    first = 0
    for _, count in shots:  # the mean over each concept's shots, as upstream (cat, then mean)
        for name, values in maps.items():
            if values is not None:
                out[name].append(values[first : first + count].mean(0))
        first += count
    empty = query.new_zeros(len(concepts), 0)
    return Priors(torch.stack(out["apos"]), torch.stack(out["aneg"]) if negative else empty, torch.stack(out["mpos"]))


def pair_priors(stack: ConceptStack, tokens: Tensor, pairs: Sequence[tuple[int, int]], negative: bool = True) -> Priors:
    """tokens: [B, N, C] normalised; pairs: (image, concept) host indices -> Priors [P, N] each,
    in pair order. Each image's concepts go through one matrix product (per SHOTS_PER_CALL)."""
    if tokens.dim() != 3 or tokens.shape[1] != TOKENS:
        raise ValueError(f"DINOv2 tokens must be [B, {TOKENS}, C], got {list(tokens.shape)}")
    if tokens.shape[2] != stack.tokens.shape[2]:
        raise ValueError(f"DINOv2 tokens of width {tokens.shape[2]} against concepts fitted at width "
                         f"{stack.tokens.shape[2]}: use the DINOv2 the concepts were fitted with")
    norms = token_norms(tokens)
    by_image: dict[int, list[int]] = {}
    for image, concept in pairs:
        if concept not in by_image.setdefault(image, []):
            by_image[image].append(concept)
    parts, where, first = [], {}, 0
    for image, concepts in by_image.items():
        parts.append(concept_priors(stack, concepts, tokens[image], norms[image], negative))
        where.update({(image, concept): first + position for position, concept in enumerate(concepts)})
        first += len(concepts)
    # pair order: one gather of host-known rows (no device read)
    index = torch.tensor([where[(int(i), int(k))] for i, k in pairs], device=tokens.device)
    return Priors(*(torch.cat(maps)[index] for maps in zip(*parts)))


def self_cosine(tokens: Tensor) -> Tensor:
    """tokens: [N, C] of one image -> [N, N] target-to-target cosine (support rows, query columns)."""
    norms = token_norms(tokens[None])[0]
    support_norms = torch.linalg.vector_norm(tokens, dim=-1)
    return cosine(tokens[None], support_norms[None], tokens, norms)[0]


def presence_of(priors: Priors) -> Tensor:
    """-> [P] presence: the maximum over the grid of Apos * Mpos (before any min-max scaling)."""
    return (priors.apos * priors.mpos).amax(-1)
