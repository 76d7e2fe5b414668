"""`persam segment`: plan the shards of a job, run the pipeline, commit each shard.

Committed shards are skipped on a rerun; shards whose images changed are recomputed,
carrying over the rows of their unchanged images (see commit.py for the protocol).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import pyarrow.compute as pc

from jobs.commands.dry_run import dry_run_segment
from jobs.pipeline import commit
from jobs.pipeline.actors import SegmentActor
from jobs.pipeline.job import PreparedJob, check_job, concept_digests, expected_precision, prepare_job
from jobs.pipeline.payload import FinishedChunk
from jobs.pipeline.run import run_pipeline
from jobs.pipeline.session import ray_session
from jobs.spec import JobSpec
from jobs.storage import listing
from jobs.storage.concept_files import read_concepts
from jobs.storage.listing import credential_free, is_manifest, no_images, waves
from jobs.storage.redaction import redact
from jobs.storage.schema import ERROR, IMAGE_URI, error_count, images_in

logger = logging.getLogger(__name__)


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
    committed: int = 0  # images committed in the output after this run, all runs together
    failed: int = 0  # images of the shards this run wrote that have error rows

    def line(self) -> str:
        return (
            f"done: {self.committed} images committed in the output; this run: "
            f"{self.images} images, {self.rows} rows, {self.error_rows} error rows, "
            f"{self.shards_run} shards written ({self.shards_skipped} already committed), "
            f"{self.encoded} encoded, {self.cache_hits} from cache, {self.carried} unchanged, {self.removed} removed "
            f"-> {self.output} in {self.seconds:.1f} s"
        )


def count_removed(paths: list[str], current: set[str], storage_options: dict | None) -> int:
    """Images in `paths` (part files about to go) that are no longer in the input."""
    return len(images_in(paths, storage_options) - current)


def failed_images(table) -> int:
    """Images with an error row in a shard's table."""
    return len(set(table.filter(pc.is_valid(table.column(ERROR))).column(IMAGE_URI).to_pylist()))


def run_segment(spec: JobSpec, log=logger.info, on_progress: Callable[[int], None] | None = None) -> SegmentSummary | None:
    """on_progress(images) is called in the driver as each chunk's rows arrive (benchmarks).
    -> the summary; None for --dry-run (the plan is logged, nothing loaded or written)."""
    started = time.perf_counter()
    concepts = read_concepts(spec.concepts, spec.storage_options)
    check_job(spec)
    manifest = is_manifest(spec.input)
    batches = waves(spec.input, spec.storage_options)  # the input is listed before any weights load
    first = next(batches, None)
    if not first:
        raise no_images(spec.input)
    if spec.dry_run:
        dry_run_segment(spec, concepts, itertools.chain([first], batches), log)
        return None
    fingerprint, cache = prepare_job(spec, concepts, log)
    # (a manifest shorter than one wave is sharded like a listing of its size)
    shards_per_wave = commit.shard_count(len(first), spec.shard_size)
    if cache is not None and not manifest:  # a new job adopts the cache's sharding: one cache file per job shard
        shards_per_wave = cache.adopt_layout(shards_per_wave)
    elif cache is not None:
        cache.adopt_layout(shards_per_wave)
    settings = {
        "precision": expected_precision(spec),  # other precisions give (slightly) other masks
        "max_instances": spec.max_instances,
        "min_similarity": spec.min_similarity,
        "concept_digests": concept_digests(concepts),
        "manifest_wave_images": listing.MANIFEST_WAVE_IMAGES if manifest else None,
    }
    record = commit.JobRecord(shards_per_wave, tuple(c.name for c in concepts), fingerprint, settings)
    record, committed = commit.open_job(spec.output, record, spec.storage_options, log)
    job = PreparedJob(spec, fingerprint, tuple(c.to_json() for c in concepts), cache.num_shards if cache else None)
    totals: Counter = Counter()
    with ray_session() if manifest and spec.runner == "ray" else nullcontext():  # waves share one Ray
        for index, versions in enumerate(itertools.chain([first], batches)):
            _run_wave(job, record, committed, versions, index * record.num_shards, totals, log, on_progress)
    if manifest:  # shards of waves past the manifest's end: images removed from it
        waves_seen = index + 1
        stale = [p for s, files in committed.items() if s >= waves_seen * record.num_shards for p in files.values()]
        totals.update(removed=count_removed(stale, set(), spec.storage_options))
        commit.remove_files(spec.output, stale, spec.storage_options, log)
    t = totals
    return SegmentSummary(t["images"], t["rows"], t["errors"], t["run"], t["skipped"], redact(spec.output),
                          time.perf_counter() - started, t["encoded"], t["cache_hits"], t["carried"], t["removed"],
                          t["committed"], t["failed"])


def _run_wave(job: PreparedJob, record: commit.JobRecord, committed: dict, versions: dict[str, str], offset: int,
              totals: Counter, log, on_progress: Callable[[int], None] | None) -> None:
    """Plan one wave's shards (global ids offset..offset+num_shards), drop stale files, run, commit."""
    output, storage = job.spec.output, job.spec.storage_options
    versions, sources = credential_free(versions)
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
    # every listed image is committed once the wave's shards are (a failing shard raises)
    totals.update(removed=count_removed(dropped, set(urls), storage), skipped=plan.up_to_date, committed=len(urls))
    commit.remove_files(output, dropped, storage, log)
    log(f"{len(urls)} images x {len(job.concept_texts)} concepts; {len(to_run)} shards to run, "
        f"{plan.up_to_date} already committed")
    if not to_run:
        return

    def commit_chunks(shard: dict, chunks: list[FinishedChunk]) -> dict:
        """All chunks of one shard arrived: carry unchanged rows, order, publish, drop old files."""
        carried = {url for c in chunks for url in c.carried}
        table, removed = commit.assemble_shard(
            shard["shard"], [c.rows() for c in chunks], carried, shard["previous"], shard["urls"], list(record.concepts),
            storage, published=commit.part_path(output, shard["shard"], shard["digest"], storage))
        commit.commit_shard(output, shard["shard"], shard["digest"], table, storage)
        commit.remove_files(output, shard["previous"], storage, log)  # only after the new file is public
        return {"shard": shard["shard"], "rows": table.num_rows, "errors": error_count(table), "failed": failed_images(table),
                "images": len(shard["urls"]), "encoded": sum(c.encoded for c in chunks),
                "cache_hits": sum(c.cache_hits for c in chunks), "carried": len(carried), "removed": removed,
                "problems": list(dict.fromkeys(p for c in chunks for p in c.problems))}

    shards = [{"shard": s["shard"], "digest": s["digest"], "urls": s["urls"], "previous": superseded.get(s["shard"], []),
               "sources": {u: sources[u] for u in s["urls"] if u in sources}} for s in to_run]
    results = run_pipeline(job, SegmentActor, shards, commit_chunks, on_progress)
    for problem in dict.fromkeys(p for r in results for p in r["problems"]):
        log(f"cache: {problem}")
    totals.update(run=len(to_run), **{k: sum(r[k] for r in results)
                                   for k in ("rows", "errors", "failed", "images", "encoded", "cache_hits", "carried", "removed")})

