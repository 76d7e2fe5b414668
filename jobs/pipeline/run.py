"""The Ray Data pipeline shared by `segment` and `rank`.

    shards (driver) -> chunks of at most DEFAULT_CHUNK_IMAGES images, never spanning shards
    -> prepare (CPU tasks: read, hash, decode, cache lookup, carried rows)
    -> SegmentActor (GPU: encode, batched cascade; two calls in flight, one encoding, one decoding)
    -> finish (CPU tasks: RLE, rows as Arrow, cache store)
    -> driver: gather each shard's chunks, hand complete shards on (commit) exactly once

The compute unit (a chunk) is not the commit unit (a shard): shards are large so that a
lake gives few, large files, chunks are small so that the GPU starts early and the CPU
stages overlap it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator

from tqdm import tqdm

from persam_core.concept import Concept

from jobs.pipeline.cache import FeatureCache
from jobs.pipeline.finish import finish_chunk
from jobs.pipeline.gather import ShardGatherer
from jobs.pipeline.prepare import prepare_chunk
from jobs.pipeline.session import actor_resources, local_cluster, start_ray, wants_gpu_actors
from jobs.pipeline.actors import SegmentActor

# Images per model-actor call: one GPU batch at the CUDA default batch size, small enough
# that two chunks in flight per actor keep it busy while the CPU stages run.
DEFAULT_CHUNK_IMAGES = 16
# Decoded chunks are large; the reservation also keeps Ray Data from fusing the CPU stage
# into the actor, where JPEG decoding would stall the model.
PREPARE_TASK_MEMORY_BYTES = 768 * 2**20  # measured: up to ~525 MiB for 16 decoded photos
FINISH_TASK_CPUS = 0.5
# Calls in flight per actor: one on the device, one unpacking or packing on the host.
ACTOR_CONCURRENT_CALLS = 2


@dataclass
class PipelineSpec:
    model_type: str
    checkpoint: str
    fingerprint: str
    concept_texts: list[str]
    device: str = "auto"
    num_actors: int | None = None
    max_pixels: int = 100_000_000
    storage_options: dict | None = None
    task: str = "segment"
    max_instances: int = 1
    min_similarity: float | None = None
    cache: dict | None = None  # FeatureCache kwargs: url, dtype, num_shards (the cache's layout)
    precision: str = "auto"
    fused_attention: bool | None = None
    compile_encoder: bool | None = None
    batch_size: int | None = None
    chunk_size: int = DEFAULT_CHUNK_IMAGES


def plan_chunks(shards: list[dict], chunk_size: int) -> list[dict]:
    """Shards ({"shard", "urls", "previous"}) -> chunks ({"shard", "chunk", "urls", "previous"})
    of at most chunk_size images, in URL order; sets each shard's "chunks" (its count)."""
    chunks = []
    for shard in shards:
        urls = list(shard["urls"])
        shard["chunks"] = max(1, math.ceil(len(urls) / chunk_size))
        for index in range(shard["chunks"]):
            chunks.append({"shard": shard["shard"], "chunk": index, "urls": urls[index * chunk_size : (index + 1) * chunk_size],
                           "previous": list(shard.get("previous") or [])})
    return chunks


def images_per_chunk(spec: PipelineSpec) -> int:
    """A chunk holds at least one encoder batch."""
    return max(1, spec.chunk_size, spec.batch_size or 1)


def run_pipeline(
    spec: PipelineSpec, shards: list[dict], on_shard: Callable[[dict, list[dict]], dict],
    on_progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Run every shard through the stages; on_shard(shard, its chunk rows) once per shard,
    on_progress(images) once per chunk as it reaches the driver -> on_shard's results."""
    import ray

    started_here = start_ray()
    try:
        chunks = plan_chunks(shards, images_per_chunk(spec))
        by_id = {s["shard"]: s for s in shards}
        with ShardGatherer(by_id, on_shard) as gatherer, tqdm(
            total=sum(len(s["urls"]) for s in shards), unit="img", desc=spec.task, file=sys.stderr, mininterval=1.0
        ) as bar:
            for row in ray_stream(spec, chunks):
                if gatherer.add(row):
                    bar.update(row["images"])
                    if on_progress is not None:
                        on_progress(int(row["images"]))
            return gatherer.results()
    finally:
        if started_here and local_cluster():
            ray.shutdown()


def ray_stream(spec: PipelineSpec, chunks: list[dict]) -> Iterator[dict]:
    """The chunks through prepare -> SegmentActor -> finish on Ray Data -> finish's rows."""
    import ray

    gpu = wants_gpu_actors(spec.device)
    if spec.num_actors:
        num_actors = spec.num_actors
    else:  # one actor per GPU on a cluster; one CPU actor locally (it uses every core)
        num_actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1
    resources = actor_resources(num_actors, gpu)
    threads = max(1, round(resources["num_cpus"])) if not local_cluster() else max(1, (os.cpu_count() or 1) // num_actors)
    print(f"{num_actors} model actor(s), each with {resources}; {len(chunks)} chunks")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one image-level bar instead of per-operator logs
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cache = None
    if spec.cache:
        cache = FeatureCache(spec.cache["url"], spec.fingerprint, spec.cache["dtype"], spec.storage_options,
                             spec.cache["num_shards"])
    labels = [(c.name, c.method) for c in (Concept.from_json(text) for text in spec.concept_texts)]
    # Ray Data restarts killed actors and retries their tasks by default (max_restarts=-1);
    # a chunk delivered twice is dropped by the gatherer.
    dataset = (
        ray.data.from_items(chunks, override_num_blocks=len(chunks))
        .map(prepare_chunk, num_cpus=1, memory=PREPARE_TASK_MEMORY_BYTES,
             fn_kwargs={"storage_options": spec.storage_options, "max_pixels": spec.max_pixels, "cache": cache})
        .map_batches(
            SegmentActor,
            batch_size=1,
            # Without enable_true_multi_threading, Ray Data (2.60) runs every call of an actor
            # on one thread, so a second call could not unpack while the first uses the GPU.
            compute=ray.data.ActorPoolStrategy(size=num_actors, max_concurrent_calls_per_actor=ACTOR_CONCURRENT_CALLS,
                                               enable_true_multi_threading=True),
            fn_constructor_kwargs={
                "model_type": spec.model_type, "checkpoint": spec.checkpoint, "expected_fingerprint": spec.fingerprint,
                "concepts_box": [ray.put(spec.concept_texts)], "device": spec.device, "threads": threads,
                "storage_options": spec.storage_options, "max_instances": spec.max_instances,
                "min_similarity": spec.min_similarity, "task": spec.task, "precision": spec.precision,
                "fused_attention": spec.fused_attention, "compile_encoder": spec.compile_encoder,
                "batch_size": spec.batch_size, "cache_dtype": spec.cache["dtype"] if spec.cache else None,
            },
            **resources,
        )
        .map(finish_chunk, num_cpus=FINISH_TASK_CPUS,
             fn_kwargs={"fingerprint": spec.fingerprint, "concepts": labels, "task": spec.task, "cache": cache})
    )
    yield from dataset.iter_rows()
