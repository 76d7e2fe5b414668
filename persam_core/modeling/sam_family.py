"""The SAM family: segment_anything's `Sam` (vit_h, vit_l, vit_b), MobileSAM (vit_t) and `tiny`.

`vit_h`, `vit_l`, `vit_b` are segment_anything's official builders; `tiny` uses the very
same module classes with small dimensions, so tests exercise the real code paths in
milliseconds; `vit_t` is MobileSAM's TinyViT encoder (our module, tiny_vit.py) around SAM's
prompt encoder and decoder. Every config yields features [B, 256, 64, 64].
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from persam_core.modeling.sam_backbone import SamBackbone
from persam_core.modeling.tiny_vit import TinyViT

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


def build_tiny() -> Sam:
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


BUILDERS: dict[str, Callable[[], Sam]] = {
    "vit_h": partial(sam_model_registry["vit_h"], checkpoint=None),
    "vit_l": partial(sam_model_registry["vit_l"], checkpoint=None),
    "vit_b": partial(sam_model_registry["vit_b"], checkpoint=None),
    "vit_t": _build_mobile_sam,
    "tiny": build_tiny,
}


def build(model_type: str) -> Sam:
    return BUILDERS[model_type]().eval()


def skeleton(model_type: str) -> Sam:
    """Built on the meta device: the keys and shapes without allocating weights."""
    with torch.device("meta"):
        return BUILDERS[model_type]()


def load(model_type: str, state_dict: Mapping[str, torch.Tensor]) -> Sam:
    """Assigned straight from the state dict, without a throw-away random init."""
    sam = skeleton(model_type)
    sam.load_state_dict(state_dict, strict=True, assign=True)
    return restore_pixel_constants(sam).float().eval()


def restore_pixel_constants(sam: Sam) -> Sam:
    """pixel_mean/std are non-persistent buffers: not in a state dict, so set SAM's constants."""
    sam.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
    sam.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
    return sam


def owns(model: Any) -> bool:
    return isinstance(model, Sam)


def adapter(model: Sam) -> SamBackbone:
    return SamBackbone(model)
