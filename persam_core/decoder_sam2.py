"""SAM 2's mask decoder with PerSAM's two additions, through SAM 2's own MaskDecoder.forward.

SAM 2's decoder differs from SAM's around the transformer (an object-score token before the
IoU token, high-resolution feature skips in the upscaling, a sigmoid IoU head, a stability
fallback for single-mask output), never inside it: its two-way transformer has SAM's layers.
So the decoder itself runs unchanged and only its transformer is wrapped: `enable_guidance`
replaces the transformer's `forward` (on that module instance, once) by one that reads the
guidance of the current call from a context variable; without guidance it is the class's own
forward, so a decode without guidance *is* SAM 2's decode, and the decoder's state dict,
fingerprint and every other caller (SAM2ImagePredictor, the video predictor) are untouched.

With guidance the transformer is `decoder.guided_transformer`: target-guided attention
(`softmax(softmax(QK^T / sqrt(d)) + A)` in each token->image cross-attention) and the target
embedding added to the tokens (the reference's in-place positional-encoding quirk included).
The embedding is added to every token, the object-score token included, as PerSAM adds it
to every token of SAM's decoder.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from typing import Iterator

import torch
from torch import Tensor

from .decoder import guided_transformer

# (attention_bias, target_embedding) of the decode in progress; None outside a guided decode.
_GUIDANCE: contextvars.ContextVar[tuple[Tensor | None, Tensor | None] | None] = contextvars.ContextVar(
    "persam_sam2_guidance", default=None
)


def _guided_forward(self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor) -> tuple[Tensor, Tensor]:
    guidance = _GUIDANCE.get()
    if guidance is None:
        return type(self).forward(self, image_embedding, image_pe, point_embedding)
    bias, target_embedding = guidance
    return guided_transformer(self, image_embedding, image_pe, point_embedding, bias, target_embedding)


def enable_guidance(mask_decoder: torch.nn.Module) -> None:
    """Wrap `mask_decoder.transformer` (idempotent; the weights and outputs stay SAM 2's)."""
    transformer = mask_decoder.transformer
    if getattr(transformer, "_persam_guidance", False):
        return
    transformer.forward = types.MethodType(_guided_forward, transformer)
    transformer._persam_guidance = True


@contextlib.contextmanager
def guidance(mask_decoder: torch.nn.Module, attention_bias: Tensor | None,
             target_embedding: Tensor | None) -> Iterator[None]:
    """Every decode of `mask_decoder` inside the block is guided (attention_bias: [P, 1, 1, 4096],
    target_embedding: [P, 1, 256]; both None: unguided). For callers that reach the decoder
    through sam2's own code, such as the video predictor's prompts (video_sam2.py)."""
    enable_guidance(mask_decoder)
    value = None if attention_bias is None and target_embedding is None else (attention_bias, target_embedding)
    token = _GUIDANCE.set(value)
    try:
        yield
    finally:
        _GUIDANCE.reset(token)


def decode_masks_sam2(
    mask_decoder: torch.nn.Module,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor,
    multimask_output: bool,
    high_res_features: tuple[Tensor, ...],
    attention_bias: Tensor | None = None,
    target_embedding: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SAM 2's MaskDecoder.forward for P prompts on P images, with optional PerSAM guidance.

    image_embeddings: [P, 256, 64, 64] (`image_embed`, no-memory embedding added); image_pe:
    [1, 256, 64, 64]; sparse: [P, N, 256]; dense: [P, 256, 64, 64]; high_res_features:
    ([P, 32, 256, 256], [P, 64, 128, 128]) or () for a decoder without skips;
    attention_bias: [P, 1, 1, 4096]; target_embedding: [P, 1, 256].
    Returns low-res logits [P, M, 256, 256], predicted IoU [P, M] (M = 3 or 1) and the
    object-score logit [P] (> 0: SAM 2 deems the object present).
    """
    with guidance(mask_decoder, attention_bias, target_embedding):
        masks, iou_pred, _, object_score = mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense_prompt_embeddings,
            multimask_output=multimask_output,
            repeat_image=False,
            high_res_features=list(high_res_features) if high_res_features else None,
        )
    return masks, iou_pred, object_score[:, 0]
