"""`persam export KIND`: the mask Parquet of `persam segment` -> files other tools import.

A thin dispatcher: each kind is one module of jobs/exports (its docstring says what it
writes). Where the result goes is checked before the masks are read; the masks are read
shard by shard; problems with single images or files are one line each on the log.
"""

from __future__ import annotations

from typing import Callable

from jobs.exports import EXPORTS
from jobs.exports.request import ExportRequest
from jobs.exports.rows import ExportError, MaskDataset
from jobs.exports.table_rows import TableMaskDataset
from jobs.pipeline.output import mask_output
from jobs.storage.outputs import check_output_file, check_output_folder


def run_export(kind: str, masks_url: str | None, output: str, images: str | None = None,
               storage_options: dict | None = None, image_root: str | None = None,
               log: Callable[[str], None] = print, table: str | None = None, catalog: str | None = None) -> str:
    """-> the summary line. `images`: where the images are now (--images); `image_root`:
    what COCO / hf-dataset file names are relative to (--image-root); `table`/`catalog`: an
    Iceberg table output instead of the `masks_url` folder."""
    if kind not in EXPORTS:
        raise ExportError(f"unknown export {kind!r}: choose one of {', '.join(EXPORTS)}")
    exporter = EXPORTS[kind]
    if exporter.file_name:
        check_output_file(output, "--output", storage_options, exporter.file_name)
    else:
        check_output_folder(output, "--output", storage_options)
    if table is not None or catalog is not None:
        mask_output(masks_url, table, catalog)  # one of --masks / --table, --catalog only with --table
        dataset = TableMaskDataset(table, catalog, log)
    else:
        dataset = MaskDataset(masks_url, storage_options, log)
    return exporter.run(ExportRequest(dataset, output, images, image_root, storage_options, log))
