"""A Hugging Face `datasets` layout: Parquet files with `datasets` features + a dataset card.

    <output>/README.md                     dataset card: columns, how to load
    <output>/data/train-NNNNN.parquet      one file per shard of the masks

`load_dataset("parquet", data_files="<output>/data/*.parquet")` (or `load_dataset(<output>)`,
through the card's `configs`) gives one row per (image, concept, instance) of every row
without error. `mask` is a `datasets.Image` (PNG, 0/255 grayscale; None where the concept
is absent) that decodes to a PIL image; the features are stored in each file's
`huggingface` schema metadata, as `datasets` itself writes them, so no `datasets` is
needed to write them.
"""

from __future__ import annotations

import io
import json
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from persam_core.masks import decode_rle

from ..redaction import redact
from ..schema import MASK_SCHEMA
from .images import build_locator
from .rows import MaskDataset
from .sink import Folder

COLUMNS = ("image_uri", "file_name", "concept", "instance", "present", "score", "similarity", "width", "height",
           "bbox", "area", "mask", "mask_rle", "content_sha256")
MASK_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets.Image's storage
DESCRIPTIONS = {
    "image_uri": "where the image is (its URI when the masks were computed, or under --images)",
    "file_name": "the image's path relative to the image root named below",
    "concept": "the concept's name",
    "instance": "instance number within (image, concept), 0 first",
    "present": "whether the concept is present (similarity at or above the segment run's --min-similarity)",
    "score": "SAM's predicted IoU of the mask",
    "similarity": "presence score: maximum cosine similarity of the concept to the image's features",
    "width": "image width in pixels (displayed orientation, EXIF applied)",
    "height": "image height in pixels (displayed orientation)",
    "bbox": "COCO box [x, y, width, height] of the mask",
    "area": "mask pixels",
    "mask": "the mask as a PNG image (0 background, 255 object; None when absent)",
    "mask_rle": "the same mask as COCO compressed RLE {size: [h, w], counts} (pycocotools.mask.decode)",
    "content_sha256": "SHA-256 of the image bytes the mask was computed from",
}


def _value(dtype: str) -> dict:
    return {"dtype": dtype, "_type": "Value"}


def _sequence(dtype: str) -> dict:
    return {"feature": _value(dtype), "_type": "Sequence"}  # read by every datasets version


FEATURES = {
    "image_uri": _value("string"), "file_name": _value("string"), "concept": _value("string"),
    "instance": _value("int32"), "present": _value("bool"), "score": _value("float32"),
    "similarity": _value("float32"), "width": _value("int32"), "height": _value("int32"),
    "bbox": _sequence("int32"), "area": _value("int64"), "mask": {"_type": "Image"},
    "mask_rle": {"size": _sequence("int32"), "counts": _value("string")}, "content_sha256": _value("string"),
}
SCHEMA = pa.schema([MASK_SCHEMA.field(n) if n in MASK_SCHEMA.names else pa.field(n, MASK_TYPE if n == "mask" else pa.string())
                    for n in COLUMNS]).with_metadata({"huggingface": json.dumps({"info": {"features": FEATURES}})})


def mask_png(rle: dict | None) -> dict | None:
    """COCO RLE -> datasets.Image storage {bytes: PNG 0/255, path: None}."""
    if rle is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(decode_rle(rle).astype(np.uint8) * 255, "L").save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def dataset_card(root: str, files: int, rows: int) -> str:
    columns = "\n".join(f"| `{name}` | {DESCRIPTIONS[name]} |" for name in COLUMNS)
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*.parquet
task_categories:
- image-segmentation
tags:
- persam
- segment-anything
---
# persam masks

Masks found by `persam segment` (PerSAM / PerSAM-F, one-shot personalised Segment
Anything): {rows} rows in {files} Parquet files, one row per (image, concept, instance)
that was segmented without error. Image file names are relative to `{root or "(none)"}`.

| column | meaning |
|---|---|
{columns}

```python
from datasets import load_dataset

masks = load_dataset("parquet", data_files="data/*.parquet", split="train")  # paths relative to this folder
masks[0]["mask"]  # a PIL image, 255 on the object
```
"""


def export_hf_dataset(dataset: MaskDataset, output: str, images: str | None, image_root: str | None,
                      storage_options: dict | None, log: Callable[[str], None]) -> str:
    locator = build_locator(dataset, images, image_root, names=True)
    folder = Folder(output, storage_options)
    files = rows_written = 0
    for rows in dataset.shards():
        kept = [r for r in rows if r["error"] is None]
        if not kept:
            continue
        records = []
        for row in kept:
            located = locator.locate(row["image_uri"])
            records.append({**{c: row.get(c) for c in COLUMNS}, "image_uri": redact(located),
                            "file_name": locator.file_name(row["image_uri"])[0], "mask": None if row.get("present") is False else mask_png(row["mask_rle"])})
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), buffer, compression="zstd")
        folder.write(f"data/train-{files:05d}.parquet", buffer.getvalue())
        files, rows_written = files + 1, rows_written + len(records)
    folder.write("README.md", dataset_card(redact(locator.root), files, rows_written).encode())
    return f"{rows_written} rows in {files} Parquet files + README.md (dataset card) -> {redact(output)}"
