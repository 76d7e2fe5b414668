"""`persam bench`: per-image costs of every path, measured side by side in one process.

Images are generated (seeded, photo-like sizes, mixed); K concepts are fitted on the first
image with K different masks. The reference-style loop is the original's way of working:
batch 1, fp32, `SamPredictor.set_image` for every (image, concept), three decodes.
Variants (bf16, fp16, fused attention, compiled) are timed on the encoder and their final
masks compared with the fp32 path's (mean and min IoU).
"""

from __future__ import annotations

import copy
import json
import resource
import time
from typing import Callable

import numpy as np
import torch
from segment_anything import SamPredictor

from persam_core.acceleration import compile_encoder, enable_fused_attention
from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
from persam_core.metrics import iou
from persam_core.persam import ConceptTensors, prior_for, segment_persam
from persam_core.persam_f import fit_mask_weights, segment_persam_f
from persam_core.predictor import EncodedImage, encode_images
from persam_core.preprocess import resize_longest_side

from .checkpoints import load_model

PHOTO_SIZES = [(768, 1024), (1024, 768), (600, 800), (1080, 1440), (480, 640)]


def synthetic_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Blocky random colour fields: [H, W, 3] uint8 at photo-like sizes."""
    generator = np.random.default_rng(seed)
    images = []
    for index in range(count):
        height, width = PHOTO_SIZES[index % len(PHOTO_SIZES)]
        coarse = generator.integers(0, 256, size=(height // 64 + 2, width // 64 + 2, 3), dtype=np.uint8)
        images.append(np.ascontiguousarray(np.kron(coarse, np.ones((64, 64, 1), dtype=np.uint8))[:height, :width]))
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


def _timed(function: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def _concepts(sam, reference: EncodedImage, picture: np.ndarray, count: int, device: str) -> tuple[list[ConceptTensors], ConceptTensors]:
    persam_concepts, persam_f = [], None
    for index, mask in enumerate(concept_masks(*picture.shape[:2], count)):
        cells = reference_cells([reference], [mask], [f"bench mask {index}"])
        feature, embedding = persam_targets(cells)
        concept = Concept(f"c{index}", "persam", feature.cpu().numpy(), embedding.cpu().numpy(), "bench")
        persam_concepts.append(ConceptTensors.on(concept, device))
        if persam_f is None:
            target = persam_f_target_feature(cells)
            weights, _ = fit_mask_weights(sam, [reference], [mask], target, epochs=5)
            persam_f = ConceptTensors.on(Concept("f", "persam-f", target.cpu().numpy(), embedding.cpu().numpy(), "bench", weights), device)
    return persam_concepts, persam_f


def _variants(sam, resized, fp32_masks, concept: ConceptTensors, images: int) -> dict:
    """Encoder time per image and mask IoU against fp32, for each faster path."""
    report = {}
    options = [("bf16", "bf16", False, False), ("fp16", "fp16", False, False), ("fused_fp32", "fp32", True, False),
               ("fused_bf16", "bf16", True, False), ("compiled_bf16", "bf16", True, True)]
    for name, precision, fused, compiled in options:
        model = copy.deepcopy(sam)
        if fused:
            enable_fused_attention(model)
        if compiled:
            compile_encoder(model)
            encode_images(model, resized[:1], precision)  # compile outside the timing
        seconds, encoded = _timed(lambda: [e for r in resized for e in encode_images(model, [r], precision)])
        ious = [iou(segment_persam(model, e, concept).mask, m) for e, m in zip(encoded, fp32_masks)]
        report[name] = {"encoder_s_per_image": round(seconds / images, 4), "mean_iou_vs_fp32": round(float(np.mean(ious)), 4),
                        "min_iou_vs_fp32": round(float(np.min(ious)), 4)}
    return report


def run_bench(model_type: str, checkpoint: str, images: int, concepts: int, device: str, epochs: int = 1000,
              variants: bool | None = None) -> dict:
    sam = load_model(model_type, checkpoint).sam.to(device)
    pictures = synthetic_images(images)
    resize_seconds, resized = _timed(lambda: [resize_longest_side(p) for p in pictures])
    reference = encode_images(sam, resized[:1])[0]
    persam_concepts, persam_f_concept = _concepts(sam, reference, pictures[0], concepts, device)
    mask = concept_masks(*pictures[0].shape[:2], 1)[0]
    target = persam_f_target_feature(reference_cells([reference], [mask], ["bench"]))
    fit_seconds, _ = _timed(lambda: fit_mask_weights(sam, [reference], [mask], target, epochs=epochs))

    encoder_seconds, encoded = _timed(lambda: [e for r in resized for e in encode_images(sam, [r])])
    persam_seconds, fp32_results = _timed(lambda: [segment_persam(sam, e, persam_concepts[0]) for e in encoded])
    persam_f_seconds, _ = _timed(lambda: [segment_persam_f(sam, e, persam_f_concept) for e in encoded])
    k_seconds, _ = _timed(lambda: [segment_persam(sam, e, c) for e in encoded for c in persam_concepts])
    half = persam_concepts[: max(1, len(persam_concepts) // 2)]
    k_half_seconds, _ = _timed(lambda: [segment_persam(sam, e, c) for e in encoded for c in half])
    cached = [(e.features.cpu().numpy().astype(np.float16), e.input_size, e.original_size) for e in encoded]

    def from_cache() -> list[EncodedImage]:  # what a warm --cache hands the actor (fp16 on disk)
        return [EncodedImage(torch.as_tensor(f.astype(np.float32), device=device), i, o) for f, i, o in cached]

    cached_seconds, _ = _timed(lambda: [segment_persam(sam, e, persam_concepts[0]) for e in from_cache()])
    rank_warm_seconds, _ = _timed(lambda: [prior_for(sam, e, persam_concepts[0]).presence for e in from_cache()])
    prior_seconds, _ = _timed(lambda: [prior_for(sam, e, persam_concepts[0]).presence for e in encoded])

    predictor = SamPredictor(sam)

    def reference_loop() -> None:
        for picture in pictures:
            for concept in persam_concepts:  # the reference re-encodes for every concept
                predictor.set_image(picture)
                features = EncodedImage(predictor.features[0], predictor.input_size, predictor.original_size)
                segment_persam(sam, features, concept)

    reference_seconds, _ = _timed(reference_loop)
    per = lambda seconds: round(seconds / images, 4)  # noqa: E731
    result = {
        "model_type": model_type, "device": device, "images": images, "concepts": concepts, "fit_epochs": epochs,
        "resize_s_per_image": per(resize_seconds),
        "encoder_s_per_image": per(encoder_seconds),
        "persam_s_per_image": per(resize_seconds + encoder_seconds + persam_seconds),
        "persam_f_s_per_image": per(resize_seconds + encoder_seconds + persam_f_seconds),
        "k_concepts_s_per_image": per(resize_seconds + encoder_seconds + k_seconds),
        f"k{len(half)}_concepts_s_per_image": per(resize_seconds + encoder_seconds + k_half_seconds),
        "cached_s_per_image": per(cached_seconds),
        "rank_cold_s_per_image": per(resize_seconds + encoder_seconds + prior_seconds),
        "rank_warm_s_per_image": per(rank_warm_seconds),
        "cache_bytes_per_image_fp16": int(cached[0][0].nbytes),
        "reference_loop_s_per_image": per(reference_seconds),
        "persam_f_fit_s": round(fit_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["images_per_s"] = round(1 / result["persam_s_per_image"], 3)
    result["pipeline_over_encoder"] = round(result["persam_s_per_image"] / result["encoder_s_per_image"], 3)
    result["k_over_one_concept"] = round(result["k_concepts_s_per_image"] / result["persam_s_per_image"], 3)
    result["rank_cold_over_warm"] = round(result["rank_cold_s_per_image"] / max(result["rank_warm_s_per_image"], 1e-9), 1)
    result["reference_over_k_concepts"] = round(result["reference_loop_s_per_image"] / result["k_concepts_s_per_image"], 2)
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if variants if variants is not None else device == "cuda":
        result["variants"] = _variants(sam, resized, [r.mask for r in fp32_results], persam_concepts[0], images)
    return result


def print_bench(result: dict, as_json: bool) -> None:
    for key, value in result.items():
        print(f"{key:>28}  {value}")
    if as_json:
        print(json.dumps(result))
