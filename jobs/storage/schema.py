"""The output tables: column names, row builders and readers. The one module that spells a column.

Mask Parquet (`persam segment`): one row per (image, concept, instance). `width`/`height`
and masks are in displayed orientation (EXIF applied). `mask_rle` is COCO compressed RLE
(`pycocotools.mask.decode` reads it); `bbox` is COCO xywh; `point` is the positive point
(x, y). Error rows have `error` set, `area` 0 and nulls where nothing could be measured.
`content_sha256` (of the image bytes) lets a rerun keep the rows of unchanged images.

Scores (`persam rank`'s first pass): one row per (image, concept); the ranking file adds
`rank` and the mask columns of the top k.

Partitioned outputs (Hive style): a part file under a `concept=<name>/` folder holds one
concept's rows without the `concept` column (the folder names it, as Spark, DuckDB and
pyarrow expect: a column both in the files and in the path conflicts in pyarrow);
`read_parts` puts the column back from the path, so every reader sees MASK_SCHEMA's columns.

Other modules name columns through the constants below (`row[IMAGE_URI]`), build rows
with `mask_row` / `score_row` and read part files with `read_parts`; a test checks that
no column name is spelled as a literal anywhere else.
"""

from __future__ import annotations

import importlib
import posixpath
from typing import Any, Sequence
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

IMAGE_URI, CONCEPT, METHOD, INSTANCE, PRESENT = "image_uri", "concept", "method", "instance", "present"
WIDTH, HEIGHT, MASK_RLE, BBOX, AREA = "width", "height", "mask_rle", "bbox", "area"
SCORE, SIMILARITY, POINT, ERROR = "score", "similarity", "point", "error"
MODEL_FINGERPRINT, CONTENT_SHA256, RANK = "model_fingerprint", "content_sha256", "rank"

_RLE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
MASK_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_URI, pa.string(), nullable=False),
        pa.field(CONCEPT, pa.string(), nullable=False),
        pa.field(METHOD, pa.string()),
        pa.field(INSTANCE, pa.int32()),
        pa.field(PRESENT, pa.bool_()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(MASK_RLE, _RLE),
        pa.field(BBOX, pa.list_(pa.int32())),
        pa.field(AREA, pa.int64()),
        pa.field(SCORE, pa.float32()),
        pa.field(SIMILARITY, pa.float32()),
        pa.field(POINT, pa.list_(pa.int32())),
        pa.field(ERROR, pa.string()),
        pa.field(MODEL_FINGERPRINT, pa.string()),
        pa.field(CONTENT_SHA256, pa.string()),
    ]
)

# `persam rank`: one row per image, sorted by similarity (highest first).
RANK_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_URI, pa.string(), nullable=False),
        pa.field(CONCEPT, pa.string(), nullable=False),
        pa.field(SIMILARITY, pa.float32()),
        pa.field(POINT, pa.list_(pa.int32())),
        pa.field(ERROR, pa.string()),
        pa.field(MODEL_FINGERPRINT, pa.string()),
        pa.field(CONTENT_SHA256, pa.string()),
    ]
)
# The mask columns a ranking carries for its top k.
RANKING_MASK_COLUMNS = (WIDTH, HEIGHT, MASK_RLE, BBOX, AREA, SCORE)
RANKING_SCHEMA = pa.schema([*RANK_SCHEMA, pa.field(RANK, pa.int64()), *(MASK_SCHEMA.field(n) for n in RANKING_MASK_COLUMNS)])


def mask_row(
    image_uri: str, concept: str, method: str, fingerprint: str, content_sha256: str | None, *,
    size: tuple[int, int] | None = None, instance: int = 0, present: bool = False, mask_rle: dict | None = None,
    bbox: list[int] | None = None, area: int = 0, score: float | None = None, similarity: float | None = None,
    point: list[int] | None = None, error: str | None = None,
) -> dict[str, Any]:
    """One mask row. size: (height, width) as displayed, None when unknown (error rows)."""
    return {
        IMAGE_URI: image_uri, CONCEPT: concept, METHOD: method, INSTANCE: instance, PRESENT: present,
        WIDTH: None if size is None else size[1], HEIGHT: None if size is None else size[0],
        MASK_RLE: mask_rle, BBOX: bbox, AREA: area, SCORE: score, SIMILARITY: similarity, POINT: point,
        ERROR: error, MODEL_FINGERPRINT: fingerprint, CONTENT_SHA256: content_sha256,
    }


def score_row(image_uri: str, concept: str, fingerprint: str, content_sha256: str | None,
              similarity: float | None, point: list[int] | None, error: str | None) -> dict[str, Any]:
    return {IMAGE_URI: image_uri, CONCEPT: concept, SIMILARITY: similarity, POINT: point, ERROR: error,
            MODEL_FINGERPRINT: fingerprint, CONTENT_SHA256: content_sha256}


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Mask rows -> a table of exactly MASK_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=MASK_SCHEMA)


def rank_rows_to_table(rows: list[dict]) -> pa.Table:
    """Score rows -> a table of exactly RANK_SCHEMA."""
    return pa.Table.from_pylist(rows, schema=RANK_SCHEMA)


def ranking_table(scores: pa.Table, masks: pa.Table | None) -> pa.Table:
    """Score rows sorted by similarity (nulls last, then URL), numbered from 1, joined with
    the mask columns of instance 0 of the images in `masks` (rank's top k)."""
    rows = sorted(scores.to_pylist(), key=lambda r: (r[SIMILARITY] is None, -(r[SIMILARITY] or 0.0), r[IMAGE_URI]))
    by_url = {m[IMAGE_URI]: m for m in (masks.to_pylist() if masks is not None else []) if m[INSTANCE] == 0}
    out = [{**row, RANK: rank, **{c: by_url.get(row[IMAGE_URI], {}).get(c) for c in RANKING_MASK_COLUMNS}}
           for rank, row in enumerate(rows, start=1)]
    return pa.Table.from_pylist(out, schema=RANKING_SCHEMA)


PARTITION_PREFIX = f"{CONCEPT}="  # the folder of one concept's part files: concept=<name>


def partition_folder(concept: str) -> str:
    """The folder name of `concept`'s partition (the name is validated by the committer)."""
    return f"{PARTITION_PREFIX}{concept}"


def partition_concept(path: str) -> str | None:
    """The concept a part file's folder names (`.../concept=<name>/part-...`); None outside a
    partition. Unquoted as Hive writers escape names (ours are validated and never need it)."""
    folder = posixpath.basename(posixpath.dirname(path.replace("\\", "/").rstrip("/")))
    return unquote(folder[len(PARTITION_PREFIX):]) if folder.startswith(PARTITION_PREFIX) else None


def partition_rows(table: pa.Table) -> pa.Table:
    """A partition's rows as written: the concept column dropped (its folder names it)."""
    return table.drop_columns([CONCEPT]) if CONCEPT in table.column_names else table


def rows_of_concepts(table: pa.Table, concepts: Sequence[str]) -> pa.Table:
    """The rows of `table` whose concept is one of `concepts`."""
    wanted = set(concepts)
    return table.filter(pa.array([c in wanted for c in table.column(CONCEPT).to_pylist()], pa.bool_()))


def is_our_schema(schema: pa.Schema, partitioned: bool = False) -> bool:
    """A part file's schema is ours: its columns are MASK_SCHEMA's (an earlier version's may be
    fewer: columns are only ever added, CHANGELOG.md), same types; a partition's files
    (`partitioned`) lack the concept column."""
    ours = {f.name: f.type for f in MASK_SCHEMA}
    required = {IMAGE_URI} if partitioned else {IMAGE_URI, CONCEPT}
    return required <= set(schema.names) and all(f.name in ours and f.type == ours[f.name] for f in schema)


def read_parts(paths: Sequence[str], storage_options: dict | None = None,
               columns: Sequence[str] | None = None) -> pa.Table | None:
    """The rows of published part files (those of `columns` the files have: ranged reads of
    just those columns on object stores); unreadable files and files of another schema
    (foreign, never read as ours) are skipped (their images are recomputed) -> None when
    nothing could be read."""
    tables = [table for table in map(lambda p: read_part(p, storage_options, columns), paths) if table is not None]
    return pa.concat_tables(tables, promote_options="default") if tables else None


# Refs that name a shard's rows in a table rather than a file: "scheme": "module:function",
# imported on first use (as jobs/exports names its exporters), `function(ref, columns)`
# reading the rows as read_part does. The table's module reads rows with this module's
# schema, so it is named here, not imported.
REF_READERS = {"iceberg://": "jobs.storage.iceberg_table:read_ref"}


def read_part(path: str, storage_options: dict | None = None, columns: Sequence[str] | None = None) -> pa.Table | None:
    """One part file's rows (see read_parts), the concept column restored from a partition's
    folder name; None when it is unreadable or not ours. A table's shard ref (iceberg_table.py)
    is read from its table."""
    for scheme, reader in REF_READERS.items():
        if path.startswith(scheme):
            module, function = reader.split(":")
            return getattr(importlib.import_module(module), function)(path, columns)
    concept = partition_concept(path)
    fs, root = url_to_fs(path, **(storage_options or {}))
    try:
        with fs.open(root, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            if not is_our_schema(parquet.schema_arrow, partitioned=concept is not None):
                return None
            table = parquet.read(columns=None if columns is None else [c for c in columns if c in names])
    except Exception:
        return None
    if concept is not None and CONCEPT not in table.column_names and (columns is None or CONCEPT in columns):
        position = min(1, table.num_columns) if columns is None else list(columns).index(CONCEPT)
        table = table.add_column(min(position, table.num_columns), MASK_SCHEMA.field(CONCEPT),
                                 pa.array([concept] * table.num_rows, pa.string()))
    return table


def image_uris(table: pa.Table | None) -> list[str]:
    return [] if table is None else table.column(IMAGE_URI).to_pylist()


def images_in(paths: Sequence[str], storage_options: dict | None = None) -> set[str]:
    """The image URLs that part files hold rows for (the URL column only)."""
    return set(image_uris(read_parts(paths, storage_options, [IMAGE_URI])))


def good_images(paths: Sequence[str], storage_options: dict | None = None,
                concepts: Sequence[str] | None = None) -> set[tuple[str, str]]:
    """(url, content_sha256) of the rows without error in part files (four columns read);
    with `concepts`, only images that have such a row for every one of them."""
    table = read_parts(paths, storage_options, [IMAGE_URI, CONTENT_SHA256, ERROR, CONCEPT])
    if table is None or CONTENT_SHA256 not in table.column_names:
        return set()
    rows = zip(*(table.column(c).to_pylist() for c in (IMAGE_URI, CONTENT_SHA256, ERROR, CONCEPT)))
    good: dict[tuple[str, str], set[str]] = {}
    for url, sha, error, concept in rows:
        if sha and error is None:
            good.setdefault((url, sha), set()).add(concept)
    return {image for image, found in good.items() if concepts is None or set(concepts) <= found}


def error_count(table: pa.Table) -> int:
    return table.num_rows - table.column(ERROR).null_count


def ordered_rows(table: pa.Table, urls: Sequence[str], concepts: Sequence[str]) -> pa.Table:
    """Rows in the shard's order: URL order of `urls`, then concept order, then instance."""
    url_order = {u: i for i, u in enumerate(urls)}
    concept_order = {c: i for i, c in enumerate(concepts)}
    keys = list(zip((url_order[u] for u in table.column(IMAGE_URI).to_pylist()),
                    (concept_order.get(c, len(concepts)) for c in table.column(CONCEPT).to_pylist()),
                    (i or 0 for i in table.column(INSTANCE).to_pylist())))
    return table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), pa.int64()))


def select_rows_of(table: pa.Table, urls: set[str]) -> pa.Table:
    """The rows of `table` whose image is in `urls`, cast to MASK_SCHEMA."""
    keep = table.filter(pa.array([u in urls for u in image_uris(table)], pa.bool_()))
    return keep.select(MASK_SCHEMA.names).cast(MASK_SCHEMA)
