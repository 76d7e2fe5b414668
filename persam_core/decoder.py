"""SAM's mask decoder with PerSAM's two additions, as a function over SAM's own modules.

Target-guided attention: in each two-way layer's token->image cross-attention,
`attn = softmax(softmax(QK^T / sqrt(d)) + A)` with A the attention bias of the prior.

Target-semantic prompting with the target embedding e, reproducing the reference's
in-place quirk: it adds e to the token queries *in place* before each two-way layer,
and that tensor is also the tokens' positional encoding, so every attention after the
first add uses `tokens + e` (added once) as positional encoding, while the queries get
e before each layer, and the final token->image query gets e once more.

With `attention_bias=None` and `target_embedding=None` this is SAM's MaskDecoder: bit for bit
for one prompt; for several, to float rounding. One prompt (the batch of one, which the
oracle tests compare with SAM bit for bit) runs SAM's own modules as they are. Several
prompts (the batched cascade) take a path that moves fewer bytes, because at many pairs
the decoder is paced by memory traffic over its [P, 4096, 256] image tokens, not by its
matrix products:
- the image tokens run contiguous (see `guided_transformer`);
- attention without a bias is one `scaled_dot_product_attention` over the module's own
  projections, which reads the heads as strided views; SAM's forward copies each head
  split and materialises the attention map (SAM 2's module does the same as ours);
- the upscaling's LayerNorm2d is one `layer_norm` over the channels (SAM's is eight
  elementwise passes over [P, 64, 128, 128]).
SAM's own batched calls differ from its single ones as much (batching changes the GEMMs):
the batched tests hold several pairs to each pair alone (1e-5 on logits).
`guided_transformer` is shared with SAM 2 (`decoder_sam2.py`): both two-way transformers have
the same layers, and an attention without bias is the module's own forward (SAM: softmax
attention, SAM 2: scaled_dot_product_attention), so guidance off is each model exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer


def _attend(attention: Attention, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None,
            fused: bool = False) -> Tensor:
    """The module's own forward; with a bias, softmax attention plus the reference's second
    softmax over `attn + bias` (SAM 2's fused attention cannot take a bias after its softmax).
    fused (several pairs, no bias): SAM's attention as one scaled_dot_product_attention over
    its own projections (same scale, 1 / sqrt(head dim)); SAM 2's module is that already."""
    if bias is None and not (fused and type(attention) is Attention):
        return attention(q, k, v)
    q = attention._separate_heads(attention.q_proj(q), attention.num_heads)
    k = attention._separate_heads(attention.k_proj(k), attention.num_heads)
    v = attention._separate_heads(attention.v_proj(v), attention.num_heads)
    if bias is None:
        return attention.out_proj(attention._recombine_heads(F.scaled_dot_product_attention(q, k, v)))
    attn = q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    attn = torch.softmax(attn + bias, dim=-1)
    return attention.out_proj(attention._recombine_heads(attn @ v))


def _two_way_layer(
    layer: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, bias: Tensor | None,
    fused: bool = False,
) -> tuple[Tensor, Tensor]:
    """TwoWayAttentionBlock.forward with the bias on the token->image cross-attention."""
    if layer.skip_first_layer_pe:
        queries = _attend(layer.self_attn, queries, queries, queries, fused=fused)
    else:
        q = queries + query_pe
        queries = queries + _attend(layer.self_attn, q, q, queries, fused=fused)
    queries = layer.norm1(queries)

    # SAM adds keys + key_pe twice per layer with the keys unchanged in between: once here
    # is the same tensor, one [P, 4096, 256] pass less
    q, k = queries + query_pe, keys + key_pe
    queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, q, k, keys, bias, fused))
    queries = layer.norm3(queries + layer.mlp(queries))

    q = queries + query_pe
    keys = layer.norm4(keys + _attend(layer.cross_attn_image_to_token, k, q, queries, fused=fused))
    return queries, keys


def guided_transformer(
    transformer: TwoWayTransformer,
    image_embedding: Tensor,
    image_pe: Tensor,
    tokens: Tensor,
    bias: Tensor | None,
    target_embedding: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """TwoWayTransformer.forward with PerSAM's guidance, over SAM's or SAM 2's transformer.

    image_embedding: [B, 256, 64, 64]; image_pe: [1 or B, 256, 64, 64]; tokens: [B, N, 256];
    bias: [1 or B, 1, 1, 4096]; target_embedding: [1 or B, 1, 256]
    -> (tokens [B, N, 256], image tokens [B, 4096, 256]).
    """
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    several = keys.shape[0] > 1
    if several:
        # Several pairs: token-major and contiguous once. SAM's permuted view sends each
        # projection of the first layer through a batched GEMM over transposed matrices,
        # with copies, and each add over strides (copies and adds were ~40 % of the
        # decoder's GPU time at 128 pairs on an H100). One pair keeps SAM's layout, where
        # the view folds into one transposed GEMM: the oracle tests compare that bit for bit
        # with SAM. Several pairs never matched one bit for bit (batching changes the GEMMs);
        # the batched tests hold them to the one-at-a-time masks (IoU >= 0.999). The batched
        # cascade hands its features over channels-last (pairs.py), so this copies nothing.
        keys = keys.contiguous()
    # The positional encoding is the same for every pair: one contiguous [1, 4096, 256] copy
    # that broadcasts, instead of SAM's B repeats (same values, same adds).
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    queries = tokens
    # The reference's in-place add makes the positional encoding `tokens + e`, added once.
    query_pe = tokens if target_embedding is None else tokens + target_embedding
    for layer in transformer.layers:
        if target_embedding is not None:
            queries = queries + target_embedding
        queries, keys = _two_way_layer(layer, queries, keys, query_pe, key_pe, bias, several)
    q = queries + query_pe
    if target_embedding is not None:
        q = q + target_embedding
    queries = queries + _attend(transformer.final_attn_token_to_image, q, keys + key_pe, keys, fused=several)
    return transformer.norm_final_attn(queries), keys


def _upscale(upscaling: nn.Sequential, src: Tensor) -> Tensor:
    """The decoder's output_upscaling for several pairs: its LayerNorm2d as one layer_norm over
    the channels (same normalisation, float rounding apart), every other module its own.

    src: [P, 256, 64, 64], channels-last strides (the transformer's contiguous tokens) ->
    [P, 32, 256, 256]. The transposed convolutions keep channels-last, so the channel axis
    is innermost and `layer_norm` reads it without a copy.
    """
    x = src
    for module in upscaling:
        if isinstance(module, LayerNorm2d):
            x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], module.weight, module.bias, module.eps)
            x = x.permute(0, 3, 1, 2)
        else:
            x = module(x)
    return x


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor,
    multimask_output: bool,
    attention_bias: Tensor | None = None,
    target_embedding: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MaskDecoder.forward with optional PerSAM guidance.

    image_embeddings: [1 or B, 256, 64, 64]; image_pe: [1, 256, 64, 64];
    sparse_prompt_embeddings: [B, N, 256]; dense_prompt_embeddings: [B, 256, 64, 64];
    attention_bias: [1 or B, 1, 1, 4096]; target_embedding: [1 or B, 1, 256].
    Returns low-res mask logits [B, M, 256, 256] and predicted IoUs [B, M] (M = 3 or 1).
    """
    batch = sparse_prompt_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)
    if image_embeddings.shape[0] == batch:
        src = image_embeddings
    else:  # one image, B prompts: SAM's repeat_interleave
        src = torch.repeat_interleave(image_embeddings, batch, dim=0)
    src = src + dense_prompt_embeddings
    b, c, h, w = src.shape
    # image_pe stays [1, ...] and broadcasts in the adds: SAM's repeat_interleave writes B copies
    hs, src = guided_transformer(decoder.transformer, src, image_pe, tokens, attention_bias, target_embedding)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + decoder.num_mask_tokens), :]

    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled = _upscale(decoder.output_upscaling, src) if batch > 1 else decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    # flatten: a view in either layout (several pairs: channels-last, which the product reads strided)
    masks = (hyper_in @ upscaled.flatten(2)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)

    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, mask_slice], iou_pred[:, mask_slice]
