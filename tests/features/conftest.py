"""Fixtures of the feature tests: concepts computed in-process with the tiny random model."""

from __future__ import annotations

import numpy as np
import pytest

from feature_tools import load_pair
from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
from persam_core.models import model_fingerprint
from persam_core.persam import ConceptTensors
from persam_core.predictor import encode_images
from persam_core.preprocess import resize_longest_side


@pytest.fixture(scope="session")
def fingerprint(tiny_sam) -> str:
    return model_fingerprint(tiny_sam, "tiny")


@pytest.fixture(scope="session")
def concepts(perseg_sample, tiny_sam, fingerprint) -> dict[str, ConceptTensors]:
    """PerSAM concepts from each sample concept's 00 shot, plus a PerSAM-F one (fixed weights)."""
    made = {}
    for name in ("cat", "duck_toy", "colorful_sneaker"):
        image, mask = load_pair(perseg_sample, name, "00")
        cells = reference_cells(encode_images(tiny_sam, [resize_longest_side(image)]), [mask], ["mask"])
        feature, embedding = persam_targets(cells)
        made[name] = ConceptTensors.on(Concept(name, "persam", feature.numpy(), embedding.numpy(), fingerprint), "cpu")
        if name == "duck_toy":
            made["duck_f"] = ConceptTensors.on(Concept(
                "duck_f", "persam-f", persam_f_target_feature(cells).numpy(), embedding.numpy(), fingerprint,
                mask_weights=np.array([0.2, 0.3, 0.5], dtype=np.float32)), "cpu")
    return made
