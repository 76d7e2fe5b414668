"""Faster encoder paths, each an option measured against the fp32 path (never implied).

- fused attention: the image encoder's attention through `scaled_dot_product_attention`
  (relative-position bias passed as the additive mask), bound per module instance as a
  function over SAM's own modules;
- reduced precision: the image encoder under autocast (bf16 / fp16); features come back
  as fp32 so the location prior and the decoder stay in fp32;
- torch.compile of the image encoder.
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _fused_forward(self: Attention, x: Tensor) -> Tensor:
    """ImageEncoderViT Attention.forward via SDPA. x: [B, H, W, C] -> [B, H, W, C]."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, heads, HW, head_dim]
    bias = None
    if self.use_rel_pos:
        rel_h_pos = get_rel_pos(height, height, self.rel_pos_h)
        rel_w_pos = get_rel_pos(width, width, self.rel_pos_w)
        r_q = q.reshape(batch * self.num_heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_pos)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_pos)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(
            batch, self.num_heads, height * width, height * width
        ).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def enable_fused_attention(sam: Sam) -> int:
    """Route every image-encoder attention through SDPA -> number of modules changed."""
    changed = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed


def compile_encoder(sam: Sam) -> None:
    sam.image_encoder = torch.compile(sam.image_encoder, dynamic=False)


@contextlib.contextmanager
def encoder_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast for the image encoder; fp32 is a no-op."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield
