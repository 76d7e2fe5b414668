"""segment_anything's `Sam` behind the Backbone protocol, exactly as `SamPredictor` drives it."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from segment_anything.modeling import Sam

from persam_core.modeling.backbone import Decoded, PredictorEncoding
from persam_core.speed.decoder_speed import decode_prompts
from persam_core.modeling.preprocess import reference_mask_grid, to_encoder_input
from persam_core.modeling.resize import resize_longest_side
from persam_core.modeling.resized import ResizedImage


class SamBackbone:
    """segment_anything's Sam, as SamPredictor drives it."""

    def __init__(self, sam: Sam) -> None:
        self.model = sam
        self.mask_threshold = sam.mask_threshold
        self.image_size = sam.image_encoder.img_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def resize(self, image: np.ndarray) -> ResizedImage:
        return resize_longest_side(image)

    def encoder_input(self, resized: ResizedImage) -> Tensor:
        return to_encoder_input(self.model, resized)

    def predictor_encoder(self):
        from segment_anything import SamPredictor

        predictor = SamPredictor(self.model)

        def encode(picture: np.ndarray) -> PredictorEncoding:
            predictor.set_image(picture)
            return PredictorEncoding(predictor.features[0], predictor.input_size, predictor.original_size)

        return encode

    def encode(self, batch: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        return self.model.image_encoder(batch), ()

    def mask_grid(self, mask: np.ndarray, value: int) -> Tensor:
        return reference_mask_grid(mask, value)

    def coordinate_table(self, input_sizes, original_sizes) -> Tensor:
        """(new_w / old_w, new_h / old_h) as Python floats (float64), as ResizeLongestSide.apply_coords."""
        scale = [(i[1] / o[1], i[0] / o[0]) for i, o in zip(input_sizes, original_sizes)]
        return torch.tensor(scale, dtype=torch.float64).reshape(-1, 2)

    def input_coordinates(self, xy: Tensor, table: Tensor) -> Tensor:
        return (xy.to(torch.float64) * table[:, None]).to(torch.float32)

    def mask_feedback(self, low_res: Tensor) -> Tensor:
        return low_res

    def postprocess(self, low_res: Tensor, input_size, original_size) -> Tensor:
        return self.model.postprocess_masks(low_res, input_size, original_size)

    def decode(self, features, high_res, coords, labels, boxes, mask_input, multimask, attention_bias,
               target_embedding) -> Decoded:
        low_res, scores = decode_prompts(self.model, features, coords, labels.to(torch.int), boxes, mask_input,
                                         multimask, attention_bias, target_embedding)
        return Decoded(low_res, scores, torch.full(scores.shape[:1], float("nan"), device=scores.device))
