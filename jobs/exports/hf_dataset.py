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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from persam_core.masks import decode_rle

from jobs.storage.redaction import redact
from jobs.storage.schema import MASK_SCHEMA
from jobs.exports.request import ExportRequest
from jobs.exports.images import build_locator
from jobs.exports.sink import Folder
from jobs.storage.schema import AREA, BBOX, CONCEPT, CONTENT_SHA256, ERROR, HEIGHT, IMAGE_URI, INSTANCE, MASK_RLE, PRESENT, SCORE, SIMILARITY, WIDTH

COLUMNS = (IMAGE_URI, "file_name", CONCEPT, INSTANCE, PRESENT, SCORE, SIMILARITY, WIDTH, HEIGHT,
           BBOX, AREA, "mask", MASK_RLE, CONTENT_SHA256)
MASK_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])  # datasets.Image's storage
DESCRIPTIONS = {
    IMAGE_URI: "where the image is (its URI when the masks were computed, or under --images)",
    "file_name": "the image's path relative to the image root named below",
    CONCEPT: "the concept's name",
    INSTANCE: "instance number within (image, concept), 0 first",
    PRESENT: "whether the concept is present (similarity at or above the segment run's --min-similarity)",
    SCORE: "SAM's predicted IoU of the mask",
    SIMILARITY: "presence score: maximum cosine similarity of the concept to the image's features",
    WIDTH: "image width in pixels (displayed orientation, EXIF applied)",
    HEIGHT: "image height in pixels (displayed orientation)",
    BBOX: "COCO box [x, y, width, height] of the mask",
    AREA: "mask pixels",
    "mask": "the mask as a PNG image (0 background, 255 object; None when absent)",
    MASK_RLE: "the same mask as COCO compressed RLE {size: [h, w], counts} (pycocotools.mask.decode)",
    CONTENT_SHA256: "SHA-256 of the image bytes the mask was computed from",
}


def _value(dtype: str) -> dict:
    return {"dtype": dtype, "_type": "Value"}


def _sequence(dtype: str) -> dict:
    return {"feature": _value(dtype), "_type": "Sequence"}  # read by every datasets version


FEATURES = {
    IMAGE_URI: _value("string"), "file_name": _value("string"), CONCEPT: _value("string"),
    INSTANCE: _value("int32"), PRESENT: _value("bool"), SCORE: _value("float32"),
    SIMILARITY: _value("float32"), WIDTH: _value("int32"), HEIGHT: _value("int32"),
    BBOX: _sequence("int32"), AREA: _value("int64"), "mask": {"_type": "Image"},
    MASK_RLE: {"size": _sequence("int32"), "counts": _value("string")}, CONTENT_SHA256: _value("string"),
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


def export_hf_dataset(request: ExportRequest) -> str:
    dataset, output, images, image_root, storage_options, log = request.fields()
    locator = build_locator(dataset, images, image_root, names=True)
    folder = Folder(output, storage_options)
    files = rows_written = 0
    for rows in dataset.shards():
        kept = [r for r in rows if r[ERROR] is None]
        if not kept:
            continue
        records = []
        for row in kept:
            located = locator.locate(row[IMAGE_URI])
            records.append({**{c: row.get(c) for c in COLUMNS}, IMAGE_URI: redact(located),
                            "file_name": locator.file_name(row[IMAGE_URI])[0], "mask": None if row.get(PRESENT) is False else mask_png(row[MASK_RLE])})
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), buffer, compression="zstd")
        folder.write(f"data/train-{files:05d}.parquet", buffer.getvalue())
        files, rows_written = files + 1, rows_written + len(records)
    folder.write("README.md", dataset_card(redact(locator.root), files, rows_written).encode())
    return f"{rows_written} rows in {files} Parquet files + README.md (dataset card) -> {redact(output)}"
