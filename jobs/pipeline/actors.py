"""The model actors: tensor work only, so that the GPU never waits for the host.

One class per task, sharing `ModelActor.__init__`: SAM (and DINOv2 where a concept's method
reads it) loaded once (refusing weights other than the driver's), moved to the device, the
encoder's speed settings applied (persam_core.speed.acceleration) and the concepts put on the
device by their methods' engines (the method registry groups them: one batched pass each). `__call__` only adapts
Ray Data's columns: it unpacks each chunk, computes (compute.py) and packs the results.

The device work runs as two stages, encode then cascade, with two calls in flight
(device_stages.py: one lock, one cascade thread and, on CUDA, one cascade stream).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from persam_core.methods.registry import engines_of

from jobs.logs import configure as configure_logging
from jobs.pipeline.compile_cache import prepare_warm
from jobs.pipeline.compute import EnginePass, FrameBatch, encode_frames, score_engines, segment_engines
from jobs.pipeline.device_stages import DeviceStages
from jobs.pipeline.host_memory import keep_large_buffers
from jobs.pipeline.job import PreparedJob
from jobs.pipeline.job_checks import load_checked_dinov2, load_checked_model, spec_speed
from jobs.pipeline.payload import Chunk, ChunkResults, pack_results, unpack_chunk
from jobs.pipeline.session import resolve_device

logger = logging.getLogger(__name__)


class ModelActor:
    """Ray Data UDF base: the job's SAM and concepts, loaded once per actor."""

    scores_only = False  # what the finish stage makes of the results: mask rows, or score rows

    def __init__(self, job: PreparedJob, threads: int, stage_threads: bool = True) -> None:
        """threads: torch's (0: keep its own); stage_threads=False: one call at a time, each
        cascade on the calling thread (the local runner, see DeviceStages)."""
        spec = job.spec
        configure_logging(spec.log_level, spec.quiet, spec.log_format)  # an actor's process logs as the driver's
        keep_large_buffers()  # the actor's own process: its CPU tensors (see host_memory.py)
        if threads > 0:
            torch.set_num_threads(threads)
        # "auto" resolves here, on the actor's node: a GPU-scheduled actor without a
        # visible CUDA device (a fake GPU resource) still runs, on CPU, with CPU settings.
        device = torch.device(resolve_device(spec.model.device))
        self.sam, self.fingerprint, self.speed = None, job.fingerprint, spec_speed(spec, device.type)
        if job.needs_sam():  # not for a presence pass that reads DINOv2 alone (the registry says)
            loaded = load_checked_model(spec, job.fingerprint)
            self.sam = loaded.sam.to(device)
            # also sets TF32 for this whole process (acceleration.py: never switched per decode);
            # a compiled encoder starts warm from the compile cache where it holds this key
            self.speed = prepare_warm(self.sam, self.speed, spec.model.model_type,
                                      spec.compile_cache, spec.storage_options, log=logger.info)
        concepts = job.concepts()
        # one batched pass per engine (the registry groups methods), each over its concepts
        self.engines = [EnginePass(engine, positions, [concepts[p] for p in positions], device)
                        for engine, positions in engines_of(concepts)]
        self.frames = job.frames()
        self.dinov2 = load_checked_dinov2(spec, job.dinov2_fingerprint, device) if job.needs_dinov2() else None
        self.job = job
        self.cache_dtype = spec.cache_dtype if job.cache_shards is not None else None
        self.stages = DeviceStages(device, cascade_thread=stage_threads)

    def compute(self, chunk: Chunk) -> ChunkResults:
        return self.stages.run(
            lambda: encode_frames(self.sam, self.dinov2, chunk, self.speed, self.frames, self.cache_dtype),
            lambda encoded: self.decode(chunk, *encoded))

    def decode(self, chunk: Chunk, frames: dict[str, list[FrameBatch]], results: ChunkResults) -> ChunkResults:
        raise NotImplementedError

    def __call__(self, batch: dict) -> dict:
        """{"meta", "arrays"} per chunk -> {"meta" (passed on), "results"} (see payload.py)."""
        out: dict[str, list] = {"meta": [], "results": []}
        for meta, arrays in zip(batch["meta"], batch["arrays"]):
            out["meta"].append(meta)
            out["results"].append(pack_results(self.compute(unpack_chunk(meta, arrays))))
        return {key: np.array(values, dtype=object) for key, values in out.items()}


class SegmentActor(ModelActor):
    """`segment`: masks of every (image, concept) pair, up to --max-instances each."""

    def decode(self, chunk: Chunk, frames: dict[str, list[FrameBatch]], results: ChunkResults) -> ChunkResults:
        spec, job = self.job.spec, self.job
        # a job of chosen pairs (eval's episodes) decodes only those
        wanted = None if job.pairs is None else (lambda item: job.concepts_for(chunk.items[item].url))
        return segment_engines(self.sam, frames, results, self.engines, spec.max_instances, spec.min_similarity, wanted)


class ScoreActor(ModelActor):
    """`rank`'s first pass: the presence score and positive point only, no mask decoding."""

    scores_only = True

    def decode(self, chunk: Chunk, frames: dict[str, list[FrameBatch]], results: ChunkResults) -> ChunkResults:
        return score_engines(self.sam, chunk, frames, results, self.engines)
