"""`persam bench --job`: the real Ray job against the in-process paths, side by side.

N generated photo-like JPEGs (1024x768 and 768x1024) and K PerSAM concepts fitted in this
process are written to a temporary folder; `run_segment` (the code of `persam segment`)
runs on them twice on one Ray, with 1 concept and with K (once with K = 1). Beside each job:

- the actor path: what the model actor does, without Ray, on already-resized images
  (compute.py's encode_chunk at the default speed settings + cascade_chunk -> host
  results), one chunk after another, and through the actor's device stages with two calls
  in flight (device_stages.py), as in the job;
- the encoder alone at the same settings;
- the reference-style loop (SamPredictor.set_image fp32 + one-image PerSAM, K = 1;
  SAM2ImagePredictor.set_image for SAM 2).

Job rates: steady state = the images of the results between the first and the last (both
excluded) / the time from the first result to the last but one (start-up and the first
chunk before the window; the draining pipeline's early last result after it); whole = all
images / the job's wall time, start-up included. The in-process paths run first, so the
encoder is compiled once here and the job's actors find inductor's on-disk cache warm. The
job's K = 1 masks of the first images are held to the actor path's masks of the same JPEGs
(min IoU).

Start-up, with a compiled encoder: the K = 1 job twice more, cold then warm (bench_start.py).
With `gfsam`: GF-SAM's parts in-process and its jobs (K = 1 and K) on the same Ray and JPEGs,
with the ratios its targets name (bench_job_gfsam.py).
"""

from __future__ import annotations

import gc
import posixpath
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np
import torch
from PIL import Image
from persam_core.speed.acceleration import EncoderSpeed, matmul_tf32
from persam_core.modeling.backbone import Model
from persam_core.modeling.families import as_backbone, family_of
from persam_core.concept import Concept, ConceptTensors
from persam_core.speed.decoder_speed import decoder_settings
from persam_core.persam import segment_persam
from persam_core.masks import decode_rle
from persam_core.evaluation.metrics import iou
from persam_core.modeling.predictor import encode_images
from persam_core.modeling.resized import ResizedImage

from jobs.commands.bench_tools import (encode_in_batches, final_masks, persam_concepts, progress, reference_encoder,
                                       segment_all, speed_model, synthetic_images, timed, warm_up)
from jobs.commands.bench_job_gfsam import (fit_gfsam_concepts, gfsam_in_process, gfsam_jobs, gfsam_ratios,
                                           gfsam_table_rows, write_gfsam_concepts)
from jobs.commands.bench_start import start_ups
from jobs.commands.segment import run_segment
from jobs.pipeline import commit
from jobs.pipeline.compute import cascade_chunk, encode_chunk, encoder_padding
from jobs.pipeline.device_stages import DeviceStages
from jobs.pipeline.job_checks import spec_speed
from jobs.pipeline.payload import Chunk, ChunkItem, ChunkResults
from jobs.pipeline.run import ACTOR_CONCURRENT_CALLS
from jobs.pipeline.session import ray_session, resolve_device
from jobs.spec import JobSpec
from jobs.storage.checkpoints import load_model
from jobs.storage.images import decode_image
from jobs.storage.schema import ERROR, IMAGE_URI, MASK_RLE, error_count, read_parts

JOB_SIZES = [(1024, 768), (768, 1024)]
# Noise amplitude that brings the generated JPEGs (quality 90) to photo-like byte sizes.
JPEG_GRAIN = 12
REFERENCE_LOOP_IMAGES = 16
AGREEMENT_IMAGES = 16  # images whose job masks are compared with the actor path's in-process ones
T = TypeVar("T")


@dataclass
class JobBenchOptions:
    """spec: the model, device, speed flags, actors and shard size as `persam segment` takes
    them; images / concepts: how many to generate and fit."""

    spec: JobSpec
    images: int = 64
    concepts: int = 8
    gfsam: bool = False  # also GF-SAM's figures and jobs (bench_job_gfsam.py)


# (graphs, compiled) of the actor path's decoder -> its figures' label
ACTOR_LABELS = {(False, False): "eager_decoder", (True, False): "decoder_graphs", (False, True): "compiled_decoder",
                (True, True): "compiled_decoder_graphs"}


class Progress:
    """on_progress target: when each result (one chunk) reached the driver, and its images."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.chunk_images: list[int] = []

    def __call__(self, images: int) -> None:
        self.arrivals.append(time.perf_counter())
        self.chunk_images.append(images)

    @property
    def calls(self) -> int:
        return len(self.arrivals)

    @property
    def images(self) -> int:
        return sum(self.chunk_images)

    def batch_fill(self, batch_size: int) -> float | None:
        """Images / the encoder batch slots their chunks took, each chunk's last, partial batch
        padded to `batch_size` (compute.encoder_padding; 1: none)."""
        slots = sum(-(-images // batch_size) * batch_size for images in self.chunk_images)
        return self.images / slots if slots else None

    def steady_window(self) -> float | None:
        """Seconds from the first result to the last but one; None with fewer than three."""
        return self.arrivals[-2] - self.arrivals[0] if self.calls >= 3 else None

    def steady_rate(self) -> float | None:
        """Images per second from the first result to the last but one: start-up and the first
        chunk are behind the first; the last comes early, as the pipeline drains (its cascade
        shares the device with no next chunk's encode), so it would shorten the window by up
        to a chunk. None with fewer than three results."""
        window = self.steady_window()
        return sum(self.chunk_images[1:-1]) / window if window else None


def write_inputs(root: Path, pictures: list[np.ndarray], concepts: list[Concept]) -> tuple[Path, list[str], float]:
    """JPEGs under root/images, concept files under root/concepts -> (image dir, concept files, mean KiB)."""
    images, concept_dir = root / "images", root / "concepts"
    images.mkdir()
    concept_dir.mkdir()
    sizes = []
    for index, picture in enumerate(pictures):
        path = images / f"img{index:05d}.jpg"
        Image.fromarray(picture).save(path, quality=90)
        sizes.append(path.stat().st_size)
    files = []
    for concept in concepts:
        path = concept_dir / f"{concept.name}.json"
        path.write_text(concept.to_json())
        files.append(str(path))
    return images, files, float(np.mean(sizes)) / 1024


def concept_sets(items: Sequence[T]) -> list[tuple[str, Sequence[T]]]:
    """The concept sets timed: ("k1", the first), ("k", all); with one concept the second
    would time the same work again, so only "k1" (the K column of the table stays empty)."""
    return [("k1", items[:1])] + ([("k", items)] if len(items) > 1 else [])


def _in_process(options: JobBenchOptions, sam: Model, device: str, pictures: list[np.ndarray],
                concepts: list[ConceptTensors], check_pictures: list[np.ndarray]) -> tuple[dict, EncoderSpeed, list[np.ndarray]]:
    """Encoder only, actor path (K = 1 and K) and the reference loop -> (figures, speed in
    effect, the actor path's K = 1 masks of `check_pictures`, which the job's are held to).

    pictures: [H, W, 3] uint8 each; check_pictures: some of them as the job decodes its JPEGs;
    sam stays the fp32 exact model (the reference loop's).
    """
    speed = spec_speed(options.spec, torch.device(device).type)
    flags = options.spec.speed
    progress(f"preparing the encoder ({speed})")
    prepare_seconds, (fast, speed) = timed(lambda: speed_model(sam, speed))
    resized = [as_backbone(sam).resize(p) for p in pictures]
    warm_up(fast, resized, speed, [chosen for _, chosen in concept_sets(concepts)])
    count = len(resized)
    progress("encoder only")
    encoder_seconds, _ = timed(lambda: [None for _ in encode_in_batches(fast, resized, speed)])
    figures = {"encoder_prepare_s": round(prepare_seconds, 2), "encoder_images_per_s": round(count / encoder_seconds, 3)}
    # the decoder timed several ways, side by side (SAM 2 decodes eagerly either way):
    # (graphs, compiled): eager and graphs on CUDA or when graphs are named, compiled when named
    modes = [(speed.decoder_graphs, speed.decoder_compile)]
    if family_of(options.spec.model.model_type).tunable_decoder:
        if device == "cuda" or flags.decoder_graphs is not None:
            modes += [(False, False), (True, False)]
        if flags.decoder_compile is not None:
            modes += [(False, True)]
    figures.update(_actor_paths(fast, speed, resized, concepts, modes))
    check = [as_backbone(fast).resize(p) for p in check_pictures]
    check_masks = final_masks(segment_all(fast, encode_in_batches(fast, check, speed), concepts[:1]))
    del fast

    reference_pictures = pictures[:REFERENCE_LOOP_IMAGES]
    progress(f"reference-style loop on {len(reference_pictures)} images")
    reference_encode = reference_encoder(sam)

    def reference_loop() -> None:
        for picture in reference_pictures:
            segment_persam(sam, reference_encode(picture), concepts[0])

    with matmul_tf32(False):  # prepare_encoder set the actor path's TF32 for the process; the reference loop is fp32
        seconds, _ = timed(reference_loop)
    figures["reference_loop_images"] = len(reference_pictures)
    figures["reference_loop_images_per_s"] = round(len(reference_pictures) / seconds, 3)
    return figures, speed, check_masks


def _actor_paths(fast: Model, speed: EncoderSpeed, resized: list[ResizedImage], concepts: list[ConceptTensors],
                 modes: list[tuple[bool, bool]]) -> dict:
    """The actor's work in-process (its own encode_chunk and cascade_chunk), for each concept
    set and decoder mode (graphs, compiled), timed two ways -> figures: one chunk after another
    on this thread (actor_*), and as the actor runs it, two chunks in flight through its device
    stages (actor_stages_*: encode lock, cascade thread, CUDA cascade stream) without Ray. The
    same work both ways: the two figures differ by the stages alone."""
    figures, count = {}, len(resized)
    chunks = [_chunk(index, resized[start : start + speed.batch_size])
              for index, start in enumerate(range(0, count, speed.batch_size))]
    stages = DeviceStages(next(fast.parameters()).device)
    with ThreadPoolExecutor(max_workers=ACTOR_CONCURRENT_CALLS, thread_name_prefix="call") as calls:
        for name, chosen in concept_sets(concepts):
            def serial(chunk: Chunk) -> ChunkResults:
                return cascade_chunk(fast, *encode_chunk(fast, chunk, speed), chosen)

            def staged(chunk: Chunk) -> ChunkResults:
                return stages.run(lambda: encode_chunk(fast, chunk, speed), lambda done: cascade_chunk(fast, *done, chosen))

            for graphs, compiled in dict.fromkeys(modes):  # in order, once each
                with decoder_settings(fast, graphs, compiled=compiled) as mode:
                    label = ACTOR_LABELS[(mode.graphs, mode.compiled)]
                    progress(f"actor path, {len(chosen)} concept(s), {label}")
                    if mode.graphs or mode.compiled:  # tracing, compiling, recording each shape once, untimed (the actors: on their first chunk)
                        serial(chunks[0])
                    seconds, _ = timed(lambda: [serial(chunk) for chunk in chunks])
                    figures[f"actor_{name}_{label}_images_per_s"] = round(count / seconds, 3)
                    staged(chunks[0])  # the cascade thread records its own graphs (untimed)
                    seconds, _ = timed(lambda: list(calls.map(staged, chunks)))
                    figures[f"actor_stages_{name}_{label}_images_per_s"] = round(count / seconds, 3)
                if (graphs, compiled) == (speed.decoder_graphs, speed.decoder_compile):  # the settings the job runs at
                    figures[f"actor_{name}_images_per_s"] = figures[f"actor_{name}_{label}_images_per_s"]
                    figures[f"actor_stages_{name}_images_per_s"] = figures[f"actor_stages_{name}_{label}_images_per_s"]
    stages.close()
    return figures


def _chunk(index: int, resized: list[ResizedImage]) -> Chunk:
    """Resized images as the prepare stage hands them to the actor."""
    items = [ChunkItem(f"img{index}-{n}", source="pixels", original_size=r.original_size, input_size=r.input_size)
             for n, r in enumerate(resized)]
    return Chunk(0, index, items, pixels={n: r.pixels for n, r in enumerate(resized)})


def job_agreement(output: Path, names: list[str], masks: list[np.ndarray]) -> float:
    """The lowest IoU between the job's mask of each image `names[i]` (a file name) and
    masks[i], the actor path's in-process mask of the same JPEG at the same settings: the
    job computes what the actor path computes (its own batches, streams and threads)."""
    table = read_parts(commit.part_files(str(output)), columns=[IMAGE_URI, MASK_RLE]).to_pylist()
    by_name = {posixpath.basename(row[IMAGE_URI]): row[MASK_RLE] for row in table}
    # an image without a mask (an error row) agrees with nothing
    return min(iou(decode_rle(by_name[name]), mask) if by_name.get(name) else 0.0 for name, mask in zip(names, masks))


def _job(options: JobBenchOptions, device: str, speed: EncoderSpeed, image_dir: Path, concept_files: list[str], output: Path,
         shard_size: int, compile_cache: str | None = None) -> dict:
    """One `persam segment` run -> its rates and the row counts of its output. compile_cache:
    the job's --compile-cache instead of the bench's own setting."""
    tracker = Progress()
    # The flags as given (None / "auto" = the job's own defaults, resolved on its actor, as
    # `persam segment` does); they resolve to the settings timed in-process above.
    spec = replace(options.spec, command="segment", model=replace(options.spec.model, device=device),
                   concepts=tuple(concept_files), input=str(image_dir), output=str(output), shard_size=shard_size,
                   compile_cache=compile_cache or options.spec.compile_cache)
    started = time.perf_counter()
    seconds, summary = timed(lambda: run_segment(spec, log=progress, on_progress=tracker))
    table = read_parts(commit.part_files(str(output)), columns=[ERROR])
    steady, window = tracker.steady_rate(), tracker.steady_window()
    fill = tracker.batch_fill(encoder_padding(speed) or 1)
    return {"images_per_s": None if steady is None else round(steady, 3),
            "whole_images_per_s": round(summary.images / seconds, 3), "s": round(seconds, 2),
            "first_result_s": round(tracker.arrivals[0] - started, 2) if tracker.calls else None,
            # how long the steady state was observed: results arriving in one burst make its rate meaningless
            "steady_window_s": None if window is None else round(window, 3),
            "results": tracker.calls, "rows": table.num_rows, "error_rows": error_count(table),
            "batch_fill": None if fill is None else round(fill, 3)}


def run_job_bench(options: JobBenchOptions) -> dict:
    model_type, device = options.spec.model.model_type, resolve_device(options.spec.model.device)
    progress(f"loading {model_type} on {device}")
    loaded = load_model(model_type, options.spec.model.checkpoint)
    sam = loaded.sam.to(device)
    progress(f"generating {options.images} images, fitting {options.concepts} concepts")
    pictures = synthetic_images(options.images, sizes=JOB_SIZES, grain=JPEG_GRAIN)
    reference = encode_images(sam, [as_backbone(sam).resize(pictures[0])])[0]
    concepts = persam_concepts(reference, pictures[0].shape[:2], options.concepts, loaded.fingerprint, model=sam)
    with tempfile.TemporaryDirectory(prefix="persam-bench-") as folder:
        root = Path(folder)
        image_dir, files, jpeg_kib = write_inputs(root, pictures, concepts)
        check_names = sorted(path.name for path in image_dir.iterdir())[:AGREEMENT_IMAGES]
        check_pictures = [decode_image((image_dir / name).read_bytes(), name) for name in check_names]
        figures, speed, check_masks = _in_process(options, sam, device, pictures,
                                                  [ConceptTensors.on(c, device) for c in concepts], check_pictures)
        progress(f"in-process figures: {figures}")  # each phase's figures as soon as known (a cut run keeps them)
        if options.gfsam:
            dinov2, fitted = fit_gfsam_concepts(options.spec, device, pictures[0], options.concepts)
            figures.update(gfsam_in_process(sam, dinov2, speed, pictures, fitted), gfsam_dinov2=options.spec.model.dinov2)
            gfsam_files = write_gfsam_concepts(root, fitted)
            del dinov2, fitted
        del sam, loaded, reference  # loaded.sam is the same module: both names go
        gc.collect()
        if device == "cuda":  # the job's actor needs the memory; the in-process peak is recorded first
            figures["peak_gpu_mb_in_process"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.empty_cache()
        # The job's own shard size, as a user's job runs: shards are hashed, so each one ends
        # in a partial chunk whose last encoder batch is padded (CUDA). At 1024 images a shard
        # that is <1 % of the encoder's work; shards of N / 8 images would make it 10-16 % at
        # N = 320-512 (job_*_batch_fill shows it).
        shard_size = options.spec.shard_size
        result = {"mode": "job", "model_type": model_type, "device": device, "images": options.images,
                  "concepts": options.concepts, "speed": asdict(speed), "shard_size": shard_size,
                  "shards": commit.shard_count(options.images, shard_size), "num_actors": options.spec.num_actors}
        if device == "cuda":
            result["device_name"] = torch.cuda.get_device_name()
        result.update(figures)
        result["jpeg_kib_mean"] = round(jpeg_kib, 1)
        progress("starting Ray")
        ray_started = time.perf_counter()
        with ray_session():  # one Ray for both jobs
            result["ray_start_s"] = round(time.perf_counter() - ray_started, 2)
            for name, chosen in concept_sets(files):
                progress(f"job with {len(chosen)} concept(s)")
                job = _job(options, device, speed, image_dir, chosen, root / f"out-{name}", shard_size)
                result.update({f"job_{name}_{key}": value for key, value in job.items()})
                progress(f"job with {len(chosen)} concept(s): {job}")
            result["job_k1_min_mask_iou_vs_actor_path"] = round(
                job_agreement(root / "out-k1", check_names, check_masks), 4)
            if options.gfsam:
                result.update(gfsam_jobs(gfsam_files, root, lambda chosen, out: _job(
                    options, device, speed, image_dir, chosen, out, shard_size)))
        if speed.compile:
            result.update(start_ups(root, lambda cache, out: _job(options, device, speed, image_dir, files[:1], out,
                                                                  shard_size, compile_cache=cache)))
    _ratios(result)
    gfsam_ratios(result)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _ratios(result: dict) -> None:
    def ratio(top: str, bottom: str) -> float | None:
        a, b = result.get(top), result.get(bottom)
        return None if a is None or not b else round(a / b, 3)

    result["job_k1_over_encoder"] = ratio("job_k1_images_per_s", "encoder_images_per_s")
    result["job_k_over_encoder"] = ratio("job_k_images_per_s", "encoder_images_per_s")
    result["job_k_over_job_k1"] = ratio("job_k_images_per_s", "job_k1_images_per_s")
    result["job_k1_over_reference_loop"] = ratio("job_k1_images_per_s", "reference_loop_images_per_s")
    result["actor_k1_over_encoder"] = ratio("actor_k1_images_per_s", "encoder_images_per_s")
    result["actor_k_over_encoder"] = ratio("actor_k_images_per_s", "encoder_images_per_s")
    result["job_k1_over_actor_k1"] = ratio("job_k1_images_per_s", "actor_k1_images_per_s")
    result["job_k1_over_actor_stages_k1"] = ratio("job_k1_images_per_s", "actor_stages_k1_images_per_s")
    result["actor_stages_k_over_actor_stages_k1"] = ratio("actor_stages_k_images_per_s", "actor_stages_k1_images_per_s")


def job_table(result: dict) -> str:
    """The side-by-side table (K = 1 | K = --concepts) of a run_job_bench result."""
    k = result["concepts"]
    show = lambda value: "-" if value is None else f"{value:g}"  # noqa: E731
    rows = [
        ("job, steady state (images/s)", result.get("job_k1_images_per_s"), result.get("job_k_images_per_s")),
        ("  observed over (s)", result.get("job_k1_steady_window_s"), result.get("job_k_steady_window_s")),
        ("  images / encoder batch slots", result.get("job_k1_batch_fill"), result.get("job_k_batch_fill")),
        ("job, whole incl. start-up (images/s)", result.get("job_k1_whole_images_per_s"), result.get("job_k_whole_images_per_s")),
        ("actor path in-process (images/s)", result.get("actor_k1_images_per_s"), result.get("actor_k_images_per_s")),
        *((f"  with {label.replace('_', ' ')}", result.get(f"actor_k1_{label}_images_per_s"),
           result.get(f"actor_k_{label}_images_per_s")) for label in ACTOR_LABELS.values()),
        ("actor stages in-process, 2 calls (images/s)", result.get("actor_stages_k1_images_per_s"),
         result.get("actor_stages_k_images_per_s")),
        *((f"  with {label.replace('_', ' ')}", result.get(f"actor_stages_k1_{label}_images_per_s"),
           result.get(f"actor_stages_k_{label}_images_per_s")) for label in ACTOR_LABELS.values()),
        ("encoder only (images/s)", result.get("encoder_images_per_s"), result.get("encoder_images_per_s")),
        (f"reference loop, {result.get('reference_loop_images')} images (images/s)", result.get("reference_loop_images_per_s"), None),
        ("job / encoder", result.get("job_k1_over_encoder"), result.get("job_k_over_encoder")),
        ("actor / encoder", result.get("actor_k1_over_encoder"), result.get("actor_k_over_encoder")),
        ("job / actor path", result.get("job_k1_over_actor_k1"), None),
        ("job / actor stages", result.get("job_k1_over_actor_stages_k1"), None),
        ("job(K) / job(1)", None, result.get("job_k_over_job_k1")),
        ("job(1) / reference loop", result.get("job_k1_over_reference_loop"), None),
        ("rows written", result.get("job_k1_rows"), result.get("job_k_rows")),
        ("first result, cold start (s)", result.get("start_cold_first_result_s"), None),
        ("first result, warm start (s)", result.get("start_warm_first_result_s"), None),
        ("job masks vs actor path's (min IoU)", result.get("job_k1_min_mask_iou_vs_actor_path"), None),
        *gfsam_table_rows(result),
    ]
    columns = 2 if k > 1 else 1  # one concept: one job (concept_sets), one column
    lines = [f"{result['model_type']} on {result.get('device_name', result['device'])}, {result['images']} images, "
             f"speed {result['speed']}", f"{'path':<44} {'K=1':>10} {f'K={k}':>10}"[: 44 + 11 * columns]]
    lines += [f"{name:<44}" + "".join(f" {show(v):>10}" for v in values[:columns]) for name, *values in rows]
    return "\n".join(lines)
