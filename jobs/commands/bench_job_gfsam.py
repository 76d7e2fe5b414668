"""`persam bench --job --gfsam`: GF-SAM beside PerSAM in the job bench, on the same JPEGs.

In process, before Ray starts (the same SAM as PerSAM's figures, DINOv2 loaded here), at the
job's encoder batch size and precision: the stretch to 1024 x 1024, SAM alone on the stretched
frames, DINOv2 alone on the same frames, and the batched GF-SAM pass alone (gfsam_batch, every
point prompt of every pair of a batch in one decoder pass) for 1 and K concepts. Then, on the
PerSAM jobs' Ray, `persam segment` with 1 and K GF-SAM concepts: the whole job. The ratios the
targets name: the GF-SAM job's images/s over the PerSAM job's (K = 1, the same run) and the
GF-SAM job with K concepts over K = 1; each for the steady state and for the whole job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from persam_core.speed.acceleration import EncoderSpeed
from persam_core.modeling.backbone import Model
from persam_core.methods.frame_resize import stretch_resize
from persam_core.methods.frames import frame_tensor
from persam_core.methods.gfsam import fit_gfsam
from persam_core.methods.gfsam_batch import segment_gfsam
from persam_core.methods.gfsam_concept import GFSAMConcept
from persam_core.methods.gfsam_reference import ConceptStack
from persam_core.methods.registry import Shots
from persam_core.modeling.dinov2 import frame_tokens
from persam_core.modeling.predictor import encode_images

from jobs.commands.bench_tools import concept_masks, progress, timed
from jobs.spec import JobSpec
from jobs.storage.dinov2_checkpoints import load_dinov2

RunJob = Callable[[list[str], Path], dict]  # (concept files, output) -> bench_job._job's figures


def fit_gfsam_concepts(spec: JobSpec, device: str, picture: np.ndarray, count: int) -> tuple[torch.nn.Module,
                                                                                           list[GFSAMConcept]]:
    """DINOv2 of the spec on `device` and `count` GF-SAM concepts fitted on `picture` with the
    bench's K different masks -> (DINOv2, concepts)."""
    progress(f"GF-SAM: loading DINOv2 {spec.model.dinov2} on {device}, fitting {count} concepts")
    dinov2, fingerprint = load_dinov2(spec.model.dinov2, spec.model.dinov2_checkpoint, device, spec.storage_options)
    concepts = [fit_gfsam(Shots(f"gfsam{k}", [picture], [mask], ["bench"], ["bench"]), spec.model.dinov2, dinov2,
                          fingerprint, "gf-sam") for k, mask in enumerate(concept_masks(*picture.shape[:2], count))]
    return dinov2, concepts


def gfsam_in_process(sam: Model, dinov2: torch.nn.Module, speed: EncoderSpeed, pictures: list[np.ndarray],
                     concepts: list[GFSAMConcept]) -> dict:
    """The GF-SAM path's parts alone, in batches of speed.batch_size -> figures (images/s), keys
    `gfsam_*`. pictures: [H, W, 3] uint8; sam: the exact model, encoding at speed.precision."""
    device = next(sam.parameters()).device
    size, count = max(1, speed.batch_size), len(pictures)
    stretch_seconds, stretched = timed(lambda: [stretch_resize(p) for p in pictures])
    batches = [stretched[start : start + size] for start in range(0, count, size)]
    progress("GF-SAM: SAM alone on the stretched frames")
    sam_seconds, encoded = timed(lambda: [encode_images(sam, batch, speed.precision) for batch in batches])

    def tokens_of(batch) -> torch.Tensor:
        pixels = torch.stack([torch.from_numpy(image.pixels) for image in batch]).to(device)
        with torch.no_grad():
            return frame_tokens(dinov2, frame_tensor(pixels), speed.precision)

    progress("GF-SAM: DINOv2 alone on the stretched frames")
    dinov2_seconds, tokens = timed(lambda: [tokens_of(batch) for batch in batches])
    figures = {"gfsam_stretch_images_per_s": round(count / max(stretch_seconds, 1e-9), 3),
               "gfsam_sam_encoder_images_per_s": round(count / max(sam_seconds, 1e-9), 3),
               "gfsam_dinov2_images_per_s": round(count / max(dinov2_seconds, 1e-9), 3)}
    sizes = [picture.shape[:2] for picture in pictures]
    for name, chosen in [("k1", concepts[:1])] + ([("k", concepts)] if len(concepts) > 1 else []):
        stack = ConceptStack.of([c.reference for c in chosen], device)

        def cascade() -> None:
            for index, (images, batch_tokens) in enumerate(zip(encoded, tokens)):
                embeddings = torch.stack([image.features for image in images])
                segment_gfsam(sam, embeddings, batch_tokens, stack, sizes[index * size : index * size + len(images)])

        progress(f"GF-SAM: the batched GF-SAM pass alone, {len(chosen)} concept(s)")
        seconds, _ = timed(cascade)
        figures[f"gfsam_cascade_{name}_images_per_s"] = round(count / max(seconds, 1e-9), 3)
    return figures


def write_gfsam_concepts(root: Path, concepts: list[GFSAMConcept]) -> list[str]:
    """The concepts as files under root/gfsam-concepts -> their paths."""
    folder = root / "gfsam-concepts"
    folder.mkdir()
    files = []
    for concept in concepts:
        path = folder / f"{concept.name}.json"
        path.write_text(concept.to_json())
        files.append(str(path))
    return files


def gfsam_jobs(files: list[str], root: Path, run_job: RunJob) -> dict:
    """`persam segment` with the first GF-SAM concept, then with all of them (on the caller's
    Ray) -> figures `gfsam_job_k1_*` and `gfsam_job_k_*` (bench_job._job's keys)."""
    result = {}
    for name, chosen in [("k1", files[:1])] + ([("k", files)] if len(files) > 1 else []):
        progress(f"GF-SAM job with {len(chosen)} concept(s)")
        job = run_job(chosen, root / f"out-gfsam-{name}")
        result.update({f"gfsam_job_{name}_{key}": value for key, value in job.items()})
        progress(f"GF-SAM job with {len(chosen)} concept(s): {job}")
    return result


def gfsam_ratios(result: dict) -> None:
    """The targets' ratios (steady state and whole job): GF-SAM job / PerSAM job (K = 1, this
    run), GF-SAM K / GF-SAM K = 1; None where a figure is missing."""
    def ratio(top: str, bottom: str) -> float | None:
        a, b = result.get(top), result.get(bottom)
        return None if a is None or not b else round(a / b, 3)

    for rate in ("images_per_s", "whole_images_per_s"):
        suffix = "" if rate == "images_per_s" else "_whole"
        result[f"gfsam_job_k1_over_job_k1{suffix}"] = ratio(f"gfsam_job_k1_{rate}", f"job_k1_{rate}")
        result[f"gfsam_job_k_over_gfsam_job_k1{suffix}"] = ratio(f"gfsam_job_k_{rate}", f"gfsam_job_k1_{rate}")
    result["gfsam_job_k1_over_sam_encoder"] = ratio("gfsam_job_k1_images_per_s", "gfsam_sam_encoder_images_per_s")


def gfsam_table_rows(result: dict) -> list[tuple[str, object, object]]:
    """job_table's rows for GF-SAM (none when the bench ran without --gfsam)."""
    if "gfsam_job_k1_s" not in result:
        return []
    get = result.get
    return [
        ("GF-SAM job, steady state (images/s)", get("gfsam_job_k1_images_per_s"), get("gfsam_job_k_images_per_s")),
        ("GF-SAM job, whole incl. start-up (images/s)", get("gfsam_job_k1_whole_images_per_s"),
         get("gfsam_job_k_whole_images_per_s")),
        ("GF-SAM pass alone in-process (images/s)", get("gfsam_cascade_k1_images_per_s"),
         get("gfsam_cascade_k_images_per_s")),
        ("SAM alone, stretched frame (images/s)", get("gfsam_sam_encoder_images_per_s"), None),
        ("DINOv2 alone, stretched frame (images/s)", get("gfsam_dinov2_images_per_s"), None),
        ("GF-SAM job / PerSAM job (steady)", get("gfsam_job_k1_over_job_k1"), None),
        ("GF-SAM job / PerSAM job (whole)", get("gfsam_job_k1_over_job_k1_whole"), None),
        ("GF-SAM job(K) / job(1) (steady)", None, get("gfsam_job_k_over_gfsam_job_k1")),
        ("GF-SAM job(K) / job(1) (whole)", None, get("gfsam_job_k_over_gfsam_job_k1_whole")),
        ("GF-SAM rows written", get("gfsam_job_k1_rows"), get("gfsam_job_k_rows")),
    ]
