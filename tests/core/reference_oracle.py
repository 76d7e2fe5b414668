"""Test oracle: a literal transcription of the reference PerSAM's per-image behaviour.

Reference: github.com/ZrrSkywalker/Personalize-SAM (persam.py, persam_f.py,
per_segment_anything/predictor.py, modeling/transformer.py, modeling/mask_decoder.py).
Each `_ref_*` function is the body of the reference method of that name, `self` being the
matching module of a segment_anything `Sam`; nothing in persam_core is used.

Kept literal on purpose, quirks included:
  - `queries += target_embedding` is in place on the tensor that is also `point_embedding`,
    so the positional encoding becomes `tokens + e` from the first layer on;
  - the target-guided attention is `softmax(softmax(QK^T / sqrt(d)) + attn_sim)`;
  - points come from `topk`, boxes from `np.nonzero` (an empty mask raises, as there).
`Quirks` turns the first two off, so tests can prove that they change the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

Encoder = Callable[[np.ndarray], Tensor]  # RGB uint8 [H, W, 3] -> features [1, 256, 64, 64]
Prediction = tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]


@dataclass(frozen=True)
class Quirks:
    """inplace_pe: the reference's aliasing add; double_softmax: its second softmax."""

    inplace_pe: bool = True
    double_softmax: bool = True


REFERENCE = Quirks()


# ---- modeling/transformer.py ----------------------------------------------------------


def _ref_attention(self, q, k, v, attn_sim=None, quirks: Quirks = REFERENCE) -> Tensor:
    q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
    q, k, v = (self._separate_heads(x, self.num_heads) for x in (q, k, v))
    attn = q @ k.permute(0, 1, 3, 2)  # B x N_heads x N_tokens x N_tokens
    attn = attn / math.sqrt(q.shape[-1])
    if attn_sim is not None and not quirks.double_softmax:
        attn = torch.softmax(attn + attn_sim, dim=-1)  # variant: the bias on the logits
    else:
        attn = torch.softmax(attn, dim=-1)
        if attn_sim is not None:
            attn = attn + attn_sim
            attn = torch.softmax(attn, dim=-1)
    return self.out_proj(self._recombine_heads(attn @ v))


def _ref_block(self, queries, keys, query_pe, key_pe, attn_sim, quirks: Quirks) -> tuple[Tensor, Tensor]:
    if self.skip_first_layer_pe:
        queries = _ref_attention(self.self_attn, q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        attn_out = _ref_attention(self.self_attn, q=q, k=q, v=queries)
        queries = queries + attn_out
    queries = self.norm1(queries)
    q = queries + query_pe
    k = keys + key_pe
    attn_out = _ref_attention(self.cross_attn_token_to_image, q=q, k=k, v=keys, attn_sim=attn_sim, quirks=quirks)
    queries = queries + attn_out
    queries = self.norm2(queries)
    queries = self.norm3(queries + self.mlp(queries))
    q = queries + query_pe
    k = keys + key_pe
    attn_out = _ref_attention(self.cross_attn_image_to_token, q=k, k=q, v=queries)
    keys = keys + attn_out
    keys = self.norm4(keys)
    return queries, keys


def _ref_transformer(
    self, image_embedding, image_pe, point_embedding, attn_sim, target_embedding, quirks: Quirks
) -> tuple[Tensor, Tensor]:
    bs, c, h, w = image_embedding.shape
    image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
    image_pe = image_pe.flatten(2).permute(0, 2, 1)
    queries = point_embedding
    keys = image_embedding
    for layer in self.layers:
        if target_embedding is not None:
            if quirks.inplace_pe:
                queries += target_embedding  # first layer: this *is* point_embedding
            else:
                queries = queries + target_embedding
        queries, keys = _ref_block(layer, queries, keys, point_embedding, image_pe, attn_sim, quirks)
    q = queries + point_embedding
    k = keys + image_pe
    if target_embedding is not None:
        q += target_embedding
    attn_out = _ref_attention(self.final_attn_token_to_image, q=q, k=k, v=keys)
    return self.norm_final_attn(queries + attn_out), keys


# ---- modeling/mask_decoder.py ---------------------------------------------------------


def _ref_predict_masks(
    self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
    attn_sim, target_embedding, quirks: Quirks,
) -> tuple[Tensor, Tensor]:
    output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    src = torch.repeat_interleave(image_embeddings, tokens.shape[0], dim=0)
    src = src + dense_prompt_embeddings
    pos_src = torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)
    b, c, h, w = src.shape
    hs, src = _ref_transformer(self.transformer, src, pos_src, tokens, attn_sim, target_embedding, quirks)
    iou_token_out, mask_tokens_out = hs[:, 0, :], hs[:, 1 : (1 + self.num_mask_tokens), :]
    src = src.transpose(1, 2).view(b, c, h, w)
    upscaled_embedding = self.output_upscaling(src)
    hyper_in_list = [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(self.num_mask_tokens)]
    hyper_in = torch.stack(hyper_in_list, dim=1)
    b, c, h, w = upscaled_embedding.shape
    masks = (hyper_in @ upscaled_embedding.view(b, c, h * w)).view(b, -1, h, w)
    return masks, self.iou_prediction_head(iou_token_out)


# ---- predictor.py ---------------------------------------------------------------------


@torch.no_grad()
def reference_predict(
    sam: Sam, features: Tensor, original_size: tuple[int, int], input_size: tuple[int, int],
    point_coords: np.ndarray | None, point_labels: np.ndarray | None, box: np.ndarray | None = None,
    mask_input: np.ndarray | None = None, multimask_output: bool = True, attn_sim: Tensor | None = None,
    target_embedding: Tensor | None = None, quirks: Quirks = REFERENCE,
) -> Prediction:
    """Reference SamPredictor.predict on features [1, 256, 64, 64] -> (masks, scores, low, high)."""
    transform = ResizeLongestSide(sam.image_encoder.img_size)
    coords_torch, labels_torch, box_torch, mask_input_torch = None, None, None, None
    if point_coords is not None:
        point_coords = transform.apply_coords(point_coords, original_size)
        coords_torch = torch.as_tensor(point_coords, dtype=torch.float, device=sam.device)[None, :, :]
        labels_torch = torch.as_tensor(point_labels, dtype=torch.int, device=sam.device)[None, :]
    if box is not None:
        box = transform.apply_boxes(box, original_size)
        box_torch = torch.as_tensor(box, dtype=torch.float, device=sam.device)[None, :]
    if mask_input is not None:
        mask_input_torch = torch.as_tensor(mask_input, dtype=torch.float, device=sam.device)[None, :, :, :]
    points = (coords_torch, labels_torch) if coords_torch is not None else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=box_torch, masks=mask_input_torch)
    masks, iou_pred = _ref_predict_masks(
        sam.mask_decoder, features, sam.prompt_encoder.get_dense_pe(), sparse, dense,
        attn_sim, target_embedding, quirks,
    )
    mask_slice = slice(1, None) if multimask_output else slice(0, 1)
    low_res_masks, iou_predictions = masks[:, mask_slice, :, :], iou_pred[:, mask_slice]
    high_res_masks = sam.postprocess_masks(low_res_masks, input_size, original_size)
    masks = (high_res_masks > sam.mask_threshold)[0].cpu().numpy()
    return masks, iou_predictions[0].cpu().numpy(), low_res_masks[0].cpu().numpy(), high_res_masks[0]


def reference_mask_input(sam: Sam, mask: np.ndarray) -> Tensor:
    """set_image's mask path: [H, W, 3] uint8 -> [1, 3, 1024, 1024], normalised and padded."""
    input_mask = ResizeLongestSide(sam.image_encoder.img_size).apply_image(mask)
    input_mask_torch = torch.as_tensor(input_mask, device=sam.device)
    input_mask_torch = input_mask_torch.permute(2, 0, 1).contiguous()[None, :, :, :]
    return sam.preprocess(input_mask_torch)


def reference_mask_grid(sam: Sam, mask: np.ndarray) -> Tensor:
    """persam.py's kept cells of a [H, W, 3] uint8 mask: bilinear 64x64, channel 0 > 0."""
    ref_mask = F.interpolate(reference_mask_input(sam, mask), size=(64, 64), mode="bilinear")
    return ref_mask.squeeze()[0] > 0


class ReferencePredictor:
    """The reference predictor's state. Encodes with segment_anything's SamPredictor unless
    `encode` is given (a test's cache, so that a slow encoder runs once per image)."""

    def __init__(self, sam: Sam, encode: Encoder | None = None) -> None:
        self.model = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self._predictor = SamPredictor(sam)
        self._encode = encode

    def set_image(self, image: np.ndarray, mask: np.ndarray | None = None) -> Tensor | None:
        """image: [H, W, 3] RGB uint8; mask: [H, W, 3] uint8 as cv2 reads a palette PNG."""
        self.original_size = tuple(image.shape[:2])
        self.input_size = tuple(self.transform.apply_image(image).shape[:2])
        if self._encode is None:
            self._predictor.set_image(image)
            self.features = self._predictor.features
        else:
            self.features = self._encode(image)
        return None if mask is None else reference_mask_input(self.model, mask)

    def predict(self, point_coords, point_labels, box=None, mask_input=None, multimask_output=True,
                attn_sim=None, target_embedding=None) -> Prediction:
        return reference_predict(
            self.model, self.features, self.original_size, self.input_size, point_coords, point_labels,
            box, mask_input, multimask_output, attn_sim, target_embedding,
        )


# ---- persam.py / persam_f.py ----------------------------------------------------------


def point_selection(mask_sim: Tensor, topk: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    w, h = mask_sim.shape
    topk_xy = mask_sim.flatten(0).topk(topk)[1]
    topk_x = (topk_xy // h).unsqueeze(0)
    topk_y = topk_xy - topk_x * h
    topk_xy = torch.cat((topk_y, topk_x), dim=0).permute(1, 0)
    topk_label = np.array([1] * topk)
    last_xy = mask_sim.flatten(0).topk(topk, largest=False)[1]
    last_x = (last_xy // h).unsqueeze(0)
    last_y = last_xy - last_x * h
    last_xy = torch.cat((last_y, last_x), dim=0).permute(1, 0)
    last_label = np.array([0] * topk)
    return topk_xy.cpu().numpy(), topk_label, last_xy.cpu().numpy(), last_label


def _reference_cells(predictor: ReferencePredictor, image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """set_image(image, mask) -> (ref_feat [64, 64, 256], kept cells [64, 64] bool)."""
    ref_mask = predictor.set_image(image, mask)
    ref_feat = predictor.features.squeeze().permute(1, 2, 0)
    ref_mask = F.interpolate(ref_mask, size=ref_feat.shape[0:2], mode="bilinear")
    return ref_feat, ref_mask.squeeze()[0] > 0


def _similarity(predictor: ReferencePredictor, target_feat: Tensor) -> Tensor:
    test_feat = predictor.features.squeeze()
    C, h, w = test_feat.shape
    test_feat = (test_feat / test_feat.norm(dim=0, keepdim=True)).reshape(C, h * w)
    sim = (target_feat @ test_feat).reshape(1, 1, h, w)
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
    return predictor.model.postprocess_masks(
        sim, input_size=predictor.input_size, original_size=predictor.original_size
    ).squeeze()


def _box(mask: np.ndarray) -> np.ndarray:
    y, x = np.nonzero(mask)
    return np.array([x.min(), y.min(), x.max(), y.max()])


@dataclass
class RefResult:
    """mask: [H, W] bool; point/negative: (x, y); weights: PerSAM-F's [3]; losses per epoch."""

    mask: np.ndarray
    score: float
    point: tuple[int, int]
    negative: tuple[int, int] | None = None
    weights: np.ndarray | None = None
    losses: list[float] | None = None


@torch.no_grad()
def reference_persam_many(
    sam: Sam, ref_image: np.ndarray, ref_mask: np.ndarray, test_images: Sequence[np.ndarray],
    encode: Encoder | None = None,
) -> list[RefResult]:
    """persam.py: one reference [H, W, 3] + mask [H, W, 3] ({128,0,0} object), many targets."""
    predictor = ReferencePredictor(sam, encode)
    ref_feat, keep = _reference_cells(predictor, ref_image, ref_mask)
    target_feat = ref_feat[keep]
    target_embedding = target_feat.mean(0).unsqueeze(0)
    target_feat = target_embedding / target_embedding.norm(dim=-1, keepdim=True)
    target_embedding = target_embedding.unsqueeze(0)
    results = []
    for test_image in test_images:
        predictor.set_image(test_image)
        sim = _similarity(predictor, target_feat)
        topk_xy_i, topk_label_i, last_xy_i, last_label_i = point_selection(sim, topk=1)
        topk_xy = np.concatenate([topk_xy_i, last_xy_i], axis=0)
        topk_label = np.concatenate([topk_label_i, last_label_i], axis=0)
        sim = (sim - sim.mean()) / torch.std(sim)
        sim = F.interpolate(sim.unsqueeze(0).unsqueeze(0), size=(64, 64), mode="bilinear")
        attn_sim = sim.sigmoid_().unsqueeze(0).flatten(3)
        masks, scores, logits, _ = predictor.predict(
            topk_xy, topk_label, multimask_output=False, attn_sim=attn_sim, target_embedding=target_embedding
        )
        best_idx = 0
        masks, scores, logits, _ = predictor.predict(
            topk_xy, topk_label, mask_input=logits[best_idx : best_idx + 1, :, :], multimask_output=True
        )
        best_idx = np.argmax(scores)
        input_box = _box(masks[best_idx])
        masks, scores, logits, _ = predictor.predict(
            topk_xy, topk_label, box=input_box[None, :], mask_input=logits[best_idx : best_idx + 1, :, :],
            multimask_output=True,
        )
        best_idx = np.argmax(scores)
        point, negative = tuple(topk_xy[0].tolist()), tuple(topk_xy[1].tolist())
        results.append(RefResult(masks[best_idx], float(scores[best_idx]), point, negative))
    return results


def reference_persam(
    sam: Sam, ref_image: np.ndarray, ref_mask: np.ndarray, test_image: np.ndarray, encode: Encoder | None = None
) -> RefResult:
    """persam.py for one test image."""
    return reference_persam_many(sam, ref_image, ref_mask, [test_image], encode)[0]


def calculate_dice_loss(inputs: Tensor, targets: Tensor, num_masks: int = 1) -> Tensor:
    inputs = inputs.sigmoid().flatten(1)
    numerator = 2 * (inputs * targets).sum(-1)
    denominator = inputs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def calculate_sigmoid_focal_loss(inputs, targets, num_masks: int = 1, alpha: float = 0.25, gamma: float = 2):
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


def reference_persam_f_many(
    sam: Sam, ref_image: np.ndarray, ref_mask: np.ndarray, test_images: Sequence[np.ndarray], epochs: int,
    encode: Encoder | None = None, lr: float = 1e-3,
) -> list[RefResult]:
    """persam_f.py: fit the weights on the reference (a decode per epoch), then segment. Its
    requires_grad=False on SAM changes no number (decodes run under no_grad): skipped."""
    predictor = ReferencePredictor(sam, encode)
    gt_mask = (torch.tensor(ref_mask)[:, :, 0] > 0).float().unsqueeze(0).flatten(1)
    ref_feat, keep = _reference_cells(predictor, ref_image, ref_mask)
    target_feat = ref_feat[keep]
    target_feat_mean, target_feat_max = target_feat.mean(0), torch.max(target_feat, dim=0)[0]
    target_feat = (target_feat_max / 2 + target_feat_mean / 2).unsqueeze(0)
    h, w, C = ref_feat.shape
    target_feat = target_feat / target_feat.norm(dim=-1, keepdim=True)
    ref_feat = ref_feat / ref_feat.norm(dim=-1, keepdim=True)
    ref_feat = ref_feat.permute(2, 0, 1).reshape(C, h * w)
    sim = (target_feat @ ref_feat).reshape(1, 1, h, w)
    sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
    sim = sam.postprocess_masks(sim, input_size=predictor.input_size, original_size=predictor.original_size).squeeze()
    topk_xy, topk_label, _, _ = point_selection(sim, topk=1)
    mask_weights = torch.nn.Parameter(torch.ones(2, 1) / 3)  # Mask_Weights.weights
    optimizer = torch.optim.AdamW([mask_weights], lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    losses: list[float] = []
    for _ in range(epochs):
        masks, scores, logits, logits_high = predictor.predict(topk_xy, topk_label, multimask_output=True)
        logits_high = logits_high.flatten(1)
        weights = torch.cat((1 - mask_weights.sum(0).unsqueeze(0), mask_weights), dim=0)
        logits_high = (logits_high * weights).sum(0).unsqueeze(0)
        loss = calculate_dice_loss(logits_high, gt_mask) + calculate_sigmoid_focal_loss(logits_high, gt_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    weights = torch.cat((1 - mask_weights.sum(0).unsqueeze(0), mask_weights), dim=0).detach()
    weights_np = weights.cpu().numpy()
    return [_persam_f_segment(predictor, target_feat, weights, weights_np, image, losses) for image in test_images]


@torch.no_grad()
def _persam_f_segment(predictor, target_feat, weights, weights_np, test_image, losses) -> RefResult:
    predictor.set_image(test_image)
    sim = _similarity(predictor, target_feat)
    topk_xy, topk_label, _, _ = point_selection(sim, topk=1)
    masks, scores, logits, logits_high = predictor.predict(topk_xy, topk_label, multimask_output=True)
    mask = ((logits_high * weights.unsqueeze(-1)).sum(0) > 0).detach().cpu().numpy()
    logit = (logits * weights_np[..., None]).sum(0)
    input_box = _box(mask)
    masks, scores, logits, _ = predictor.predict(
        topk_xy, topk_label, box=input_box[None, :], mask_input=logit[None, :, :], multimask_output=True
    )
    best_idx = np.argmax(scores)
    input_box = _box(masks[best_idx])
    masks, scores, logits, _ = predictor.predict(
        topk_xy, topk_label, box=input_box[None, :], mask_input=logits[best_idx : best_idx + 1, :, :],
        multimask_output=True,
    )
    best_idx = np.argmax(scores)
    return RefResult(masks[best_idx], float(scores[best_idx]), tuple(topk_xy[0].tolist()),
                     weights=weights_np[:, 0].copy(), losses=list(losses))


def reference_persam_f(
    sam: Sam, ref_image: np.ndarray, ref_mask: np.ndarray, test_image: np.ndarray, epochs: int,
    encode: Encoder | None = None,
) -> RefResult:
    """persam_f.py for one test image (fit on the reference, then segment)."""
    return reference_persam_f_many(sam, ref_image, ref_mask, [test_image], epochs, encode)[0]
