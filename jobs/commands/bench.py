"""`persam bench`: per-image costs of every path, measured side by side in one process.

Images are generated (seeded, photo-like sizes, mixed); K concepts are fitted on the first
image with K different masks. Every timed path is the batched cascade (`segment_batch`:
all images of an encoder batch x all concepts in one call) at the speed settings
`resolve_speed` gives the spec's flags on this device (CUDA: bf16, fused attention, compiled, batch 16;
CPU: the exact fp32 path, batch 1), and its final masks are compared with the fp32 exact
path's. The reference-style loop is the original's way of working: batch 1, fp32,
`SamPredictor.set_image` (SAM 2: `SAM2ImagePredictor.set_image`) for every (image,
concept), three decodes. Every model type runs the same protocol, so SAM 2.1's rows sit in
the same table as vit_h's and vit_b's. Variants (fp32, bf16,
fp16, fused attention) are timed on the encoder at the same batch size and their final
masks compared with the fp32 exact path's (mean and min IoU).

`persam bench --job` (bench_job.py) times the real Ray job against these paths; what both
share (generated inputs, the timer, the actor path's pieces) is in bench_tools.py.
"""

from __future__ import annotations

import copy
import json
import re
import warnings
import resource
from dataclasses import asdict, replace
from typing import Callable, Sequence

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from persam_core.speed.acceleration import EncoderSpeed, matmul_tf32, prepare_encoder
from persam_core.modeling.backbone import Model
from persam_core.modeling.families import as_backbone, family_of_model
from persam_core.batch import EncodedBatch
from persam_core.cascade import score_batch
from persam_core.concept import Concept, ConceptTensors, persam_f_target_feature, persam_targets, reference_cells
from persam_core.speed.decoder_speed import decoder_settings
from persam_core.evaluation.metrics import iou
from persam_core.persam import segment_persam
from persam_core.persam_f import fit_mask_weights
from persam_core.modeling.predictor import EncodedImage, encode_images
from persam_core.modeling.resized import ResizedImage

from jobs.commands.bench_tools import (batched, concept_masks, encode_in_batches, final_masks, is_exact, persam_concepts,
                                       progress, reference_encoder, segment_all, speed_model, synthetic_images, timed,
                                       warm_up)
from jobs.logs import native_stderr_filter
from jobs.pipeline.job_checks import spec_speed
from jobs.pipeline.session import resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import load_model

# What torch's profiler (kineto) writes to fd 2 by itself on every start and stop.
PROFILER_NOISE = re.compile(r"SyncActivityProfilerHandler|gpuGetDeviceCount|ActivityProfilerController")


def host_dispatch(run: Callable[[], object]) -> dict:
    """What `run` makes the host do, counted with torch.profiler: top-level torch ops
    dispatched from Python, and on CUDA the kernel and graph launches (the host's pace)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with native_stderr_filter(PROFILER_NOISE), warnings.catch_warnings():
        # its "Profiler clears events at the end of each cycle" warning on every use (seen on torch 2.11)
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events", category=UserWarning)
        with profile(activities=activities) as profiler:
            run()
    events = profiler.events()
    counts = {"torch_ops": sum(1 for e in events if e.name.startswith("aten::")
                               and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))}
    if cuda:
        counts["launches"] = sum(1 for e in events if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel",
                                                                          "cudaGraphLaunch")))
    return counts


# label -> (decoder graphs, decoder precision, compiled decoder); the first is the yardstick of the others' masks
DECODER_VARIANTS = {"eager_decoder": (False, "fp32", False), "decoder_graphs": (True, "fp32", False),
                    "bf16_decoder": (False, "bf16", False), "bf16_decoder_graphs": (True, "bf16", False),
                    "compiled_decoder": (False, "fp32", True), "compiled_decoder_graphs": (True, "fp32", True)}


def decoder_figures(model: Model, batches: Sequence[Sequence[EncodedImage]],
                    concept_sets: dict[str, Sequence[ConceptTensors]], images: int, compiled: bool = True) -> dict:
    """The cascade on the same encoded batches with each decoder variant, per concept set:
    seconds per image, torch ops (and on CUDA launches) of one batch, and the masks' minimum
    IoU against the eager fp32 decoder's (all under the default path's TF32 setting: on CUDA,
    by default, TF32 matmuls). Tracing, compiling and recording graphs happen in
    an untimed first run (the job's actors do it on their first chunks). compiled: also the
    compiled variants (off the GPU only the one without graphs, the same compile)."""
    if not family_of_model(model).tunable_decoder:
        return {"decoder_variants": f"not for {family_of_model(model).name}: its decoder runs as its package runs it"}
    on_gpu = next(model.parameters()).device.type == "cuda"
    variants = {label: v for label, v in DECODER_VARIANTS.items()
                if not v[2] or (compiled and (on_gpu or not v[0]))}
    figures: dict = {}
    for name, chosen in concept_sets.items():
        yardstick: list[np.ndarray] = []
        for label, (graphs, precision, compile_it) in variants.items():
            with decoder_settings(model, graphs, precision, compile_it):
                if compile_it or (graphs and on_gpu):  # compile / record each shape, untimed
                    segment_all(model, batches, chosen)
                seconds, results = timed(lambda: segment_all(model, batches, chosen))
                counts = host_dispatch(lambda: segment_all(model, batches[:1], chosen))
            masks = final_masks(results)
            yardstick = yardstick or masks
            key = f"cascade_{name}_{label}"
            figures[f"{key}_s_per_image"] = round(seconds / images, 4)
            figures.update({f"{key}_{what}_per_batch": n for what, n in counts.items()})
            figures[f"{key}_min_iou_vs_eager_fp32"] = round(float(min(iou(a, b) for a, b in zip(masks, yardstick))), 4)
    return figures


def _variants(sam: Model, resized: Sequence[ResizedImage], exact_masks: list[np.ndarray], concept: ConceptTensors,
              batch_size: int, default_row: dict) -> dict:
    """Encoder time per image and mask IoU against the fp32 exact path, for each eager path."""
    report = {}
    options = [("fp32", EncoderSpeed("fp32")), ("bf16", EncoderSpeed("bf16")), ("fp16", EncoderSpeed("fp16")),
               ("fused_fp32", EncoderSpeed("fp32", True)), ("fused_bf16", EncoderSpeed("bf16", True))]
    for name, speed in options:
        speed = replace(speed, batch_size=batch_size)
        model = copy.deepcopy(sam)
        prepare_encoder(model, speed)
        warm_up(model, resized, speed, [[concept]])
        seconds, encoded = timed(lambda: [e for b in encode_in_batches(model, resized, speed) for e in b])
        ious = [iou(a, b) for a, b in zip(final_masks(segment_all(model, batched(encoded, batch_size), [concept])), exact_masks)]
        report[name] = {"encoder_s_per_image": round(seconds / len(resized), 4), "mean_iou_vs_fp32": round(float(np.mean(ious)), 4),
                        "min_iou_vs_fp32": round(float(np.min(ious)), 4)}
        del model, encoded
    report["default"] = default_row
    return report


def run_bench(spec: JobSpec, images: int, concepts: int, epochs: int = 1000, variants: bool | None = None) -> dict:
    """Every in-process path timed on the same generated images -> the figures.

    One straight sequence of timed phases over shared state (model, images, concepts):
    long, but read top to bottom it is the benchmark's protocol."""
    model_type, device = spec.model.model_type, resolve_device(spec.model.device)
    progress(f"loading {model_type} on {device}")
    loaded = load_model(model_type, spec.model.checkpoint)
    sam = loaded.sam.to(device)
    speed = spec_speed(spec, torch.device(device).type)
    pictures = synthetic_images(images)
    resize_seconds, resized = timed(lambda: [as_backbone(sam).resize(p) for p in pictures])
    progress(f"fitting {concepts} concepts and PerSAM-F ({epochs} epochs)")
    reference = encode_images(sam, resized[:1])[0]
    fitted = [ConceptTensors.on(c, device)
              for c in persam_concepts(reference, pictures[0].shape[:2], concepts, loaded.fingerprint, model=sam)]
    mask = concept_masks(*pictures[0].shape[:2], 1)[0]
    cells = reference_cells([reference], [mask], ["bench"], model=sam)
    target = persam_f_target_feature(cells)
    fit_seconds, (weights, _) = timed(lambda: fit_mask_weights(sam, [reference], [mask], target, epochs=epochs))
    persam_f = ConceptTensors.on(Concept("f", "persam-f", target.cpu().numpy(), persam_targets(cells)[1].cpu().numpy(),
                                         loaded.fingerprint, weights), device)

    progress(f"preparing the encoder ({speed})")
    compile_seconds, (fast, speed) = timed(lambda: speed_model(sam, speed))
    half = fitted[: max(1, len(fitted) // 2)]
    warm_up(fast, resized, speed, [fitted[:1], [persam_f], fitted, half])
    progress("timing the batched paths")
    encoder_seconds, encoded = timed(lambda: [e for b in encode_in_batches(fast, resized, speed) for e in b])
    batches = batched(encoded, speed.batch_size)
    persam_seconds, _ = timed(lambda: segment_all(fast, batches, fitted[:1]))
    persam_f_seconds, _ = timed(lambda: segment_all(fast, batches, [persam_f]))
    k_seconds, k_results = timed(lambda: segment_all(fast, batches, fitted))
    k_half_seconds, _ = timed(lambda: segment_all(fast, batches, half))
    half_host = lambda t: t.cpu().numpy().astype(np.float16)  # noqa: E731
    cached = [(half_host(e.features), e.input_size, e.original_size, [half_host(h) for h in e.high_res]) for e in encoded]
    on_device = lambda a: torch.as_tensor(a.astype(np.float32), device=device)  # noqa: E731

    def from_cache() -> list[list[EncodedImage]]:  # what a warm --cache hands the actor (fp16 on disk; SAM 2 + high-res)
        return batched([EncodedImage(on_device(f), i, o, tuple(on_device(h) for h in levels)) for f, i, o, levels in cached],
                       speed.batch_size)

    cached_seconds, _ = timed(lambda: segment_all(fast, from_cache(), fitted[:1]))
    rank_warm_seconds, _ = timed(lambda: [score_batch(fast, EncodedBatch.of(b), fitted[:1]) for b in from_cache()])
    prior_seconds, _ = timed(lambda: [score_batch(fast, EncodedBatch.of(b), fitted[:1]) for b in batches])

    # prepare_encoder set the default path's TF32 for the process; these two paths are exact
    with matmul_tf32(False):
        progress("fp32 exact path (mask agreement)")
        exact_results = k_results
        if not is_exact(speed):
            exact_encoded = [e for r in resized for e in encode_images(sam, [r])]
            exact_results = segment_all(sam, batched(exact_encoded, speed.batch_size), fitted)
        ious = [iou(a, b) for a, b in zip(final_masks(k_results), final_masks(exact_results))]

        progress("reference-style loop")
        reference_encode = reference_encoder(sam)

        def reference_loop() -> None:
            for picture in pictures:
                for concept in fitted:  # the reference re-encodes for every concept
                    segment_persam(sam, reference_encode(picture), concept)

        reference_seconds, _ = timed(reference_loop)
    per = lambda seconds: round(seconds / images, 4)  # noqa: E731
    result = {
        "model_type": model_type, "device": device, "images": images, "concepts": concepts, "fit_epochs": epochs,
        "speed": asdict(speed), "encoder_prepare_s": round(compile_seconds, 2),
        "resize_s_per_image": per(resize_seconds),
        "encoder_s_per_image": per(encoder_seconds),
        "persam_s_per_image": per(resize_seconds + encoder_seconds + persam_seconds),
        "persam_f_s_per_image": per(resize_seconds + encoder_seconds + persam_f_seconds),
        "k_concepts_s_per_image": per(resize_seconds + encoder_seconds + k_seconds),
        f"k{len(half)}_concepts_s_per_image": per(resize_seconds + encoder_seconds + k_half_seconds),
        "cached_s_per_image": per(cached_seconds),
        "rank_cold_s_per_image": per(resize_seconds + encoder_seconds + prior_seconds),
        "rank_warm_s_per_image": per(rank_warm_seconds),
        "cache_bytes_per_image_fp16": int(cached[0][0].nbytes + sum(h.nbytes for h in cached[0][3])),
        "reference_loop_s_per_image": per(reference_seconds),
        "persam_f_fit_s": round(fit_seconds, 2),
        "mask_iou_vs_fp32_mean": round(float(np.mean(ious)), 4),
        "mask_iou_vs_fp32_min": round(float(np.min(ious)), 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["images_per_s"] = round(1 / max(result["persam_s_per_image"], 1e-9), 3)
    result["pipeline_over_encoder"] = round(result["persam_s_per_image"] / max(result["encoder_s_per_image"], 1e-9), 3)
    result["k_over_one_concept"] = round(result["k_concepts_s_per_image"] / max(result["persam_s_per_image"], 1e-9), 3)
    result["rank_cold_over_warm"] = round(result["rank_cold_s_per_image"] / max(result["rank_warm_s_per_image"], 1e-9), 1)
    result["reference_over_k_concepts"] = round(result["reference_loop_s_per_image"] / max(result["k_concepts_s_per_image"], 1e-9), 2)
    flags = spec.speed
    if device == "cuda" or flags.decoder_graphs is not None or flags.decoder_compile is not None or flags.decoder_precision != "fp32":
        progress("the cascade with each decoder variant")
        # off the GPU the variants only show that they run: K = 1 is enough there
        sets = {"k1": fitted[:1], "k": fitted} if device == "cuda" else {"k1": fitted[:1]}
        # the compiled variants compile each pass kind per concept set: only when --decoder-compile is named
        result.update(decoder_figures(fast, batches, sets, images, compiled=flags.decoder_compile is not None))
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if variants if variants is not None else device == "cuda":
        progress("variants")
        default_row = {"encoder_s_per_image": result["encoder_s_per_image"], "mean_iou_vs_fp32": result["mask_iou_vs_fp32_mean"],
                       "min_iou_vs_fp32": result["mask_iou_vs_fp32_min"], **asdict(speed)}
        del fast, encoded, batches
        result["variants"] = _variants(sam, resized, final_masks(exact_results, 0), fitted[0], speed.batch_size, default_row)
    return result


def print_bench(result: dict, as_json: bool) -> None:
    for key, value in result.items():
        print(f"{key:>28}  {value}")
    if as_json:
        print(json.dumps(result))
