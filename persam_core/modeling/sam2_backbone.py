"""SAM 2 (sam2's `SAM2Base`) as a PerSAM backbone, exactly as `SAM2ImagePredictor` drives it.

- Input: `SAM2Transforms` (to_tensor, resize to 1024 x 1024 with antialiasing, normalise). The
  resize is the CPU-side step: `resize` keeps its float32 result, because rounding it to uint8
  would change the features; `encoder_input` only normalises.
- Features: `forward_image` (which also projects the two high-resolution levels for the
  decoder), the no-memory embedding added to the lowest-resolution level: `image_embed`
  [B, 256, 64, 64] is what PerSAM's prior and the concept see; the high-resolution features
  [B, 32, 256, 256], [B, 64, 128, 128] feed the decoder's skips.
- Prompts: pixel / original size * 1024 in float32; a box is two corner points (labels 2, 3)
  before the clicks, as the predictor merges them; mask inputs are the predictor's low-res
  logits, which it clamps to +-32 before handing them back.
- Masks: bilinear upsampling of the 256 x 256 logits to the image. The predictor's optional
  hole filling (`max_hole_area`, which needs sam2's CUDA extension) is off by default and never
  used here, so the extension's absence changes nothing.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms import functional as TF
from sam2.modeling.sam2_base import SAM2Base

from persam_core.modeling.backbone import Decoded, PredictorEncoding
from persam_core.decoder_sam2 import decode_masks_sam2
from persam_core.modeling.preprocess import GRID_SIZE, array_to_device
from persam_core.modeling.resize import resize_square
from persam_core.modeling.resized import ResizedImage

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
LOW_RES_CLAMP = 32.0  # SAM2ImagePredictor clamps the low-res logits it returns to +-32
BOX_LABELS = (2, 3)  # SAM 2's prompt encoder: top-left and bottom-right box corners


def square_mask_grid(mask: np.ndarray, value: int, size: int = 1024) -> Tensor:
    """mask: [H, W] bool -> [64, 64] bool: the {0, value} mask through the image's transform
    (red channel's mean/std), bilinear to 64 x 64, cells > 0 (PerSAM's reference-mask rule)."""
    if mask.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {mask.shape}")
    scaled = TF.to_tensor(mask.astype(np.uint8) * np.uint8(value))  # [1, H, W] in [0, 1]
    normalised = TF.normalize(TF.resize(scaled, [size, size]), PIXEL_MEAN[:1], PIXEL_STD[:1])
    return F.interpolate(normalised[None], size=(GRID_SIZE, GRID_SIZE), mode="bilinear")[0, 0] > 0


class Sam2Backbone:
    """A SAM2Base model (image mode: no memory) behind the Backbone protocol."""

    def __init__(self, model: SAM2Base) -> None:
        if not isinstance(model, SAM2Base):
            raise TypeError(f"expected a sam2 SAM2Base, got {type(model).__name__}")
        self.model = model
        self.mask_threshold = 0.0
        self.image_size = int(model.image_size)
        # (256, 256), (128, 128), (64, 64) at 1024: the grid of each feature level, finest first
        self.level_sizes = tuple((self.image_size // s, self.image_size // s) for s in (4, 8, 16))

    def predictor_encoder(self):
        with warnings.catch_warnings():  # SAM2Transforms' torch.jit.script deprecation, not ours
            warnings.simplefilter("ignore", FutureWarning)
            from sam2.sam2_image_predictor import SAM2ImagePredictor

            predictor = SAM2ImagePredictor(self.model)

        def encode(picture: np.ndarray) -> PredictorEncoding:
            predictor.set_image(picture)
            features = predictor._features  # the predictor's own: image_embed [1, 256, 64, 64], high_res_feats
            return PredictorEncoding(features["image_embed"][0], (self.image_size, self.image_size),
                                     tuple(predictor._orig_hw[0]), tuple(level[0] for level in features["high_res_feats"]))

        return encode

    @property
    def device(self) -> torch.device:
        return self.model.device

    def resize(self, image: np.ndarray) -> ResizedImage:
        return resize_square(image, self.image_size)

    def encoder_input(self, resized: ResizedImage) -> Tensor:
        expected = (self.image_size, self.image_size, 3)
        if resized.pixels.dtype != np.float32 or tuple(resized.pixels.shape) != expected:
            raise ValueError(
                f"SAM 2 encodes images resized by its own transform ({expected[0]}x{expected[1]} float32, "
                f"Sam2Backbone.resize), got {resized.pixels.dtype} {tuple(resized.pixels.shape)}"
            )
        pixels = array_to_device(resized.pixels, self.device)
        return TF.normalize(pixels.permute(2, 0, 1).contiguous(), PIXEL_MEAN, PIXEL_STD)[None]

    def encode(self, batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """SAM2ImagePredictor.set_image_batch's features -> (image_embed, (level 0, level 1))."""
        model = self.model
        _, levels, _, _ = model._prepare_backbone_features(model.forward_image(batch))  # each [HW, B, C]
        return self.embed_levels(levels)

    def embed_levels(self, levels: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
        """sam2's prepared feature levels ([HW, B, C] each, finest first, as `_prepare_backbone_features`
        and the video predictor's frame features hold them) -> (image_embed [B, 256, 64, 64],
        (level 0, level 1)), the no-memory embedding added as SAM2ImagePredictor adds it."""
        model = self.model
        levels = list(levels)
        if model.directly_add_no_mem_embed:
            levels[-1] = levels[-1] + model.no_mem_embed
        batch = levels[-1].shape[1]
        maps = [level.permute(1, 2, 0).view(batch, -1, *size) for level, size in zip(levels, self.level_sizes)]
        return maps[-1], tuple(maps[:-1])

    def mask_grid(self, mask: np.ndarray, value: int) -> Tensor:
        return square_mask_grid(mask, value, self.image_size)

    def coordinate_table(self, input_sizes, original_sizes) -> Tensor:
        """(w, h) of each pair's original image, float32 (the predictor divides by them)."""
        return torch.tensor([(o[1], o[0]) for o in original_sizes], dtype=torch.float32).reshape(-1, 2)

    def input_coordinates(self, xy: Tensor, table: Tensor) -> Tensor:
        return xy.to(torch.float32) / table[:, None] * self.image_size

    def mask_feedback(self, low_res: Tensor) -> Tensor:
        return torch.clamp(low_res, -LOW_RES_CLAMP, LOW_RES_CLAMP)

    def postprocess(self, low_res: Tensor, input_size, original_size) -> Tensor:
        return F.interpolate(low_res.float(), tuple(original_size), mode="bilinear", align_corners=False)

    def decode(self, features, high_res, coords, labels, boxes, mask_input, multimask, attention_bias,
               target_embedding) -> Decoded:
        if self.model.sam_mask_decoder.use_high_res_features and len(high_res) != 2:
            raise ValueError("SAM 2 decodes need the encoder's high-resolution features (EncodedImage.high_res); "
                             "the 64x64 features alone are not enough")
        labels = labels.to(torch.int)
        if boxes is not None:  # the predictor's merge: box corners first, then the clicks
            # 2, 3 made on the device (a host tensor copied from pageable memory would wait for the GPU)
            corners = (BOX_LABELS[0] + torch.arange(2, dtype=torch.int, device=labels.device)).expand(labels.shape[0], -1)
            coords = torch.cat([boxes.reshape(-1, 2, 2), coords], dim=1)
            labels = torch.cat([corners, labels], dim=1)
        sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=mask_input)
        low_res, scores, object_score = decode_masks_sam2(
            self.model.sam_mask_decoder, features, self.model.sam_prompt_encoder.get_dense_pe(), sparse, dense,
            multimask, high_res, attention_bias=attention_bias, target_embedding=target_embedding,
        )
        return Decoded(low_res, scores, object_score)
