"""PerSAM / PerSAM-F over segment_anything's and sam2's modules: pure torch + numpy.

By role, each concept in one module named after it:

    modeling/   the models: the family registry (families: model types, builders, official
                checkpoints, capabilities, as_backbone; nothing else asks which family a model
                is), SAM (sam_family, sam_backbone), SAM 2.1 (sam2_family, sam2_models,
                sam2_backbone), MobileSAM's TinyViT (tiny_vit), DINOv2 (dinov2: GF-SAM's second
                model), any family's weights (models), what the methods need from a model
                (backbone), input formats (inputs), the CPU side's resizes (resize, torch-free),
                image -> encoder input (preprocess, predictor)
    methods/    the method registry and one module per method (persam, persam-f, gf-sam); the
                frames they read (frames) and the CPU side's resize to each (frame_resize)
    speed/      encoder precision, fused attention, compile, TF32 (acceleration), the decoder's
                speed paths (decoder_speed), warm starts (compile_cache), the flags (options)
    video/      the reference's video mode over SAM (reference_mode), PerSAM on SAM 2's memory
                (sam2_memory)
    evaluation/ IoU (metrics), PerSeg mIoU / bIoU and DAVIS J / F (scores), few-shot episodes
                (fewshot)

PerSAM's own mechanics, which the methods above share, stay at the top level:

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
    prompts, refine  the cascade's prompts and its final box refinement
    masks       COCO RLE, bbox, area
    errors      how an error reads on one line (notes, error rows, the CLI)

What a Python user needs is exported here (build a model, fit a concept, segment an image,
register a method or a model family), imported on first use: importing persam_core itself
loads no torch, so the command line's torch-free modules (speed.options, modeling.families) stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_random": "modeling.models", "build_from_state_dict": "modeling.models", "load_state_dict_file": "modeling.models",
    "model_fingerprint": "modeling.models",
    "family_of": "modeling.families", "register_family": "modeling.families", "as_backbone": "modeling.families", "input_format": "modeling.families",
    "encode_images": "modeling.predictor",
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
