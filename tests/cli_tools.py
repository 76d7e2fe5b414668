"""Helpers shared by the feature tests: the CLI in-process, sample images, mask IoU, chunk rows."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from jobs.cli import main
from jobs.pipeline.finish import mask_rows
from jobs.storage.images import decode_image, decode_mask
from jobs.pipeline.payload import Chunk, ChunkItem, ChunkResults
from jobs.pipeline.compute import segment_chunk
from persam_core.acceleration import EncoderSpeed
from persam_core.concept import Concept, ConceptTensors
from persam_core.preprocess import ResizedImage

TINY = ["--model-type", "tiny", "--device", "cpu"]
MODEL = [*TINY, "--checkpoint", "random:0"]


def run_cli(argv: list[str]) -> SimpleNamespace:
    """jobs.cli.main in this process -> rc, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def assert_one_error_line(result: SimpleNamespace, *phrases: str) -> str:
    """A non-zero exit with exactly one `persam ...` line on stderr holding every phrase."""
    assert result.rc != 0, result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("persam ") and "Traceback" not in result.err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def fit_cli(sample: Path, shots: list[tuple[str, str]], out: Path, *extra: str, name: str = "thing",
            checkpoint: str = "random:0") -> Concept:
    """`persam fit` on sample shots [(concept, "NN"), ...] -> the concept written."""
    argv = ["fit", *TINY, "--checkpoint", checkpoint, "--name", name, "--out", str(out)]
    for concept, number in shots:
        argv += ["--image", str(sample / "Images" / concept / f"{number}.jpg"),
                 "--mask", str(sample / "Annotations" / concept / f"{number}.png")]
    result = run_cli([*argv, *extra])
    assert result.rc == 0, result.err
    return Concept.from_json(out.read_text())


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


def segment_rows(sam, fingerprint: str, concepts: list[ConceptTensors], chunk: Chunk, batch_size: int = 1,
                 max_instances: int = 1, min_similarity: float | None = None,
                 cache_dtype: str | None = None) -> tuple[list[dict], ChunkResults]:
    """The model actor's device work and the finish stage's rows, in this process (CPU, fp32)."""
    results = segment_chunk(sam, chunk, concepts, EncoderSpeed(batch_size=batch_size), max_instances, min_similarity,
                            cache_dtype)
    return mask_rows(chunk, results, [(c.concept.name, c.concept.method) for c in concepts], fingerprint), results
