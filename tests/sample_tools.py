"""Sample images as the tests use them (decoded, shrunk), mask IoU, and a hand-built chunk
through the model actor's device work and the finish stage's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jobs.pipeline.compute import cascade_chunk, encode_chunk
from jobs.pipeline.finish import mask_rows
from jobs.pipeline.payload import Chunk, ChunkItem, ChunkResults
from jobs.storage.images import decode_image, decode_mask
from persam_core.speed.acceleration import EncoderSpeed
from persam_core.concept import ConceptTensors
from persam_core.modeling.resized import ResizedImage


def load_pair(sample: Path, concept: str, number: str) -> tuple[np.ndarray, np.ndarray]:
    """A sample image and its mask, decoded as `persam fit` decodes them."""
    image = decode_image((sample / "Images" / concept / f"{number}.jpg").read_bytes(), "image")
    mask = decode_mask((sample / "Annotations" / concept / f"{number}.png").read_bytes(), "mask")
    return image, mask


def save_small(sample: Path, source: str, target: Path, side: int = 320, quality: int = 90) -> Path:
    """Sample image `source` ("cat/01") shrunk to `side` px, saved as JPEG at `target`."""
    with Image.open(sample / "Images" / f"{source}.jpg") as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((side, side))
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=quality)
    return target


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["image_uri"]).name: r for r in rows}


def make_chunk(images: list[tuple[str, str, ResizedImage]]) -> Chunk:
    """(url, content hash, resized image) per image -> a chunk to encode, as prepare_chunk makes it."""
    chunk = Chunk(0, 0, [])
    for index, (url, sha, resized) in enumerate(images):
        chunk.items.append(ChunkItem(url, sha, source="pixels", original_size=resized.original_size,
                                     input_size=resized.input_size))
        chunk.pixels[index] = resized.pixels
    return chunk


def segment_chunk(sam, chunk: Chunk, concepts: list[ConceptTensors], speed: EncoderSpeed, max_instances: int = 1,
                  min_similarity: float | None = None, cache_dtype: str | None = None) -> ChunkResults:
    """The model actor's device work on one chunk, its two stages one after the other."""
    batches, results = encode_chunk(sam, chunk, speed, cache_dtype)
    return cascade_chunk(sam, batches, results, concepts, max_instances, min_similarity)


def segment_rows(sam, fingerprint: str, concepts: list[ConceptTensors], chunk: Chunk, batch_size: int = 1,
                 max_instances: int = 1, min_similarity: float | None = None,
                 cache_dtype: str | None = None) -> tuple[list[dict], ChunkResults]:
    """The model actor's device work and the finish stage's rows, in this process (CPU, fp32)."""
    results = segment_chunk(sam, chunk, concepts, EncoderSpeed(batch_size=batch_size), max_instances, min_similarity,
                            cache_dtype)
    return mask_rows(chunk, results, [(c.concept.name, c.concept.method) for c in concepts], fingerprint), results
