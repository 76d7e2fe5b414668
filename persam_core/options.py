"""The names a command line offers, without importing torch (so `persam --help` is instant).

acceleration.py and decoder_speed.py build on these names (model types: families.py) and check at import that they agree.
"""

from __future__ import annotations

SPEED_PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # "auto" + acceleration.PRECISIONS
DECODER_PRECISIONS = ("fp32", "bf16")  # decoder_speed.DECODER_DTYPES
GPU_BATCH_SIZE = 16  # images per encoder batch on CUDA
