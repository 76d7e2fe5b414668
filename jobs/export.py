"""`persam export`: mask Parquet -> COCO instances JSON, overlay gallery, subject crops."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from PIL import Image

from persam_core.masks import decode_rle

from jobs.pipeline.output_files import output_tables
from jobs.storage.images import decode_image
from jobs.storage.files import read_bytes
from jobs.storage.files import write_atomically
from jobs.storage.outputs import check_output_file, check_output_folder
from jobs.overlays import render_overlay, safe_file_name

REQUIRED_COLUMNS = ("image_uri", "concept", "width", "height", "mask_rle", "bbox", "area", "score", "error")


class ExportError(ValueError):
    """A masks dataset that cannot be exported; the message says what to do."""


def read_mask_rows(masks_url: str, storage_options: dict | None = None) -> list[dict]:
    try:
        fs, root = url_to_fs(masks_url, **(storage_options or {}))
        # a segment output (any layout) through its reader; any other Parquet folder as it is
        tables = list(output_tables(masks_url, storage_options)) if fs.isdir(root) else []
        paths = [] if tables else sorted(fs.glob(f"{root.rstrip('/')}/**/*.parquet")) if fs.isdir(root) else [root]
        tables += [pq.read_table(p, filesystem=fs) for p in paths]
    except (OSError, ValueError) as error:
        raise ExportError(f"{masks_url}: cannot read the masks Parquet ({type(error).__name__}); pass the --output of `persam segment`") from None
    if not tables:
        raise ExportError(f"{masks_url}: no Parquet files found; pass the --output of `persam segment`")
    missing = [c for c in REQUIRED_COLUMNS if c not in tables[0].column_names]
    if missing:
        raise ExportError(f"{masks_url}: Parquet lacks the columns {missing}; pass the --output of `persam segment`")
    return [row for table in tables for row in table.to_pylist()]


def _usable(row: dict) -> bool:
    return row["error"] is None and row["mask_rle"] is not None and row.get("present", True) is not False and row["area"] > 0


def coco_document(rows: list[dict]) -> dict:
    """COCO instances: images, categories = concepts, annotations with RLE segmentation."""
    image_ids: dict[str, int] = {}
    images, annotations = [], []
    categories = {name: i + 1 for i, name in enumerate(sorted({r["concept"] for r in rows}))}
    for row in rows:
        if row["image_uri"] not in image_ids and row["width"] is not None:
            image_ids[row["image_uri"]] = len(image_ids) + 1
            images.append({"id": image_ids[row["image_uri"]], "file_name": row["image_uri"],
                           "width": row["width"], "height": row["height"]})
    for row in rows:
        if _usable(row):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_ids[row["image_uri"]],
                "category_id": categories[row["concept"]], "segmentation": dict(row["mask_rle"]),
                "bbox": [float(v) for v in row["bbox"]], "area": float(row["area"]), "iscrowd": 0,
                "score": float(row["score"]) if row["score"] is not None else 0.0,
                "instance": int(row.get("instance") or 0),
            })
    return {
        "info": {"description": "persam segment masks"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": "concept"} for n, i in categories.items()],
    }


def _image_locator(rows: list[dict], images_root: str | None):
    if not images_root:
        return lambda uri: uri
    prefix = os.path.commonpath([os.path.dirname(r["image_uri"]) for r in rows])
    return lambda uri: f"{images_root.rstrip('/')}/{os.path.relpath(uri, prefix)}"


def export_overlays(rows: list[dict], output: Path, locate, storage_options: dict | None) -> list[Path]:
    written = []
    for row in filter(_usable, rows):
        image = decode_image(read_bytes(locate(row["image_uri"]), storage_options), row["image_uri"])
        caption = f"{row['concept']} #{row.get('instance') or 0} score {row['score']:.2f} sim {row['similarity']:.2f}"
        path = output / f"{safe_file_name(row['image_uri'], row['concept'], str(row.get('instance') or 0))}.png"
        render_overlay(image, decode_rle(row["mask_rle"]), tuple(row["point"]) if row["point"] else None, caption).save(
            path, compress_level=1)
        written.append(path)
    cards = "\n".join(f'<figure><img src="{html.escape(p.name)}" loading="lazy"><figcaption>{html.escape(p.stem)}</figcaption></figure>' for p in written)
    (output / "index.html").write_text(
        "<!doctype html><meta charset=utf-8><title>persam overlays</title>"
        "<style>body{font-family:sans-serif}figure{display:inline-block;margin:6px}img{max-width:320px}</style>\n" + cards
    )
    return written


def export_subjects(rows: list[dict], output: Path, locate, storage_options: dict | None) -> list[Path]:
    """RGBA crops with transparent background + white-background JPEGs, per concept folder."""
    written = []
    for row in filter(_usable, rows):
        image = decode_image(read_bytes(locate(row["image_uri"]), storage_options), row["image_uri"])
        mask = decode_rle(row["mask_rle"])
        x, y, w, h = row["bbox"]
        crop, crop_mask = image[y : y + h, x : x + w], mask[y : y + h, x : x + w]
        folder = output / safe_file_name(row["concept"])
        folder.mkdir(parents=True, exist_ok=True)
        stem = safe_file_name(row["image_uri"], row["concept"], str(row.get("instance") or 0))
        rgba = np.dstack([crop, crop_mask.astype(np.uint8) * 255])
        Image.fromarray(rgba, "RGBA").save(folder / f"{stem}.png", compress_level=1)
        white = np.where(crop_mask[..., None], crop, 255).astype(np.uint8)
        Image.fromarray(white).save(folder / f"{stem}.jpg", quality=95)
        written += [folder / f"{stem}.png", folder / f"{stem}.jpg"]
    return written


def run_export(kind: str, masks_url: str, output: str, images_root: str | None = None, storage_options: dict | None = None) -> str:
    if kind == "coco":  # where the result goes is checked before the masks are read
        check_output_file(output, "--output", storage_options, "coco.json")
    elif kind in ("overlays", "subjects"):
        check_output_folder(output, "--output", storage_options)
    rows = read_mask_rows(masks_url, storage_options)
    if kind == "coco":
        document = coco_document(rows)
        write_atomically(output, json.dumps(document).encode("utf-8"), storage_options)
        return f"{len(document['annotations'])} annotations on {len(document['images'])} images -> {output}"
    target = Path(output)
    target.mkdir(parents=True, exist_ok=True)
    locate = _image_locator(rows, images_root)
    if kind == "overlays":
        written = export_overlays(rows, target, locate, storage_options)
        return f"{len(written)} overlays + index.html -> {target}"
    if kind == "subjects":
        written = export_subjects(rows, target, locate, storage_options)
        return f"{len(written)} subject files -> {target}"
    raise ExportError(f"unknown export {kind!r}: choose coco, overlays or subjects")
