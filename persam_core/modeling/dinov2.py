"""DINOv2 ViT/14 (no registers) through timm: build, load the official weights, frame -> tokens.

GF-SAM reads DINOv2 on a 518x518 input (a 37x37 grid of 14-px patches, so `pos_embed` is
never interpolated) and keeps only `x_prenorm`: the last block's output before the final
norm, cls token dropped. timm's `VisionTransformer` with the `vit_*_patch14_dinov2` settings
(LayerScale, qkv/proj/FFN biases, LayerNorm eps 1e-6, exact GELU) is that network; its own
`checkpoint_filter_fn` maps the official `dinov2_vit*14_pretrain.pth` keys onto it (only
`mask_token`, a training-time parameter, is dropped). `tiny` (width 64, 2 blocks) is the
same classes at test size.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F

from persam_core.speed.acceleration import encoder_precision
from persam_core.modeling.models import ModelError, fingerprint
# the sizes' owner is torch-free; the names are re-exported for the network's users
from persam_core.modeling.dinov2_sizes import (DINOV2_ARCH, DINOV2_TYPES, GRID_SIDE, INPUT_SIDE, KNOWN_SIZES,  # noqa: F401
                                               PATCH, TOKENS, arch, dinov2_width)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_SCALE_INIT = 1e-5  # DINOv2's init_values; only random weights depend on it

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer


def build_dinov2(kind: str, device: torch.device | str | None = None, init: bool = True) -> VisionTransformer:
    """The architecture of `kind` with timm's initial weights (`init=False`: left uninitialised,
    for a meta build that a state dict fills). Input [B, 3, 518, 518]."""
    # timm is imported where a DINOv2 is built, not with this module: the processes that only
    # import it (a PerSAM job's actors, the CLI) never pay for timm's import
    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    width, depth, heads = arch(kind)
    return VisionTransformer(
        img_size=INPUT_SIDE, patch_size=PATCH, embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=4.0, qkv_bias=True, init_values=LAYER_SCALE_INIT, num_classes=0,
        norm_layer=partial(LayerNorm, eps=1e-6), act_layer=torch.nn.GELU,
        weight_init="" if init else "skip", device=device,
    )


def build_random_dinov2(kind: str, seed: int) -> VisionTransformer:
    """`kind` with timm's initialisation drawn after `torch.manual_seed(seed)`, in eval mode."""
    torch.manual_seed(seed)
    return build_dinov2(kind).eval()


def official_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Our model's weights in the official key format (what `dinov2_from_state_dict` reads).

    timm keeps the official names for every tensor it has; `mask_token` [1, C] is not one of
    them (masked training only, unused at inference), so it is written as zeros."""
    state = dict(model.state_dict())
    width = state["cls_token"].shape[-1]
    state["mask_token"] = torch.zeros(1, width, dtype=state["cls_token"].dtype, device=state["cls_token"].device)
    return state


def _expected_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in official_state_dict(build_dinov2(kind, device="meta", init=False)).items()}


def _describe(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """'a DINOv2 vitb14 state dict (width 768)' when the file is recognisably DINOv2."""
    cls_token = state_dict.get("cls_token")
    if not isinstance(cls_token, torch.Tensor) or cls_token.dim() != 3 or "pos_embed" not in state_dict:
        return None
    width = int(cls_token.shape[-1])
    depth = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.") and k.split(".")[1].isdigit()), default=-1)
    registers = " with register tokens" if "register_tokens" in state_dict else ""
    kind = KNOWN_SIZES.get((width, depth))
    name = f"DINOv2 {kind}" if kind else f"DINOv2-style ({depth} blocks)"
    return f"a {name} state dict{registers} (width {width})"


def check_dinov2_state_dict(kind: str, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse, in one line naming `source`, a state dict that is not `kind` in the official
    format (checked before timm's filter, which would silently resample another grid)."""
    expected = _expected_shapes(kind)
    given = {k: tuple(v.shape) for k, v in state_dict.items()}
    optional = {"mask_token"}
    missing = sorted(set(expected) - set(given) - optional)
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in expected if k in given and given[k] != expected[k])
    if not (missing or unexpected or wrong):
        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ModelError(f"{source}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}); "
                             "the checkpoint is corrupt: download it again")
        return
    problem = (f"{missing[0]} is missing" if missing else f"{unexpected[0]} is not a tensor of it" if unexpected
               else f"{wrong[0]} has shape {list(given[wrong[0]])}, not {list(expected[wrong[0]])}")
    what = _describe(state_dict)
    if what is None:
        raise ModelError(f"{source}: not a DINOv2 state dict in the official dinov2_vit*14_pretrain.pth key format "
                         f"({problem}); pass an official DINOv2 ViT/14 checkpoint")
    if "register_tokens" in state_dict:
        raise ModelError(f"{source}: {what}, but --dinov2 {kind} has no registers; "
                         "pass the dinov2_vit*14_pretrain.pth file without registers")
    width = expected["cls_token"][-1]
    if f"(width {width})" not in what:
        raise ModelError(f"{source}: {what}, but --dinov2 {kind} expects width {width}; pass the matching --dinov2")
    raise ModelError(f"{source}: {what}, but it does not fit --dinov2 {kind} ({problem}); "
                     "pass an unmodified official-format state dict of that size")


def dinov2_from_state_dict(kind: str, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> VisionTransformer:
    """`kind` with an official-format state dict loaded strictly through timm's filter, float32, eval."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    check_dinov2_state_dict(kind, state_dict, source)
    model = build_dinov2(kind, device="meta", init=False)
    filtered = checkpoint_filter_fn(dict(state_dict), model)  # a copy: the filter pops mask_token
    model.load_state_dict(filtered, strict=True, assign=True)
    return model.float().eval()


def dinov2_fingerprint(model: torch.nn.Module, kind: str) -> str:
    """`dinov2_<kind>:<sha256 prefix>` over every tensor the forward uses (not `mask_token`), in the
    official names: a file and the model built from it agree, and so do `random:SEED` and its save."""
    state = official_state_dict(model)
    del state["mask_token"]
    return fingerprint(state, f"dinov2_{kind}")


def dinov2_input(frames: torch.Tensor) -> torch.Tensor:
    """frames: [B, 3, H, W] float in [0, 1] (GF-SAM's 1024x1024 stretch) -> pixels [B, 3, 518, 518].

    Bilinear without antialias, as torchvision 0.14's tensor Resize did for the reference
    (antialias changes the features noticeably), then ImageNet mean/std."""
    pixels = F.interpolate(frames, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False, antialias=False)
    mean = torch.tensor(IMAGENET_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


@torch.no_grad()
def prenorm_tokens(model: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [B, 3, 518, 518] -> x_prenorm [B, 1369, C]: the last block's output before the
    final norm, cls token dropped (row-major over the 37x37 grid)."""
    if tuple(pixels.shape[-2:]) != (INPUT_SIDE, INPUT_SIDE):
        raise ValueError(f"DINOv2 input must be [B, 3, {INPUT_SIDE}, {INPUT_SIDE}], got {list(pixels.shape)}")
    pixels = pixels.to(next(model.parameters()).dtype)
    (tokens,) = model.forward_intermediates(pixels, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)
    return tokens


def normalise_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, C] -> [B, N, C] with each CHANNEL divided by its L2 norm over the N tokens
    of its image (GF-SAM's `F.normalize(dim=1)`; not a per-token normalisation)."""
    return F.normalize(tokens, dim=1, p=2)


def frame_tokens(model: VisionTransformer, frames: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """frames [B, 3, 1024, 1024] in [0, 1] -> normalised tokens [B, 1369, C] float32.

    precision: the SAM image encoder's (`--precision`, acceleration.encoder_precision): the
    transformer's blocks run under that autocast ("fp32": none, GF-SAM's own path); the resize
    before them and the normalisation after them stay fp32."""
    pixels = dinov2_input(frames)
    with encoder_precision(precision, frames.device):
        tokens = prenorm_tokens(model, pixels)
    return normalise_tokens(tokens.float())


def grid_side(tokens: int) -> int:
    """37 for 1369 tokens (a square grid)."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{tokens} tokens are not a square grid")
    return side
