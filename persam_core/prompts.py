"""SAM's prompt encoder as a function over its own modules, without host syncs.

`PromptEncoder._embed_points` selects points by label with boolean indexing
(`embedding[labels == 0] += ...`), and every boolean index reads the device (a nonzero)
before the next kernel can be queued: four waits per call, twelve per PerSAM cascade,
each leaving the GPU idle while the host catches up. Here the same additions are
`torch.where` selections: for each point exactly the same float operations happen
(x + 0.0 elsewhere is exact), so the embeddings are bit-identical to SAM's.
Boxes and masks use SAM's own `_embed_boxes` / `_embed_masks` (they never sync).
"""

from __future__ import annotations

import torch
from torch import Tensor
from segment_anything.modeling.prompt_encoder import PromptEncoder


def embed_points(encoder: PromptEncoder, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
    """PromptEncoder._embed_points. points: [P, N, 2] (1024-input pixels); labels: [P, N] -> [P, N(+1), C]."""
    points = points + 0.5  # shift to the centre of the pixel, as SAM
    if pad:
        points = torch.cat([points, torch.zeros((points.shape[0], 1, 2), device=points.device)], dim=1)
        labels = torch.cat([labels, -torch.ones((labels.shape[0], 1), device=labels.device, dtype=labels.dtype)], dim=1)
    embedding = encoder.pe_layer.forward_with_coords(points, encoder.input_image_size)
    label = labels[..., None]
    zero = embedding.new_zeros(())
    embedding = torch.where(label == -1, zero, embedding)
    embedding = embedding + torch.where(label == -1, encoder.not_a_point_embed.weight, zero)
    embedding = embedding + torch.where(label == 0, encoder.point_embeddings[0].weight, zero)
    return embedding + torch.where(label == 1, encoder.point_embeddings[1].weight, zero)


def encode_prompts(
    encoder: PromptEncoder, points: Tensor, labels: Tensor, boxes: Tensor | None, masks: Tensor | None
) -> tuple[Tensor, Tensor]:
    """PromptEncoder.forward for points (always given here), optional boxes [P, 4] and masks
    [P, 1, 256, 256] -> (sparse [P, N, C], dense [P, C, 64, 64])."""
    sparse = embed_points(encoder, points, labels, pad=boxes is None)
    if boxes is not None:
        sparse = torch.cat([sparse, encoder._embed_boxes(boxes)], dim=1)
    if masks is not None:
        dense = encoder._embed_masks(masks)
    else:
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            points.shape[0], -1, encoder.image_embedding_size[0], encoder.image_embedding_size[1]
        )
    return sparse, dense
