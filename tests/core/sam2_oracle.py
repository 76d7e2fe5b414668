"""Test oracle: the reference PerSAM / PerSAM-F flow driven through sam2's SAM2ImagePredictor.

The reference's per-image steps (as transcribed in reference_oracle.py) with SAM 2's own
predictor in place of SamPredictor: every decode is `SAM2ImagePredictor.predict` (its
coordinate transform, its box merge, its clamped low-res logits fed back as mask input), the
prior is computed on its `image_embed`, the reference mask goes through its image transform
and the similarity map through its `postprocess_masks`. The two PerSAM additions, which
SAM2ImagePredictor cannot take, come from the reference's own transformer
(`reference_oracle._ref_transformer`, literal) put in place of SAM 2's transformer for the
guided pass only. Nothing in persam_core is used.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from reference_oracle import REFERENCE, RefResult, _box, _ref_transformer, point_selection

with warnings.catch_warnings():  # SAM2Transforms' torch.jit.script deprecation, not ours
    warnings.simplefilter("ignore", FutureWarning)
    from sam2.sam2_image_predictor import SAM2ImagePredictor


@contextlib.contextmanager
def reference_guidance(model, attn_sim: Tensor | None, target_embedding: Tensor | None) -> Iterator[None]:
    """SAM 2's transformer replaced by the reference's guided one while the block runs."""
    transformer = model.sam_mask_decoder.transformer
    previous = transformer.__dict__.get("forward")

    def forward(image_embedding, image_pe, point_embedding):
        return _ref_transformer(transformer, image_embedding, image_pe, point_embedding, attn_sim,
                                target_embedding, REFERENCE)

    transformer.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del transformer.forward
        else:
            transformer.forward = previous


class Sam2Reference:
    """SAM2ImagePredictor, warnings of its own construction silenced."""

    def __init__(self, model) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.predictor = SAM2ImagePredictor(model)
        self.model = model

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)

    @property
    def features(self) -> Tensor:
        """image_embed: [256, 64, 64]."""
        return self.predictor._features["image_embed"][0]

    def predict(self, points, labels, box=None, mask_input=None, multimask_output=True, attn_sim=None,
                target_embedding=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, Tensor]:
        """-> (masks [M, H, W] bool, scores [M], low-res logits [M, 256, 256], high-res logits)."""
        guided = attn_sim is not None or target_embedding is not None
        with reference_guidance(self.model, attn_sim, target_embedding) if guided else contextlib.nullcontext():
            high, scores, low = self.predictor.predict(points, labels, box=box, mask_input=mask_input,
                                                      multimask_output=multimask_output, return_logits=True)
        return high > 0, scores, low, torch.as_tensor(high)

    def mask_grid(self, mask: np.ndarray) -> Tensor:
        """The reference's kept cells: the {128, 0, 0} mask through the image transform, 64x64, red > 0."""
        rgb = np.zeros((*mask.shape, 3), np.uint8)
        rgb[mask] = (128, 0, 0)
        transformed = self.predictor._transforms(rgb)  # [3, 1024, 1024]
        return F.interpolate(transformed[None], size=(64, 64), mode="bilinear")[0, 0] > 0

    def similarity(self, target_feat: Tensor) -> Tensor:
        test_feat = self.features
        C, h, w = test_feat.shape
        test_feat = (test_feat / test_feat.norm(dim=0, keepdim=True)).reshape(C, h * w)
        sim = (target_feat @ test_feat).reshape(1, 1, h, w)
        sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
        return self.predictor._transforms.postprocess_masks(sim, self.predictor._orig_hw[0]).squeeze()


@torch.no_grad()
def reference_targets(ref: Sam2Reference, image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    """persam.py's target: (target_feat [1, 256] unit, target_embedding [1, 1, 256])."""
    ref.set_image(image)
    cells = ref.features.permute(1, 2, 0)[ref.mask_grid(mask)]
    target_embedding = cells.mean(0).unsqueeze(0)
    return target_embedding / target_embedding.norm(dim=-1, keepdim=True), target_embedding.unsqueeze(0)


@torch.no_grad()
def reference_persam(ref: Sam2Reference, target_feat: Tensor, target_embedding: Tensor, image: np.ndarray) -> RefResult:
    """persam.py's segmentation of one test image."""
    ref.set_image(image)
    sim = ref.similarity(target_feat)
    topk_xy_i, topk_label_i, last_xy_i, last_label_i = point_selection(sim, topk=1)
    topk_xy = np.concatenate([topk_xy_i, last_xy_i], axis=0)
    topk_label = np.concatenate([topk_label_i, last_label_i], axis=0)
    sim = (sim - sim.mean()) / torch.std(sim)
    sim = F.interpolate(sim.unsqueeze(0).unsqueeze(0), size=(64, 64), mode="bilinear")
    attn_sim = sim.sigmoid_().unsqueeze(0).flatten(3)
    masks, scores, logits, _ = ref.predict(topk_xy, topk_label, multimask_output=False, attn_sim=attn_sim,
                                           target_embedding=target_embedding)
    best_idx = 0
    masks, scores, logits, _ = ref.predict(topk_xy, topk_label, mask_input=logits[best_idx : best_idx + 1],
                                           multimask_output=True)
    best_idx = np.argmax(scores)
    input_box = _box(masks[best_idx])
    masks, scores, logits, _ = ref.predict(topk_xy, topk_label, box=input_box[None, :],
                                           mask_input=logits[best_idx : best_idx + 1], multimask_output=True)
    best_idx = np.argmax(scores)
    return RefResult(masks[best_idx], float(scores[best_idx]), tuple(topk_xy[0].tolist()), tuple(topk_xy[1].tolist()))


@torch.no_grad()
def reference_persam_f(ref: Sam2Reference, target_feat: Tensor, weights: np.ndarray, image: np.ndarray) -> RefResult:
    """persam_f.py's segmentation of one test image with fitted weights [3]."""
    ref.set_image(image)
    topk_xy, topk_label, _, _ = point_selection(ref.similarity(target_feat), topk=1)
    masks, scores, logits, logits_high = ref.predict(topk_xy, topk_label, multimask_output=True)
    mask = ((logits_high * torch.as_tensor(weights)[:, None, None]).sum(0) > 0).numpy()
    logit = (logits * weights[:, None, None]).sum(0)
    input_box = _box(mask)
    masks, scores, logits, _ = ref.predict(topk_xy, topk_label, box=input_box[None, :], mask_input=logit[None],
                                           multimask_output=True)
    best_idx = np.argmax(scores)
    input_box = _box(masks[best_idx])
    masks, scores, logits, _ = ref.predict(topk_xy, topk_label, box=input_box[None, :],
                                           mask_input=logits[best_idx : best_idx + 1], multimask_output=True)
    best_idx = np.argmax(scores)
    return RefResult(masks[best_idx], float(scores[best_idx]), tuple(topk_xy[0].tolist()))
