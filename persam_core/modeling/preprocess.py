"""Image -> SAM encoder input, exactly as `SamPredictor.set_image`; mask -> 64x64 grid.

Resizing is split from normalising so that CPU workers can resize (the costly, lossy
step) and ship uint8 arrays, and the model actor only normalises and pads. The resizes
themselves (SAM's and SAM 2's) live in resize.py, which CPU workers import without torch.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.nn import functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from persam_core.modeling.resize import ENCODER_SIZE
from persam_core.modeling.resized import ResizedImage

GRID_SIZE = 64
# The reference feeds a {0,128} mask (PerSeg's palette red) through SAM's pixel normalisation.
REFERENCE_MASK_VALUE = 128


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over `array`'s memory, also when it is read-only (the job's stages hand
    pixels over as views of received bytes): every caller copies it before any write."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor -> `device` without waiting: to CUDA from pinned memory the copy is queued
    like a kernel (from pageable memory it would wait until the GPU's queue is empty)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def array_to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> a tensor on `device`, always a copy (the array may be a read-only view
    of received bytes), to CUDA by `tensor_to_device`."""
    tensor = host_tensor(array)
    return tensor.clone() if device.type == "cpu" else tensor_to_device(tensor, device)


def to_encoder_input(sam: Sam, resized: ResizedImage) -> torch.Tensor:
    """-> [1, 3, 1024, 1024] float: SAM's normalise + zero pad (as `set_torch_image`)."""
    pixels = array_to_device(resized.pixels, sam.device)
    return sam.preprocess(pixels.permute(2, 0, 1).contiguous()[None])


def reference_mask_grid(mask: np.ndarray, value: int = REFERENCE_MASK_VALUE) -> torch.Tensor:
    """mask: [H, W] bool -> [64, 64] bool, the grid cells the reference keeps.

    The reference resizes the {0, value} mask like the image (value 128: PerSeg's palette
    red; its video mode uses other values), normalises it with the red channel's pixel
    mean/std, pads with 0, bilinear-resizes to 64x64 and keeps cells > 0.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an [H, W] mask, got shape {mask.shape}")
    scaled = mask.astype(np.uint8) * np.uint8(value)
    resized = ResizeLongestSide(ENCODER_SIZE).apply_image(scaled)  # [h, w] uint8
    normalised = (torch.as_tensor(resized)[None, None] - PIXEL_MEAN_RED) / PIXEL_STD_RED
    height, width = normalised.shape[-2:]
    padded = F.pad(normalised, (0, ENCODER_SIZE - width, 0, ENCODER_SIZE - height))
    grid = F.interpolate(padded, size=(GRID_SIZE, GRID_SIZE), mode="bilinear")
    return grid[0, 0] > 0


PIXEL_MEAN_RED = torch.tensor(123.675)
PIXEL_STD_RED = torch.tensor(58.395)
