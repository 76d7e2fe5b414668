"""GF-SAM's reference side (fit): what a concept keeps once its reference images are gone.

Per shot: the token-normalised DINOv2 tokens T [1369, C] and two 37 x 37 weight maps, the
reference mask (wpos) and its complement (wneg), bilinearly resized from the 1024 frame with
align_corners=True (the GF-SAM contract §3). Everything predict needs is here: the positive priors use
the tokens with wpos > 0, the negative one those with wneg > 0, together the whole grid.

`ConceptStack` is K references on the device, every shot of every concept in one matrix, so
that the priors of all K concepts on an image are one matrix product (gfsam_priors.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..modeling.dinov2_sizes import GRID_SIDE, TOKENS  # noqa: F401  (GF-SAM's grid is DINOv2's; re-exported)
from . import gfsam_quirks
from .registry import FRAME_SIDE

# An all-empty reference (every shot) gets this 14 x 14 square at the frame's centre (upstream).
_RESCUE = slice(FRAME_SIDE // 2 - 7, FRAME_SIDE // 2 + 7)


@dataclass(frozen=True)
class GFSAMReference:
    """One concept. tokens: [S, 1369, C] float32 (token-axis normalised DINOv2 x_prenorm);
    wpos, wneg: [S, 1369] float32 weights of the reference mask and of its complement."""

    tokens: np.ndarray
    wpos: np.ndarray
    wneg: np.ndarray

    @property
    def shots(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def width(self) -> int:
        return int(self.tokens.shape[2])


def reference_weights(masks_1024: Tensor) -> tuple[Tensor, Tensor]:
    """masks_1024: [S, 1024, 1024] 0/1 -> (wpos [S, 1369], wneg [S, 1369]), with the all-empty rule.

    If every shot's mask is empty, the centre square is set in every shot (one empty shot
    among non-empty ones stays empty). The weights sample the mask every 1023/36 px
    (align_corners=True): a thin mask between the samples gets all-zero weights."""
    masks = masks_1024.to(torch.float32).clone()
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (FRAME_SIDE, FRAME_SIDE):
        raise ValueError(f"reference masks must be [S, {FRAME_SIDE}, {FRAME_SIDE}], got {list(masks.shape)}")
    quirks = gfsam_quirks.FAITHFUL
    if quirks.joint_empty_rule:
        if not bool(masks.any()):
            masks[:, _RESCUE, _RESCUE] = 1
    else:  # quirk 6 off (tests only): each empty shot rescued on its own
        empty = ~masks.flatten(1).any(1)
        masks[empty, _RESCUE, _RESCUE] = 1
    corners = quirks.align_corners_weights
    size = (GRID_SIDE, GRID_SIDE)
    wpos = F.interpolate(masks[:, None], size, mode="bilinear", align_corners=corners)
    wneg = F.interpolate((1 - masks)[:, None], size, mode="bilinear", align_corners=corners)
    return wpos.flatten(1), wneg.flatten(1)


def fit_reference(tokens: Tensor, masks_1024: Tensor) -> GFSAMReference:
    """tokens: [S, 1369, C] normalised (dinov2.frame_tokens); masks_1024: [S, 1024, 1024]
    (gfsam_frames.frame_mask of each shot) -> the concept's GFSAMReference (host numpy)."""
    if tokens.dim() != 3 or tokens.shape[1] != TOKENS:
        raise ValueError(f"reference tokens must be [S, {TOKENS}, C], got {list(tokens.shape)}")
    if masks_1024.shape[0] != tokens.shape[0]:
        raise ValueError(f"{tokens.shape[0]} reference images but {masks_1024.shape[0]} masks")
    wpos, wneg = reference_weights(masks_1024.to(tokens.device))
    return GFSAMReference(
        tokens.detach().to("cpu", torch.float32).numpy(),
        wpos.to("cpu").numpy(),
        wneg.to("cpu").numpy(),
    )


@dataclass(frozen=True)
class ConceptStack:
    """K concepts on the device, shots concatenated concept by concept (Σ = all shots).

    tokens: [Σ, 1369, C]; norms: [Σ, 1369] (per-token L2 norm over C, for the cosine);
    wpos, wneg: [Σ, 1369]; shots: (S_k) per concept, host; offsets: first shot of each concept."""

    tokens: Tensor
    norms: Tensor
    wpos: Tensor
    wneg: Tensor
    shots: tuple[int, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(v) for v in np.cumsum((0,) + self.shots[:-1]))

    def __len__(self) -> int:
        return len(self.shots)

    @classmethod
    def of(cls, references: Sequence[GFSAMReference], device: torch.device | str) -> "ConceptStack":
        if not references:
            raise ValueError("no GF-SAM concepts given")
        widths = {r.width for r in references}
        if len(widths) != 1:
            raise ValueError(f"GF-SAM concepts of different DINOv2 widths {sorted(widths)}: fit them with one DINOv2")
        tokens = torch.cat([torch.as_tensor(r.tokens, dtype=torch.float32) for r in references]).to(device)
        return cls(
            tokens,
            torch.linalg.vector_norm(tokens, dim=-1),
            torch.cat([torch.as_tensor(r.wpos, dtype=torch.float32) for r in references]).to(device),
            torch.cat([torch.as_tensor(r.wneg, dtype=torch.float32) for r in references]).to(device),
            tuple(r.shots for r in references),
        )


def as_stack(references: "Sequence[GFSAMReference] | ConceptStack", device: torch.device) -> ConceptStack:
    """References (host) or an existing stack -> a ConceptStack on `device` (a stack is reused:
    a job stacks its concepts once, not per batch)."""
    if isinstance(references, ConceptStack):
        return references if references.tokens.device == device else ConceptStack(
            *(t.to(device) for t in (references.tokens, references.norms, references.wpos, references.wneg)),
            references.shots)
    return ConceptStack.of(references, device)
