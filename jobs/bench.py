"""`persam bench`: per-image costs of every path, measured side by side in one process.

Images are generated (mixed photo-like sizes, seeded); concepts are fitted on the first
image with a central mask. The reference-style loop is the original's way of working:
batch 1, fp32, `SamPredictor.set_image` for every (image, concept), three decodes.
"""

from __future__ import annotations

import json
import resource
import time
from typing import Callable

import numpy as np
import torch
from segment_anything import SamPredictor

from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
from persam_core.persam import ConceptTensors, segment_persam
from persam_core.persam_f import fit_mask_weights, segment_persam_f
from persam_core.predictor import EncodedImage, encode_images
from persam_core.preprocess import resize_longest_side

from .checkpoints import load_model

PHOTO_SIZES = [(768, 1024), (1024, 768), (600, 800), (1080, 1440), (480, 640)]


def synthetic_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random colour fields with a few blobs: [H, W, 3] uint8, photo-like sizes."""
    generator = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = PHOTO_SIZES[index % len(PHOTO_SIZES)]
        coarse = generator.integers(0, 256, size=(height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
        image = np.kron(coarse, np.ones((64, 64, 1), dtype=np.uint8))[:height, :width]
        images.append(np.ascontiguousarray(image))
    return images


def central_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    return mask


def _per_image(seconds: float, images: int) -> float:
    return round(seconds / max(1, images), 4)


def _timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def run_bench(model_type: str, checkpoint: str, images: int, concepts: int, device: str, epochs: int = 1000) -> dict:
    sam = load_model(model_type, checkpoint).sam.to(device)
    pictures = synthetic_images(images)
    resized = [resize_longest_side(p) for p in pictures]

    reference = encode_images(sam, resized[:1])
    mask = central_mask(*pictures[0].shape[:2])
    cells = reference_cells(reference, [mask], ["bench mask"])
    feature, embedding = persam_targets(cells)
    fit_seconds = _timed(lambda: fit_mask_weights(sam, reference, [mask], persam_f_target_feature(cells), epochs=epochs))
    weights, _ = fit_mask_weights(sam, reference, [mask], persam_f_target_feature(cells), epochs=5)
    persam_concept = ConceptTensors.on(Concept("a", "persam", feature.numpy(), embedding.numpy(), "bench"), device)
    persam_f_concept = ConceptTensors.on(
        Concept("b", "persam-f", persam_f_target_feature(cells).numpy(), embedding.numpy(), "bench", weights), device
    )

    encoded: list[EncodedImage] = []
    encoder_seconds = _timed(lambda: encoded.extend(e for r in resized for e in encode_images(sam, [r])))
    decode_persam = _timed(lambda: [segment_persam(sam, e, persam_concept) for e in encoded])
    decode_persam_f = _timed(lambda: [segment_persam_f(sam, e, persam_f_concept) for e in encoded])
    decode_k = _timed(lambda: [segment_persam(sam, e, persam_concept) for e in encoded for _ in range(concepts)])

    predictor = SamPredictor(sam)

    def reference_loop() -> None:
        for picture in pictures:
            for _ in range(concepts):  # the reference re-encodes for every concept
                predictor.set_image(picture)
                features = EncodedImage(predictor.features[0], predictor.input_size, predictor.original_size)
                segment_persam(sam, features, persam_concept)

    reference_seconds = _timed(reference_loop)
    result = {
        "model_type": model_type, "device": device, "images": images, "concepts": concepts, "fit_epochs": epochs,
        "encoder_s_per_image": _per_image(encoder_seconds, images),
        "persam_s_per_image": _per_image(encoder_seconds + decode_persam, images),
        "persam_f_s_per_image": _per_image(encoder_seconds + decode_persam_f, images),
        "k_concepts_s_per_image": _per_image(encoder_seconds + decode_k, images),
        "cached_s_per_image": _per_image(decode_persam, images),
        "reference_loop_s_per_image": _per_image(reference_seconds, images),
        "persam_f_fit_s": round(fit_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["pipeline_over_encoder"] = round(result["persam_s_per_image"] / result["encoder_s_per_image"], 3)
    result["reference_over_k_concepts"] = round(result["reference_loop_s_per_image"] / result["k_concepts_s_per_image"], 3)
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def print_bench(result: dict, as_json: bool) -> None:
    for key, value in result.items():
        print(f"{key:>28}  {value}")
    if as_json:
        print(json.dumps(result))
