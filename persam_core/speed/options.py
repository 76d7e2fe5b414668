"""The names a command line offers, without importing torch (so `persam --help` is instant).

acceleration.py and decoder_speed.py build on these names (model types: families.py) and check at import that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEED_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # "auto" + acceleration.PRECISIONS
DECODER_PRECISIONS = ("fp32", "bf16")  # decoder_speed.DECODER_DTYPES
DINOV2_TYPES = ("vitl14", "vitb14", "vits14", "tiny")  # modeling.dinov2.DINOV2_TYPES
DEFAULT_DINOV2 = "vitl14"  # GF-SAM's paper model
GPU_BATCH_SIZE = 16  # images per encoder batch on CUDA


@dataclass(frozen=True)
class SpeedFlags:
    """The speed flags as given: None / "auto" = not given, resolved on each device by
    `acceleration.resolve_speed` into the `EncoderSpeed` of the same field names."""

    precision: str = "auto"  # SPEED_PRECISIONS
    fused_attention: bool | None = None
    compile: bool | None = None
    batch_size: int | None = None
    decoder_graphs: bool | None = None
    decoder_precision: str = "fp32"  # DECODER_PRECISIONS
    tf32: bool | None = None
    decoder_compile: bool | None = None
