"""`persam eval --video`: DAVIS 2017 semi-supervised J&F, one sequence per Ray actor call.

    scan JPEGImages/480p/<seq>/*.jpg + Annotations/480p/<seq>/*.png (counts, names and
    sizes checked before work; sequences: --sequences, else ImageSets/2017/val.txt when
    present, else every annotated sequence)
    -> a pool of model actors (--runner local: one in this process); each call tracks one
       sequence, frames in order, writes its palette PNGs to <output>/predictions/<seq>/ and
       returns per-object J and F of every frame but the first and the last. The mode
       follows the model: SAM re-localises every object in every frame with PerSAM's prior
       (persam_core.video.reference_mode, the reference's video mode: `sam-prior`); SAM 2 propagates the
       first frame's masks with its memory bank and re-prompts lost objects from the prior
       (persam_core.video.sam2_memory: `sam2-memory`)
    -> metrics.json / metrics.md: J, F, J&F (means over all objects, as the toolkit),
       recall and decay, per sequence and per object.

Annotations are palette (index) PNGs: 0 background, 255 void (ignored, as the toolkit).
"""

from __future__ import annotations

import logging
import io
import os
import time
from dataclasses import replace

import fsspec
import numpy as np
from fsspec.core import url_to_fs
from PIL import Image

from persam_core.evaluation.scores import davis_f, davis_j, davis_statistics
from persam_core.modeling.families import family_of
from persam_core.video.reference_mode import SequenceTracker, VideoSettings, fits_mask_weights, video_methods

from jobs.commands.eval_report import EvalError, percent, title, write_metrics
from jobs.pipeline.job_checks import load_checked_model
from jobs.pipeline.session import plan_actors, ray_session, resolve_device
from jobs.commands.dry_run import dry_run_eval
from jobs.pipeline.progress import Progress
from jobs.spec import JobSpec
from jobs.storage.checkpoints import load_model, random_weights_note
from jobs.storage.files import as_given, folder_entries, join_url, read_bytes
from jobs.storage.images import decode_image
from jobs.storage.outputs import check_output_folder
from jobs.storage.redaction import redact

logger = logging.getLogger(__name__)

VOID_LABEL = 255
# metrics' "mode": how the sequences were tracked
MODES = {"sam-prior": "SAM; PerSAM's prior re-localises every object in every frame (the reference's video mode)",
         "sam2-memory": "SAM 2's memory bank propagates the first frame's masks; PerSAM's prior re-prompts "
                        "objects SAM 2 loses"}


def video_mode(model_type: str) -> str:
    return family_of(model_type).video_mode


def _sequence_names(fs, root: str, requested: list[str] | None, available: list[str]) -> list[str]:
    if requested:
        names = requested
    elif fs.isfile(f"{root}/ImageSets/2017/val.txt"):
        names = [line.strip() for line in fs.cat_file(f"{root}/ImageSets/2017/val.txt").decode().splitlines() if line.strip()]
    else:
        names = available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise EvalError(f"sequence {unknown[0]!r} has no folder in Annotations/480p/; pass existing sequence names")
    return names


def _displayed_size(fs, path: str) -> tuple[int, int]:
    """(width, height) from the header, EXIF rotation applied (as decode_image does)."""
    with fs.open(path, "rb") as handle, Image.open(handle) as image:
        width, height = image.size
        if image.format == "JPEG" and image.getexif().get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def scan_davis(data: str, storage_options: dict | None = None, sequences: list[str] | None = None) -> list[dict]:
    """Check the DAVIS layout before any work -> [{"name", "frames": [url], "masks": [url]}]."""
    fs, root = url_to_fs(data, **(storage_options or {}))
    root = root.rstrip("/")
    url = as_given(fs, data)
    images_root, masks_root = f"{root}/JPEGImages/480p", f"{root}/Annotations/480p"
    for folder in (images_root, masks_root):
        if not fs.isdir(folder):
            raise EvalError(f"{redact(data)}: no {folder[len(root) + 1:]}/ folder; expected the DAVIS 2017 layout "
                            "JPEGImages/480p/<sequence>/00000.jpg and Annotations/480p/<sequence>/00000.png")
    specs = []
    for name in _sequence_names(fs, root, sequences, folder_entries(fs, masks_root)[0]):
        frames = [f for f in folder_entries(fs, f"{images_root}/{name}")[1] if f.lower().endswith((".jpg", ".jpeg"))] \
            if fs.isdir(f"{images_root}/{name}") else []
        masks = [f for f in folder_entries(fs, f"{masks_root}/{name}")[1] if f.lower().endswith(".png")]
        stems = [os.path.splitext(f)[0] for f in frames]
        if stems != [os.path.splitext(m)[0] for m in masks]:
            missing = sorted(set(stems) ^ {os.path.splitext(m)[0] for m in masks})
            raise EvalError(f"sequence {name!r}: {len(frames)} frames but {len(masks)} annotations "
                            f"(unmatched: {missing[0] if missing else 'order'}); every frame needs its annotation")
        if len(frames) < 3:
            raise EvalError(f"sequence {name!r}: {len(frames)} frames; DAVIS scores the frames between the first "
                            "and the last, so at least 3 are needed")
        sizes = {_displayed_size(fs, f"{folder}/{name}/{f}") for folder, names in ((images_root, frames), (masks_root, masks))
                 for f in names}
        if len(sizes) != 1:
            raise EvalError(f"sequence {name!r}: frames and annotations differ in size ({sorted(sizes)}); "
                            "every frame and annotation of a sequence must have one size")
        specs.append({"name": name, "frames": [url(f"{images_root}/{name}/{f}") for f in frames],
                      "masks": [url(f"{masks_root}/{name}/{m}") for m in masks]})
    if not specs:
        raise EvalError(f"{redact(data)}: no sequences in Annotations/480p/")
    return specs


def read_labels(url: str, storage_options: dict | None = None) -> tuple[np.ndarray, list[int] | None]:
    """Palette/grayscale PNG -> ([H, W] uint8 object ids, 255 = void, its palette or None)."""
    with Image.open(io.BytesIO(read_bytes(url, storage_options))) as image:
        if image.mode not in ("P", "L"):
            raise EvalError(f"{redact(url)}: a {image.mode} image; DAVIS annotations are palette PNGs of object ids")
        return np.array(image, dtype=np.uint8), image.getpalette()


def davis_palette() -> list[int]:
    """The PASCAL VOC / DAVIS colour map, 256 x RGB."""
    palette = []
    for index in range(256):
        rgb, value = [0, 0, 0], index
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette += rgb
    return palette


def _write_png(url: str, labels: np.ndarray, palette: list[int], storage_options: dict | None) -> None:
    image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with fsspec.open(url, "wb", **(storage_options or {})) as handle:
        handle.write(buffer.getvalue())


class ClipFrames:
    """A sequence's frames, read and decoded one index at a time ([H, W, 3] uint8 RGB)."""

    def __init__(self, urls: list[str], storage_options: dict | None) -> None:
        self.urls, self.storage = urls, storage_options

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> np.ndarray:
        return decode_image(read_bytes(self.urls[index], self.storage), redact(self.urls[index]))


class VideoWorker:
    """Ray actor (or in process): the model loaded once; `run` tracks and scores one whole sequence."""

    def __init__(self, spec: JobSpec, expected_fingerprint: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.sam = load_checked_model(spec, expected_fingerprint).sam.to(resolve_device(spec.model.device))
        self.with_memory = family_of(spec.model.model_type).tracks_with_memory
        if self.with_memory:
            from persam_core.video.sam2_memory import video_predictor

            self.sam = video_predictor(self.sam, spec.model.model_type)
        defaults = VideoSettings(method=spec.method)  # its own epoch default (800) unless --epochs
        self.settings = defaults if spec.epochs is None else replace(defaults, epochs=spec.epochs)
        self.storage = spec.storage_options

    def run(self, spec: dict, predictions: str) -> dict:
        started = time.perf_counter()
        storage, name = self.storage, spec["name"]
        first, palette = read_labels(spec["masks"][0], storage)
        first = np.where(first == VOID_LABEL, 0, first)
        labels = [int(v) for v in np.unique(first) if v != 0]
        if not labels:
            raise EvalError(f"{redact(spec['masks'][0])}: no object in the first annotation of sequence {name!r}")
        palette = palette or davis_palette()
        _write_png(join_url(predictions, f"{name}/{os.path.basename(spec['masks'][0])}"), first.astype(np.uint8), palette, storage)
        scores = {label: {"j": [], "f": []} for label in labels}
        last = len(spec["frames"]) - 1
        for index, predicted in self._track(ClipFrames(spec["frames"], storage), first):
            _write_png(join_url(predictions, f"{name}/{os.path.basename(spec['masks'][index])}"), predicted, palette, storage)
            if index == last:  # DAVIS scores neither the first nor the last frame
                continue
            truth, _ = read_labels(spec["masks"][index], storage)
            for label in labels:
                scores[label]["j"].append(davis_j(truth == label, predicted == label))
                scores[label]["f"].append(davis_f(truth == label, predicted == label))
        return {"name": name, "objects": scores, "frames": len(spec["frames"]), "seconds": time.perf_counter() - started}

    def _track(self, frames: ClipFrames, first: np.ndarray):
        """-> (index, [H, W] uint8 labels) of frames 1 .. n-1, in order (frame 0 is the annotation)."""
        if self.with_memory:
            from persam_core.video.sam2_memory import MemoryTracker

            tracked = MemoryTracker(self.sam, frames).from_masks(first)
            next(tracked)  # frame 0: SAM 2's decode of the given masks; DAVIS keeps the annotation
            yield from tracked
            return
        tracker = SequenceTracker(self.sam, frames[0], first, self.settings)
        for index in range(1, len(frames)):
            yield index, tracker.step(frames[index])


def video_metrics(results: list[dict]) -> dict:
    """Per-sequence results -> J, F, J&F over all objects (davis2017-evaluation's global means)."""
    per_object, per_sequence, stats = {}, {}, {"j": [], "f": []}
    for result in sorted(results, key=lambda r: r["name"]):
        j_means, f_means = [], []
        for label, values in sorted(result["objects"].items(), key=lambda item: int(item[0])):
            j_stats, f_stats = davis_statistics(values["j"]), davis_statistics(values["f"])
            stats["j"].append(j_stats)
            stats["f"].append(f_stats)
            per_object[f"{result['name']}_{label}"] = {"j": j_stats[0], "f": f_stats[0]}
            j_means.append(j_stats[0])
            f_means.append(f_stats[0])
        j, f = float(np.mean(j_means)), float(np.mean(f_means))
        per_sequence[result["name"]] = {"j": j, "f": f, "jf": (j + f) / 2, "objects": len(j_means), "frames": result["frames"]}
    j_all, f_all = np.array(stats["j"]), np.array(stats["f"])
    j, f = float(np.mean(j_all[:, 0])), float(np.mean(f_all[:, 0]))
    return {"j": j, "f": f, "jf": (j + f) / 2,
            "j_recall": float(np.mean(j_all[:, 1])), "j_decay": float(np.mean(j_all[:, 2])),
            "f_recall": float(np.mean(f_all[:, 1])), "f_decay": float(np.mean(f_all[:, 2])),
            "per_sequence": per_sequence, "per_object": per_object,
            "sequences": len(per_sequence), "objects": len(per_object)}


def video_markdown(metrics: dict, title: str) -> str:
    lines = [f"# {title}", "", f"Mode: `{metrics['mode']}`: {MODES[metrics['mode']]}.", "", "| sequence | J | F | J&F | objects | frames |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, value in metrics["per_sequence"].items():
        lines.append(f"| {name} | {percent(value['j'])} | {percent(value['f'])} | {percent(value['jf'])} | "
                     f"{value['objects']} | {value['frames']} |")
    lines += ["", "| J&F | J | J recall | J decay | F | F recall | F decay |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
              "| " + " | ".join(percent(metrics[k]) for k in ("jf", "j", "j_recall", "j_decay", "f", "f_recall", "f_decay")) + " |",
              "", "Means over all objects of all sequences, frames between the first and the last "
              "(davis2017-evaluation, semi-supervised). Values in percent."]
    return "\n".join(lines) + "\n"


def run_clip_pool(worker_class: type, spec: JobSpec, items: list, fingerprint: str, *args,
                  error_type: type[Exception] = EvalError) -> list[dict]:
    """Ray: one model actor per planned slot, `actor.run(item, *args)` for each item, results as
    they come (eval --video's sequences, track's clips); a failure -> error_type(its first line)."""
    import ray
    from ray.util import ActorPool

    plan = plan_actors(spec.model.device, spec.num_actors, work_items=len(items))
    results = []
    try:
        with ray_session():
            worker = ray.remote(worker_class).options(max_restarts=1, max_task_retries=1, **plan.resources)
            pool = ActorPool([worker.remote(spec, fingerprint, plan.threads) for _ in range(plan.count)])
            with Progress(len(items), spec.command, spec.progress_interval, unit="clips") as progress:
                for result in pool.map_unordered(lambda actor, item: actor.run.remote(item, *args), items):
                    results.append(result)
                    progress.update(1)
    except ray.exceptions.RayError as error:  # an item's or an actor's failure: its first line
        cause = error.cause if isinstance(getattr(error, "cause", None), BaseException) else error
        text = str(cause).strip().splitlines()
        raise error_type(text[0] if text else type(cause).__name__) from None
    return results


def run_clip_local(worker_class: type, spec: JobSpec, items: list, fingerprint: str, *args) -> list[dict]:
    """--runner local: the same worker in this process, one item after another."""
    import torch

    worker = worker_class(spec, fingerprint, torch.get_num_threads())
    results = []
    with Progress(len(items), spec.command, spec.progress_interval, unit="clips") as progress:
        for item in items:
            results.append(worker.run(item, *args))
            progress.update(1)
    return results


def run_video_eval(spec: JobSpec, log=logger.info) -> dict | None:
    started = time.perf_counter()
    mode = video_mode(spec.model.model_type)
    if family_of(spec.model.model_type).tracks_with_memory and (spec.method not in video_methods() or fits_mask_weights(spec.method)):
        raise EvalError(f"--method {spec.method}: SAM 2's video mode tracks with its memory and fits no mask "
                        "weights; pass --method persam (or a SAM --model-type for PerSAM-F's video mode)")
    check_output_folder(spec.output, "--output", spec.storage_options)  # before the model loads
    sequences = scan_davis(spec.data, spec.storage_options, list(spec.sequences) if spec.sequences else None)
    log(f"DAVIS: {len(sequences)} sequences, {sum(len(s['frames']) for s in sequences)} frames")
    if spec.dry_run:
        dry_run_eval(spec, f"DAVIS {redact(spec.data)}: {len(sequences)} sequences", log)
        return None
    fingerprint = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options).fingerprint
    note = random_weights_note(spec.model.checkpoint)  # the actors load their own copy
    if note:
        log(f"note: {note}")
    run = run_clip_local if spec.runner == "local" else run_clip_pool
    results = run(VideoWorker, spec, sequences, fingerprint, join_url(spec.output, "predictions"))
    metrics = video_metrics(results)
    metrics.update(method=spec.method, mode=mode, model_type=spec.model.model_type, model_fingerprint=fingerprint,
                   seconds=round(time.perf_counter() - started, 1))
    if note:
        metrics["note"] = note
    write_metrics(spec.output, metrics, video_markdown(metrics, title(spec, "DAVIS 2017", note)), spec.storage_options)
    return metrics
