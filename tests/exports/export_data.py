"""Small synthetic mask datasets for the export tests: images on disk, rows built with the
schema helpers, written as part files the way `persam segment` commits them (no model)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cli_tools import run_cli  # noqa: F401  (the export tests take it from here)
from jobs.pipeline.commit import shard_name, shard_of
from jobs.storage.schema import rows_to_table
from persam_core.masks import area_px, bbox_xywh, encode_rle


def ok(result: SimpleNamespace) -> str:
    assert result.rc == 0, result.err
    assert "Traceback" not in result.err
    return result.out


def save_image(path: Path, width: int, height: int, seed: int) -> bytes:
    """A random-textured RGB image (PNG, or JPEG by suffix) -> its bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.read_bytes()


def ellipse(width: int, height: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """[H, W] bool ellipse."""
    yy, xx = np.mgrid[:height, :width]
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def mask_row(uri: str, data: bytes, concept: str, mask: np.ndarray | None, similarity: float, **extra) -> dict:
    """One row as `persam segment` writes it; mask None: absent (present false, empty mask)."""
    height, width = mask.shape if mask is not None else (extra.pop("height"), extra.pop("width"))
    present = mask is not None
    shown = mask if present else np.zeros((height, width), dtype=bool)
    ys, xs = np.nonzero(shown)
    row = {"image_uri": uri, "concept": concept, "method": "persam", "instance": 0, "present": present,
           "width": width, "height": height, "mask_rle": encode_rle(shown), "bbox": bbox_xywh(shown),
           "area": area_px(shown), "score": 0.9 if present else None, "similarity": similarity,
           "point": [int(xs.mean()), int(ys.mean())] if present and xs.size else None, "error": None,
           "model_fingerprint": "tiny-0123456789ab", "content_sha256": hashlib.sha256(data).hexdigest()}
    return {**row, **extra}


def error_row(uri: str, concept: str) -> dict:
    return {"image_uri": uri, "concept": concept, "method": "persam", "instance": 0, "present": None, "width": None,
            "height": None, "mask_rle": None, "bbox": None, "area": 0, "score": None, "similarity": None,
            "point": None, "error": f"{uri}: not a decodable image (UnidentifiedImageError)",
            "model_fingerprint": "tiny-0123456789ab", "content_sha256": None}


def write_parts(folder: Path, rows: list[dict], num_shards: int = 2) -> list[Path]:
    """Rows -> part files by the commit protocol's URL hash (sorted as a shard is)."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: dict[int, list[dict]] = {}
    for row in rows:
        shards.setdefault(shard_of(row["image_uri"], num_shards), []).append(row)
    paths = []
    for shard, members in sorted(shards.items()):
        members.sort(key=lambda r: (r["image_uri"], r["concept"], r["instance"]))
        digest = hashlib.sha1("".join(r["image_uri"] for r in members).encode()).hexdigest()[:12]
        paths.append(folder / shard_name(shard, digest))
        pq.write_table(rows_to_table(members), paths[-1])
    return paths


def small_lake(root: Path) -> SimpleNamespace:
    """Four images in two subfolders (one undecodable), two concepts, a few absent:

        photos/garden/cat.png   (96x64)  cat 0.91, dog absent 0.21
        photos/garden/dog.png   (80x60)  cat 0.55, dog 0.88
        photos/house/both.jpg   (640x400: thumbnails shrink it) cat 0.73, dog 0.62
        photos/house/broken.jpg (not an image: error rows)
    """
    photos = root / "photos"
    rows, masks, data = [], {}, {}
    specs = [("garden/cat.png", 96, 64, {"cat": 0.91, "dog": 0.21}), ("garden/dog.png", 80, 60, {"cat": 0.55, "dog": 0.88}),
             ("house/both.jpg", 640, 400, {"cat": 0.73, "dog": 0.62})]
    for seed, (name, width, height, concepts) in enumerate(specs):
        path = photos / name
        data[name] = save_image(path, width, height, seed)
        for index, (concept, similarity) in enumerate(sorted(concepts.items())):
            present = similarity > 0.5
            mask = ellipse(width, height, width * (0.3 + 0.4 * index), height / 2, width / 5, height / 4) if present else None
            masks[(name, concept)] = mask
            rows.append(mask_row(str(path), data[name], concept, mask, similarity, width=width, height=height))
    broken = photos / "house" / "broken.jpg"
    broken.write_bytes(b"<html>not an image</html>")
    rows += [error_row(str(broken), concept) for concept in ("cat", "dog")]
    write_parts(root / "masks", rows)
    return SimpleNamespace(root=root, photos=photos, masks=root / "masks", rows=rows, mask_of=masks, data=data)
