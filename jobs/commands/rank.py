"""`persam rank`: score every image of --input for one concept by its presence score.

Pass 1 (all images) computes only the location prior: similarity = max of S, and the
positive point; no mask decoding. Pass 2 segments the --top-k best. With a warm cache
neither pass runs the image encoder. Output: `<output>/ranking.parquet`, sorted by
similarity (highest first), masks for the top k.
"""

from __future__ import annotations

import io
import logging
import time
from contextlib import nullcontext
from dataclasses import replace

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from persam_core.methods.registry import method_of

from jobs.commands.dry_run import dry_run_rank
from jobs.pipeline import commit
from jobs.pipeline.actors import ModelActor, ScoreActor, SegmentActor
from jobs.pipeline.job import PreparedJob
from jobs.pipeline.job_checks import check_job, prepare_job
from jobs.pipeline.payload import FinishedChunk
from jobs.pipeline.run import run_pipeline
from jobs.pipeline.session import ray_session
from jobs.pipeline.shards import Shard, ShardOutcome
from jobs.spec import JobSpec
from jobs.storage.concept_files import read_concepts
from jobs.storage.files import join_url, make_folder, publish_bytes
from jobs.storage.iceberg_table import check_table_name, replace_whole, shown_table
from jobs.storage.listing import credential_free, list_all_images
from jobs.storage.redaction import redact
from jobs.storage.schema import IMAGE_URI, RANK, SIMILARITY, error_count, ranking_table

RANKING_FILE = "ranking.parquet"
logger = logging.getLogger(__name__)


def _collect(shard: Shard, chunks: list[FinishedChunk]) -> tuple[pa.Table, ShardOutcome]:
    """A shard's chunks -> its rows and counts (a ranking is global: nothing is committed per shard)."""
    return pa.concat_tables([c.rows() for c in chunks]), ShardOutcome(
        encoded=sum(c.encoded for c in chunks), cache_hits=sum(c.cache_hits for c in chunks),
        problems=tuple(dict.fromkeys(p for c in chunks for p in c.problems)))


def _shards(urls: list[str], num_shards: int, sources: dict[str, str]) -> list[Shard]:
    """The same stable-hash shards as `segment` (so cache files line up), all to run."""
    plan = commit.plan_shards(urls, num_shards, {})
    return [replace(s, sources={u: sources[u] for u in s.urls if u in sources}) for s in plan.to_run]


def run_rank(spec: JobSpec, log=logger.info) -> pa.Table | None:
    """-> the ranking (one row per image); None for --dry-run."""
    started = time.perf_counter()
    concepts = read_concepts(spec.concepts, spec.storage_options)
    if len(concepts) != 1:
        raise ValueError(f"{', '.join(map(redact, spec.concepts))}: rank takes exactly one concept, found {len(concepts)}")
    if not method_of(concepts[0]).engine.ranks:
        raise ValueError(f"--concept {concepts[0].name}: method {concepts[0].method} has no presence score to rank by")
    check_job(spec)
    # a ranking is global: every image's score is kept; listed before any weights load
    names, sources = credential_free(list_all_images(spec.input, spec.storage_options))
    urls = list(names)
    num_shards = commit.shard_count(len(urls), spec.shard_size)
    if spec.table is not None:
        check_table_name(spec.table)  # before any work
    elif spec.catalog is not None:
        raise ValueError(f"--catalog {spec.catalog}: names the catalog of a --table; give --table NAMESPACE.TABLE")
    if spec.dry_run:
        target = shown_table(spec.table, spec.catalog) if spec.table else redact(join_url(spec.output, RANKING_FILE))
        dry_run_rank(spec, concepts[0], urls, num_shards, target, log)
        return None
    fingerprint, feature_cache, dinov2_fingerprint = prepare_job(spec, concepts, log)
    if feature_cache is not None:  # follow the cache's sharding: one cache file per shard
        num_shards = feature_cache.adopt_layout(num_shards)
    job = PreparedJob(spec, fingerprint, (concepts[0].to_json(),), num_shards if feature_cache is not None else None,
                      dinov2_fingerprint)
    with ray_session() if spec.runner == "ray" else nullcontext():  # one Ray for both passes
        return _rank(job, concepts[0].name, urls, sources, num_shards, started, log)


def _rank(job: PreparedJob, concept: str, urls: list[str], sources: dict[str, str], num_shards: int, started: float,
          log) -> pa.Table:
    spec = job.spec

    def one_pass(actor: type[ModelActor], images: list[str]) -> list[tuple[pa.Table, ShardOutcome]]:
        return run_pipeline(job, actor, _shards(images, num_shards, sources), _collect)

    results = one_pass(ScoreActor, urls)
    scores = pa.concat_tables([table for table, _ in results])
    outcome = ShardOutcome.total(o for _, o in results)
    encoded, hits = outcome.encoded, outcome.cache_hits
    for problem in outcome.problems:
        log(f"cache: {problem}")

    top = [r[IMAGE_URI] for r in ranking_table(scores, None).to_pylist()[: spec.top_k] if r[SIMILARITY] is not None]
    masks = pa.concat_tables([table for table, _ in one_pass(SegmentActor, top)]) if top else None
    ranking = ranking_table(scores, masks)

    if spec.table is not None:  # an Iceberg table, replaced whole in one snapshot
        target = replace_whole(spec.catalog, spec.table, ranking, {"persam.concept": concept,
                                                                   "persam.model_fingerprint": job.fingerprint})
    else:
        fs, root = url_to_fs(spec.output, **spec.storage_options)
        make_folder(fs, root)
        buffer = io.BytesIO()
        pq.write_table(ranking, buffer, compression="zstd")
        publish_bytes(fs, join_url(root, RANKING_FILE), buffer.getvalue())
        target = f"{redact(spec.output)}/{RANKING_FILE}"
    for row in ranking.to_pylist()[: min(spec.top_k, 10)]:
        similarity = "n/a" if row[SIMILARITY] is None else f"{row[SIMILARITY]:.4f}"
        log(f"  #{row[RANK]:<3} {similarity:>6}  {redact(row[IMAGE_URI])}")
    log(f"done: {ranking.num_rows} images ranked for {concept!r} ({error_count(scores)} failed), {encoded} encoded, {hits} from cache, "
        f"masks for the top {len(top)} -> {target} in {time.perf_counter() - started:.1f} s")
    return ranking
