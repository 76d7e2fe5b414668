"""Shared fixtures: the PerSeg sample data and randomly initialised SAM models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Measured on the 2-core dev VM: one intra-op thread is faster than two (tiny decode 0.13 s vs
# 0.2-1.9 s, vit_b encode 23 s vs 29 s; the whole suite 2 min vs 6 min). PERSAM_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("PERSAM_TEST_THREADS", "1")))

SAMPLE_RELATIVE = Path("shared") / "data" / "perseg-sample"


def find_perseg_sample() -> Path | None:
    """$PERSAM_SAMPLE_DATA, else the first `shared/data/perseg-sample` above this file."""
    override = os.environ.get("PERSAM_SAMPLE_DATA")
    if override:
        path = Path(override)
        return path if (path / "Images").is_dir() else None
    for parent in Path(__file__).resolve().parents:
        candidate = parent / SAMPLE_RELATIVE
        if (candidate / "Images").is_dir() and (candidate / "Annotations").is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def perseg_sample() -> Path:
    """Root of the PerSeg sample (Images/<concept>/NN.jpg, Annotations/<concept>/NN.png)."""
    path = find_perseg_sample()
    if path is None:
        pytest.skip("perseg-sample data not found (set PERSAM_SAMPLE_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_sam():
    from persam_core.models import build_random

    return build_random("tiny", 0)


@pytest.fixture(scope="session")
def tiny_sam2():
    """SAM 2 (sam2's SAM2Base) with a shrunken Hiera trunk: SAM 2's real code paths, fast."""
    from persam_core.models import build_random

    return build_random("tiny_sam2", 0)


@pytest.fixture(scope="session")
def vit_b_sam():
    from persam_core.models import build_random

    return build_random("vit_b", 0)
