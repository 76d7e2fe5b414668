"""`persam export KIND`: the mask Parquet of `persam segment` -> files that labelling,
training and review tools import. Every kind streams: the masks are read one shard (one
part file, or the part files of one shard number across concept partitions) at a time,
so memory stays bounded whatever the dataset's size; every file is written to any fsspec
URL atomically (temp file + rename locally, one upload on object stores).

    request.py       what every kind is handed (one signature)
    rows.py          the masks dataset, shard by shard; foreign Parquet files skipped with a line
    sink.py          where an export writes: one streamed file, or files in a folder
    images.py        where the images are now (--images), their names under --image-root,
                     reading them with missing and changed images reported, not fatal
    names.py         file names derived from data that cannot leave their folder
    coco.py          COCO instances JSON (pycocotools, COCOeval, CVAT "COCO 1.0", FiftyOne)
    brush.py         Label Studio's brush RLE
    label_studio.py  Label Studio tasks with brush pre-annotations + a labelling config
    hf_dataset.py    a Hugging Face `datasets` Parquet layout with a dataset card
    drawing.py       mask overlays drawn with torchvision.utils
    gallery.py       the review gallery (thumbnails, full-size overlays, captions)
    subjects.py      masked subject crops (RGBA PNG + white-background JPEG)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportKind:
    """name: the CLI's word; help: what it writes; exporter: "module:function", imported on
    first use, `function(ExportRequest) -> summary line`; file_name: an example name when the
    kind writes one file (`--output` is a file), None when it writes a folder."""

    name: str
    help: str
    exporter: str
    file_name: str | None = None

    def run(self, request) -> str:
        module, function = self.exporter.split(":")
        return getattr(importlib.import_module(module), function)(request)


EXPORTS: dict[str, ExportKind] = {kind.name: kind for kind in (
    ExportKind("coco", "COCO instances JSON", "jobs.exports.coco:export_coco", "coco.json"),
    ExportKind("label-studio", "Label Studio tasks JSON with brush pre-annotations",
               "jobs.exports.label_studio:export_label_studio", "tasks.json"),
    ExportKind("hf-dataset", "`datasets` Parquet + card", "jobs.exports.hf_dataset:export_hf_dataset"),
    ExportKind("overlays", "review gallery", "jobs.exports.gallery:export_gallery"),
    ExportKind("subjects", "masked crops", "jobs.exports.subjects:export_subjects"),
)}
EXPORT_KINDS = tuple(EXPORTS)
