"""COCO instances JSON, streamed: what pycocotools (COCO, COCOeval), CVAT's "COCO 1.0"
import and FiftyOne's COCODetectionDataset importer read.

`images`: {id, file_name (relative to the image root, see images.py), width, height}, one
per image with a measured size. `categories`: one per concept, ids by sorted name,
supercategory "concept". `annotations`: one per usable row (rows.usable), {id, image_id,
category_id, segmentation (COCO compressed RLE), bbox (xywh), area, iscrowd, score,
instance}. `iscrowd` is 0 although the segmentation is RLE: COCOeval ignores crowd
regions, while pycocotools, CVAT and FiftyOne read an RLE segmentation whatever iscrowd
says. `info.image_root` records the (redacted) root the file names are relative to.

Streaming: a first pass reads only the image_uri and concept columns (categories, the
common folder of the images); the second writes each shard's images into the output as
they come and spools its annotations to a temporary file, appended at the end.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from typing import Callable

from jobs.storage.redaction import redact
from jobs.exports.request import ExportRequest
from jobs.exports.images import build_locator
from jobs.exports.rows import usable
from jobs.exports.sink import atomic_file
from jobs.storage.schema import AREA, BBOX, CONCEPT, HEIGHT, IMAGE_URI, INSTANCE, MASK_RLE, PRESENT, SCORE, WIDTH

COLUMNS = (WIDTH, HEIGHT, MASK_RLE, BBOX, AREA, SCORE, INSTANCE, PRESENT)
Log = Callable[[str], None]


def _annotation(row: dict, annotation_id: int, image_id: int, category_id: int) -> dict:
    return {
        "id": annotation_id, "image_id": image_id, "category_id": category_id,
        "segmentation": {"size": list(row[MASK_RLE]["size"]), "counts": row[MASK_RLE]["counts"]},
        BBOX: [float(v) for v in row[BBOX]], AREA: float(row[AREA]), "iscrowd": 0,
        SCORE: float(row[SCORE]) if row[SCORE] is not None else 0.0,
        INSTANCE: int(row.get(INSTANCE) or 0),
    }


def export_coco(request: ExportRequest) -> str:
    dataset, output, images, image_root, storage_options, log = request.fields()
    concepts: set[str] = set()
    locator = build_locator(dataset, images, image_root, names=True, concepts=concepts)
    categories = {name: i + 1 for i, name in enumerate(sorted(concepts))}
    head = {
        "info": {"description": "persam segment masks", "image_root": redact(locator.root)},
        "licenses": [],
        "categories": [{"id": i, "name": n, "supercategory": CONCEPT} for n, i in categories.items()],
    }
    counts = {"images": 0, "annotations": 0}
    with atomic_file(output, storage_options) as out, tempfile.TemporaryFile() as spool:
        out.write(json.dumps(head)[:-1].encode() + b', "images": [')
        for rows in dataset.shards(COLUMNS):
            ids: dict[str, int] = {}
            for row in rows:
                uri = row[IMAGE_URI]
                if uri not in ids and row[WIDTH] is not None:
                    ids[uri] = counts["images"] = counts["images"] + 1
                    name, inside = locator.file_name(uri)
                    if not inside:
                        log(f"outside --image-root: {name}: file_name is its full URI")
                    image = {"id": ids[uri], "file_name": name, WIDTH: row[WIDTH], HEIGHT: row[HEIGHT]}
                    out.write(b"," * (counts["images"] > 1) + json.dumps(image).encode())
                if usable(row) and uri in ids:
                    counts["annotations"] += 1
                    annotation = _annotation(row, counts["annotations"], ids[uri], categories[row[CONCEPT]])
                    spool.write(b"," * (counts["annotations"] > 1) + json.dumps(annotation).encode())
        out.write(b'], "annotations": [')
        spool.seek(0)
        shutil.copyfileobj(spool, out)
        out.write(b"]}")
    return (f"{counts['annotations']} annotations on {counts['images']} images, file names relative to "
            f"{redact(locator.root) or '(none)'} -> {redact(output)}")
