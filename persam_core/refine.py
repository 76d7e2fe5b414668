"""Cascaded refinement, shared by PerSAM, PerSAM-F and the video mode.

The best of a decode's masks gives a tight box; box + that mask's logits are decoded
again and the best new mask wins. A pair whose best mask is empty has no box: the
reference crashes there, we keep the empty mask. In a batch every pair is decoded
(one call) and the empty ones keep their input by `torch.where`, not by a branch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .pairs import PairBatch, pick


@dataclass(frozen=True)
class CascadeOutput:
    """Per pair: final low-res logits [P, 256, 256], score [P] (the predicted IoU, or
    PerSAM-F's weighted one), empty [P] bool (the final mask is known to be empty),
    object_score [P] (SAM 2's object-score logit of the decode that gave the mask; NaN for SAM)."""

    low_res: Tensor
    score: Tensor
    empty: Tensor
    object_score: Tensor


def refine_with_box(pairs: PairBatch, points: Tensor, labels: Tensor, low_res: Tensor, scores: Tensor,
                    object_score: Tensor | None = None) -> CascadeOutput:
    """Cascaded refinement: best mask of (low_res [P, M, 256, 256], scores [P, M]; object_score
    [P] of that decode) -> its tight box + its logits -> best new mask. Pairs whose best mask is
    empty keep it (no box)."""
    best = torch.argmax(scores, dim=1)  # first on ties, as numpy.argmax in the reference
    chosen, chosen_score = pick(low_res, best), pick(scores, best)
    box, empty = pairs.mask_boxes(chosen)
    refined = pairs.decode(points, labels, box=box, mask_input=pairs.feedback(chosen), multimask=True)
    final = torch.argmax(refined.scores, dim=1)
    if object_score is None:
        object_score = torch.full_like(chosen_score, float("nan"))
    return CascadeOutput(
        torch.where(empty[:, None, None], chosen, pick(refined.low_res, final)),
        torch.where(empty, chosen_score, pick(refined.scores, final)),
        empty,
        torch.where(empty, object_score, refined.object_score),
    )


def final_mask(pairs: PairBatch, output: CascadeOutput, row: int = 0) -> np.ndarray:
    """The final [H, W] bool mask of one pair, on the host (one-image path only)."""
    group = next(g for g in pairs.groups if row in g.rows_host)
    high = pairs.to_original(output.low_res[row : row + 1, None], group)[0, 0]
    return ((high > pairs.backbone.mask_threshold) & ~output.empty[row]).cpu().numpy()
