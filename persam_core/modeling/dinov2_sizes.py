"""DINOv2's sizes, torch-free: the token grid GF-SAM reads (518 x 518 input, 37 x 37 patches of
14 px) and each kind's width, depth and heads, for the CPU stages and checks that need only
these numbers (dinov2.py builds the networks)."""

from __future__ import annotations

from persam_core.modeling.families import ModelError
from persam_core.speed.options import DINOV2_TYPES  # the CLI's names, torch-free

PATCH = 14
GRID_SIDE = 37
INPUT_SIDE = GRID_SIDE * PATCH  # 518
TOKENS = GRID_SIDE * GRID_SIDE  # 1369

# kind -> (width, depth, heads), as timm's vit_{small,base,large}_patch14_dinov2.
DINOV2_ARCH: dict[str, tuple[int, int, int]] = {
    "vitl14": (1024, 24, 16),
    "vitb14": (768, 12, 12),
    "vits14": (384, 12, 6),
    "tiny": (64, 2, 2),
}
assert tuple(DINOV2_ARCH) == DINOV2_TYPES, "options.DINOV2_TYPES names the sizes"
# Widths and depths of the published DINOv2 sizes, to name what a wrong file holds.
KNOWN_SIZES = {(w, d): kind for kind, (w, d, _) in DINOV2_ARCH.items()} | {(1536, 40): "vitg14"}


def arch(kind: str) -> tuple[int, int, int]:
    if kind not in DINOV2_ARCH:
        raise ModelError(f"unknown DINOv2 type {kind!r}: choose one of {', '.join(DINOV2_TYPES)}")
    return DINOV2_ARCH[kind]


def dinov2_width(kind: str) -> int:
    """C, the token width of `kind` (1024 for vitl14)."""
    return arch(kind)[0]
