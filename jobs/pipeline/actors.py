"""The model actor: tensor work only, so that the GPU never waits for the host.

`__init__` loads SAM once (checking the job's fingerprint), moves it to the device,
applies the encoder's speed settings (persam_core.acceleration) and reads the concepts.
`__call__` takes one chunk: images with pixels are encoded in batches of
`speed.batch_size`, images with cached features skip the encoder, and the batched
cascade runs once per batch. It returns host numpy (payload.ChunkResults); rows, RLE,
Arrow and every cache or Parquet access happen in CPU stages (prepare.py, finish.py).
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

import numpy as np
import torch

from persam_core.acceleration import EncoderSpeed, prepare_encoder, resolve_speed
from persam_core.batch import EncodedBatch, HostResults
from persam_core.cascade import score_batch, segment_batch
from persam_core.concept import Concept, ConceptTensors
from persam_core.predictor import EncodedImage, encode_images

from jobs.pipeline.cache import DTYPES
from jobs.storage.checkpoints import load_model
from jobs.pipeline.payload import Chunk, ChunkResults, pack_results, short_reason, unpack_chunk
from jobs.pipeline.session import resolve_device

Batch = tuple[list[int], list[EncodedImage]]  # item indices of a chunk, and their features on the device


def encode_chunk(sam, chunk: Chunk, speed: EncoderSpeed, cache_dtype: str | None = None) -> tuple[list[Batch], ChunkResults]:
    """Features of every image of the chunk that has pixels or cached features, in batches
    of speed.batch_size -> (batches, results with failures, encoded items and, when
    `cache_dtype` is given, the fresh features in that dtype for the cache)."""
    results, batches = ChunkResults(), []
    size = max(1, speed.batch_size)
    pending = [i for i, item in enumerate(chunk.items) if item.source == "pixels"]
    for start in range(0, len(pending), size):
        indices = pending[start : start + size]
        try:  # padded to one shape: the compiled encoder never recompiles
            encoded = encode_images(sam, [chunk.resized(i) for i in indices], speed.precision,
                                    pad_to=size if speed.compile else None)
        except Exception as error:  # e.g. out of memory on one batch: record, go on
            results.failures.update({i: f"encode failed: {short_reason(error)}" for i in indices})
            continue
        batches.append((indices, encoded))
        results.encoded += indices
        if cache_dtype is not None:  # cast on the device: half the bytes cross to the host in fp16
            dtype = getattr(torch, np.dtype(DTYPES[cache_dtype]).name)
            host = torch.stack([e.features for e in encoded]).to(dtype).cpu().numpy()
            results.fresh.update({i: host[n] for n, i in enumerate(indices)})
    cached = [i for i, item in enumerate(chunk.items) if item.source == "cached"]
    for start in range(0, len(cached), size):
        indices = cached[start : start + size]
        batches.append((indices, [EncodedImage(torch.from_numpy(chunk.features[i]).to(sam.device).float(),
                                               chunk.items[i].input_size, chunk.items[i].original_size)
                                  for i in indices]))
    return batches, results


def per_batch(
    run: Callable[[list[EncodedImage]], object], batch: Batch, failures: dict[int, str], what: str
) -> list[tuple[list[int], object]]:
    """run(batch) -> [(indices, output)]; if the batch fails, each image alone, so that one
    bad image becomes error rows ("<what> failed: ...") and the others succeed."""
    indices, encoded = batch
    try:
        return [(indices, run(encoded))]
    except Exception as error:
        if len(indices) == 1:
            failures[indices[0]] = f"{what} failed: {short_reason(error)}"
            return []
    done = []
    for index, image in zip(indices, encoded):
        try:
            done.append(([index], run([image])))
        except Exception as error:
            failures[index] = f"{what} failed: {short_reason(error)}"
    return done


def segment_chunk(
    sam, chunk: Chunk, concepts: Sequence[ConceptTensors], speed: EncoderSpeed, max_instances: int = 1,
    min_similarity: float | None = None, cache_dtype: str | None = None,
) -> ChunkResults:
    """Every (image, concept) pair of the chunk -> results.masks, image_index = item index."""
    batches, results = encode_chunk(sam, chunk, speed, cache_dtype)
    return cascade_chunk(sam, batches, results, concepts, max_instances, min_similarity)


def cascade_chunk(
    sam, batches: list[Batch], results: ChunkResults, concepts: Sequence[ConceptTensors], max_instances: int = 1,
    min_similarity: float | None = None,
) -> ChunkResults:
    """The batched cascade over each encoded batch -> results.masks (image_index = item index)."""
    parts = []
    for batch in batches:
        run = lambda images: segment_batch(sam, EncodedBatch.of(images), concepts, max_instances, min_similarity)  # noqa: E731
        for indices, host in per_batch(run, batch, results.failures, "segment"):
            # batch positions -> item indices of the chunk
            parts.append(HostResults(**{**host.to_arrays(),
                                        "image_index": np.asarray(indices, np.int32)[host.image_index]}))
    results.masks = HostResults.concatenate(parts, [0] * len(parts))
    return results


def score_chunk(sam, chunk: Chunk, concepts: Sequence[ConceptTensors], speed: EncoderSpeed,
                cache_dtype: str | None = None) -> ChunkResults:
    """Presence score and positive point per (image, concept), no mask decoding (persam rank)."""
    batches, results = encode_chunk(sam, chunk, speed, cache_dtype)
    return score_batches(sam, chunk, batches, results, concepts)


def score_batches(sam, chunk: Chunk, batches: list[Batch], results: ChunkResults,
                  concepts: Sequence[ConceptTensors]) -> ChunkResults:
    """The location prior of each encoded batch -> results.similarity [N, K], results.point [N, K, 2]."""
    results.similarity = np.full((len(chunk.items), len(concepts)), np.nan, np.float32)
    results.point = np.zeros((len(chunk.items), len(concepts), 2), np.int32)
    for batch in batches:
        run = lambda images: score_batch(sam, EncodedBatch.of(images), concepts)  # noqa: E731
        for indices, (similarity, point) in per_batch(run, batch, results.failures, "score"):
            results.similarity[indices], results.point[indices] = similarity, point
    return results


class SegmentActor:
    """Ray Data UDF: SAM + concepts loaded once in __init__; each __call__ computes chunks.

    task "segment" computes masks; task "score" (persam rank) only the presence score.
    Ray Data runs up to two calls at once (max_concurrent_calls_per_actor=2 with true
    multi-threading, see pipeline.py). Two locks make them a two-stage pipeline: while one
    call runs its chunk's cascade (many small kernels, launched from Python), the other
    queues its chunk's encoder work, so the GPU has the encoder to run whenever the cascade
    leaves it waiting for the host; unpacking and packing happen outside both locks.
    """

    def __init__(
        self, model_type: str, checkpoint: str, expected_fingerprint: str, concepts_box: list, device: str,
        threads: int, storage_options: dict | None = None, max_instances: int = 1,
        min_similarity: float | None = None, task: str = "segment", precision: str = "auto",
        fused_attention: bool | None = None, compile_encoder: bool | None = None, batch_size: int | None = None,
        cache_dtype: str | None = None,
    ) -> None:
        import ray

        torch.set_num_threads(max(1, threads))
        loaded = load_model(model_type, checkpoint, storage_options)
        if loaded.fingerprint != expected_fingerprint:
            raise RuntimeError(
                f"{loaded.source}: this node loaded weights {loaded.fingerprint}, the job expects "
                f"{expected_fingerprint}; the checkpoint changed under the job"
            )
        # "auto" resolves here, on the actor's node: a GPU-scheduled actor without a
        # visible CUDA device (a fake GPU resource) still runs, on CPU, with CPU settings.
        self.sam = loaded.sam.to(resolve_device(device))
        self.fingerprint = loaded.fingerprint
        speed = resolve_speed(self.sam.device.type, precision, fused_attention, compile_encoder, batch_size)
        self.speed = prepare_encoder(self.sam, speed, log=print)
        texts = ray.get(concepts_box[0])  # broadcast once through the object store
        self.concepts = [ConceptTensors.on(Concept.from_json(text), self.sam.device) for text in texts]
        self.task, self.cache_dtype = task, cache_dtype
        self.max_instances, self.min_similarity = max_instances, min_similarity
        self.encode_lock, self.cascade_lock = threading.Lock(), threading.Lock()

    def compute(self, chunk: Chunk) -> ChunkResults:
        with self.encode_lock:  # queued on the device; no host read unless a cache needs the features
            batches, results = encode_chunk(self.sam, chunk, self.speed, self.cache_dtype)
        with self.cascade_lock:
            if self.task == "score":
                return score_batches(self.sam, chunk, batches, results, self.concepts)
            return cascade_chunk(self.sam, batches, results, self.concepts, self.max_instances, self.min_similarity)

    def __call__(self, batch: dict) -> dict:
        """{"meta", "arrays"} per chunk -> {"meta" (passed on), "results"} (see payload.py)."""
        out: dict[str, list] = {"meta": [], "results": []}
        for meta, arrays in zip(batch["meta"], batch["arrays"]):
            chunk = unpack_chunk(meta, arrays)
            results = self.compute(chunk)
            out["meta"].append(meta)
            out["results"].append(pack_results(results))
        return {key: np.array(values, dtype=object) for key, values in out.items()}
