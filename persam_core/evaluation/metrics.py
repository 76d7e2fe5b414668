"""Mask agreement metrics."""

from __future__ import annotations

import numpy as np


def iou(first: np.ndarray, second: np.ndarray) -> float:
    """[H, W] bool x2 -> intersection over union; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(first, second).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(first, second).sum() / union)
