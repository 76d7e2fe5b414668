"""The model actors: tensor work only, so that the GPU never waits for the host.

One class per task, sharing `ModelActor.__init__`: SAM loaded once (refusing weights other
than the driver's), moved to the device, the encoder's speed settings applied
(persam_core.acceleration) and the concepts put on the device. `__call__` only adapts
Ray Data's columns: it unpacks each chunk, computes (compute.py) and packs the results.

Ray Data runs up to two calls at once (max_concurrent_calls_per_actor=2 with true
multi-threading, see run.py). A lock and a thread make them a two-stage pipeline: while
one chunk's cascade runs (many small kernels, launched from Python), the next call queues
its chunk's encoder work, so the GPU has the encoder to run whenever the cascade leaves
it waiting for the host; unpacking and packing happen outside both. Every cascade runs
on the actor's one cascade thread, not on Ray's call threads: torch keeps CUDA graphs
(--decoder-graphs) per thread, so one thread records each decoder shape once and
replays it for every chunk (two call threads would each record and hold their own).
On CUDA the cascades also run on a stream of their own (cascade_stream.py), so that a
cascade's final read waits for its own kernels, not for the next chunk's encoder batch.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from persam_core.acceleration import prepare_encoder
from persam_core.concept import Concept, ConceptTensors

from jobs.logs import configure as configure_logging
from jobs.pipeline.cascade_stream import CascadeStream
from jobs.pipeline.compute import Batch, cascade_chunk, encode_chunk, score_batches
from jobs.pipeline.host_memory import keep_large_buffers
from jobs.pipeline.job import PreparedJob, load_checked_model, spec_speed
from jobs.pipeline.payload import Chunk, ChunkResults, pack_results, unpack_chunk
from jobs.pipeline.session import resolve_device

logger = logging.getLogger(__name__)


class ModelActor:
    """Ray Data UDF base: the job's SAM and concepts, loaded once per actor."""

    scores_only = False  # what the finish stage makes of the results: mask rows, or score rows

    def __init__(self, job: PreparedJob, threads: int) -> None:
        spec = job.spec
        configure_logging(spec.log_level, spec.quiet, spec.log_format)  # an actor's process logs as the driver's
        keep_large_buffers()  # the actor's own process: its CPU tensors (see host_memory.py)
        if threads > 0:
            torch.set_num_threads(threads)
        loaded = load_checked_model(spec, job.fingerprint)
        # "auto" resolves here, on the actor's node: a GPU-scheduled actor without a
        # visible CUDA device (a fake GPU resource) still runs, on CPU, with CPU settings.
        self.sam = loaded.sam.to(resolve_device(spec.model.device))
        self.fingerprint = loaded.fingerprint
        # also sets TF32 for this whole process (acceleration.py: never switched per decode)
        self.speed = prepare_encoder(self.sam, spec_speed(spec, self.sam.device.type), log=logger.info)
        self.concepts = [ConceptTensors.on(Concept.from_json(text), self.sam.device) for text in job.concept_texts]
        self.job = job
        self.cache_dtype = spec.cache_dtype if job.cache_shards is not None else None
        self.encode_lock = threading.Lock()
        # one thread: the cascades run one at a time, and decoder graphs live on it (see above)
        self.cascade_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cascade")
        self.cascade_stream = CascadeStream(self.sam.device)

    def compute(self, chunk: Chunk) -> ChunkResults:
        with self.encode_lock:  # queued on the device; no host read unless a cache needs the features
            batches, results = encode_chunk(self.sam, chunk, self.speed, self.cache_dtype)
            encoded = self.cascade_stream.mark_encoded()
        return self.cascade_thread.submit(self._cascade, chunk, batches, results, encoded).result()

    def _cascade(self, chunk: Chunk, batches: list[Batch], results: ChunkResults,
                 encoded: torch.cuda.Event | None) -> ChunkResults:
        """`decode` on the cascade stream, after the chunk's encoder work (runs on the cascade thread)."""
        with self.cascade_stream.running_after(encoded):
            return self.decode(chunk, batches, results)

    def decode(self, chunk: Chunk, batches: list[Batch], results: ChunkResults) -> ChunkResults:
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

    def decode(self, chunk: Chunk, batches: list[Batch], results: ChunkResults) -> ChunkResults:
        spec = self.job.spec
        return cascade_chunk(self.sam, batches, results, self.concepts, spec.max_instances, spec.min_similarity)


class ScoreActor(ModelActor):
    """`rank`'s first pass: the presence score and positive point only, no mask decoding."""

    scores_only = True

    def decode(self, chunk: Chunk, batches: list[Batch], results: ChunkResults) -> ChunkResults:
        return score_batches(self.sam, chunk, batches, results, self.concepts)
