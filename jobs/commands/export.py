"""`persam export KIND`: the mask Parquet of `persam segment` -> files other tools import.

A thin dispatcher: each kind is one module of jobs/exports (its docstring says what it
writes). Where the result goes is checked before the masks are read; the masks are read
shard by shard; problems with single images or files are one line each on the log.
"""

from __future__ import annotations

from typing import Callable

from jobs.exports import EXPORT_KINDS
from jobs.exports.rows import ExportError, MaskDataset
from jobs.storage.outputs import check_output_file, check_output_folder

FILE_KINDS = {"coco": "coco.json", "label-studio": "tasks.json"}  # one file (example name); the others write a folder


def run_export(kind: str, masks_url: str, output: str, images: str | None = None, storage_options: dict | None = None,
               image_root: str | None = None, log: Callable[[str], None] = print) -> str:
    """-> the summary line. `images`: where the images are now (--images); `image_root`:
    what COCO / hf-dataset file names are relative to (--image-root)."""
    if kind not in EXPORT_KINDS:
        raise ExportError(f"unknown export {kind!r}: choose one of {', '.join(EXPORT_KINDS)}")
    if kind in FILE_KINDS:
        check_output_file(output, "--output", storage_options, FILE_KINDS[kind])
    else:
        check_output_folder(output, "--output", storage_options)
    dataset = MaskDataset(masks_url, storage_options, log)
    if kind == "coco":
        from jobs.exports.coco import export_coco

        return export_coco(dataset, output, images, image_root, storage_options, log)
    if kind == "label-studio":
        from jobs.exports.label_studio import export_label_studio

        return export_label_studio(dataset, output, images, storage_options, log)
    if kind == "hf-dataset":
        from jobs.exports.hf_dataset import export_hf_dataset

        return export_hf_dataset(dataset, output, images, image_root, storage_options, log)
    if kind == "overlays":
        from jobs.exports.gallery import export_gallery

        return export_gallery(dataset, output, images, storage_options, log)
    from jobs.exports.subjects import export_subjects

    return export_subjects(dataset, output, images, storage_options, log)
