"""The batched PerSAM cascade: every (image, concept) pair of an encoder batch at once.

For B images and K concepts (P = B x K pairs) the location prior of every pair is one
matrix product ([B, 256, 4096] x [K, 256]); each PerSAM pass is one mask-decoder call for
all PerSAM pairs, each PerSAM-F pass one for all PerSAM-F pairs (3 calls per method present,
whatever B and K, up to `pairs.DECODER_PAIRS` pairs; beyond, one call per that many, to bound
the decoder's memory). Points, attention biases, boxes, best-mask picks, PerSAM-F's weighted
logits and the presence test are tensor ops on the model's device; nothing waits on the
host until the results leave the device, once, at the end (`HostResults`). The model is a
SAM or a SAM 2 (`backbone.py`); the cascade is the same for both.

Presence (`min_similarity`) and several instances (`max_instances`) as in `instances.py`.
The only host reads before the results leave: with `min_similarity`, one [P] flag vector
per batch, so that absent pairs never reach the decoder (in retrieval most pairs are
absent; decoding them to throw the masks away would cost more than the read); and with
`max_instances` > 1, one per further round, to batch the pairs still searching.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from persam_core.modeling.backbone import Model
from .batch import EncodedBatch
from .host_results import HostResults, empty_host_results
from .concept import ConceptTensors
from .pairs import PairBatch, boxes_of, to_device
from .persam import persam_passes
from .refine import CascadeOutput
from .persam_f import persam_f_passes
from .prior import attention_biases, negative_points, positive_points, similarity_maps, upsample_similarities

STATS = ("present", "score", "similarity", "point_x", "point_y", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "area",
         "object_score")


@dataclass
class _Rows:
    """Candidate rows, chunk by chunk: host pair ids and instance number, packed masks
    [p, bytes] uint8, stats [p, len(STATS)] float64 and accepted [p] bool on the device."""

    pair_ids: list[tuple[int, ...]] = field(default_factory=list)
    instances: list[int] = field(default_factory=list)
    masks: list[Tensor] = field(default_factory=list)
    stats: list[Tensor] = field(default_factory=list)
    accepted: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class _ConceptStack:
    """K concepts on the device: targets [K, 256], embeddings [K, 256], weights [K, 3], methods (host)."""

    targets: Tensor
    embeddings: Tensor
    weights: Tensor
    is_persam_f: tuple[bool, ...]

    @classmethod
    def of(cls, concepts: Sequence[ConceptTensors], device: torch.device) -> "_ConceptStack":
        weights = [c.mask_weights if c.mask_weights is not None else torch.zeros(3) for c in concepts]
        return cls(
            torch.stack([c.target_feature for c in concepts]).to(device, torch.float32),
            torch.stack([c.target_embedding for c in concepts]).to(device, torch.float32),
            torch.stack([w.to(device, torch.float32) for w in weights]),
            tuple(c.mask_weights is not None for c in concepts),  # PerSAM-F's concepts carry its weights
        )


def _all_pairs(sam: Model, batch: EncodedBatch, concepts: Sequence[ConceptTensors]):
    """Every (image, concept) pair, image-major -> (concepts stacked, PairBatch, concept of each
    pair (host), S: [P, 64, 64] from one matrix product)."""
    stack = _ConceptStack.of(concepts, batch.features.device)
    image_of_pair = [b for b in range(len(batch)) for _ in concepts]
    concept_of_pair = [k for _ in range(len(batch)) for k in range(len(concepts))]
    pairs = PairBatch.build(sam, batch.features, image_of_pair, batch.input_sizes, batch.original_sizes, batch.high_res)
    return stack, pairs, concept_of_pair, similarity_maps(batch.features, stack.targets).flatten(0, 1)


def _prompts(pairs: PairBatch, similarity: Tensor, pair_ids: Sequence[int], found: dict[int, Tensor] | None,
             points_only: bool = False):
    """-> positive [P, 2], negative [P, 2] (x, y), attention bias [P, 1, 1, 4096], peak [P] of S'.

    similarity: [P, 64, 64]; found: pixels of earlier instances ([H, W] bool) by pair id,
    lowered to the map's minimum first (the next instance is searched elsewhere).
    points_only: the positive points alone (rank needs no decoder prompts); the rest stay empty.
    """
    count, device = len(pairs), pairs.device
    positive = torch.empty(count, 2, dtype=torch.long, device=device)
    negative = torch.empty_like(positive)
    bias = torch.empty(count, 1, 1, similarity.shape[1] * similarity.shape[2], device=device)
    peak = torch.empty(count, device=device)
    for group, rows, rows_host in pairs.chunks():
        upsampled = upsample_similarities(pairs.backbone, similarity[rows], group.input_size, group.original_size)
        if found is not None:
            taken = torch.stack([found[pair_ids[r]] for r in rows_host])
            upsampled = torch.where(taken, upsampled.flatten(1).amin(1)[:, None, None], upsampled)
        positive[rows] = positive_points(upsampled)
        if points_only:
            continue
        negative[rows] = negative_points(upsampled)
        bias[rows] = attention_biases(upsampled, tuple(similarity.shape[1:]))
        peak[rows] = upsampled.flatten(1).amax(1)
    return positive, negative, bias, peak


def _cascade(pairs: PairBatch, concept_of_pair: Sequence[int], stack: _ConceptStack, positive: Tensor,
             negative: Tensor, bias: Tensor) -> CascadeOutput:
    """PerSAM pairs through persam_passes, PerSAM-F pairs through persam_f_passes (one batch each)."""
    concept_index = to_device(list(concept_of_pair), torch.long, pairs.device)
    outputs = []
    for persam_f in (False, True):
        rows = [r for r, k in enumerate(concept_of_pair) if stack.is_persam_f[k] == persam_f]
        if not rows:
            continue
        whole = len(rows) == len(pairs)
        sub = pairs if whole else pairs.subset(rows)
        index = None if whole else to_device(rows, torch.long, pairs.device)
        take = (lambda t: t) if whole else (lambda t: t[index])  # noqa: E731
        k = take(concept_index)
        if persam_f:
            output = persam_f_passes(sub, take(positive), stack.weights[k])
        else:
            output = persam_passes(sub, take(positive), take(negative), take(bias), stack.embeddings[k][:, None])
        if whole:
            return output
        outputs.append((index, output))
    low = torch.empty(len(pairs), *outputs[0][1].low_res.shape[1:], device=pairs.device)
    score = torch.empty(len(pairs), device=pairs.device)
    empty = torch.empty(len(pairs), dtype=torch.bool, device=pairs.device)
    object_score = torch.empty(len(pairs), device=pairs.device)
    for index, output in outputs:
        low[index], score[index], empty[index] = output.low_res, output.score, output.empty
        object_score[index] = output.object_score
    return CascadeOutput(low, score, empty, object_score)


def _present_only(pairs: PairBatch, concept_of_pair: Sequence[int], stack: _ConceptStack, positive: Tensor,
                  negative: Tensor, bias: Tensor, present: Tensor) -> CascadeOutput:
    """The cascade over the present pairs only; absent pairs get an empty output."""
    device = pairs.device
    low = torch.zeros(len(pairs), 256, 256, device=device)
    score = torch.zeros(len(pairs), device=device)
    empty = torch.ones(len(pairs), dtype=torch.bool, device=device)
    object_score = torch.full((len(pairs),), float("nan"), device=device)
    rows = present.nonzero().flatten().tolist()
    if rows:
        index = to_device(rows, torch.long, device)
        sub = pairs if len(rows) == len(pairs) else pairs.subset(rows)
        output = _cascade(sub, [concept_of_pair[r] for r in rows], stack, positive[index], negative[index], bias[index])
        low = low.to(output.low_res.dtype)
        low[index], score[index], empty[index] = output.low_res, output.score, output.empty
        object_score[index] = output.object_score
    return CascadeOutput(low, score, empty, object_score)


def _pack_bits(masks: Tensor) -> Tensor:
    """masks: [p, H, W] bool -> [p, ceil(H*W / 8)] uint8 as numpy.packbits of each flattened mask."""
    flat = masks.flatten(1).to(torch.uint8)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], pad)], dim=1)
    weights = 2 ** torch.arange(7, -1, -1, device=masks.device, dtype=torch.uint8)  # packbits order, no host copy
    return (flat.view(flat.shape[0], -1, 8) * weights).sum(2, dtype=torch.uint8)


def _collect(rows_out: _Rows, pairs: PairBatch, pair_ids: Sequence[int], instance: int, output: CascadeOutput,
             keep: Tensor, similarity: Tensor, positive: Tensor, found: dict[int, Tensor] | None) -> Tensor:
    """Final masks of one round -> candidate rows; updates `found` -> still searching [P] bool.

    keep: [P] bool (present / peak above the threshold); instance > 0 rows are accepted only
    when at least half of the mask is new (else the decoder came back to a found instance).
    """
    searching = torch.zeros(len(pairs), dtype=torch.bool, device=pairs.device)
    for group, rows, rows_host in pairs.chunks():
        high = pairs.to_original(output.low_res[rows][:, None], group)[:, 0]
        valid = (keep[rows] & ~output.empty[rows])[:, None, None]
        masks = (high > pairs.backbone.mask_threshold) & valid  # [p, H, W]
        area = masks.flatten(1).sum(1)
        accepted = torch.ones_like(keep[rows])
        if found is not None:
            before = torch.stack([found[pair_ids[r]] for r in rows_host]) if instance else torch.zeros_like(masks)
            fresh = (masks & ~before).flatten(1).sum(1)
            if instance:
                accepted = keep[rows] & (fresh > 0) & (fresh >= 0.5 * area.clamp(min=1))
            after = before | (masks & accepted[:, None, None])
            for r, pixels in zip(rows_host, after.unbind(0)):  # tensor references only, no host read
                found[pair_ids[r]] = pixels
            searching[rows] = accepted & after.flatten(1).any(1) & ~after.flatten(1).all(1)
        box = boxes_of(masks)[:, :4]
        size = torch.where(area[:, None] > 0, box[:, 2:] - box[:, :2] + 1, torch.zeros_like(box[:, 2:]))
        present = keep[rows] if instance == 0 else torch.ones_like(keep[rows])
        nan = torch.full_like(area, float("nan"), dtype=torch.float64)
        score = torch.where(keep[rows], output.score[rows].double(), nan)
        object_score = torch.where(keep[rows], output.object_score[rows].double(), nan)
        rows_out.stats.append(torch.stack([
            present.double(), score, similarity[rows].double(), positive[rows, 0].double(), positive[rows, 1].double(),
            box[:, 0].double(), box[:, 1].double(), size[:, 0].double(), size[:, 1].double(), area.double(),
            object_score,
        ], dim=1))
        rows_out.masks.append(_pack_bits(masks))
        rows_out.accepted.append(accepted)
        rows_out.pair_ids.append(tuple(pair_ids[r] for r in rows_host))
        rows_out.instances.append(instance)
    return searching


@torch.no_grad()
def segment_batch(
    sam: Model,
    batch: EncodedBatch,
    concepts: Sequence[ConceptTensors],
    max_instances: int = 1,
    min_similarity: float | None = None,
) -> HostResults:
    """All B x K pairs -> rows ordered by (image, concept, instance); masks leave the device once."""
    if max_instances < 1:
        raise ValueError("max_instances must be at least 1")
    if len(batch) == 0 or not concepts:
        return empty_host_results()
    count_concepts = len(concepts)
    stack, pairs, concept_of_pair, similarity = _all_pairs(sam, batch, concepts)
    presence = similarity.flatten(1).amax(1)
    present = torch.ones_like(presence, dtype=torch.bool) if min_similarity is None else presence >= min_similarity

    rows = _Rows()
    found: dict[int, Tensor] | None = {} if max_instances > 1 else None
    all_ids = list(range(len(pairs)))
    positive, negative, bias, _ = _prompts(pairs, similarity, all_ids, None)
    if min_similarity is None:
        output = _cascade(pairs, concept_of_pair, stack, positive, negative, bias)
    else:  # one host read of P flags: absent pairs never reach the decoder (most, in retrieval)
        output = _present_only(pairs, concept_of_pair, stack, positive, negative, bias, present)
    searching = _collect(rows, pairs, all_ids, 0, output, present, presence, positive, found)
    ids = all_ids
    for instance in range(1, max_instances):
        # One host read per round: which pairs go on searching (see the module docstring).
        ids = [ids[i] for i in searching.nonzero().flatten().tolist()]
        if not ids:
            break
        sub = pairs.subset(ids)
        index = to_device(ids, torch.long, pairs.device)
        positive, negative, bias, peak = _prompts(sub, similarity[index], ids, found)
        keep = torch.ones_like(peak, dtype=torch.bool) if min_similarity is None else peak >= min_similarity
        output = _cascade(sub, [concept_of_pair[i] for i in ids], stack, positive, negative, bias)
        searching = _collect(rows, sub, ids, instance, output, keep, peak, positive, found)
    return _to_host(rows, batch, count_concepts, max_instances > 1)


def _to_host(rows: _Rows, batch: EncodedBatch, count_concepts: int, filtered: bool) -> HostResults:
    """Order the accepted rows by (pair, instance), gather their bits into one buffer, copy once."""
    if filtered:  # one read of every chunk's flags (several instances only)
        flags = torch.cat(rows.accepted).cpu().numpy()
        accepted = np.split(flags, np.cumsum([len(p) for p in rows.pair_ids])[:-1])
    else:
        accepted = [np.ones(len(p), bool) for p in rows.pair_ids]
    entries = sorted(
        (pair, instance, chunk, position)
        for chunk, (pairs, instance, ok) in enumerate(zip(rows.pair_ids, rows.instances, accepted))
        for position, pair in enumerate(pairs) if ok[position]
    )
    sizes = np.array([batch.original_sizes[pair // count_concepts] for pair, *_ in entries], np.int64).reshape(-1, 2)
    lengths = (sizes[:, 0] * sizes[:, 1] + 7) // 8
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    device = rows.masks[0].device
    bits = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=device)
    order = {(chunk, position): slot for slot, (_, _, chunk, position) in enumerate(entries)}
    stats = torch.empty(len(entries), len(STATS), dtype=torch.float64, device=device)
    for chunk, packed in enumerate(rows.masks):
        slots = [(position, order[(chunk, position)]) for position in range(packed.shape[0]) if (chunk, position) in order]
        if not slots:
            continue
        positions = to_device([p for p, _ in slots], torch.long, device)
        targets = to_device([s for _, s in slots], torch.long, device)
        starts = to_device([int(offsets[s]) for _, s in slots], torch.long, device)
        width = packed.shape[1]
        bits[(starts[:, None] + torch.arange(width, device=device)).flatten()] = packed[positions].flatten()
        stats[targets] = rows.stats[chunk][positions]
    host_bits, host = bits.cpu().numpy(), stats.cpu().numpy()
    pair_ids = np.array([pair for pair, *_ in entries], np.int64)
    return HostResults(
        image_index=(pair_ids // count_concepts).astype(np.int32),
        concept_index=(pair_ids % count_concepts).astype(np.int32),
        instance=np.array([instance for _, instance, *_ in entries], np.int32),
        present=host[:, 0] > 0.5,
        score=host[:, 1].astype(np.float32),
        similarity=host[:, 2].astype(np.float32),
        point=host[:, 3:5].astype(np.int32),
        bbox=host[:, 5:9].astype(np.int32),
        area=host[:, 9].astype(np.int64),
        object_score=host[:, 10].astype(np.float32),
        mask_bits=host_bits,
        mask_offsets=offsets,
        mask_sizes=sizes.astype(np.int32),
    )


@torch.no_grad()
def score_batch(sam: Model, batch: EncodedBatch, concepts: Sequence[ConceptTensors]) -> tuple[np.ndarray, np.ndarray]:
    """Location prior only (no decoding) -> (similarity [B, K] float32, point [B, K, 2] int32 (x, y))."""
    count_images, count_concepts = len(batch), len(concepts)
    _, pairs, _, similarity = _all_pairs(sam, batch, concepts)
    positive, _, _, _ = _prompts(pairs, similarity, range(len(pairs)), None, points_only=True)
    presence = similarity.flatten(1).amax(1)
    return (presence.cpu().numpy().reshape(count_images, count_concepts).astype(np.float32),
            positive.cpu().numpy().reshape(count_images, count_concepts, 2).astype(np.int32))
