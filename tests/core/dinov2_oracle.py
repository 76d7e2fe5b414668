"""A plain functional DINOv2 ViT/14 forward, written from the official key layout alone.

No timm, no module classes: a patch conv, cls token + learned positions, then per block
`x += ls1 * attn(norm1(x))` and `x += ls2 * mlp(norm2(x))`, and NO final norm (GF-SAM reads
`x_prenorm`). Tests compare the product's timm model against it.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

EPS = 1e-6  # DINOv2's LayerNorm eps


def _attention(x: torch.Tensor, s: Mapping[str, torch.Tensor], p: str, heads: int) -> torch.Tensor:
    batch, tokens, width = x.shape
    qkv = F.linear(x, s[p + "qkv.weight"], s[p + "qkv.bias"]).reshape(batch, tokens, 3, heads, width // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, d]
    weights = torch.softmax((q * (width // heads) ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, s[p + "proj.weight"], s[p + "proj.bias"])


def _mlp(x: torch.Tensor, s: Mapping[str, torch.Tensor], p: str) -> torch.Tensor:
    hidden = F.gelu(F.linear(x, s[p + "fc1.weight"], s[p + "fc1.bias"]))  # exact (erf) GELU
    return F.linear(hidden, s[p + "fc2.weight"], s[p + "fc2.bias"])


def _norm(x: torch.Tensor, s: Mapping[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s[p + "weight"], s[p + "bias"], EPS)


@torch.no_grad()
def oracle_prenorm(state: Mapping[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """state: official-format DINOv2 weights; pixels [B, 3, 518, 518] -> x_prenorm [B, 1369, C]."""
    s = {k: v.double() for k, v in state.items()}
    x = F.conv2d(pixels.double(), s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)  # [B, 1369, C], row-major over the grid
    x = torch.cat([s["cls_token"].expand(len(x), -1, -1), x], dim=1) + s["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}."
        x = x + s[p + "ls1.gamma"] * _attention(_norm(x, s, p + "norm1."), s, p + "attn.", heads)
        x = x + s[p + "ls2.gamma"] * _mlp(_norm(x, s, p + "norm2."), s, p + "mlp.")
    return x[:, 1:].float()


def scrambled(state: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`state` with LayerScale, norms and biases drawn away from their init, so every block
    and every affine term visibly changes the output (init LayerScale is 1e-5)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in state.items():
        noise = torch.randn(value.shape, generator=generator)
        if name.endswith("gamma"):
            value = 0.5 * noise
        elif ".norm" in name or name.startswith("norm."):
            value = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.2 * noise
        elif name.endswith("bias"):
            value = 0.1 * noise
        out[name] = value.clone()
    return out
