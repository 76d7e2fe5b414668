"""SAM 2.1 models through the `sam2` package's own `build_sam2` and hydra configs.

`sam2.1_t|s|b+|l` are the released configs as they are; `tiny_sam2` is the Hiera-T config with
hydra overrides that shrink the trunk (8 channels, five blocks) and the memory modules, so
tests run SAM 2's real code paths in well under a second per image. Every config keeps SAM 2's
contract: a 1024 x 1024 input, `image_embed` [B, 256, 64, 64] and high-resolution features
[B, 32, 256, 256] and [B, 64, 128, 128].

`sam2` is imported on first use: importing it starts hydra, which commands that never build a
SAM 2 model should not pay for.
"""

from __future__ import annotations

import torch

CONFIGS = {
    "sam2.1_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "tiny_sam2": "configs/sam2.1/sam2.1_hiera_t.yaml",
}
# Hiera: q-pooling blocks (the first of stages 2-4) cannot use global attention, so the one
# global block is the second of stage 3. The neck's channel list is the trunk's, deepest first.
TINY_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=8",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[64,32,16,8]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.dim_feedforward=64",
    "++model.memory_encoder.fuser.num_layers=1",
)
SAM2_MODEL_TYPES = tuple(CONFIGS)


def build_sam2_model(model_type: str) -> torch.nn.Module:
    """SAM2Base for `model_type`, randomly initialised on the CPU, in eval mode.

    `apply_postprocessing` stays on, as in sam2's own builders: single-mask decodes fall back
    to the best multimask output when unstable (what SAM2ImagePredictor users get).
    """
    from sam2.build_sam import build_sam2

    overrides = list(TINY_OVERRIDES) if model_type == "tiny_sam2" else []
    return build_sam2(CONFIGS[model_type], None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


def build_sam2_video_model(model_type: str) -> torch.nn.Module:
    """sam2's `SAM2VideoPredictor` for `model_type` (sam2's `build_sam2_video_predictor`, its
    video post-processing included), randomly initialised on the CPU, in eval mode. It holds
    the same modules, so a SAM2Base's state dict loads into it as it is."""
    from sam2.build_sam import build_sam2_video_predictor

    overrides = list(TINY_OVERRIDES) if model_type == "tiny_sam2" else []
    return build_sam2_video_predictor(CONFIGS[model_type], None, device="cpu", mode="eval",
                                      hydra_overrides_extra=overrides)
