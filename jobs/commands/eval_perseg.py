"""`persam eval`: the paper's PerSeg protocol (mIoU / bIoU) through the segment job.

    scan Images/<concept>/NN.* + Annotations/<concept>/NN.png (all checked before work)
    -> fit each concept on its image 00 (one model load) -> <output>/concepts/*.json
    -> `persam segment` over every target image (<output>/targets.txt, Parquet in
       <output>/masks/, distributed and resumable like any segment job)
    -> per concept Σ intersection / Σ union (region and boundary) over its targets
    -> <output>/metrics.json + metrics.md

The segment job decodes every concept in every target image; only a target's own
concept is scored (the others cost decoder passes, not encodes). `--video` is DAVIS
2017 J&F, see eval_video.py.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import numpy as np
from fsspec.core import url_to_fs

from persam_core.evaluation.scores import BOUNDARY_DILATION_RATIO, boundary_counts, ratio_or_one, region_counts
from persam_core.masks import decode_rle
from persam_core.methods.registry import FitModels, Shots

from jobs.commands.eval_report import EvalError, percent, title, write_metrics, write_text
from jobs.commands.fit import fit_concept, fit_models
from jobs.commands.dry_run import dry_run_eval
from jobs.commands.segment import run_segment
from jobs.pipeline.output import read_rows
from jobs.pipeline.session import resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import random_weights_note
from jobs.storage.files import as_given, folder_entries, join_url, read_bytes
from jobs.storage.images import IMAGE_EXTENSIONS, decode_image, decode_mask
from jobs.storage.outputs import check_output_folder
from jobs.storage.redaction import redact
from jobs.storage.schema import CONCEPT, ERROR, IMAGE_URI, INSTANCE, MASK_RLE

logger = logging.getLogger(__name__)

REFERENCE_STEM = "00"
# The reference's eval_mioU.py skips these; the paper's figures are over the other 32.
PAPER_SKIPPED = ("physics_mug", "clock", "pink_sunglasses", "cat2", "red_teapot", "mug_skulls", "flower", "vase")


@dataclass(frozen=True)
class ConceptData:
    """One PerSeg concept: reference image/mask URLs and (image, mask) URL pairs of its targets."""

    name: str
    reference_image: str
    reference_mask: str
    targets: tuple[tuple[str, str], ...]


def _by_stem(names: list[str], extensions: tuple[str, ...]) -> dict[str, str]:
    return {os.path.splitext(n)[0]: n for n in names if n.lower().endswith(extensions) and not n.startswith(".")}


def scan_perseg(data: str, storage_options: dict | None = None) -> list[ConceptData]:
    """Check the PerSeg layout before any work -> its concepts, sorted by name."""
    fs, root = url_to_fs(data, **(storage_options or {}))
    root = root.rstrip("/")
    url = as_given(fs, data)
    for folder in ("Images", "Annotations"):
        if not fs.isdir(f"{root}/{folder}"):
            raise EvalError(f"{redact(data)}: no {folder}/ folder; expected the PerSeg layout "
                            "Images/<concept>/NN.jpg and Annotations/<concept>/NN.png")
    concepts = []
    for name in folder_entries(fs, f"{root}/Images")[0]:
        images = _by_stem(folder_entries(fs, f"{root}/Images/{name}")[1], IMAGE_EXTENSIONS)
        mask_dir = f"{root}/Annotations/{name}"
        masks = _by_stem(folder_entries(fs, mask_dir)[1], (".png",)) if fs.isdir(mask_dir) else {}
        if REFERENCE_STEM not in images or REFERENCE_STEM not in masks:
            raise EvalError(f"{redact(data)}: concept {name!r} has no reference: Images/{name}/00.jpg and "
                            f"Annotations/{name}/00.png are both needed")
        for stem in sorted(set(images) ^ set(masks)):
            what = f"Images/{name}/{images[stem]} has no mask Annotations/{name}/{stem}.png" if stem in images else \
                f"Annotations/{name}/{masks[stem]} has no image in Images/{name}/"
            raise EvalError(f"{redact(data)}: {what}; every target needs both")
        targets = tuple((url(f"{root}/Images/{name}/{images[s]}"), url(f"{mask_dir}/{masks[s]}"))
                        for s in sorted(images) if s != REFERENCE_STEM)
        if not targets:
            raise EvalError(f"{redact(data)}: concept {name!r} has only its reference image; add target images")
        concepts.append(ConceptData(name, url(f"{root}/Images/{name}/{images[REFERENCE_STEM]}"),
                                    url(f"{mask_dir}/{masks[REFERENCE_STEM]}"), targets))
    if not concepts:
        raise EvalError(f"{redact(data)}: Images/ holds no concept folders")
    return concepts


def fit_concepts(models: FitModels, concepts: list[ConceptData], method: str, epochs: int | None,
                 storage_options: dict | None = None) -> list:
    """Each concept from its image 00 and mask, as `persam fit` (same steps, one model load)."""
    fitted = []
    for data in concepts:
        image = decode_image(read_bytes(data.reference_image, storage_options), redact(data.reference_image))
        mask = decode_mask(read_bytes(data.reference_mask, storage_options), redact(data.reference_mask))
        shots = Shots(data.name, [image], [mask], [redact(data.reference_image)], [redact(data.reference_mask)], epochs)
        fitted.append(fit_concept(models, method, shots, log=lambda _: None))
    return fitted


def score_rows(rows: list[dict], concepts: list[ConceptData], storage_options: dict | None = None) -> dict:
    """Mask rows of the segment job -> {concept: counts}; a target without a usable row scores empty."""
    by_image = {image: (data.name, mask) for data in concepts for image, mask in data.targets}
    found = {(r[IMAGE_URI], r[CONCEPT]): r for r in rows if r.get(INSTANCE, 0) == 0}
    scores = {data.name: {"intersection": 0, "union": 0, "b_intersection": 0, "b_union": 0, "images": 0, "errors": 0}
              for data in concepts}
    for image, (name, mask_url) in by_image.items():
        truth = decode_mask(read_bytes(mask_url, storage_options), redact(mask_url))
        row = found.get((image, name))
        score = scores[name]
        if row is None or row[ERROR] is not None or row[MASK_RLE] is None:
            score["errors"] += 1
            prediction = np.zeros_like(truth)
        else:
            prediction = decode_rle(row[MASK_RLE])
        if prediction.shape != truth.shape:
            raise EvalError(f"{redact(mask_url)}: mask is {truth.shape[1]}x{truth.shape[0]} but its image "
                            f"{redact(image)} is {prediction.shape[1]}x{prediction.shape[0]}; fix the annotation")
        inter, union = region_counts(prediction, truth)
        b_inter, b_union = boundary_counts(prediction, truth)
        score.update(intersection=score["intersection"] + inter, union=score["union"] + union,
                     b_intersection=score["b_intersection"] + b_inter, b_union=score["b_union"] + b_union,
                     images=score["images"] + 1)
    return scores


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def perseg_metrics(scores: dict) -> dict:
    """Counts per concept -> the metrics.json metrics (+ the paper's 32-concept subset)."""
    per_concept = {name: {"miou": ratio_or_one(s["intersection"], s["union"]),
                          "biou": ratio_or_one(s["b_intersection"], s["b_union"]),
                          "images": s["images"], "errors": s["errors"]} for name, s in sorted(scores.items())}
    subset = {n: v for n, v in per_concept.items() if n not in PAPER_SKIPPED}
    return {
        "miou": _mean([v["miou"] for v in per_concept.values()]),
        "biou": _mean([v["biou"] for v in per_concept.values()]),
        "per_concept": per_concept,
        "subset_32": {"miou": _mean([v["miou"] for v in subset.values()]),
                      "biou": _mean([v["biou"] for v in subset.values()]), "concepts": len(subset),
                      "excluded": [n for n in PAPER_SKIPPED if n in per_concept]},
        "concepts": len(per_concept),
        "images": sum(v["images"] for v in per_concept.values()),
        "error_images": sum(v["errors"] for v in per_concept.values()),
        "boundary_dilation_ratio": BOUNDARY_DILATION_RATIO,
    }


def perseg_markdown(metrics: dict, title: str) -> str:
    lines = [f"# {title}", "", "| concept | IoU | bIoU | targets | in paper's 32 |", "| --- | ---: | ---: | ---: | :---: |"]
    for name, value in metrics["per_concept"].items():
        lines.append(f"| {name} | {percent(value['miou'])} | {percent(value['biou'])} | {value['images']} | "
                     f"{'no' if name in PAPER_SKIPPED else 'yes'} |")
    subset = metrics["subset_32"]
    lines += ["", "| set | mIoU | bIoU | concepts |", "| --- | ---: | ---: | ---: |",
              f"| all | {percent(metrics['miou'])} | {percent(metrics['biou'])} | {metrics['concepts']} |",
              f"| paper's 32-concept subset | {percent(subset['miou'])} | {percent(subset['biou'])} | {subset['concepts']} |",
              "", f"bIoU: Boundary IoU, boundary width {metrics['boundary_dilation_ratio']} x image diagonal. "
              "Values in percent."]
    return "\n".join(lines) + "\n"


def run_perseg_eval(spec: JobSpec, log=logger.info) -> dict | None:
    """Evaluate and write metrics.json / metrics.md into --output -> the metrics."""
    started = time.perf_counter()
    device = resolve_device(spec.model.device)
    check_output_folder(spec.output, "--output", spec.storage_options)  # before the model loads
    concepts = scan_perseg(spec.data, spec.storage_options)
    log(f"PerSeg: {len(concepts)} concepts, {sum(len(c.targets) for c in concepts)} target images")
    if spec.dry_run:
        dry_run_eval(spec, f"PerSeg {redact(spec.data)}: {len(concepts)} concepts fitted on their image 00, "
                           f"their targets segmented", log)
        return None
    note = random_weights_note(spec.model.checkpoint)
    models = fit_models(spec, device, log=lambda _: None)
    fitted = fit_concepts(models, concepts, spec.method, spec.epochs, spec.storage_options)
    fingerprint = models.sam()[1]
    del models
    concept_dir = join_url(spec.output, "concepts")
    for concept in fitted:
        write_text(join_url(concept_dir, f"{concept.name}.json"), concept.to_json(), spec.storage_options)
    manifest = join_url(spec.output, "targets.txt")
    write_text(manifest, "".join(f"{image}\n" for c in concepts for image, _ in c.targets), spec.storage_options)
    masks = join_url(spec.output, "masks")
    # the targets go through the segment job itself: distributed, resumable, same rows
    summary = run_segment(replace(spec, command="segment", concepts=(concept_dir,), input=manifest, output=masks), log)
    log(summary.line())
    # the masks as any reader of an output gets them: from <output>/masks, or from --table
    rows = read_rows(None if spec.table else masks, spec.table, spec.catalog, spec.storage_options)
    metrics = perseg_metrics(score_rows(rows.to_pylist() if rows is not None else [], concepts, spec.storage_options))
    # the failure policy (--max-error-rate) judges the targets this run segmented
    metrics.update(targets_run=summary.images, targets_failed=summary.failed)
    metrics.update(method=spec.method, model_type=spec.model.model_type, model_fingerprint=fingerprint,
                   seconds=round(time.perf_counter() - started, 1))
    if note:
        metrics["note"] = note
    write_metrics(spec.output, metrics, perseg_markdown(metrics, title(spec, "PerSeg", note)), spec.storage_options)
    return metrics
