"""MobileSAM (`vit_t`): the TinyViT-5M image encoder + SAM's prompt encoder and mask decoder.

Module names and parameter shapes follow MobileSAM's `tiny_vit_sam.TinyViT`, so the
official `mobile_sam.pt` state dict loads with strict key matching (its unused classifier
`norm_head`/`head` included). Inference only: no drop path, no checkpointing. Unlike the
original, the attention-bias index is not a buffer (a non-persistent buffer would stay on
the meta device when models.build_from_state_dict assigns the weights) and the gathered
biases are not cached at `eval()` (the original caches them then, before a later
load_state_dict, which is how stale biases arise).

Shapes for a 1024x1024 input: patch embedding (two stride-2 convs) -> 64 x 256 x 256;
stage 0 MBConvs; merges to 128 x 128 x 128, 160 x 64 x 64, 320 x 64 x 64 (the last merge
keeps the stride at 1, as MobileSAM does); windowed attention stages; neck -> 256 x 64 x 64.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from segment_anything.modeling.common import LayerNorm2d

IMAGE_SIZE = 1024
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)


class Conv2dBN(nn.Sequential):
    """Conv (no bias) + BatchNorm, named `c` and `bn` as in TinyViT."""

    def __init__(self, in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))


class PatchEmbed(nn.Module):
    """[B, 3, S, S] -> [B, dim, S/4, S/4]."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(Conv2dBN(in_chans, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, + input. [B, C, H, W] -> same."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim)
        self.act3 = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Tokens [B, H*W, dim] (or [B, dim, H, W]) -> [B, (H/s)*(W/s), out_dim]."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.act = nn.GELU()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 3:
            height, width = self.resolution
            x = x.view(len(x), height, width, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv2(self.act(self.conv1(x))))
        return self.conv3(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


@lru_cache(maxsize=None)
def _bias_layout(window: int) -> tuple[int, tuple[int, ...]]:
    """-> (number of distinct |dy|, |dx| offsets, [N*N] offset index per query/key pair)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    index = []
    for p in points:
        for q in points:
            index.append(offsets.setdefault((abs(p[0] - q[0]), abs(p[1] - q[1])), len(offsets)))
    return len(offsets), tuple(index)


class Attention(nn.Module):
    """Multi-head self-attention in a window with learned relative-offset biases. [B, N, C] -> same."""

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.window = num_heads, dim // num_heads, window
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        count, _ = _bias_layout(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, count))
        self._index: dict[torch.device, Tensor] = {}

    def _biases(self) -> Tensor:
        """-> [heads, N, N] bias for each query/key pair of the window."""
        device = self.attention_biases.device
        if device not in self._index:
            _, index = _bias_layout(self.window)
            self._index[device] = torch.tensor(index, dtype=torch.long, device=device).view(self.window**2, -1)
        return self.attention_biases[:, self._index[device]]

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim] * 3, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attn = ((q @ k.transpose(-2, -1)) * self.scale + self._biases()).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention + depthwise 3x3 conv + MLP, residual. [B, H*W, C] -> same."""

    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, 3, 1, 1, groups=dim)

    def _windowed(self, x: Tensor) -> Tensor:
        height, width = self.resolution
        batch, tokens, channels = x.shape
        size = self.window
        if height == size and width == size:
            return self.attn(x)
        x = x.view(batch, height, width, channels)
        pad_b, pad_r = (size - height % size) % size, (size - width % size) % size
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        rows, cols = (height + pad_b) // size, (width + pad_r) // size
        x = x.view(batch, rows, size, cols, size, channels).transpose(2, 3).reshape(-1, size * size, channels)
        x = self.attn(x)
        x = x.view(batch, rows, cols, size, size, channels).transpose(2, 3).reshape(batch, rows * size, cols * size, channels)
        return x[:, :height, :width].reshape(batch, tokens, channels)

    def forward(self, x: Tensor) -> Tensor:
        height, width = self.resolution
        batch, tokens, channels = x.shape
        x = x + self._windowed(x)
        x = self.local_conv(x.transpose(1, 2).reshape(batch, channels, height, width))
        x = x.view(batch, channels, tokens).transpose(1, 2)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks, then a merge. [B, C, H, W] -> tokens."""

    def __init__(self, dim: int, depth: int, downsample: PatchMerging, expand_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Stages 1-3: TinyViT blocks, then a merge (none after the last stage)."""

    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, resolution, num_heads, window) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's image encoder: [B, 3, 1024, 1024] -> [B, 256, 64, 64]."""

    def __init__(self, img_size: int = IMAGE_SIZE, embed_dims: tuple[int, ...] = EMBED_DIMS, depths: tuple[int, ...] = DEPTHS,
                 num_heads: tuple[int, ...] = NUM_HEADS, window_sizes: tuple[int, ...] = WINDOW_SIZES,
                 num_classes: int = 1000, out_chans: int = 256) -> None:
        super().__init__()
        self.img_size = img_size  # Sam.preprocess pads to this
        self.patch_embed = PatchEmbed(3, embed_dims[0])
        side = img_size // 4
        # Resolution per stage: each merge halves it, except the last (stride 1).
        sides = [side, side // 2, side // 4, side // 4]
        self.grid = sides[-1]
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            last = i == len(embed_dims) - 1
            merge = None if last else PatchMerging(
                (sides[i], sides[i]), dim, embed_dims[i + 1], stride=1 if i + 1 == len(embed_dims) - 1 else 2)
            if i == 0:
                self.layers.append(ConvLayer(dim, depths[i], merge))
            else:
                self.layers.append(BasicLayer(dim, (sides[i], sides[i]), depths[i], num_heads[i], window_sizes[i], merge))
        # Unused by SAM, kept so that the official state dict loads strictly.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        batch, _, channels = x.shape
        x = x.view(batch, self.grid, self.grid, channels).permute(0, 3, 1, 2)
        return self.neck(x)
