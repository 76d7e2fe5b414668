"""What both benchmarks (`persam bench`, `persam bench --job`) share: generated images and
concepts, the timer, the phase lines, and the actor path's pieces (a model at a speed,
encoder batches, the batched cascade over them, their final masks, the warm-up).
"""

from __future__ import annotations

import copy
import sys
import time
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from persam_core.speed.acceleration import EncoderSpeed, prepare_encoder
from persam_core.modeling.backbone import Model
from persam_core.modeling.families import as_backbone
from persam_core.batch import EncodedBatch
from persam_core.host_results import HostResults
from persam_core.cascade import segment_batch
from persam_core.concept import Concept, ConceptTensors, persam_targets, reference_cells
from persam_core.modeling.predictor import EncodedImage, encode_images
from persam_core.modeling.resized import ResizedImage

PHOTO_SIZES = [(768, 1024), (1024, 768), (600, 800), (1080, 1440), (480, 640)]


def progress(message: str) -> None:
    """Phase lines go to stderr, so that a run cut short shows where it was."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def synthetic_images(count: int, seed: int = 0, sizes: Sequence[tuple[int, int]] = PHOTO_SIZES,
                     grain: int = 0) -> list[np.ndarray]:
    """Blocky random colour fields: [H, W, 3] uint8, sizes (H, W) in turn.

    grain > 0 adds uniform noise in [-grain, grain] (from its own generator, so the fields
    stay the same), which gives JPEG files of photo-like byte sizes.
    """
    generator, noise = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    images = []
    for index in range(count):
        height, width = sizes[index % len(sizes)]
        coarse = generator.integers(0, 256, size=(height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((64, 64, 1), dtype=np.uint8))[:height, :width]
        if grain:
            image = np.clip(image + noise.integers(-grain, grain + 1, size=image.shape, dtype=np.int16), 0, 255)
        images.append(np.ascontiguousarray(image.astype(np.uint8)))
    return images


def concept_masks(height: int, width: int, count: int) -> list[np.ndarray]:
    """`count` different rectangles covering a quarter of the image each."""
    masks = []
    for index in range(count):
        mask = np.zeros((height, width), dtype=bool)
        top, left = (index % 3) * height // 6, (index // 3 % 3) * width // 6
        mask[top : top + height // 2, left : left + width // 2] = True
        masks.append(mask)
    return masks


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """-> (seconds, value); CUDA work queued by `function` is waited for inside the timing."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def persam_concepts(reference: EncodedImage, shape: tuple[int, int], count: int, fingerprint: str,
                    model: Model | None = None) -> list[Concept]:
    """K PerSAM concepts fitted on one encoded image with K different masks (shape: (H, W));
    `model` (SAM or SAM 2) decides the masks' grid cells, None meaning SAM's."""
    concepts = []
    for index, mask in enumerate(concept_masks(*shape, count)):
        feature, embedding = persam_targets(reference_cells([reference], [mask], [f"bench mask {index}"], model=model))
        concepts.append(Concept(f"c{index}", "persam", feature.cpu().numpy(), embedding.cpu().numpy(), fingerprint))
    return concepts


def is_exact(speed: EncoderSpeed) -> bool:
    return (speed.precision == "fp32" and not speed.fused_attention and not speed.compile and not speed.decoder_graphs
            and speed.decoder_precision == "fp32" and not speed.tf32 and not speed.decoder_compile)


def reference_encoder(sam: Model) -> Callable[[np.ndarray], EncodedImage]:
    """The original's per-image encode (SamPredictor.set_image, SAM2ImagePredictor.set_image:
    the family's own predictor) -> a function [H, W, 3] uint8 -> its EncodedImage."""
    encode = as_backbone(sam).predictor_encoder()
    return lambda picture: EncodedImage(*encode(picture))


def speed_model(sam: Model, speed: EncoderSpeed, log: Callable[[str], None] = progress) -> tuple[Model, EncoderSpeed]:
    """-> (a model running at `speed`, the settings in effect). The exact path is `sam`
    itself; any other is a copy, because prepare_encoder changes the model in place and
    the fp32 exact path must stay available for comparison."""
    if is_exact(speed):
        return sam, speed
    model = copy.deepcopy(sam)
    return model, prepare_encoder(model, speed, log)


def encode_in_batches(model: Model, resized: Sequence[ResizedImage], speed: EncoderSpeed) -> Iterator[list[EncodedImage]]:
    """Encoder batches of speed.batch_size; padded when compiled (one shape, no recompiling)."""
    pad = speed.batch_size if speed.compile else None
    for start in range(0, len(resized), speed.batch_size):
        yield encode_images(model, resized[start : start + speed.batch_size], speed.precision, pad_to=pad)


def batched(encoded: Sequence[EncodedImage], size: int) -> list[list[EncodedImage]]:
    return [list(encoded[start : start + size]) for start in range(0, len(encoded), size)]


def segment_all(model: Model, batches: Iterable[Sequence[EncodedImage]], concepts: Sequence[ConceptTensors]) -> list[HostResults]:
    """One segment_batch call per encoder batch (all its images x all concepts)."""
    return [segment_batch(model, EncodedBatch.of(batch), concepts) for batch in batches]


def final_masks(results: Sequence[HostResults], concept_index: int | None = None) -> list[np.ndarray]:
    """Every row's [h, w] bool mask in row order (image, concept), optionally one concept's."""
    return [part.mask(row) for part in results for row in range(len(part))
            if concept_index is None or part.concept_index[row] == concept_index]



def warm_up(model: Model, resized: Sequence[ResizedImage], speed: EncoderSpeed,
            concept_sets: Sequence[Sequence[ConceptTensors]]) -> None:
    """One untimed batch per concept set to be timed, on CUDA (kernel selection, allocator
    growth) or with a traced decoder (tracing, compiling, recording each pair count and pass
    kind); nothing to do on CPU otherwise."""
    if next(model.parameters()).device.type == "cuda" or speed.decoder_graphs or speed.decoder_compile:
        batch = next(encode_in_batches(model, resized[: speed.batch_size], speed))
        for concepts in concept_sets:
            segment_all(model, [batch], concepts)
