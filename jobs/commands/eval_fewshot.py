"""`persam eval --benchmark fss1000|coco20i`: few-shot episodes through the segment job.

    scan the layout (eval_fewshot_data.py; all checked before any model loads)
    -> draw the episodes (persam_core.evaluation.fewshot: upstream's seeded protocol)
    -> per group of EPISODES_PER_JOB episodes, under <output>/fold<N>/job<NNNN>/:
       fit one concept per episode from its supports (one model load for the whole run)
       -> concepts/e<NNNN>.json, the group's query images -> targets.txt
       -> `persam segment` (Parquet in masks/, distributed and resumable like any segment job)
       -> each episode's own (query, concept) pair, and no other, computed and scored in the
          1024 x 1024 frame
    -> per fold mIoU / FB-IoU, their mean over folds -> <output>/metrics.json + metrics.md

The segment job computes each episode's own (query, concept) pair only (its `pairs`): one job
per group amortises the job's start-up (model load, Ray) over its episodes without decoding
the group's other concepts in each query.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np

from persam_core.evaluation.fewshot import COCO_EPISODES, COCO_FOLDS, ClassMeter, Episode, coco_episodes, frame_counts, fss_episodes
from persam_core.masks import decode_rle
from persam_core.methods.registry import FitModels, Shots

from jobs.commands.dry_run import dry_run_eval
from jobs.commands.eval_fewshot_data import FewShotData, scan_coco, scan_fss
from jobs.commands.eval_report import EvalError, percent, title, write_metrics, write_text
from jobs.commands.fit import fit_concept, fit_models
from jobs.commands.segment import run_segment
from jobs.pipeline.commit import part_files
from jobs.pipeline.session import ray_session, resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import random_weights_note
from jobs.storage.files import join_url
from jobs.storage.outputs import check_output_folder
from jobs.storage.redaction import redact
from jobs.storage.schema import CONCEPT, ERROR, IMAGE_URI, INSTANCE, MASK_RLE, read_parts

logger = logging.getLogger(__name__)

EPISODES_PER_JOB = 16
BENCHMARK_TITLES = {"fss1000": "FSS-1000", "coco20i": "COCO-20i"}


def plan_folds(spec: JobSpec) -> list[tuple[int, FewShotData, list[Episode]]]:
    """The benchmark's folds, each with its data and episodes (FSS-1000: one, numbered 0)."""
    if spec.benchmark == "fss1000":
        if spec.folds:
            raise EvalError("--fold: FSS-1000 has no folds (its test classes come from --split)")
        data = scan_fss(spec.data, spec.split, spec.storage_options)
        return [(0, data, fss_episodes(list(data.classes.items()), spec.shots, spec.seed, spec.episodes))]
    folds = list(dict.fromkeys(spec.folds)) if spec.folds else list(range(COCO_FOLDS))
    bad = [fold for fold in folds if not 0 <= fold < COCO_FOLDS]
    if bad:
        raise EvalError(f"--fold {bad[0]}: COCO-20i has folds 0 to {COCO_FOLDS - 1}")
    planned = []
    for fold, data in zip(folds, scan_coco(spec.data, folds, spec.split, spec.storage_options)):
        images = {int(label): names for label, names in data.classes.items()}
        planned.append((fold, data, coco_episodes(images, sorted(images), spec.shots,
                                                  spec.episodes or COCO_EPISODES, spec.seed)))
    return planned


def concept_name(episode: Episode) -> str:
    """The name of an episode's concept (its file under concepts/, its rows' `concept`)."""
    return f"e{episode.index:04d}"


def _fit(models: FitModels, spec: JobSpec, data: FewShotData, episode: Episode):
    """An episode's concept, fitted from its supports as `persam fit` would."""
    images = [data.image(name, spec.storage_options) for name in episode.supports]
    masks = [data.truth(name, episode.label) for name in episode.supports]
    sources = [redact(data.url(name)) for name in episode.supports]
    shots = Shots(concept_name(episode), images, masks, sources, sources, spec.epochs)
    return fit_concept(models, spec.method, shots, log=lambda _: None)


def _score(rows: list[dict], data: FewShotData, episodes: list[Episode], meter: ClassMeter) -> int:
    """Each episode's own row against its query's annotation -> the meter; -> episodes without a usable row."""
    found = {(r[IMAGE_URI], r[CONCEPT]): r for r in rows if r.get(INSTANCE, 0) == 0}
    errors = 0
    for episode in episodes:
        truth = data.truth(episode.query, episode.label)
        row = found.get((data.url(episode.query), concept_name(episode)))
        if row is None or row[ERROR] is not None or row[MASK_RLE] is None:
            errors += 1
            prediction = np.zeros_like(truth)
        else:
            prediction = decode_rle(row[MASK_RLE])
        if prediction.shape != truth.shape:
            raise EvalError(f"{data.source}: the annotation of {episode.query} is {truth.shape[1]}x{truth.shape[0]} "
                            f"but the image is {prediction.shape[1]}x{prediction.shape[0]}; fix the annotation")
        meter.add(episode.label, frame_counts(prediction, truth))
    return errors


def episode_pairs(data: FewShotData, episodes: list[Episode]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(query URL, its episodes' concept names): what a group's job computes (a query drawn by
    several episodes of the group, as COCO-20i can, has each of their concepts)."""
    pairs: dict[str, list[str]] = {}
    for episode in episodes:
        pairs.setdefault(data.url(episode.query), []).append(concept_name(episode))
    return tuple((url, tuple(names)) for url, names in pairs.items())


def _run_group(spec: JobSpec, models: FitModels, data: FewShotData, episodes: list[Episode], folder: str,
               meter: ClassMeter) -> tuple[int, int, int]:
    """One segment job over a group of episodes -> (queries run, queries failed, episodes unscored)."""
    concept_dir = join_url(folder, "concepts")
    for episode in episodes:
        concept = _fit(models, spec, data, episode)
        write_text(join_url(concept_dir, f"{concept.name}.json"), concept.to_json(), spec.storage_options)
    queries = list(dict.fromkeys(data.url(e.query) for e in episodes))
    manifest = join_url(folder, "targets.txt")
    write_text(manifest, "".join(f"{url}\n" for url in queries), spec.storage_options)
    masks = join_url(folder, "masks")
    summary = run_segment(replace(spec, command="segment", concepts=(concept_dir,), input=manifest, output=masks),
                          logger.debug, pairs=episode_pairs(data, episodes))
    rows = read_parts(part_files(masks, spec.storage_options), spec.storage_options)
    errors = _score(rows.to_pylist() if rows is not None else [], data, episodes, meter)
    return summary.images, summary.failed, errors


def fold_metrics(meter: ClassMeter, data: FewShotData, errors: int) -> dict:
    per_class = meter.per_class()
    return {"miou": meter.miou(), "fb_iou": meter.fb_iou(), "episodes": sum(meter.episodes.values()),
            "classes": len(per_class), "error_episodes": errors,
            "per_class": {label: {"name": data.names.get(label, label), "iou": iou, "episodes": meter.episodes[label]}
                          for label, iou in sorted(per_class.items(), key=lambda item: _label_key(item[0]))}}


def _label_key(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def fewshot_markdown(metrics: dict, heading: str) -> str:
    lines = [f"# {heading}", "", "| fold | mIoU | FB-IoU | classes | episodes |", "| ---: | ---: | ---: | ---: | ---: |"]
    for fold, value in metrics["folds"].items():
        lines.append(f"| {fold} | {percent(value['miou'])} | {percent(value['fb_iou'])} | {value['classes']} | "
                     f"{value['episodes']} |")
    lines.append(f"| mean | {percent(metrics['miou'])} | {percent(metrics['fb_iou'])} | | {metrics['episodes']} |")
    for fold, value in metrics["folds"].items():
        lines += ["", f"## fold {fold}", "", "| class | IoU | episodes |", "| --- | ---: | ---: |"]
        lines += [f"| {c['name']} | {percent(c['iou'])} | {c['episodes']} |" for c in value["per_class"].values()]
    lines += ["", f"{metrics['shots']}-shot, episode seed {metrics['seed']}. Per class: IoU = sum of intersections / "
              "sum of unions over its episodes, in the 1024 x 1024 frame; mIoU = mean over the fold's classes; "
              "FB-IoU = mean of background and foreground IoU over all episodes. Values in percent."]
    return "\n".join(lines) + "\n"


def run_fewshot_eval(spec: JobSpec, log=logger.info) -> dict | None:
    """Evaluate and write metrics.json / metrics.md into --output -> the metrics."""
    started = time.perf_counter()
    device = resolve_device(spec.model.device)
    check_output_folder(spec.output, "--output", spec.storage_options)  # before the model loads
    name = BENCHMARK_TITLES[spec.benchmark]
    planned = plan_folds(spec)
    for fold, data, episodes in planned:
        log(f"{name} fold {fold}: {len(data.classes)} classes, {len(episodes)} episodes, {spec.shots}-shot")
    if spec.dry_run:
        dry_run_eval(spec, f"{name} {redact(spec.data)}: {sum(len(e) for _, _, e in planned)} episodes, "
                           f"each fitted from its supports and its query segmented", log)
        return None
    note = random_weights_note(spec.model.checkpoint)
    models = fit_models(spec, device, log=lambda _: None)
    folds, run, failed = {}, 0, 0
    with ray_session() if spec.runner == "ray" else nullcontext():  # one Ray for every group's job
        for fold, data, episodes in planned:
            meter, errors = ClassMeter(), 0
            for start in range(0, len(episodes), EPISODES_PER_JOB):
                group = episodes[start : start + EPISODES_PER_JOB]
                folder = join_url(spec.output, f"fold{fold}/job{start // EPISODES_PER_JOB:04d}")
                images, bad, unscored = _run_group(spec, models, data, group, folder, meter)
                run, failed, errors = run + images, failed + bad, errors + unscored
                log(f"{name} fold {fold}: {start + len(group)}/{len(episodes)} episodes, mIoU so far "
                    f"{percent(meter.miou())}")
            folds[str(fold)] = fold_metrics(meter, data, errors)
    del models
    metrics = {"benchmark": spec.benchmark, "shots": spec.shots, "seed": spec.seed,
               "miou": _mean([f["miou"] for f in folds.values()]), "fb_iou": _mean([f["fb_iou"] for f in folds.values()]),
               "episodes": sum(f["episodes"] for f in folds.values()), "folds": folds,
               # the failure policy (--max-error-rate) judges the queries this run segmented
               "targets_run": run, "targets_failed": failed}
    metrics.update(method=spec.method, model_type=spec.model.model_type, seconds=round(time.perf_counter() - started, 1))
    if note:
        metrics["note"] = note
    heading = title(spec, f"{name} {spec.shots}-shot", note)
    write_metrics(spec.output, metrics, fewshot_markdown(metrics, heading), spec.storage_options)
    return metrics
