"""Presence and several instances per (image, concept), beyond the reference.

Presence: `similarity` (max of the location-prior map S) below `min_similarity` means the
concept is absent: an empty mask, and the decoder is skipped.
Several instances: after each instance the prior is searched again outside the union of
the masks found so far; it stops at `max_instances`, or when the next peak is below
`min_similarity`, or when nothing new is found. Instance 0 is exactly the single result. The implementation is the batched cascade
(`cascade.py`); this module is its one-image view.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from persam_core.modeling.backbone import Model
from .batch import EncodedBatch
from .host_results import HostResults
from .cascade import segment_batch
from .concept import ConceptTensors
from .persam import Result
from persam_core.modeling.predictor import EncodedImage


@dataclass(frozen=True)
class InstanceResult:
    """One row's worth: `present` False means below the presence threshold (empty mask)."""

    result: Result
    instance: int
    present: bool


def instance_results(results: HostResults) -> list[InstanceResult]:
    """Rows of a batch's results -> InstanceResults (score 0.0 where absent)."""
    out = []
    for row in range(len(results)):
        present = bool(results.present[row])
        score = float(results.score[row]) if present else 0.0
        point = (int(results.point[row, 0]), int(results.point[row, 1]))
        result = Result(results.mask(row), score, float(results.similarity[row]), point,
                        object_score=float(results.object_score[row]))
        out.append(InstanceResult(result, int(results.instance[row]), present))
    return out


@torch.no_grad()
def segment_instances(
    sam: Model,
    encoded: EncodedImage,
    concept: ConceptTensors,
    max_instances: int = 1,
    min_similarity: float | None = None,
) -> list[InstanceResult]:
    """Instance 0 always (present or not), then further instances as found: the batched
    cascade on a batch of one. max_instances >= 1."""
    return instance_results(segment_batch(sam, EncodedBatch.of([encoded]), [concept], max_instances, min_similarity))
