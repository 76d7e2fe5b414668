"""GF-SAM's predict for every (image, concept) pair of an encoder batch, on the device.

Inputs are what the encoders made of B stretched frames (gfsam_frames): SAM features and
token-normalised DINOv2 tokens. For P pairs:
1. priors, presence, location maps and points of every pair: matrix products and tensor ops
   (gfsam_priors, gfsam_points);
2. one host read of the P point counts (and presence flags): the prompts of all pairs then go
   through SAM's prompt encoder and mask decoder together, in calls of `pairs.DECODER_PAIRS`
   prompts, without decoding padding (a pair has 1 to 128 points, often far fewer);
3. the masks' grid facts, chunk by chunk (gfsam_masks), then graph, growth, vote and labels
   for all pairs at once (gfsam_graph);
4. one host read of which masks each pair outputs: only those are upsampled again, to 1024
   and to the image's original size.
Results stay on the device; the caller copies them once. GF-SAM is specified for SAM
(segment_anything) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from segment_anything.modeling import Sam

from persam_core.modeling.families import ModelError, families, family_of_model
from ..pairs import PairBatch
from .registry import FRAME_SIDE
from .gfsam_graph import adjacency, choose_masks, components, consistency, grow, point_labels
from .gfsam_masks import chosen_outputs, mask_facts, union_footprints
from .gfsam_points import find_points, location_map, prompt_pixels
from .gfsam_priors import Priors, pair_priors, presence_of, self_cosine
from .gfsam_reference import GRID_SIDE, ConceptStack, GFSAMReference, as_stack

PATH_UNION = "union"  # the union of the label-1 masks
PATH_FALLBACK = "fallback"  # no label-1 pixels: the best label-2 point's mask (§4.10)
PATH_NO_POINTS = "no_points"  # an all-zero location map: empty mask (upstream crashes here)
PATH_ABSENT = "absent"  # presence below min_presence: empty mask, nothing decoded


@dataclass
class GFSAMResult:
    """One (image, concept) pair, tensors on the device.

    mask: [H, W] bool at the original size; mask_1024: [1024, 1024] bool in the stretched frame;
    presence: 0-d, max of Apos * Mpos; score: 0-d prob score (NaN when absent); points: [n, 2]
    long grid cells (x, y), x-major; labels, groups: [n] long; cls_scores: [n] float;
    point: [2] long (x, y) in original pixels, where the presence was measured (the best cell
    of Apos * Mpos, at its prompt pixel); path: how the mask was chosen (PATH_*)."""

    mask: Tensor
    mask_1024: Tensor
    presence: Tensor
    score: Tensor
    points: Tensor
    labels: Tensor
    groups: Tensor
    cls_scores: Tensor
    point: Tensor
    path: str


def _check_sam(sam) -> Sam:
    try:
        decodes_as_sam = family_of_model(sam).sam_predictor_decodes
    except ModelError:  # no model of any registered family
        decodes_as_sam = False
    if not decodes_as_sam:
        able = ", ".join(t for f in families() if f.sam_predictor_decodes for t in f.model_types)
        raise ValueError(f"GF-SAM runs on SAM (segment_anything) models only: choose a SAM --model-type ({able}), "
                         "not SAM 2")
    return sam


def best_points(priors: Priors, original_sizes: Sequence[tuple[int, int]], image_of_pair: Sequence[int]) -> Tensor:
    """-> [P, 2] long (x, y) original pixels of each pair's best cell of Apos * Mpos (first on
    ties), at its prompt pixel in the 1024 frame, scaled to the image."""
    flat = (priors.apos * priors.mpos).argmax(1)
    cells = torch.stack([flat % GRID_SIDE, flat // GRID_SIDE], dim=1)
    pixels = prompt_pixels(cells)
    sizes = torch.tensor([[original_sizes[i][1], original_sizes[i][0]] for i in image_of_pair],
                         dtype=torch.long, device=pixels.device)  # (W, H)
    return torch.div(pixels * sizes, FRAME_SIDE, rounding_mode="floor")


@torch.no_grad()
def gfsam_presence(tokens: Tensor, references: "Sequence[GFSAMReference] | ConceptStack") -> Tensor:
    """tokens: [B, 1369, C] normalised DINOv2 tokens -> presence [B, K] (no SAM, no decoding)."""
    stack = as_stack(references, tokens.device)
    pairs = [(b, k) for b in range(tokens.shape[0]) for k in range(len(stack))]
    priors = pair_priors(stack, tokens, pairs, negative=False)
    return presence_of(priors).view(tokens.shape[0], len(stack))


@torch.no_grad()
def presence_points(tokens: Tensor, references: "Sequence[GFSAMReference] | ConceptStack",
                    original_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """-> (presence [B, K], point [B, K, 2] long (x, y) original pixels): rank's pass."""
    stack = as_stack(references, tokens.device)
    count, concepts = tokens.shape[0], len(stack)
    pairs = [(b, k) for b in range(count) for k in range(concepts)]
    priors = pair_priors(stack, tokens, pairs, negative=False)
    point = best_points(priors, original_sizes, [b for b, _ in pairs])
    return presence_of(priors).view(count, concepts), point.view(count, concepts, 2)


def _empty_result(size: tuple[int, int], presence: Tensor, score: float, point: Tensor, path: str) -> GFSAMResult:
    device = presence.device
    nothing = torch.zeros(0, dtype=torch.long, device=device)
    return GFSAMResult(
        torch.zeros(size, dtype=torch.bool, device=device),
        torch.zeros(FRAME_SIDE, FRAME_SIDE, dtype=torch.bool, device=device),
        presence, torch.tensor(score, device=device), nothing.view(0, 2), nothing, nothing,
        torch.zeros(0, device=device), point, path,
    )


def _padded(values: Tensor, pair_of_prompt: Tensor, slot: Tensor, shape: tuple[int, int]) -> Tensor:
    """values: [T, ...] per prompt -> [A, n, ...] per active pair and point slot (zeros elsewhere)."""
    out = values.new_zeros(*shape, *values.shape[1:])
    out[pair_of_prompt, slot] = values
    return out


@torch.no_grad()
def segment_gfsam(
    sam,
    embeddings: Tensor,
    tokens: Tensor,
    references: "Sequence[GFSAMReference] | ConceptStack",
    original_sizes: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]] | None = None,
    min_presence: float | None = None,
) -> list[GFSAMResult]:
    """GF-SAM on P (image, concept) pairs -> one GFSAMResult per pair, in pair order.

    embeddings: [B, 256, 64, 64] SAM features of the 1024 stretched frames; tokens: [B, 1369, C]
    normalised DINOv2 tokens of the same frames; references: K concepts (or their stack);
    original_sizes: (H, W) per image; pairs: (image, concept) indices, default all B x K
    image-major; min_presence: pairs below it get an empty mask and no decode."""
    sam = _check_sam(sam)
    count_images = embeddings.shape[0]
    if tokens.shape[0] != count_images or len(original_sizes) != count_images:
        raise ValueError(f"{count_images} SAM embeddings, {tokens.shape[0]} DINOv2 token sets and "
                         f"{len(original_sizes)} image sizes: one each per image")
    device = embeddings.device
    stack = as_stack(references, device)
    if pairs is None:
        pairs = [(b, k) for b in range(count_images) for k in range(len(stack))]
    pairs = [(int(b), int(k)) for b, k in pairs]
    if not pairs:
        return []
    tokens = tokens.to(device, torch.float32)
    priors = pair_priors(stack, tokens, pairs)
    presence = presence_of(priors)
    points = find_points(location_map(priors))
    image_of_pair = [b for b, _ in pairs]
    best = best_points(priors, original_sizes, image_of_pair)
    present = torch.ones_like(presence, dtype=torch.bool) if min_presence is None else presence >= min_presence
    # Host read 1 of 2: how many prompts each pair has (absent pairs none), to decode them all
    # together without padding.
    counts = torch.where(present, points.count, torch.zeros_like(points.count))
    counts, present_host = torch.stack([counts, present.long()]).tolist()
    active = [p for p, c in enumerate(counts) if c > 0]
    results: list[GFSAMResult | None] = [None] * len(pairs)
    for p, (b, _) in enumerate(pairs):
        if not present_host[p]:
            results[p] = _empty_result(original_sizes[b], presence[p], float("nan"), best[p], PATH_ABSENT)
        elif counts[p] == 0:
            results[p] = _empty_result(original_sizes[b], presence[p], 0.0, best[p], PATH_NO_POINTS)
    if not active:
        return results  # type: ignore[return-value]

    pair_host = [a for a, p in enumerate(active) for _ in range(counts[p])]
    slot_host = [j for p in active for j in range(counts[p])]
    image_of_prompt = [pairs[active[a]][0] for a in pair_host]
    rows = torch.tensor(active, device=device)
    pair_of_prompt = torch.tensor(pair_host, device=device)
    slot = torch.tensor(slot_host, device=device)
    width = max(counts[p] for p in active)
    shape = (len(active), width)

    prompts = points.prompts[rows[pair_of_prompt], slot]  # [T, 2] frame pixels
    frame = [(FRAME_SIDE, FRAME_SIDE)] * count_images
    batch = PairBatch.build(sam, embeddings, image_of_prompt, frame, frame)
    labels_in = torch.ones(len(pair_host), 1, dtype=torch.int, device=device)
    low = batch.decode(prompts[:, None, :], labels_in, multimask=False).low_res  # [T, 1, 256, 256]
    threshold = sam.mask_threshold
    facts = mask_facts(low, threshold)

    cells = points.cells[rows, :width]
    valid = points.valid[rows, :width]
    flat_cells = cells[..., 1] * GRID_SIDE + cells[..., 0]
    near = _padded(facts.near, pair_of_prompt, slot, shape)
    foot = _padded(facts.foot, pair_of_prompt, slot, shape)
    probe = _padded(facts.probe, pair_of_prompt, slot, shape)
    nonempty = _padded(facts.nonempty, pair_of_prompt, slot, shape)
    apos, aneg = priors.apos[rows], priors.aneg[rows]

    graph = components(adjacency(near, flat_cells, valid), valid)
    fg, cls = grow(foot, apos, aneg, graph, valid)
    images = sorted({pairs[p][0] for p in active})
    self_cos = torch.stack([self_cosine(tokens[i]) for i in images])  # once per image, [U, N, N]
    which = torch.tensor([images.index(pairs[p][0]) for p in active], device=device)
    token_index = torch.arange(self_cos.shape[1], device=device)
    cos_at = self_cos[which[:, None, None], token_index[None, :, None], flat_cells[:, None, :]]  # [A, N, n]
    selected = consistency(union_footprints(probe, graph.member), cos_at, cells, graph, valid)
    labels = point_labels(selected, fg, valid)
    chosen, fallback = choose_masks(labels, cls, nonempty, valid)

    # Host read 2 of 2: which masks each pair outputs, so that only those are upsampled again.
    flags = torch.cat([chosen, fallback[:, None]], dim=1).tolist()
    chosen_host, fallback_host = [row[:-1] for row in flags], [row[-1] for row in flags]
    chosen_prompts = [t for t, (a, j) in enumerate(zip(pair_host, slot_host)) if chosen_host[a][j]]
    sizes = [tuple(original_sizes[pairs[p][0]]) for p in active]
    outputs = chosen_outputs(low, chosen_prompts, pair_host, len(active), sizes, apos, threshold)
    for a, p in enumerate(active):
        n = counts[p]
        results[p] = GFSAMResult(
            outputs.masks[a], outputs.mask_1024[a], presence[p], outputs.score[a], cells[a, :n], labels[a, :n],
            graph.groups[a, :n], cls[a, :n], best[p], PATH_FALLBACK if fallback_host[a] else PATH_UNION,
        )
    return results  # type: ignore[return-value]
