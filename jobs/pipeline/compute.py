"""The model actors' device work on one chunk, as plain functions (tests and `bench` call
them without Ray): images with pixels are encoded in batches of `speed.batch_size`,
images with cached features skip the encoder, and the batched cascade (or, for `rank`,
only the location prior) runs once per batch. Results are host numpy
(payload.ChunkResults); rows, RLE, Arrow and every cache or Parquet access happen in the
CPU stages (prepare.py, finish.py).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from persam_core.speed.acceleration import EncoderSpeed
from persam_core.batch import EncodedBatch
from persam_core.host_results import HostResults
from persam_core.cascade import score_batch, segment_batch
from persam_core.concept import ConceptTensors
from persam_core.errors import describe
from persam_core.methods.frames import FrameImage, frame_tensor
from persam_core.methods.registry import FRAME_SIDE
from persam_core.methods.registry import FRAME_MODEL, FRAME_STRETCH
from persam_core.modeling.dinov2 import frame_tokens
from persam_core.modeling.predictor import EncodedImage, encode_images
from persam_core.modeling.preprocess import array_to_device

from jobs.pipeline.cache import DTYPES
from jobs.pipeline.payload import Chunk, ChunkResults

Batch = tuple[list[int], list[EncodedImage]]  # item indices of a chunk, and their features on the device


def encoder_padding(speed: EncoderSpeed) -> int | None:
    """The size a chunk's partial encoder batch is padded to: the whole batch for a compiled
    encoder (one shape, so it never recompiles); None (not padded) for an eager one."""
    return max(1, speed.batch_size) if speed.compile else None


def encode_chunk(sam, chunk: Chunk, speed: EncoderSpeed, cache_dtype: str | None = None) -> tuple[list[Batch], ChunkResults]:
    """Features of every image of the chunk that has pixels or cached features, in batches
    of speed.batch_size -> (batches, results with failures, encoded items and, when
    `cache_dtype` is given, the fresh features in that dtype for the cache)."""
    results, batches = ChunkResults(), []
    size = max(1, speed.batch_size)
    pending = [i for i, item in enumerate(chunk.items) if item.source == "pixels"]
    for start in range(0, len(pending), size):
        indices = pending[start : start + size]
        try:
            encoded = encode_images(sam, [chunk.resized(i) for i in indices], speed.precision,
                                    pad_to=encoder_padding(speed))
        except Exception as error:  # e.g. out of memory on one batch: record, go on
            results.failures.update({i: f"encode failed: {describe(error)}" for i in indices})
            continue
        batches.append((indices, encoded))
        results.encoded += indices
        if cache_dtype is not None:  # cast on the device: half the bytes cross to the host in fp16
            dtype = getattr(torch, np.dtype(DTYPES[cache_dtype]).name)
            host = torch.stack([e.features for e in encoded]).to(dtype).cpu().numpy()
            results.fresh.update({i: host[n] for n, i in enumerate(indices)})
            levels = [torch.stack([e.high_res[level] for e in encoded]).to(dtype).cpu().numpy()
                      for level in range(len(encoded[0].high_res))]  # SAM 2's decoder skips; none for SAM
            if levels:
                results.fresh_high_res.update({i: tuple(level[n] for level in levels) for n, i in enumerate(indices)})
    cached = [i for i, item in enumerate(chunk.items) if item.source == "cached"]
    for start in range(0, len(cached), size):
        indices = cached[start : start + size]
        batches.append((indices, [cached_image(chunk, i, sam.device) for i in indices]))
    return batches, results


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Cached fp16/fp32 features -> fp32 on the device (what the cascade computes in)."""
    return array_to_device(array, device).float()


def cached_image(chunk: Chunk, item: int, device: torch.device) -> EncodedImage:
    """The cached features of one item (SAM 2: with its high-resolution levels) on the device."""
    entry = chunk.items[item]
    return EncodedImage(on_device(chunk.features[item], device), entry.input_size, entry.original_size,
                        tuple(on_device(level, device) for level in chunk.high_res.get(item, ())))


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
            failures[indices[0]] = f"{what} failed: {describe(error)}"
            return []
    done = []
    for index, image in zip(indices, encoded):
        try:
            done.append(([index], run([image])))
        except Exception as error:
            failures[index] = f"{what} failed: {describe(error)}"
    return done


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


# -- several methods: each image encoded once per frame its concepts' methods read ---------------

FrameBatch = tuple[list[int], list[FrameImage]]  # item indices of a chunk, and their frame images


class EnginePass:
    """One engine's batched pass over its concepts of a job: their positions (job order) and
    their on-device form (engine.on_device), made once for all of them and, for a job that
    computes chosen pairs only (PreparedJob.pairs), once per subset as first asked."""

    def __init__(self, engine, positions: Sequence[int], concepts: Sequence[object], device) -> None:
        self.engine, self.positions, self.device = engine, tuple(positions), device
        self._concepts = dict(zip(self.positions, concepts))
        self._on_device = {self.positions: engine.on_device(list(concepts), device)}

    @property
    def concepts(self):
        """All of its concepts on the device."""
        return self._on_device[self.positions]

    def on_device(self, chosen: tuple[int, ...]):
        """The concepts at job positions `chosen` (a subset of `positions`, in order) on the device."""
        if chosen not in self._on_device:
            self._on_device[chosen] = self.engine.on_device([self._concepts[p] for p in chosen], self.device)
        return self._on_device[chosen]


Engines = list[EnginePass]


def encode_frames(sam, dinov2, chunk: Chunk, speed: EncoderSpeed, frames: Sequence[str],
                  cache_dtype: str | None = None) -> tuple[dict[str, list[FrameBatch]], ChunkResults]:
    """Every frame in `frames` of the chunk's images -> ({frame: batches}, results). The model
    frame as encode_chunk (cache included); the stretch frame through SAM and DINOv2, or DINOv2
    alone when `sam` is None (a presence pass that reads no SAM features)."""
    encoded: dict[str, list[FrameBatch]] = {}
    results = ChunkResults()
    if FRAME_MODEL in frames:
        batches, results = encode_chunk(sam, chunk, speed, cache_dtype)
        encoded[FRAME_MODEL] = [(indices, [FrameImage(e) for e in images]) for indices, images in batches]
    if FRAME_STRETCH in frames:
        encoded[FRAME_STRETCH] = encode_stretch(sam, dinov2, chunk, speed, results, cache_dtype)
    return encoded, results


def _cached_stretch(chunk: Chunk, item: int, device: torch.device) -> FrameImage:
    """A cached stretch frame on the device: its DINOv2 tokens, with SAM's features where cached."""
    features, size = chunk.stretch_features.get(item), chunk.items[item].original_size
    encoded = (None if features is None
               else EncodedImage(on_device(features, device), (FRAME_SIDE, FRAME_SIDE), size))
    return FrameImage(encoded, on_device(chunk.stretch_tokens[item], device), size)


def encode_stretch(sam, dinov2, chunk: Chunk, speed: EncoderSpeed, results: ChunkResults,
                   cache_dtype: str | None = None) -> list[FrameBatch]:
    """The stretch frames ([1024, 1024, 3] uint8) -> SAM features (none when `sam` is None) and
    DINOv2 tokens, in batches of speed.batch_size (a failing batch becomes its images' failures;
    with `cache_dtype`, the fresh ones also go to results.fresh_stretch, or fresh_tokens without
    SAM, for the cache); cached frames skip both encoders."""
    batches: list[FrameBatch] = []
    size = max(1, speed.batch_size)
    device = next(dinov2.parameters()).device
    cached = [i for i in sorted(chunk.stretch_tokens) if i not in results.failures]
    for start in range(0, len(cached), size):
        indices = cached[start : start + size]
        batches.append((indices, [_cached_stretch(chunk, i, device) for i in indices]))
    pending = [i for i in sorted(chunk.stretch) if i not in results.failures]
    for start in range(0, len(pending), size):
        indices = pending[start : start + size]
        try:
            images = [chunk.stretched(i) for i in indices]
            features = (None if sam is None
                        else encode_images(sam, images, speed.precision, pad_to=encoder_padding(speed)))
            pixels = torch.stack([array_to_device(image.pixels, device) for image in images])
            with torch.no_grad():
                tokens = frame_tokens(dinov2, frame_tensor(pixels), speed.precision)  # as SAM's encoder
        except Exception as error:
            results.failures.update({i: f"encode failed: {describe(error)}" for i in indices})
            continue
        if features is None:
            batches.append((indices, [FrameImage(None, t, image.original_size) for t, image in zip(tokens, images)]))
        else:
            batches.append((indices, [FrameImage(f, t) for f, t in zip(features, tokens)]))
        results.encoded = sorted(set(results.encoded) | set(indices))
        if cache_dtype is not None:  # cast on the device: fewer bytes cross to the host
            dtype = getattr(torch, np.dtype(DTYPES[cache_dtype]).name)
            host_tokens = tokens.to(dtype).cpu().numpy()
            if features is None:
                results.fresh_tokens.update({i: host_tokens[n] for n, i in enumerate(indices)})
                continue
            host_features = torch.stack([f.features for f in features]).to(dtype).cpu().numpy()
            results.fresh_stretch.update({i: (host_features[n], host_tokens[n]) for n, i in enumerate(indices)})
    return batches


def _to_job(host: HostResults, indices: list[int], positions: list[int]) -> HostResults:
    """An engine's results -> the chunk's item indices and the job's concept positions."""
    return HostResults(**{**host.to_arrays(), "image_index": np.asarray(indices, np.int32)[host.image_index],
                          "concept_index": np.asarray(positions, np.int32)[host.concept_index]})


def pair_groups(indices: Sequence[int], positions: Sequence[int],
                wanted: Callable[[int], Sequence[int]] | None) -> list[tuple[tuple[int, ...], list[int]]]:
    """A batch's items (chunk indices) -> [(concept positions, batch members)]: one group of all
    of them with every position, or with `wanted` (item -> its concept positions) the members
    that want the same subset of `positions` together (items wanting none of them: no group)."""
    if wanted is None:
        return [(tuple(positions), list(range(len(indices))))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for member, item in enumerate(indices):
        its = set(wanted(item))
        chosen = tuple(p for p in positions if p in its)
        if chosen:
            groups.setdefault(chosen, []).append(member)
    return list(groups.items())


def segment_engines(sam, encoded: dict[str, list[FrameBatch]], results: ChunkResults, engines: Engines,
                    max_instances: int = 1, min_similarity: float | None = None,
                    wanted: Callable[[int], Sequence[int]] | None = None) -> ChunkResults:
    """Each engine's batched pass over the batches of its frame -> results.masks (rows of every
    engine, image_index = item index, concept_index = the job's concept order). wanted: item
    index -> the concept positions computed for it (None: every pair); a batch's images that
    want the same concepts share one pass, no other pair is decoded."""
    parts = []
    for engine_pass in engines:
        engine = engine_pass.engine
        for indices, images in encoded.get(engine.frame, []):
            for chosen, members in pair_groups(indices, engine_pass.positions, wanted):
                concepts = engine_pass.on_device(chosen)
                batch = ([indices[m] for m in members], [images[m] for m in members])
                run = lambda images: engine.segment(sam, images, concepts, max_instances, min_similarity)  # noqa: E731
                parts.extend(_to_job(host, done, list(chosen))
                             for done, host in per_batch(run, batch, results.failures, "segment"))
    results.masks = HostResults.concatenate(parts, [0] * len(parts))
    return results


def score_engines(sam, chunk: Chunk, encoded: dict[str, list[FrameBatch]], results: ChunkResults,
                  engines: Engines) -> ChunkResults:
    """Each engine's presence pass -> results.similarity [N, K], results.point [N, K, 2] (job order)."""
    count = sum(len(engine_pass.positions) for engine_pass in engines)
    results.similarity = np.full((len(chunk.items), count), np.nan, np.float32)
    results.point = np.zeros((len(chunk.items), count, 2), np.int32)
    for engine_pass in engines:
        engine, positions, concepts = engine_pass.engine, list(engine_pass.positions), engine_pass.concepts
        for batch in encoded.get(engine.frame, []):
            run = lambda images: engine.score(sam, images, concepts)  # noqa: E731
            for indices, (similarity, point) in per_batch(run, batch, results.failures, "score"):
                results.similarity[np.ix_(indices, positions)] = similarity
                results.point[np.ix_(indices, positions)] = point
    return results
