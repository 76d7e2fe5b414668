"""Building and loading any registered model family's models, safely, and their fingerprint.

Which model types exist and how each family builds them is `families.py`'s; this module adds
what is the same for every family: seeded random weights, safe state-dict files, strict key
and shape checks that name the file, and the weights' fingerprint.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Mapping

import torch

from persam_core.modeling.families import ModelError, implementation_of, model_types

__all__ = ["ModelError", "build_random", "build_from_state_dict", "check_architecture", "fingerprint",
           "load_state_dict_file", "model_fingerprint", "model_types"]


def build_random(model_type: str, seed: int) -> torch.nn.Module:
    """The architecture with `torch.manual_seed(seed)` initial weights (tests, offline demo):
    a segment_anything `Sam` or a sam2 `SAM2Base`."""
    implementation = implementation_of(model_type)
    torch.manual_seed(seed)
    return implementation.build(model_type).eval()


def _torch_load(path: str, mmap: bool):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_state_dict_file(path: str, family: str = "SAM") -> dict[str, torch.Tensor]:
    """Read an official `family` (SAM, DINOv2) state dict without unpickling arbitrary objects.

    torch's own error texts are never passed on: they suggest `weights_only=False`.
    """
    try:
        try:
            state = _torch_load(path, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            state = _torch_load(path, mmap=False)
    except pickle.UnpicklingError:
        raise ModelError(
            f"{path}: refused: the file holds pickled objects other than tensors (loading it could run code); "
            f"pass an official {family} state dict"
        ) from None
    except Exception:
        raise ModelError(f"{path}: not a readable PyTorch checkpoint (corrupt or truncated); pass an official {family} .pth file") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not contain a state dict of tensors; pass an official {family} checkpoint")
    return dict(state)


def check_architecture(model_type: str, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes do not match `model_type`."""
    _compare(model_type, implementation_of(model_type).skeleton(model_type).state_dict(), state_dict, source)


def _compare(model_type: str, expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
             source: str) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        detail = (missing and f"{len(missing)} missing keys (e.g. {missing[0]})") or (
            unexpected and f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})"
        ) or f"{len(wrong)} tensors of another shape (e.g. {wrong[0]})"
        raise ModelError(
            f"{source}: is not a {model_type} checkpoint ({detail}); "
            f"pass the --model-type that matches the checkpoint"
        )


def build_from_state_dict(
    model_type: str, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> torch.nn.Module:
    """Build `model_type` and load `state_dict` strictly, after a key and shape check naming `source`."""
    check_architecture(model_type, state_dict, source)
    return implementation_of(model_type).load(model_type, state_dict)


def fingerprint(state_dict: Mapping[str, torch.Tensor], model_type: str) -> str:
    """`<model_type>:<sha256 prefix>` over every tensor (name, dtype, shape, bytes), key-sorted.

    Hashing tensors rather than the file makes `random:SEED` and the same weights saved
    with `torch.save` agree, whatever the container format.
    """
    digest = hashlib.sha256(model_type.encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        # reshape: 0-d tensors (vit_t's BatchNorm counters) cannot be viewed as bytes
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return f"{model_type}:{digest.hexdigest()[:16]}"


def model_fingerprint(sam: torch.nn.Module, model_type: str) -> str:
    """Fingerprint of a built model's weights (same as of the state dict it came from)."""
    return fingerprint(sam.state_dict(), model_type)
