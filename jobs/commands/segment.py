"""`persam segment`: plan the shards of a job, run the pipeline, commit each shard.

Committed shards are skipped on a rerun; shards whose images changed are recomputed,
carrying over the rows of their unchanged images (see commit.py for the protocol). The
output has one partition per concept: a concept added to an existing output is computed
alone, and a shard that several concepts lack is encoded once for all of them. The output is
a folder or an Apache Iceberg table (--table): the command asks pipeline/output.py's seam,
never a layout.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable

import pyarrow.compute as pc
from persam_core.modeling.families import family_of

from jobs.commands.dry_run import dry_run_segment
from jobs.pipeline import commit
from jobs.pipeline.job_record import persam_version, utc_now
from jobs.pipeline.actors import SegmentActor
from jobs.pipeline.job import PreparedJob, concept_digests, feature_cache
from jobs.pipeline.job_checks import check_job, expected_speed, prepare_job
from jobs.pipeline.output import output_of
from jobs.pipeline.payload import FinishedChunk
from jobs.pipeline.run import run_pipeline
from jobs.pipeline.session import ray_session
from jobs.pipeline.shards import Shard, ShardOutcome
from jobs.spec import JobSpec
from jobs.storage import listing
from jobs.storage.concept_files import read_concepts
from jobs.storage.listing import credential_free, is_manifest, no_images, waves
from jobs.storage.outputs import OutputError
from jobs.storage.redaction import redact
from jobs.storage.schema import CONCEPT, ERROR, IMAGE_URI, error_count, images_in, rows_of_concepts

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
    # {concept: {"shards_run", "shards_skipped", "rows"}}: a concept added to an output runs
    # every shard while the others skip them all
    per_concept: dict = field(default_factory=dict)
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


def failed_images(table) -> set[str]:
    """Images with an error row in a shard's table."""
    return set(table.filter(pc.is_valid(table.column(ERROR))).column(IMAGE_URI).to_pylist())


def run_segment(spec: JobSpec, log=logger.info, on_progress: Callable[[int], None] | None = None,
                pairs: tuple[tuple[str, tuple[str, ...]], ...] | None = None) -> SegmentSummary | None:
    """on_progress(images) is called in the driver as each chunk's rows arrive (benchmarks);
    pairs: (image URL, concept names) -> only those pairs computed and written (eval's episodes).
    -> the summary; None for --dry-run (the plan is logged, nothing loaded or written)."""
    started = time.perf_counter()
    concepts = read_concepts(spec.concepts, spec.storage_options)
    check_job(spec)
    output = output_of(spec)  # a folder or a table (pipeline/output.py)
    manifest = is_manifest(spec.input)
    batches = waves(spec.input, spec.storage_options)  # the input is listed before any weights load
    first = next(batches, None)
    if not first:
        raise no_images(spec.input)
    # (a manifest shorter than one wave is sharded like a listing of its size)
    shards_per_wave = commit.shard_count(len(first), spec.shard_size)
    check_before_work(spec, concepts, shards_per_wave)  # the same checks for --dry-run
    if spec.dry_run:
        dry_run_segment(spec, concepts, itertools.chain([first], batches), log)
        return None
    fingerprint, cache, dinov2_fingerprint = prepare_job(spec, concepts, log)
    if cache is not None and not manifest:  # a new job adopts the cache's sharding: one cache file per job shard
        shards_per_wave = cache.adopt_layout(shards_per_wave)
    elif cache is not None:
        cache.adopt_layout(shards_per_wave)
    record = segment_record(spec, concepts, fingerprint, shards_per_wave)
    record, committed = output.open(record, log)
    job = PreparedJob(spec, fingerprint, tuple(c.to_json() for c in concepts), cache.num_shards if cache else None,
                      dinov2_fingerprint, pairs=pairs)
    totals: Counter = Counter()
    per_concept: dict[str, Counter] = {c.name: Counter() for c in concepts}
    with ray_session() if manifest and spec.runner == "ray" else nullcontext():  # waves share one Ray
        for index, versions in enumerate(itertools.chain([first], batches)):
            if index and not output.many_waves:
                raise OutputError(f"{output.shown}: the manifest holds more than one wave of images "
                                  f"({listing.MANIFEST_WAVE_IMAGES}); a table takes one (the first is committed): "
                                  "split the manifest, or use --output")
            _run_wave(job, record, committed, versions, index * record.num_shards, totals, per_concept, log,
                      on_progress)
    if manifest:  # shards of waves past the manifest's end: images removed from it
        waves_seen = index + 1
        stale = [p for shards in committed.values() for s, files in shards.items()
                 if s >= waves_seen * record.num_shards for p in files.values()]
        totals.update(removed=count_removed(stale, set(), spec.storage_options))
        output.remove(stale, log)
    t = totals
    return SegmentSummary(t["images"], t["rows"], t["errors"], t["run"], t["skipped"], output.shown,
                          time.perf_counter() - started, t["encoded"], t["cache_hits"], t["carried"], t["removed"],
                          {name: dict(counts) for name, counts in per_concept.items()}, t["committed"], t["failed"])


def segment_record(spec: JobSpec, concepts: list, fingerprint: str, num_shards: int) -> commit.JobRecord:
    """The job record of a segment run: what a rerun on its output must agree on, provenance."""
    speed = expected_speed(spec)
    settings = {
        "precision": speed.precision,  # other precisions give (slightly) other masks
        "max_instances": spec.max_instances,
        "min_similarity": spec.min_similarity,
        "manifest_wave_images": listing.MANIFEST_WAVE_IMAGES if is_manifest(spec.input) else None,
    }
    # the decoder's precision as it runs: families without a tunable decoder keep fp32 whatever was asked
    tunable = family_of(spec.model.model_type).tunable_decoder
    settings["decoder_precision"] = speed.decoder_precision if tunable else "fp32"
    settings["tf32"] = speed.tf32
    provenance = {"persam_version": persam_version(), "model_type": spec.model.model_type,
                  "checkpoint": redact(spec.model.checkpoint), "input": redact(spec.input), "created": utc_now()}
    # a concept re-fitted under the same name is a different concept: its digest is recorded
    return commit.JobRecord(num_shards, tuple(c.name for c in concepts), fingerprint, settings,
                            concept_digests(concepts), provenance)


def check_before_work(spec: JobSpec, concepts: list, num_shards: int) -> commit.JobRecord:
    """What a run checks of its output and cache before any weights load, read only; --dry-run
    runs exactly this too: every record there validated, this run's concepts (names, contents),
    weights and settings against them. The weights are the concepts' (the run refuses a
    checkpoint of others once loaded) -> the record the output would hold."""
    fingerprints = sorted({c.sam_fingerprint for c in concepts} - {None})  # GF-SAM concepts: DINOv2's only
    if len(fingerprints) > 1:
        first = next(c for c in concepts if c.sam_fingerprint is not None)
        others = [c.name for c in concepts if c.sam_fingerprint not in (None, first.sam_fingerprint)]
        raise ValueError(f"--concept: the concepts were fitted with different weights: {', '.join(map(repr, others))} "
                         f"with other SAM weights than {first.name!r} ({first.sam_fingerprint}); one run uses one model: "
                         "re-run `persam fit` with the same --model-type/--checkpoint")
    if fingerprints:
        fingerprint = fingerprints[0]
    else:  # only the loaded SAM tells its weights: the output's own stand until then (checked again once loaded)
        stored = output_of(spec).read_record()
        fingerprint = stored["model_fingerprint"] if stored else ""
    record = output_of(spec).check(segment_record(spec, concepts, fingerprint, num_shards))
    if spec.cache:
        feature_cache(spec, fingerprint).recorded_shards()
    return record


def _run_wave(job: PreparedJob, record: commit.JobRecord, committed: dict, versions: dict[str, str], offset: int,
              totals: Counter, per_concept: dict[str, Counter], log, on_progress: Callable[[int], None] | None) -> None:
    """Plan one wave's shards (global ids offset..offset+num_shards) in every partition, drop
    stale files, run each group of shards lacking the same concepts, commit per partition."""
    output, storage = output_of(job.spec), job.spec.storage_options
    versions, sources = credential_free(versions)
    urls = list(versions)
    local = {partition: {s - offset: files for s, files in shards.items() if offset <= s < offset + record.num_shards}
             for partition, shards in committed.items()}
    plan = commit.plan_output(urls, record.num_shards, local, versions)
    # Superseded files of shards not rerun now (repairs, emptied shards) go at once; the
    # others are replaced by their shard's commit, and read for the rows they carry over.
    # every listed image is committed once the wave's shards are (a failing shard raises)
    totals.update(removed=count_removed(plan.dropped, set(urls), storage), skipped=plan.skipped, committed=len(urls))
    output.remove(plan.dropped, log)
    for partition, count in plan.committed.items():  # a partition is its concept's
        per_concept[partition].update(shards_skipped=count)
    lacking = "" if len(plan.committed) < 2 else " (" + ", ".join(
        f"{p}: {sum(p in s.partitions for s in plan.shards)} to run" for p in plan.committed) + ")"
    log(f"{len(urls)} images x {len(job.concept_texts)} concepts; {len(plan.shards)} shards to run{lacking}, "
        f"{plan.skipped} already committed")
    groups: dict[tuple[str, ...], list[Shard]] = {}
    for shard in plan.shards:
        shard = replace(shard, shard=shard.shard + offset, sources={u: sources[u] for u in shard.urls if u in sources})
        groups.setdefault(shard.partitions, []).append(shard)
    texts = dict(zip((name for name, _ in job.labels()), job.concept_texts))
    # one pipeline run per set of lacking concepts (usually one): each image is encoded once
    with ray_session() if len(groups) > 1 and job.spec.runner == "ray" else nullcontext():
        for partitions, shards in groups.items():
            names = list(partitions)
            group_job = replace(job, concept_texts=tuple(texts[n] for n in names))
            # summed here: commits run on several threads
            outcome = ShardOutcome.total(run_pipeline(group_job, SegmentActor, shards, _committer(job, record, log),
                                                      on_progress))
            for problem in outcome.problems:
                log(f"cache: {problem}")
            for name, counts in outcome.per_concept.items():
                per_concept[name].update(counts)
            totals.update(run=len(shards), **outcome.counts())


def _committer(job: PreparedJob, record: commit.JobRecord, log):
    output, storage = output_of(job.spec), job.spec.storage_options

    def commit_chunks(shard: Shard, chunks: list[FinishedChunk]) -> ShardOutcome:
        """All chunks of one shard arrived: per partition, carry unchanged rows, order,
        and replace the shard's old files by its new one."""
        carried = {url for c in chunks for url in c.carried}
        computed = [c.rows() for c in chunks]
        number, digest = shard.shard, shard.digest
        counts, per_concept, failed = Counter(), {}, set()
        for partition in shard.partitions:
            names = [partition]
            previous = list(shard.previous_by_partition.get(partition, ()))
            table, removed = commit.assemble_shard(
                number, [rows_of_concepts(t, names) for t in computed], carried, previous,
                job.images_with(names, list(shard.urls)), names,
                storage, published=output.ref(number, digest, partition))
            # the old files go before the new one is public (commit.py, supersede.py)
            output.commit_shard(number, digest, table, partition, record.parquet_metadata(names), previous, log)
            counts.update(rows=table.num_rows, errors=error_count(table))
            failed |= failed_images(table)
            counts["removed"] = max(counts["removed"], removed)  # the same images in every partition
            rows = Counter(table.column(CONCEPT).to_pylist())
            per_concept.update({name: {"shards_run": 1, "rows": rows[name]} for name in names})
        return ShardOutcome(rows=counts["rows"], errors=counts["errors"], failed=len(failed), images=len(shard.urls),
                            encoded=sum(c.encoded for c in chunks), cache_hits=sum(c.cache_hits for c in chunks),
                            carried=len(carried), removed=counts["removed"], per_concept=per_concept,
                            problems=tuple(dict.fromkeys(p for c in chunks for p in c.problems)))

    return commit_chunks
