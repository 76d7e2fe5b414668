"""Test oracle: the reference's persam_video.py main loop (training-free), transcribed.

Reference: github.com/ZrrSkywalker/Personalize-SAM persam_video.py with its defaults
(topk 2, exp 215, threshold 10, box_prompt, large, center) over segment_anything's
SamPredictor (the video mode passes no attention bias or target embedding, so the
reference's predictor is plain SAM there). Nothing in persam_core is used.

One change, documented in persam_core/video/reference_mode.py: `large` picks the mask of largest area;
the reference stores the areas as uint8 (wrapping at 256), which this does not copy.
Empty masks raise here, as in the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


def all_to_onehot(masks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = np.zeros((len(labels), masks.shape[0], masks.shape[1]), dtype=np.uint8)
    for k, label in enumerate(labels):
        out[k] = (masks == label).astype(np.uint8)
    return out


def get_box_prompt(img: np.ndarray, threshold: int):
    rows, cols = np.any(img, axis=1), np.any(img, axis=0)
    rmin, rmax = np.where(rows)[0][[0, -1]]
    cmin, cmax = np.where(cols)[0][[0, -1]]
    cmin = 0 if cmin - threshold <= 0 else cmin - threshold
    rmin = 0 if rmin - threshold <= 0 else rmin - threshold
    cmax = img.shape[1] if cmax + threshold >= img.shape[1] else cmax + threshold
    rmax = img.shape[0] if rmax + threshold >= img.shape[0] else rmax + threshold
    return np.array([[(cmin + cmax) // 2, (rmin + rmax) // 2]]), np.array([cmin, rmin, cmax, rmax])


def point_selection(mask_sim: torch.Tensor, topk: int = 1):
    w, h = mask_sim.shape
    topk_xy = mask_sim.flatten(0).topk(topk)[1]
    topk_x = (topk_xy // h).unsqueeze(0)
    topk_y = topk_xy - topk_x * h
    topk_xy = torch.cat((topk_y, topk_x), dim=0).permute(1, 0)
    return topk_xy.cpu().numpy(), np.array([1] * topk)


def _mask_input(sam: Sam, mask: np.ndarray) -> torch.Tensor:
    """The reference predictor's set_image(image, mask) mask path: resize, normalise, pad."""
    resized = ResizeLongestSide(sam.image_encoder.img_size).apply_image(mask)
    return sam.preprocess(torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None])


@torch.no_grad()
def reference_video(sam: Sam, frames: list[np.ndarray], first_labels: np.ndarray, topk: int = 2, exp: int = 215,
                    threshold: int = 10) -> list[np.ndarray]:
    """frames: [H, W, 3] uint8; first_labels: [H, W] ids -> merged label maps of frames 1.."""
    predictor = SamPredictor(sam)
    labels = np.unique(first_labels)
    labels = labels[labels != 0]
    msk0 = all_to_onehot(first_labels, labels)
    first_frame_mask = msk0 * exp
    input_boxes = [msk0[k] for k in range(msk0.shape[0])]
    fore_feat_list = []
    for obj in range(len(labels)):
        obj_mask = first_frame_mask[obj].reshape(*first_frame_mask.shape[1:], 1)
        obj_mask = np.concatenate((obj_mask, np.zeros((*obj_mask.shape[:2], 2), dtype=obj_mask.dtype)), axis=2)
        predictor.set_image(frames[0])
        obj_mask = _mask_input(sam, obj_mask)
        if obj == 0:
            img_feat1 = predictor.features.squeeze().permute(1, 2, 0)
        obj_mask = F.interpolate(obj_mask, size=img_feat1.shape[0:2], mode="bilinear").squeeze()[0]
        fore_feat = img_feat1[obj_mask > 0]
        fore_feat_mean = fore_feat.mean(0)
        fore_feat_max = torch.max(fore_feat, dim=0)[0]
        fore_feat = (fore_feat_max / 2 + fore_feat_mean / 2).unsqueeze(0)
        fore_feat_list.append(fore_feat / fore_feat.norm(dim=-1, keepdim=True))

    outputs = []
    for current_img in frames[1:]:
        predictor.set_image(current_img)
        test_feat = predictor.features.squeeze()
        C, htest, wtest = test_feat.shape
        test_feat = (test_feat / test_feat.norm(dim=0, keepdim=True)).reshape(C, htest * wtest)
        concat_mask = np.zeros((1, *first_labels.shape), dtype=np.uint8)
        for j in range(min(len(fore_feat_list), len(input_boxes))):
            sim = (fore_feat_list[j] @ test_feat).reshape(1, 1, htest, wtest)
            sim = F.interpolate(sim, scale_factor=4, mode="bilinear")
            mask_sim = sam.postprocess_masks(sim, input_size=predictor.input_size,
                                             original_size=predictor.original_size).squeeze()
            topk_xy, topk_label = point_selection(mask_sim, topk=topk)
            topk_label = np.concatenate([topk_label, [1]], axis=0)
            center, input_box_ = get_box_prompt(input_boxes[j], threshold)
            topk_xy = np.concatenate((topk_xy, center), axis=0)
            masks, scores, logits = predictor.predict(point_coords=topk_xy, point_labels=topk_label,
                                                      box=input_box_[None, :], multimask_output=True)
            ic_index = int(np.argmax([np.sum(m) for m in masks]))  # see the module docstring
            masks, scores, logits = predictor.predict(point_coords=topk_xy, point_labels=topk_label,
                                                      mask_input=logits[ic_index : ic_index + 1], multimask_output=True)
            ic_index = np.argmax(scores)
            y, x = np.nonzero(masks[ic_index])
            input_box = np.array([x.min(), y.min(), x.max(), y.max()])
            masks, scores, logits = predictor.predict(point_coords=topk_xy, point_labels=topk_label,
                                                      box=input_box[None, :], mask_input=logits[ic_index : ic_index + 1],
                                                      multimask_output=True, return_logits=True)
            ic_index = np.argmax(scores)
            concat_mask = np.concatenate((concat_mask, masks[ic_index].reshape(1, *masks.shape[1:])), axis=0)
        current_mask_pred = np.argmax(concat_mask, axis=0).astype(np.uint8)
        outputs.append(current_mask_pred)
        cur_labels = np.unique(current_mask_pred)
        input_boxes = all_to_onehot(current_mask_pred, cur_labels[cur_labels != 0])
    return outputs
