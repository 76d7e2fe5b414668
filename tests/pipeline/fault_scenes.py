"""Scenes for the commit-protocol fault tests of both outputs (folder and table): images,
concepts with a given fingerprint, and the writer's death."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from persam_core.concept import Concept

CONCEPTS = ("cat", "dog")


class Killed(BaseException):
    """The writer's death: not an Exception, so no handler of the product swallows it."""


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)


def write_concepts(folder: Path, fingerprint: str) -> list[Path]:
    """-> one PerSAM concept file per name of CONCEPTS, fitted (so to speak) with `fingerprint`."""
    paths = []
    for index, name in enumerate(CONCEPTS):
        feature = np.random.default_rng(100 + index).standard_normal(256).astype(np.float32)
        feature /= np.linalg.norm(feature)
        path = folder / f"{name}.json"
        path.write_text(Concept(name, "persam", feature, feature, fingerprint).to_json())
        paths.append(path)
    return paths
