"""PerSAM / PerSAM-F over segment_anything's and sam2's modules: pure torch + numpy.

Every concept of the paper lives in one module named after it:

    families    the model-family registry: model types, builders, official checkpoints, capabilities,
                as_backbone (nothing else asks which family a model is)
    sam_family  SAM (vit_h/l/b), MobileSAM (vit_t), tiny;  sam2_family  SAM 2.1 (sam2.1_t/s/b+/l, tiny_sam2)
    models      any family: seeded random weights, safe state-dict loading, key checks, fingerprint
    sam2_models SAM 2.1 through sam2's own build_sam2 and hydra configs
    backbone    what the methods need from a model (encode, prompts, decode, upsample): the protocol
    sam_backbone   SAM's adapter, exactly as SamPredictor drives it
    sam2_backbone  SAM 2's, exactly as SAM2ImagePredictor drives it
    preprocess  image -> encoder input exactly as SamPredictor (and SAM 2's resize); mask -> 64x64 grid
    inputs      the input formats (resize, encoder outputs) families name (no model built)
    concept     reference features -> Concept (target feature, target embedding)
    prior       similarity map, positive/negative points, attention bias
    decoder     SAM's mask decoder + target-guided attention + target-semantic prompt
    decoder_sam2  SAM 2's own mask decoder with its transformer wrapped for the same guidance
    pairs       P (image, concept) pairs decoded together; size groups for full-res work
    persam      the training-free three-pass cascade (batched; one image = batch of one)
    persam_f    the two-weight fit and its cascade (batched)
    cascade     every pair of an encoder batch through its method's passes, presence,
                further instances as batched rounds; results leave the device once
    batch       EncodedBatch in, HostResults out (bit-packed masks, plain numpy)
    instances   presence threshold and several instances per image (one-image view)
    acceleration  fused attention, bf16/fp16 encoder, torch.compile, TF32; applies the decoder's (options)
    decoder_speed SAM's decoder eagerly, as CUDA graphs and/or compiled, fp32 or bf16 autocast (options)
    compile_cache the compiled encoder's cache key and torch's serialised artifacts (warm starts)
    masks       COCO RLE, bbox, area
    metrics     IoU
    evaluation  PerSeg mIoU / boundary IoU, DAVIS J and F
    video       the reference's video mode (DAVIS)
    tiny_vit    MobileSAM's TinyViT image encoder (vit_t)
    errors      how an error reads on one line (notes, error rows, the CLI)
    methods/    the method registry and one module per method (persam, persam-f, gf-sam)
    modeling/   DINOv2 (GF-SAM's second model)

What a Python user needs is exported here (build a model, fit a concept, segment an image,
register a method or a model family), imported on first use: importing persam_core itself
loads no torch, so the command line's torch-free modules (options, families) stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_random": "models", "build_from_state_dict": "models", "load_state_dict_file": "models",
    "model_fingerprint": "models",
    "family_of": "families", "register_family": "families", "as_backbone": "families", "input_format": "families",
    "encode_images": "predictor",
    "Concept": "concept", "ConceptTensors": "concept", "persam_targets": "concept", "reference_cells": "concept",
    "segment_persam": "persam",
    "get_method": "methods.registry", "register_method": "methods.registry", "load_concept": "methods.registry",
    "Shots": "methods.registry", "FitModels": "methods.registry",
}
_RENAMED = {"register_method": "register"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'persam_core' has no attribute {name!r}")
    module = importlib.import_module(f"persam_core.{_EXPORTS[name]}")
    return getattr(module, _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
