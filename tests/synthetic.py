"""Small generated datasets in the PerSeg and DAVIS 2017 layouts (answers known by construction)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0, 0, 0] * 253
COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def rectangles(frame: int, height: int = 64, width: int = 96) -> np.ndarray:
    """[H, W] uint8 labels: object 1 moves right, object 2 moves down, 3 px per frame."""
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[10:30, 8 + 3 * frame : 30 + 3 * frame] = 1
    labels[30 + 3 * frame : 50 + 3 * frame, 55:85] = 2
    return labels


def frame_image(labels: np.ndarray, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: mild noise background, each object in its colour."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 140, size=(*labels.shape, 3)).astype(np.uint8)
    for label, colour in COLOURS.items():
        image[labels == label] = colour
    return image


def save_palette_png(labels: np.ndarray, path: Path) -> None:
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    image.putpalette(PALETTE)
    image.save(path)


def make_davis(root: Path, sequences: dict[str, int]) -> Path:
    """DAVIS 2017 layout with `frames` frames per sequence; returns root."""
    for name, frames in sequences.items():
        images, masks = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for index in range(frames):
            labels = rectangles(index)
            Image.fromarray(frame_image(labels, index)).save(images / f"{index:05d}.jpg", quality=95)
            save_palette_png(labels, masks / f"{index:05d}.png")
    return root


def small_concept_masks(height: int, width: int, count: int) -> list[np.ndarray]:
    """The bench's own concept masks (jobs.commands.bench_tools.concept_masks, a quarter of the
    image each), each cut to a fiftieth of each side at its top-left corner: [H, W] bool.

    The bench fits its GF-SAM concepts on its own first image, so a concept's object is in the
    image it segments; with random weights a quarter-image object makes GF-SAM's location map
    flat and every pair decodes its 128-prompt maximum. Tests that check the bench's wiring
    (not its worst-case figures) patch these in: about 10-20 prompts per pair.
    """
    # imported here: the bench's helpers load the models' packages, which the other helpers of
    # this module (the sample every test session makes) do not need
    from jobs.commands.bench_tools import concept_masks

    small = []
    for mask in concept_masks(height, width, count):
        top, left = np.flatnonzero(mask.any(axis=1))[0], np.flatnonzero(mask.any(axis=0))[0]
        corner = np.zeros_like(mask)
        corner[top : top + max(1, height // 50), left : left + max(1, width // 50)] = True
        small.append(corner)
    return small
