"""`persam segment`: the Ray Data job.

    list inputs -> shards (stable hash) -> decode+resize (CPU tasks) -> SegmentActor
    (encode once, decode every concept) -> commit one Parquet file per shard (atomic)

Committed shards are skipped on a rerun (see commit.py for the protocol).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import fsspec
from tqdm import tqdm

from persam_core.concept import Concept, ConceptError

from . import commit
from .checkpoints import load_model, random_weights_note, redact
from .inputs import InputError, list_image_urls
from .runtime import actor_resources, check_device_option, local_cluster, start_ray, wants_gpu_actors
from .worker import SegmentActor, decode_shard_row, ipc_to_table


DECODE_TASK_MEMORY_BYTES = 512 * 2**20


@dataclass
class SegmentOptions:
    model_type: str
    checkpoint: str
    concepts: list[str]
    input: str
    output: str
    device: str = "auto"
    batch_size: int = 1
    num_actors: int | None = None
    shard_size: int = commit.DEFAULT_SHARD_SIZE
    max_pixels: int = 100_000_000
    storage_options: dict = field(default_factory=dict)
    max_instances: int = 1
    min_similarity: float | None = None


@dataclass
class SegmentSummary:
    images: int
    rows: int
    error_rows: int
    shards_run: int
    shards_skipped: int
    output: str
    seconds: float

    def line(self) -> str:
        return (
            f"done: {self.images} images, {self.rows} rows, {self.error_rows} error rows, "
            f"{self.shards_run} shards written ({self.shards_skipped} already committed) "
            f"-> {self.output} in {self.seconds:.1f} s"
        )


def read_concepts(paths: list[str], storage_options: dict) -> list[Concept]:
    """Concept files (or directories of *.json) -> concepts, names unique."""
    files: list[str] = []
    for path in paths:
        fs, root = fsspec.core.url_to_fs(path, **storage_options)
        if fs.isdir(root):  # glob drops the protocol: put it back for remote stores
            files.extend(fs.unstrip_protocol(p) if "://" in path else p for p in sorted(fs.glob(f"{root.rstrip('/')}/*.json")))
        else:
            files.append(path)
    concepts = []
    for path in files:
        try:
            with fsspec.open(path, "rb", **storage_options) as handle:
                text = handle.read(1 << 20).decode("utf-8", errors="replace")
        except (OSError, ValueError) as error:
            raise ConceptError(f"{redact(path)}: cannot read concept file ({type(error).__name__}); pass a file written by `persam fit`") from None
        concepts.append(Concept.from_json(text, source=redact(path)))
    names = [c.name for c in concepts]
    if not concepts:
        raise ConceptError("no concept given: pass --concept FILE (written by `persam fit`)")
    if len(set(names)) != len(names):
        raise ConceptError(f"concept names must be unique, got {names}")
    return concepts


def run_segment(options: SegmentOptions, log=print) -> SegmentSummary:
    started = time.perf_counter()
    device = check_device_option(options.device)
    concepts = read_concepts(options.concepts, options.storage_options)
    model = load_model(options.model_type, options.checkpoint, options.storage_options)
    for concept in concepts:
        concept.require_fingerprint(model.fingerprint, f"--concept {concept.name}")
    del model  # the actors load their own copy; the driver only checked the fingerprint
    note = random_weights_note(options.checkpoint)
    if note:
        log(f"note: {note}")

    urls = list(dict.fromkeys(list_image_urls(options.input, options.storage_options)))
    if not urls:
        raise InputError(f"{redact(options.input)}: no images found (extensions: jpg jpeg png webp bmp tif tiff)")
    settings = {
        "max_instances": options.max_instances,
        "min_similarity": options.min_similarity,
        # a concept re-fitted under the same name is a different job
        "concept_digests": {c.name: hashlib.sha1(c.to_json().encode()).hexdigest()[:12] for c in concepts},
    }
    record = commit.JobRecord(commit.shard_count(len(urls), options.shard_size), tuple(c.name for c in concepts),
                              concepts[0].model_fingerprint, settings)
    record, committed = commit.open_job(options.output, record, options.storage_options)
    plan = commit.plan_shards(urls, record.num_shards, committed)
    running = {s["shard"] for s in plan.to_run}
    # Superseded files of shards that are not rerun now (repairs, emptied shards) go first;
    # the others are replaced by their shard's commit.
    commit.remove_files(options.output, [p for p in plan.superseded if _shard_of_path(p) not in running], options.storage_options)
    log(f"{len(urls)} images x {len(concepts)} concepts; {len(plan.to_run)} shards to run, {plan.up_to_date} already committed")
    if not plan.to_run:
        return SegmentSummary(0, 0, 0, 0, plan.up_to_date, redact(options.output), time.perf_counter() - started)

    import ray

    started_ray = start_ray()
    try:
        rows, errors, images = _run_pipeline(ray, options, device, concepts, plan.to_run, record.model_fingerprint, plan.superseded)
    finally:
        if started_ray and local_cluster():
            ray.shutdown()
    return SegmentSummary(images, rows, errors, len(plan.to_run), plan.up_to_date, redact(options.output),
                          time.perf_counter() - started)


def _shard_of_path(path: str) -> int:
    return int(commit.PART_FILE.match(os.path.basename(path)).group(1))


def _run_pipeline(ray, options: SegmentOptions, device: str, concepts, shards, fingerprint: str, plan_superseded: list[str]):
    gpu = wants_gpu_actors(device)
    if options.num_actors:
        num_actors = options.num_actors
    else:  # one actor per GPU on a cluster; one CPU actor locally (it uses every core)
        num_actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1
    resources = actor_resources(num_actors, gpu)
    print(f"{num_actors} model actor(s), each with {resources}; {len(shards)} shards")
    threads = max(1, int(resources.get("num_cpus", 1) + 0.999)) if not local_cluster() else max(1, (os.cpu_count() or 1) // num_actors)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one image-level bar below instead of per-operator logs
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    concepts_ref = ray.put([c.to_json() for c in concepts])
    output, storage = options.output, options.storage_options

    digests = {s["shard"]: s["digest"] for s in shards}
    superseded = {}
    for path in plan_superseded:
        superseded.setdefault(_shard_of_path(path), []).append(path)

    def commit_row(row: dict) -> dict:
        table = ipc_to_table(row["table"])
        shard = int(row["shard"])
        commit.commit_shard(output, shard, digests[shard], table, storage)
        commit.remove_files(output, superseded.get(shard, []), storage)  # only after the new file is public
        errors = sum(1 for e in table.column("error").to_pylist() if e is not None)
        return {"shard": int(row["shard"]), "rows": table.num_rows, "errors": errors,
                "images": len(set(table.column("image_uri").to_pylist()))}

    # Ray Data restarts killed actors and retries their tasks by default (max_restarts=-1).
    dataset = (
        ray.data.from_items([{"shard": s["shard"], "urls": s["urls"]} for s in shards], override_num_blocks=len(shards))
        # Decode on CPU tasks of their own. Their memory reservation (a decoded shard is
        # large) also keeps Ray Data from fusing them into the actor, where JPEG decoding
        # would stall the model.
        .map(decode_shard_row, fn_kwargs={"storage_options": storage, "max_pixels": options.max_pixels},
             num_cpus=1, memory=DECODE_TASK_MEMORY_BYTES)
        .map_batches(
            SegmentActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            fn_constructor_kwargs={
                "model_type": options.model_type, "checkpoint": options.checkpoint,
                "expected_fingerprint": fingerprint, "concepts_box": [concepts_ref], "device": device,
                "batch_size": options.batch_size, "threads": threads, "storage_options": storage,
                "max_instances": options.max_instances, "min_similarity": options.min_similarity,
            },
            **resources,
        )
        .map(commit_row, num_cpus=0.5)
    )
    rows = errors = images = 0
    total = sum(len(s["urls"]) for s in shards)
    with tqdm(total=total, unit="img", desc="segment", file=sys.stderr, mininterval=1.0) as progress:
        for result in dataset.iter_rows():
            rows, errors, images = rows + result["rows"], errors + result["errors"], images + result["images"]
            progress.update(result["images"])
            progress.set_postfix(shards=f"{result['shard']:05d}", rows=rows, errors=errors, refresh=False)
    return rows, errors, images
