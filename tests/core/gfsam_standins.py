"""Deterministic stand-ins for GF-SAM tests (the GF-SAM contract section 10).

Random SAM weights give one image-wide mask whatever the prompt, so every point lands in one
group. `standin_decoder` turns a segment_anything `Sam`'s prompt encoder and mask decoder, in
place and until the `with` block ends, into a function of the prompt point: each prompt's
low-res logits are those of a disc, `shape(points)` -> (cx, cy, r) in 1024-frame pixels
(r <= 0: an empty mask). It works through SAM's own module structure, so it holds for
SamPredictor, for `MaskDecoder.forward` and for any code that calls the same submodules:
  - the point's positional encoding is its (x + 0.5, y + 0.5) in channels 0 and 1, every
    learned embedding is zero, the image encoding's positional grid is zero;
  - the two-way transformer has no layers; its final attention copies the point token onto
    the mask tokens (they are zero, so the copy is exact);
  - the upscaling ignores the image and yields the features [1, u, v, u^2 + v^2] of each
    256x256 low-res pixel centre, and the hypernetwork turns the point's disc into the
    coefficients of r^2 - (u - cx)^2 - (v - cy)^2 (centred units, to keep float32 error small).
The 1024 mask is SAM's bilinear upsampling of those logits, so it is a disc up to a pixel.

`TokenStandIn` is a tiny deterministic DINOv2 stand-in (pixels [B, 3, 518, 518] -> patch tokens
[B, 1369, C]) for tests that must not depend on a real DINOv2 module: tokens follow each 14 px
patch's mean colour, so equal colours give equal tokens.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn
from torch.nn import functional as F

ShapeFn = Callable[[Tensor], Tensor]  # points [B, 2] (SAM's x + 0.5, y + 0.5) -> [B, 3] (cx, cy, r)
FRAME = 1024
LOW_RES = 256


# ---- shapes ----------------------------------------------------------------------------


def disc_around_point(radius: float) -> ShapeFn:
    """A disc of `radius` px centred on the prompt point."""
    return lambda points: torch.cat([points, torch.full_like(points[:, :1], float(radius))], dim=1)


def fixed_disc(cx: float, cy: float, radius: float) -> ShapeFn:
    """The same disc whatever the prompt."""
    return lambda points: points.new_tensor([cx, cy, radius]).expand(points.shape[0], 3)


def empty_mask() -> ShapeFn:
    """An empty mask whatever the prompt."""
    return fixed_disc(0.0, 0.0, 0.0)


def nearest_centre_disc(centres: Sequence[tuple[float, float]], radius: float) -> ShapeFn:
    """A disc of `radius` around the centre nearest to the point (first on ties): every
    point near one centre gets the same mask, a group per covered centre."""

    def shape(points: Tensor) -> Tensor:
        table = points.new_tensor(centres)  # [K, 2]
        nearest = torch.cdist(points, table).argmin(dim=1)
        return torch.cat([table[nearest], torch.full_like(points[:, :1], float(radius))], dim=1)

    return shape


def by_region(regions: Sequence[tuple[tuple[float, float, float, float], ShapeFn]], default: ShapeFn) -> ShapeFn:
    """The first region (x0, y0, x1, y1) holding the point (x0 <= x < x1, y0 <= y < y1) picks
    the shape; `default` elsewhere."""

    def shape(points: Tensor) -> Tensor:
        result = default(points).clone()
        taken = torch.zeros(points.shape[0], dtype=torch.bool, device=points.device)
        for (x0, y0, x1, y1), fn in regions:
            inside = (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)
            inside &= ~taken
            result[inside] = fn(points)[inside].to(result.dtype)
            taken |= inside
        return result

    return shape


# ---- SAM stand-in modules ---------------------------------------------------------------


class _CoordinateEncoding(nn.Module):
    """PositionEmbeddingRandom's interface: a point's encoding is its raw coordinates."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("anchor", torch.zeros(()))  # the device of get_dense_pe's grid

    def forward(self, size: tuple[int, int]) -> Tensor:
        return torch.zeros(self.dim, size[0], size[1], device=self.anchor.device)

    def forward_with_coords(self, coords: Tensor, image_size: tuple[int, int]) -> Tensor:
        out = torch.zeros(*coords.shape[:-1], self.dim, device=coords.device, dtype=torch.float32)
        out[..., :2] = coords.float()
        return out


class _CopyPointToMaskTokens(nn.Module):
    """The final token->image attention: q = 2 * tokens there, so q / 2 is the point token."""

    def __init__(self, first_mask: int, mask_tokens: int) -> None:
        super().__init__()
        self.first_mask, self.mask_tokens = first_mask, mask_tokens

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = torch.zeros_like(q)
        point = self.first_mask + self.mask_tokens
        out[:, self.first_mask : point] = (q[:, point : point + 1] * 0.5).expand(-1, self.mask_tokens, -1)
        return out


class _PixelFeatures(nn.Module):
    """Upscaling stand-in: [B, 256, 64, 64] -> [B, channels, 256, 256] = (1, u, v, u^2 + v^2, 0...)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, src: Tensor) -> Tensor:
        centres = (torch.arange(LOW_RES, device=src.device, dtype=torch.float32) + 0.5) / LOW_RES - 0.5
        v, u = torch.meshgrid(centres, centres, indexing="ij")
        out = torch.zeros(1, self.channels, LOW_RES, LOW_RES, device=src.device, dtype=src.dtype)
        out[:, 0], out[:, 1], out[:, 2], out[:, 3] = 1.0, u, v, u * u + v * v
        return out.expand(src.shape[0], -1, -1, -1)  # the same for every prompt: no copies


class _DiscCoefficients(nn.Module):
    """Hypernetwork stand-in: point token [B, 256] -> [B, channels] coefficients of the disc."""

    def __init__(self, shape: ShapeFn, channels: int) -> None:
        super().__init__()
        self.shape, self.channels = shape, channels

    def forward(self, token: Tensor) -> Tensor:
        disc = self.shape(token[:, :2].float()).float()
        cx, cy = disc[:, 0] / FRAME - 0.5, disc[:, 1] / FRAME - 0.5
        r = disc[:, 2] / FRAME
        out = torch.zeros(token.shape[0], self.channels, device=token.device, dtype=torch.float32)
        filled = disc[:, 2] > 0
        out[:, 0] = torch.where(filled, r * r - cx * cx - cy * cy, torch.full_like(r, -1.0))
        out[:, 1] = torch.where(filled, 2 * cx, torch.zeros_like(cx))
        out[:, 2] = torch.where(filled, 2 * cy, torch.zeros_like(cy))
        out[:, 3] = torch.where(filled, -torch.ones_like(r), torch.zeros_like(r))
        return out.to(token.dtype)


class _ZeroIoU(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, token: Tensor) -> Tensor:
        return token.new_zeros(token.shape[0], self.outputs)


def _zero_embedding(original: nn.Embedding) -> nn.Embedding:
    embedding = nn.Embedding(original.num_embeddings, original.embedding_dim).to(original.weight.device)
    nn.init.zeros_(embedding.weight)
    return embedding


@contextmanager
def standin_decoder(sam: Sam, shape: ShapeFn) -> Iterator[Sam]:
    """Inside the block, every prompt's masks are `shape`'s disc (see the module docstring)."""
    encoder, decoder = sam.prompt_encoder, sam.mask_decoder
    transformer = decoder.transformer
    dim = encoder.embed_dim
    channels = decoder.transformer_dim // 8
    swaps = [
        (encoder, "pe_layer", _CoordinateEncoding(dim).to(encoder.no_mask_embed.weight.device)),
        (encoder, "point_embeddings", nn.ModuleList(_zero_embedding(e) for e in encoder.point_embeddings)),
        (encoder, "not_a_point_embed", _zero_embedding(encoder.not_a_point_embed)),
        (encoder, "no_mask_embed", _zero_embedding(encoder.no_mask_embed)),
        (decoder, "iou_token", _zero_embedding(decoder.iou_token)),
        (decoder, "mask_tokens", _zero_embedding(decoder.mask_tokens)),
        (decoder, "output_upscaling", nn.Sequential(_PixelFeatures(channels))),
        (decoder, "output_hypernetworks_mlps",
         nn.ModuleList(_DiscCoefficients(shape, channels) for _ in range(decoder.num_mask_tokens))),
        (decoder, "iou_prediction_head", _ZeroIoU(decoder.num_mask_tokens)),
        (transformer, "layers", nn.ModuleList()),
        (transformer, "final_attn_token_to_image", _CopyPointToMaskTokens(1, decoder.num_mask_tokens)),
        (transformer, "norm_final_attn", nn.Identity()),
    ]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in swaps]
    try:
        for owner, name, module in swaps:
            setattr(owner, name, module)
        yield sam
    finally:
        for owner, name, module in originals:
            setattr(owner, name, module)


def disc_mask(cx: float, cy: float, radius: float) -> Tensor:
    """The stand-in's disc as SAM's postprocessing renders it: [1024, 1024] bool (for tests)."""
    shape = _DiscCoefficients(fixed_disc(cx, cy, radius), 4)
    logits = (shape(torch.zeros(1, 2)) @ _PixelFeatures(4)(torch.zeros(1, 1)).flatten(2)).view(1, 1, LOW_RES, LOW_RES)
    return F.interpolate(logits, size=(FRAME, FRAME), mode="bilinear", align_corners=False)[0, 0] > 0


# ---- DINOv2 stand-in -----------------------------------------------------------------------


class TokenStandIn(nn.Module):
    """pixels [B, 3, 518, 518] -> [B, 1369, dim]: a fixed random MLP of each 14 px patch's mean colour."""

    is_token_standin = True  # gfsam_oracle calls it directly (no DINOv2 forward)

    def __init__(self, seed: int = 0, dim: int = 32) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = nn.Parameter(torch.randn(3, dim, generator=generator), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(dim, generator=generator), requires_grad=False)
        self.second = nn.Parameter(torch.randn(dim, dim, generator=generator) / dim**0.5, requires_grad=False)

    def forward(self, pixels: Tensor) -> Tensor:
        colours = F.avg_pool2d(pixels, kernel_size=14).flatten(2).transpose(1, 2)  # [B, 1369, 3]
        return torch.tanh(colours @ self.first + self.bias) @ self.second


class FixedTokens(nn.Module):
    """pixels [B, 3, 518, 518] -> the given tokens [1369, C] for every image (priors by design)."""

    is_token_standin = True

    def __init__(self, tokens: Tensor) -> None:
        super().__init__()
        self.register_buffer("tokens", tokens.float())

    def forward(self, pixels: Tensor) -> Tensor:
        return self.tokens.expand(pixels.shape[0], -1, -1).clone()


def two_kind_tokens(foreground_cells: Sequence[tuple[int, int]], grid: int = 37, dim: int = 4) -> Tensor:
    """[grid * grid, dim] tokens: e0 at the given (x, y) cells, e1 elsewhere. Each token has one
    non-zero channel, so the token-axis normalisation keeps every cosine at exactly 0 or 1."""
    tokens = torch.zeros(grid * grid, dim)
    tokens[:, 1] = 1.0
    for x, y in foreground_cells:
        tokens[y * grid + x] = 0.0
        tokens[y * grid + x, 0] = 1.0
    return tokens


def cells_mask(x0: int, y0: int, x1: int, y1: int, grid: int = 37) -> Tensor:
    """[1024, 1024] bool covering exactly the grid cells x0..x1, y0..y1 (inclusive) for both of
    GF-SAM's samplings: nearest 1024 -> 37 hits those cells only, and their bilinear footprint
    is 1 there (up to float rounding at a few cells) and exactly 0 elsewhere (the box spans each
    cell's nearest pixel and both pixels of its bilinear sample)."""
    scale = torch.tensor(FRAME, dtype=torch.float32) / grid

    def first(cell: int) -> int:  # torch's legacy nearest source pixel
        return int(torch.floor(torch.tensor(float(cell)) * scale))

    def last(cell: int) -> int:  # the upper pixel of the bilinear sample (align_corners False)
        return int(torch.floor(scale * (cell + 0.5) - 0.5)) + 1

    mask = torch.zeros(FRAME, FRAME, dtype=torch.bool)
    mask[first(y0) : last(y1) + 1, first(x0) : last(x1) + 1] = True
    return mask


def hand_reference(cells: Sequence[tuple[int, int]]) -> dict:
    """A one-shot oracle reference: tokens e0 on `cells` (e1 elsewhere), wpos 1 on `cells`."""
    tokens = two_kind_tokens(cells)
    wpos = torch.zeros(37 * 37)
    for x, y in cells:
        wpos[y * 37 + x] = 1.0
    return {"tokens": tokens[None], "wpos": wpos[None], "wneg": 1 - wpos[None]}
