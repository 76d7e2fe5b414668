"""The pipeline shared by `segment`, `rank` and `eval`: one set of stages, two runners.

    shards (driver) -> chunks of at most --chunk-size images, never spanning shards
    -> prepare (CPU tasks: read, hash, decode, cache lookup, carried rows)
    -> model actor (GPU: encode, batched cascade; two calls in flight, one encoding, one decoding)
    -> finish (CPU tasks: RLE, rows as Arrow, cache store)
    -> driver: gather each shard's chunks, hand complete shards on (commit) exactly once

The compute unit (a chunk) is not the commit unit (a shard): shards are large so that a
lake gives few, large files, chunks are small so that the GPU starts early and the CPU
stages overlap it.

`--runner ray` (default) runs the stages on Ray Data; `--runner local` runs the same stage
functions and actor class in this process, one chunk after another (debugging, small
inputs, and the tests, which so exercise the real wiring without a Ray start).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Callable, Iterator, TypeVar

from jobs.logs import native_stderr_filter, ray_logging_level
from jobs.pipeline.actors import ModelActor
from jobs.pipeline.finish import finish_chunk
from jobs.pipeline.gather import ShardGatherer
from jobs.pipeline.job import PreparedJob
from jobs.pipeline.payload import FinishedChunk
from jobs.pipeline.prepare import prepare_chunk
from jobs.pipeline.progress import Progress
from jobs.pipeline.session import plan_actors, ray_session
from jobs.pipeline.shards import Shard

# Decoded chunks are large; the reservation also keeps Ray Data from fusing the CPU stage
# into the actor, where JPEG decoding would stall the model.
PREPARE_TASK_MEMORY_BYTES = 768 * 2**20  # measured: up to ~525 MiB for 16 decoded photos
# Calls in flight per actor: one on the device, one unpacking or packing on the host.
ACTOR_CONCURRENT_CALLS = 2

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


def plan_chunks(shards: list[Shard], chunk_size: int) -> list[dict]:
    """Shards -> chunks ({"shard", "chunk", "urls", "previous", "sources"}) of at most
    chunk_size images (Shard.chunk_count of them), in URL order. `sources` (reading URLs
    that hold credentials, see listing.credential_free) go only to the chunks of their images."""
    chunks = []
    for shard in shards:
        for index in range(shard.chunk_count(chunk_size)):
            part = list(shard.urls[index * chunk_size : (index + 1) * chunk_size])
            chunks.append({"shard": shard.shard, "chunk": index, "urls": part, "previous": list(shard.previous),
                           "sources": {u: shard.sources[u] for u in part if u in shard.sources}})
    return chunks


def run_pipeline(
    job: PreparedJob, actor: type[ModelActor], shards: list[Shard],
    on_shard: Callable[[Shard, list[FinishedChunk]], Result], on_progress: Callable[[int], None] | None = None,
) -> list[Result]:
    """Run every shard through the stages; on_shard(shard, its chunks in order) once per
    shard, on_progress(images) once per chunk as it reaches the driver -> on_shard's results."""
    if actor.scores_only:  # the stages make, encode and cache only what the engines' presence reads
        job = replace(job, presence_only=True)
    chunk_size = job.spec.speed.images_per_chunk()
    chunks = plan_chunks(shards, chunk_size)
    by_id = {s.shard: s for s in shards}
    stream = local_stream if job.spec.runner == "local" else ray_stream
    with ShardGatherer(by_id, chunk_size, on_shard) as gatherer, Progress(
        sum(len(s.urls) for s in shards), job.spec.command, job.spec.progress_interval
    ) as bar:
        for row in stream(job, actor, chunks):
            finished = FinishedChunk.from_row(row)
            if gatherer.add(finished):
                bar.update(finished.images)
                if on_progress is not None:
                    on_progress(finished.images)
        return gatherer.results()


def local_stream(job: PreparedJob, actor: type[ModelActor], chunks: list[dict]) -> Iterator[dict]:
    """The stages in this process: prepare -> actor -> finish, chunk by chunk."""
    model = actor(job, threads=0, stage_threads=False)  # 0: keep torch's own thread count; one call at a time
    for chunk in chunks:
        prepared = prepare_chunk(chunk, job)
        computed = model({"meta": [prepared["meta"]], "arrays": [prepared["arrays"]]})
        yield finish_chunk({"meta": computed["meta"][0], "results": computed["results"][0]}, job,
                           scores_only=actor.scores_only)


def ray_stream(job: PreparedJob, actor: type[ModelActor], chunks: list[dict]) -> Iterator[dict]:
    """The chunks through prepare -> actor -> finish on Ray Data -> finish's rows."""
    import ray

    with ray_session(), native_stderr_filter():  # see jobs/logs.py for the line it drops
        plan = plan_actors(job.spec.model.device, job.spec.num_actors)
        logger.info(f"{plan.count} model actor(s), each with {plan.resources}; {len(chunks)} chunks")
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # one image-level progress (progress.py) instead of per-operator logs
        logging.getLogger("ray.data").setLevel(ray_logging_level())
        # Ray Data restarts killed actors and retries their tasks by default (max_restarts=-1);
        # a chunk delivered twice is dropped by the gatherer.
        dataset = (
            ray.data.from_items(chunks, override_num_blocks=len(chunks))
            .map(prepare_chunk, num_cpus=plan.prepare_cpus, memory=PREPARE_TASK_MEMORY_BYTES, fn_kwargs={"job": job})
            .map_batches(
                actor,
                batch_size=1,
                # Without enable_true_multi_threading, Ray Data (2.60) runs every call of an actor
                # on one thread, so a second call could not unpack while the first uses the GPU.
                compute=ray.data.ActorPoolStrategy(size=plan.count, max_concurrent_calls_per_actor=ACTOR_CONCURRENT_CALLS,
                                                   enable_true_multi_threading=True),
                fn_constructor_kwargs={"job": job, "threads": plan.threads},
                # merged key by key with a job-level runtime_env's env_vars (ours win on the same key)
                **({"runtime_env": {"env_vars": plan.env}} if plan.env else {}),
                **plan.resources,
            )
            .map(finish_chunk, num_cpus=plan.finish_cpus, fn_kwargs={"job": job, "scores_only": actor.scores_only})
        )
        yield from dataset.iter_rows()
