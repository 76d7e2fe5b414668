"""The mask Parquet schema: one row per (image, concept, instance).

`width`/`height` and masks are in displayed orientation (EXIF applied). `mask_rle` is
COCO compressed RLE (`pycocotools.mask.decode` reads it); `bbox` is COCO xywh; `point`
is the positive point (x, y). Error rows have `error` set, `area` 0 and nulls where
nothing could be measured. `content_sha256` (of the image bytes) lets a rerun keep the
rows of unchanged images.
"""

from __future__ import annotations

import pyarrow as pa

MASK_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),
        pa.field("method", pa.string()),
        pa.field("instance", pa.int32()),
        pa.field("present", pa.bool_()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("mask_rle", pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])),
        pa.field("bbox", pa.list_(pa.int32())),
        pa.field("area", pa.int64()),
        pa.field("score", pa.float32()),
        pa.field("similarity", pa.float32()),
        pa.field("point", pa.list_(pa.int32())),
        pa.field("error", pa.string()),
        pa.field("model_fingerprint", pa.string()),
        pa.field("content_sha256", pa.string()),
    ]
)

# `persam rank`: one row per image, sorted by similarity (highest first).
RANK_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("concept", pa.string(), nullable=False),
        pa.field("similarity", pa.float32()),
        pa.field("point", pa.list_(pa.int32())),
        pa.field("error", pa.string()),
        pa.field("model_fingerprint", pa.string()),
        pa.field("content_sha256", pa.string()),
    ]
)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with the schema's keys) -> a table of exactly MASK_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=MASK_SCHEMA)
