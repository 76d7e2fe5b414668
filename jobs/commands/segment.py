"""`persam segment`: plan the shards of a job, run the pipeline, commit each shard.

Committed shards are skipped on a rerun; shards whose images changed are recomputed,
carrying over the rows of their unchanged images (see commit.py for the protocol).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import fsspec

from persam_core.acceleration import resolve_speed
from persam_core.concept import Concept, ConceptError

from jobs.pipeline import commit
from jobs.pipeline.cache import FeatureCache
from jobs.storage.checkpoints import load_model, random_weights_note, redact
from jobs.storage.images import IMAGE_EXTENSIONS
from jobs.storage.listing import InputError, is_manifest, list_images
from jobs.storage.outputs import check_output_folder
from jobs.pipeline.payload import ipc_to_table
from jobs.pipeline.run import DEFAULT_CHUNK_IMAGES, PipelineSpec, run_pipeline
from jobs.pipeline.session import check_device_option, expected_device_type, local_cluster, start_ray

# A manifest is planned and run in chunks of this many images (bounded driver memory).
MANIFEST_WAVE_IMAGES = 500_000
# Named in "no images found" errors; the list itself is owned by jobs/images.py.
EXTENSIONS_NOTE = " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


@dataclass
class SegmentOptions:
    model_type: str
    checkpoint: str
    concepts: list[str]
    input: str
    output: str
    device: str = "auto"
    batch_size: int | None = None  # None: resolve_speed's default for the actor's device
    num_actors: int | None = None
    shard_size: int = commit.DEFAULT_SHARD_SIZE
    max_pixels: int = 100_000_000
    storage_options: dict = field(default_factory=dict)
    max_instances: int = 1
    min_similarity: float | None = None
    cache: str | None = None
    cache_dtype: str = "fp16"
    precision: str = "auto"
    fused_attention: bool | None = None
    compile_encoder: bool | None = None
    chunk_size: int = DEFAULT_CHUNK_IMAGES
    # Called in the driver with the image count of each chunk as its rows arrive (benchmarks).
    on_progress: Callable[[int], None] | None = None


@dataclass
class SegmentSummary:
    images: int
    rows: int
    error_rows: int
    shards_run: int
    shards_skipped: int
    output: str
    seconds: float
    encoded: int = 0
    cache_hits: int = 0
    carried: int = 0
    removed: int = 0

    def line(self) -> str:
        return (
            f"done: {self.images} images, {self.rows} rows, {self.error_rows} error rows, "
            f"{self.shards_run} shards written ({self.shards_skipped} already committed), "
            f"{self.encoded} encoded, {self.cache_hits} from cache, {self.carried} unchanged, {self.removed} removed "
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


def expected_precision(options) -> str:
    """The encoder precision the actors will run at, as far as the driver can tell: GPU
    actors (--device cuda, or auto on a cluster with GPUs) resolve "auto" as CUDA does."""
    return resolve_speed(expected_device_type(options.device), options.precision, options.fused_attention,
                         options.compile_encoder, options.batch_size).precision


def prepare_job(options, concepts: list[Concept], log) -> tuple[str, FeatureCache | None]:
    """Checks that need no Ray: device, weights vs concepts, cache -> (model fingerprint, the cache or None)."""
    check_device_option(options.device)
    if (options.batch_size is not None and options.batch_size < 1) or options.chunk_size < 1:
        raise ValueError("--batch-size and --chunk-size must be at least 1")
    resolve_speed("cpu", options.precision)  # refuses an unknown precision before any work
    check_output_folder(options.output, "--output", options.storage_options)  # before the model loads
    if options.cache:
        check_output_folder(options.cache, "--cache", options.storage_options)
    model = load_model(options.model_type, options.checkpoint, options.storage_options)
    for concept in concepts:
        concept.require_fingerprint(model.fingerprint, f"--concept {concept.name}")
    cache = None
    if options.cache:
        cache = FeatureCache(options.cache, model.fingerprint, options.cache_dtype, options.storage_options)
        cache.check_writable()
    note = random_weights_note(options.checkpoint)
    if note:
        log(f"note: {note}")
    return model.fingerprint, cache


def list_all_images(options) -> dict[str, str]:
    """{image url: version token} of the whole --input (see waves() for manifests)."""
    images = dict(list_images(options.input, options.storage_options))
    if not images:
        raise InputError(f"{redact(options.input)}: no images found (extensions: {EXTENSIONS_NOTE})")
    return images


def count_removed(paths: list[str], current: set[str], storage_options: dict | None) -> int:
    """Images in `paths` (part files about to go) that are no longer in the input."""
    table = commit.read_parts(paths, storage_options, ["image_uri"])
    return 0 if table is None else len(set(table.column("image_uri").to_pylist()) - current)


def waves(options) -> Iterator[dict[str, str]]:
    """The input in planning waves of {url: version}: everything at once for a listing;
    consecutive chunks of MANIFEST_WAVE_IMAGES for a manifest, so the driver never holds
    more than one chunk of a lake-sized manifest (shards are hashed within each chunk)."""
    if not is_manifest(options.input):
        yield list_all_images(options)
        return
    chunk: dict[str, str] = {}
    for url, version in list_images(options.input, options.storage_options):
        chunk[url] = version
        if len(chunk) == MANIFEST_WAVE_IMAGES:
            yield chunk
            chunk = {}
    if chunk:
        yield chunk


def run_segment(options: SegmentOptions, log=print) -> SegmentSummary:
    started = time.perf_counter()
    concepts = read_concepts(options.concepts, options.storage_options)
    fingerprint, cache = prepare_job(options, concepts, log)
    manifest = is_manifest(options.input)
    batches = waves(options)
    first = next(batches, None)
    if not first:
        raise InputError(f"{redact(options.input)}: no images found (extensions: {EXTENSIONS_NOTE})")
    # (a manifest shorter than one wave is sharded like a listing of its size)
    shards_per_wave = commit.shard_count(len(first), options.shard_size)
    if cache is not None and not manifest:  # a new job adopts the cache's sharding: one cache file per job shard
        shards_per_wave = cache.adopt_layout(shards_per_wave)
    elif cache is not None:
        cache.adopt_layout(shards_per_wave)
    settings = {
        "precision": expected_precision(options),  # other precisions give (slightly) other masks
        "max_instances": options.max_instances,
        "min_similarity": options.min_similarity,
        # a concept re-fitted under the same name is a different job
        "concept_digests": {c.name: hashlib.sha1(c.to_json().encode()).hexdigest()[:12] for c in concepts},
        "manifest_wave_images": MANIFEST_WAVE_IMAGES if manifest else None,
    }
    record = commit.JobRecord(shards_per_wave, tuple(c.name for c in concepts), fingerprint, settings)
    record, committed = commit.open_job(options.output, record, options.storage_options, log)
    spec = PipelineSpec(
        options.model_type, options.checkpoint, fingerprint, [c.to_json() for c in concepts], options.device,
        options.num_actors, options.max_pixels, options.storage_options, "segment",
        options.max_instances, options.min_similarity,
        {"url": options.cache, "dtype": options.cache_dtype, "num_shards": cache.num_shards} if cache else None,
        options.precision, options.fused_attention, options.compile_encoder, options.batch_size, options.chunk_size,
    )
    totals: Counter = Counter()
    started_ray = start_ray() if manifest else False  # waves share one Ray
    try:
        for index, versions in enumerate(itertools.chain([first], batches)):
            _run_wave(options, spec, record, committed, versions, index * record.num_shards, totals, log)
    finally:
        if started_ray and local_cluster():
            import ray

            ray.shutdown()
    if manifest:  # shards of waves past the manifest's end: images removed from it
        waves_seen = index + 1
        stale = [p for s, files in committed.items() if s >= waves_seen * record.num_shards for p in files.values()]
        totals.update(removed=count_removed(stale, set(), options.storage_options))
        commit.remove_files(options.output, stale, options.storage_options, log)
    t = totals
    return SegmentSummary(t["images"], t["rows"], t["errors"], t["run"], t["skipped"], redact(options.output),
                          time.perf_counter() - started, t["encoded"], t["cache_hits"], t["carried"], t["removed"])


def _run_wave(options: SegmentOptions, spec: PipelineSpec, record: commit.JobRecord, committed: dict,
              versions: dict[str, str], offset: int, totals: Counter, log) -> None:
    """Plan one wave's shards (global ids offset..offset+num_shards), drop stale files, run, commit."""
    urls = list(versions)
    local = {s - offset: files for s, files in committed.items() if offset <= s < offset + record.num_shards}
    plan = commit.plan_shards(urls, record.num_shards, local, versions)
    superseded: dict[int, list[str]] = {}
    for path in plan.superseded:
        superseded.setdefault(commit.shard_of_path(path), []).append(path)
    to_run = [{**s, "shard": s["shard"] + offset} for s in plan.to_run]
    running = {s["shard"] for s in to_run}
    # Superseded files of shards not rerun now (repairs, emptied shards) go at once; the
    # others are replaced by their shard's commit, and read for the rows they carry over.
    dropped = [p for s, ps in superseded.items() if s not in running for p in ps]
    totals.update(removed=count_removed(dropped, set(urls), options.storage_options), skipped=plan.up_to_date)
    commit.remove_files(options.output, dropped, options.storage_options, log)
    log(f"{len(urls)} images x {len(spec.concept_texts)} concepts; {len(to_run)} shards to run, "
        f"{plan.up_to_date} already committed")
    if not to_run:
        return
    output, storage = options.output, options.storage_options

    def commit_chunks(shard: dict, chunks: list[dict]) -> dict:
        """All chunks of one shard arrived: carry unchanged rows, order, publish, drop old files."""
        carried = {url for c in chunks for url in json.loads(c["carried"])}
        table, removed = commit.assemble_shard(shard["shard"], [ipc_to_table(c["table"]) for c in chunks], carried,
                                               shard["previous"], shard["urls"], list(record.concepts), storage)
        commit.commit_shard(output, shard["shard"], shard["digest"], table, storage)
        commit.remove_files(output, shard["previous"], storage, log)  # only after the new file is public
        errors = sum(1 for e in table.column("error").to_pylist() if e is not None)
        return {"shard": shard["shard"], "rows": table.num_rows, "errors": errors, "images": len(shard["urls"]),
                "encoded": sum(int(c["encoded"]) for c in chunks), "cache_hits": sum(int(c["cache_hits"]) for c in chunks),
                "carried": len(carried), "removed": removed,
                "problems": list(dict.fromkeys(p for c in chunks for p in json.loads(c["problems"])))}

    shards = [{"shard": s["shard"], "digest": s["digest"], "urls": s["urls"], "previous": superseded.get(s["shard"], [])}
              for s in to_run]
    results = run_pipeline(spec, shards, commit_chunks, options.on_progress)
    for problem in dict.fromkeys(p for r in results for p in r["problems"]):
        log(f"cache: {problem}")
    totals.update(run=len(to_run), **{k: sum(r[k] for r in results)
                                   for k in ("rows", "errors", "images", "encoded", "cache_hits", "carried", "removed")})
