"""The names a command line offers, without importing torch (so `persam --help` is instant).

models.py and acceleration.py build on these names and check at import that they agree.
"""

from __future__ import annotations

MODEL_TYPES = ("vit_h", "vit_l", "vit_b", "vit_t", "tiny",  # models.MODEL_BUILDERS, in this order
               "sam2.1_t", "sam2.1_s", "sam2.1_b+", "sam2.1_l", "tiny_sam2")
SPEED_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # "auto" + acceleration.PRECISIONS
DECODER_PRECISIONS = ("fp32", "bf16")  # decoder_speed.DECODER_DTYPES
DINOV2_TYPES = ("vitl14", "vitb14", "vits14", "tiny")  # modeling.dinov2.DINOV2_TYPES
DEFAULT_DINOV2 = "vitl14"  # modeling.dinov2.DEFAULT_DINOV2: GF-SAM's paper model
GPU_BATCH_SIZE = 16  # images per encoder batch on CUDA
