"""`persam bench --gfsam`: GF-SAM's per-image costs beside PerSAM's, on the same generated images.

Timed in one process, batch 1, fp32 (GF-SAM's exact path): the stretch to 1024 x 1024, SAM on
the stretched frame, DINOv2 on the same frame, the batched GF-SAM pass for one concept and for
K concepts (gfsam_batch.segment_gfsam: every point prompt of every pair in one decoder pass),
and rank's presence pass (DINOv2 tokens only). `gfsam_over_persam` is the GF-SAM path's time
per image over PerSAM's (K = 1) from the main bench.
"""

from __future__ import annotations

import torch

from persam_core.methods.frame_resize import stretch_resize
from persam_core.methods.frames import frame_tensor
from persam_core.methods.gfsam import fit_gfsam
from persam_core.methods.gfsam_batch import gfsam_presence, segment_gfsam
from persam_core.methods.gfsam_reference import ConceptStack
from persam_core.methods.registry import Shots
from persam_core.modeling.dinov2 import frame_tokens
from persam_core.modeling.predictor import encode_images

from jobs.commands.bench_tools import concept_masks, progress, synthetic_images, timed
from jobs.pipeline.session import resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import load_model
from jobs.storage.dinov2_checkpoints import load_dinov2


def run_gfsam_bench(spec: JobSpec, images: int, concepts: int, persam_s_per_image: float | None = None) -> dict:
    """-> the GF-SAM figures (seconds per image), keys prefixed `gfsam_`."""
    model_type, checkpoint, device = spec.model.model_type, spec.model.checkpoint, resolve_device(spec.model.device)
    dinov2_kind, dinov2_checkpoint = spec.model.dinov2, spec.model.dinov2_checkpoint
    progress(f"GF-SAM: loading {model_type} and DINOv2 {dinov2_kind} on {device}")
    sam = load_model(model_type, checkpoint).sam.to(device)
    dinov2, fingerprint = load_dinov2(dinov2_kind, dinov2_checkpoint, device)
    pictures = synthetic_images(images)
    masks = concept_masks(*pictures[0].shape[:2], concepts)
    fitted = [fit_gfsam(Shots(f"c{k}", [pictures[0]], [mask], ["bench"], ["bench"]), dinov2_kind, dinov2, fingerprint,
                        "gf-sam") for k, mask in enumerate(masks)]
    one = ConceptStack.of([fitted[0].reference], device)
    every = ConceptStack.of([c.reference for c in fitted], device)

    progress("GF-SAM: timing")
    stretch_seconds, stretched = timed(lambda: [stretch_resize(p) for p in pictures])
    sam_seconds, encoded = timed(lambda: [encode_images(sam, [s])[0] for s in stretched])

    def tokens_of(resized) -> torch.Tensor:
        with torch.no_grad():
            return frame_tokens(dinov2, frame_tensor(torch.from_numpy(resized.pixels)[None].to(device)))

    dinov2_seconds, tokens = timed(lambda: [tokens_of(s) for s in stretched])

    def cascade(stack: ConceptStack) -> None:
        for image, token, picture in zip(encoded, tokens, pictures):
            segment_gfsam(sam, image.features[None], token, stack, [picture.shape[:2]])

    cascade_one, _ = timed(lambda: cascade(one))
    cascade_every, _ = timed(lambda: cascade(every))
    presence_seconds, _ = timed(lambda: [gfsam_presence(t, one) for t in tokens])
    per = lambda seconds: round(seconds / images, 4)  # noqa: E731
    encoders = stretch_seconds + sam_seconds + dinov2_seconds
    result = {
        "gfsam_dinov2": dinov2_kind,
        "gfsam_stretch_s_per_image": per(stretch_seconds),
        "gfsam_sam_encoder_s_per_image": per(sam_seconds),
        "gfsam_dinov2_s_per_image": per(dinov2_seconds),
        "gfsam_cascade_k1_s_per_image": per(cascade_one),
        "gfsam_cascade_k_s_per_image": per(cascade_every),
        "gfsam_s_per_image": per(encoders + cascade_one),
        "gfsam_k_concepts_s_per_image": per(encoders + cascade_every),
        "gfsam_rank_s_per_image": per(stretch_seconds + dinov2_seconds + presence_seconds),
    }
    result["gfsam_images_per_s"] = round(1 / max(result["gfsam_s_per_image"], 1e-9), 3)
    result["gfsam_k_over_one_concept"] = round(
        result["gfsam_k_concepts_s_per_image"] / max(result["gfsam_s_per_image"], 1e-9), 3)
    if persam_s_per_image:
        result["gfsam_over_persam"] = round(result["gfsam_s_per_image"] / max(persam_s_per_image, 1e-9), 3)
    return result
