"""`--dinov2-checkpoint` specs -> a loaded DINOv2 and its fingerprint.

A spec is `official` (Meta's published `dinov2_vit*14_pretrain.pth` for the `--dinov2` type,
downloaded once per node into SAM's checkpoint cache, under the same lock), a local path or
any fsspec URL of a state dict in that official key format, or `random:SEED`. `tiny` is a
test configuration: it has no official file.

Meta publishes no SHA-256 for the DINOv2 files, so none is checked (as for SAM 2.1). What is
checked instead: the file loads without unpickling code, every tensor has the name and shape
of the requested size and is finite, and the fingerprint of the weights goes into every GF-SAM
concept, so features of other weights are refused later.
"""

from __future__ import annotations

import torch

from persam_core.modeling.models import ModelError, load_state_dict_file
from persam_core.modeling.dinov2 import (
    DINOV2_TYPES,
    build_random_dinov2,
    dinov2_fingerprint,
    dinov2_from_state_dict,
)

from jobs.storage.checkpoints import fetch, random_seed
from jobs.storage.redaction import redact

DINOV2_BASE = "https://dl.fbaipublicfiles.com/dinov2/"
OFFICIAL_DINOV2: dict[str, str] = {
    kind: f"{DINOV2_BASE}dinov2_{kind}/dinov2_{kind}_pretrain.pth" for kind in DINOV2_TYPES if kind != "tiny"
}


def official_dinov2_url(kind: str) -> str:
    if kind not in OFFICIAL_DINOV2:
        raise ModelError(f"no official DINOv2 checkpoint for --dinov2 {kind} (a test configuration); "
                         "pass --dinov2-checkpoint random:SEED or a file of that shape")
    return OFFICIAL_DINOV2[kind]


def load_dinov2(kind: str, checkpoint: str, device: torch.device | str,
                storage_options: dict | None = None) -> tuple[torch.nn.Module, str]:
    """(DINOv2 `kind` in eval mode on `device`, its weights' fingerprint) from a spec (see above)."""
    if kind not in DINOV2_TYPES:
        raise ModelError(f"unknown --dinov2 {kind!r}: choose one of {', '.join(DINOV2_TYPES)}")
    seed = random_seed(checkpoint)
    if seed is not None:
        model = build_random_dinov2(kind, seed)
    else:
        url = official_dinov2_url(kind) if checkpoint == "official" else checkpoint
        source = redact(url)
        path = fetch(url, storage_options)
        try:
            state = load_state_dict_file(str(path), family="DINOv2")
        except ModelError as error:  # name the file as the user gave it, not its cached copy
            raise ModelError(str(error).replace(str(path), source, 1)) from None
        model = dinov2_from_state_dict(kind, state, source=source)
    fingerprint = dinov2_fingerprint(model, kind)  # on the host: no device round trip of the weights
    return model.to(device).eval(), fingerprint


def random_dinov2_note(checkpoint: str) -> str | None:
    """The warning every output carries when the DINOv2 weights are random."""
    if random_seed(checkpoint) is None:
        return None
    return "DINOv2 weights are random (--dinov2-checkpoint random:SEED): masks are NOT meaningful; pass real DINOv2 weights"
