"""The Ray Data pipeline shared by `segment` and `rank`.

    shards -> prepare (CPU tasks: read, hash, decode, cache lookup) -> SegmentActor
    (encode once, decode every concept) -> sink (commit a shard, or hand rows back)
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Callable

from tqdm import tqdm

from .runtime import actor_resources, local_cluster, start_ray, wants_gpu_actors
from .shard_payload import prepare_shard
from .worker import SegmentActor

# Decoded shards are large; the reservation also keeps Ray Data from fusing the CPU stage
# into the actor, where JPEG decoding would stall the model.
PREPARE_TASK_MEMORY_BYTES = 512 * 2**20


@dataclass
class PipelineSpec:
    model_type: str
    checkpoint: str
    fingerprint: str
    concept_texts: list[str]
    device: str = "auto"
    batch_size: int = 1
    num_actors: int | None = None
    max_pixels: int = 100_000_000
    storage_options: dict | None = None
    task: str = "segment"
    max_instances: int = 1
    min_similarity: float | None = None
    cache: dict | None = None  # FeatureCache kwargs: url, dtype, num_shards (the cache's layout)
    precision: str = "fp32"
    fused_attention: bool = False
    compile_encoder: bool = False


def run_pipeline(spec: PipelineSpec, shards: list[dict], sink: Callable[[dict], dict]) -> list[dict]:
    """Run every shard ({"shard", "urls", "previous"}) through the stages -> sink results."""
    import ray

    started_here = start_ray()
    try:
        return _run(ray, spec, shards, sink)
    finally:
        if started_here and local_cluster():
            ray.shutdown()


def _run(ray, spec: PipelineSpec, shards: list[dict], sink: Callable[[dict], dict]) -> list[dict]:
    gpu = wants_gpu_actors(spec.device)
    if spec.num_actors:
        num_actors = spec.num_actors
    else:  # one actor per GPU on a cluster; one CPU actor locally (it uses every core)
        num_actors = max(1, int(ray.cluster_resources().get("GPU", 0))) if gpu else 1
    resources = actor_resources(num_actors, gpu)
    threads = max(1, round(resources["num_cpus"])) if not local_cluster() else max(1, (os.cpu_count() or 1) // num_actors)
    print(f"{num_actors} model actor(s), each with {resources}; {len(shards)} shards")
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one image-level bar below instead of per-operator logs
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    concepts_ref = ray.put(spec.concept_texts)
    cache = None
    if spec.cache:
        from .cache import FeatureCache

        cache = FeatureCache(spec.cache["url"], spec.fingerprint, spec.cache["dtype"], spec.storage_options,
                             spec.cache["num_shards"])

    # Ray Data restarts killed actors and retries their tasks by default (max_restarts=-1).
    dataset = (
        ray.data.from_items(shards, override_num_blocks=len(shards))
        .map(prepare_shard, num_cpus=1, memory=PREPARE_TASK_MEMORY_BYTES,
             fn_kwargs={"storage_options": spec.storage_options, "max_pixels": spec.max_pixels, "cache": cache})
        .map_batches(
            SegmentActor,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            fn_constructor_kwargs={
                "model_type": spec.model_type, "checkpoint": spec.checkpoint, "expected_fingerprint": spec.fingerprint,
                "concepts_box": [concepts_ref], "device": spec.device, "batch_size": spec.batch_size,
                "threads": threads, "storage_options": spec.storage_options, "max_instances": spec.max_instances,
                "min_similarity": spec.min_similarity, "task": spec.task, "cache": spec.cache,
                "precision": spec.precision, "fused_attention": spec.fused_attention,
                "compile_encoder": spec.compile_encoder,
            },
            **resources,
        )
        .map(sink, num_cpus=0.5)
    )
    results = []
    with tqdm(total=sum(len(s["urls"]) for s in shards), unit="img", desc=spec.task, file=sys.stderr, mininterval=1.0) as bar:
        for result in dataset.iter_rows():
            results.append(result)
            bar.update(result["images"])
            bar.set_postfix(rows=sum(r["rows"] for r in results), errors=sum(r["errors"] for r in results), refresh=False)
    return results
