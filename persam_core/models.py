"""Model registry (SAM and SAM 2.1), safe weight loading and the model fingerprint.

`vit_h`, `vit_l`, `vit_b` are segment_anything's official builders; `tiny` uses the very
same module classes with small dimensions, so tests exercise the real code paths in
milliseconds. `sam2.1_t|s|b+|l` and `tiny_sam2` are built by the sam2 package's own
`build_sam2` (see `sam2_models.py`). Every config yields features [B, 256, 64, 64].
"""

from __future__ import annotations

import hashlib
import pickle
from functools import partial
from typing import Callable, Mapping

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from .options import MODEL_TYPES
from .sam2_models import SAM2_MODEL_TYPES, build_sam2_model
from .tiny_vit import TinyViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def sam_around(image_encoder: torch.nn.Module, decoder_mlp_dim: int = 2048, iou_head_hidden_dim: int = 256) -> Sam:
    """SAM's prompt encoder and mask decoder around `image_encoder` (256-d, 64x64 grid)."""
    prompt_dim, image_size = 256, 1024
    grid = image_size // 16
    prompt_encoder = PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp_dim, num_heads=8),
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return Sam(image_encoder, prompt_encoder, decoder, pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD))


def _build_tiny() -> Sam:
    """Same classes as SAM, small encoder/decoder; still 256-d features on a 64x64 grid."""
    encoder = ImageEncoderViT(
        depth=2,
        embed_dim=32,
        img_size=1024,
        mlp_ratio=2,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=2,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=(1,),
        window_size=14,
        out_chans=256,
    )
    return sam_around(encoder, decoder_mlp_dim=256, iou_head_hidden_dim=64)


def _build_mobile_sam() -> Sam:
    """MobileSAM: the TinyViT encoder with SAM's (vit_h-sized) prompt encoder and decoder."""
    return sam_around(TinyViT())


MODEL_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "vit_h": partial(sam_model_registry["vit_h"], checkpoint=None),
    "vit_l": partial(sam_model_registry["vit_l"], checkpoint=None),
    "vit_b": partial(sam_model_registry["vit_b"], checkpoint=None),
    "vit_t": _build_mobile_sam,
    "tiny": _build_tiny,
    **{model_type: partial(build_sam2_model, model_type) for model_type in SAM2_MODEL_TYPES},
}
assert tuple(MODEL_BUILDERS) == MODEL_TYPES, "options.MODEL_TYPES names the builders"


class ModelError(ValueError):
    """A model type or checkpoint that cannot be used; the message says what to do."""


def is_sam2(model_type: str) -> bool:
    return model_type in SAM2_MODEL_TYPES


def _builder(model_type: str) -> Callable[[], torch.nn.Module]:
    if model_type not in MODEL_BUILDERS:
        raise ModelError(
            f"unknown model type {model_type!r}: choose one of {', '.join(MODEL_TYPES)}"
        )
    return MODEL_BUILDERS[model_type]


def build_random(model_type: str, seed: int) -> torch.nn.Module:
    """The architecture with `torch.manual_seed(seed)` initial weights (tests, offline demo):
    a segment_anything `Sam` or a sam2 `SAM2Base`."""
    builder = _builder(model_type)
    torch.manual_seed(seed)
    return builder().eval()


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


def _skeleton(model_type: str) -> torch.nn.Module:
    """The architecture without real weights where possible. SAM builds on the meta device;
    SAM 2 is built on the CPU, because sam2 computes tensors at construction that a meta
    build cannot hold (its RoPE tables, moved to CUDA when there is one)."""
    if is_sam2(model_type):
        return _builder(model_type)()
    with torch.device("meta"):
        return _builder(model_type)()


def check_architecture(model_type: str, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a state dict whose keys or shapes do not match `model_type`."""
    _compare(model_type, _skeleton(model_type).state_dict(), state_dict, source)


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
    """Build `model_type` and load `state_dict` strictly (SAM: without a throw-away random init)."""
    if is_sam2(model_type):
        model = _skeleton(model_type)
        _compare(model_type, model.state_dict(), state_dict, source)
        model.load_state_dict(state_dict, strict=True)
        return model.float().eval()
    check_architecture(model_type, state_dict, source)
    with torch.device("meta"):
        sam = _builder(model_type)()
    sam.load_state_dict(state_dict, strict=True, assign=True)
    # pixel_mean/std are non-persistent buffers: not in the file, so restore SAM's constants.
    sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    return sam.float().eval()


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
