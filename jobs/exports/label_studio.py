"""Label Studio tasks JSON with brush pre-annotations, streamed, plus its labelling config.

One task per image with at least one row without error: `data.image` is the image's URI
as Label Studio should load it (where it is now: `--images`, e.g. an `s3://` URI of a
connected cloud storage, an `https://` URL, or `/data/local-files/?d=photos` for local
files; redacted, never with credentials), `data.persam_uri` the URI the masks were
computed from. `predictions` holds one prediction (model_version: the model fingerprint)
whose `result` has one `brushlabels` region per usable row: `value.rle` (brush RLE,
brush.py), `value.brushlabels` [concept], `original_width` / `original_height`, and the
row's score. Tasks of images whose concepts are all absent have an empty result, so
annotators see them too.

Beside the tasks file, `<name>.label_config.xml` is the project's labelling config: an
Image named `image` and a BrushLabels named `tag` with one Label per concept.
"""

from __future__ import annotations

import hashlib
import json
from html import escape
from typing import Callable

from persam_core.masks import decode_rle

from jobs.storage.redaction import redact
from jobs.exports.brush import mask_to_brush_rle
from jobs.exports.request import ExportRequest
from jobs.exports.images import build_locator
from jobs.exports.rows import usable
from jobs.exports.sink import atomic_file
from jobs.storage.schema import AREA, CONCEPT, ERROR, HEIGHT, INSTANCE, MASK_RLE, MODEL_FINGERPRINT, PRESENT, SCORE, WIDTH

FROM_NAME, TO_NAME = "tag", "image"  # the control and object tag names of the labelling config
COLUMNS = (WIDTH, HEIGHT, MASK_RLE, AREA, SCORE, INSTANCE, PRESENT, MODEL_FINGERPRINT)
Log = Callable[[str], None]


def labelling_config(concepts: list[str]) -> str:
    labels = "".join(f'\n    <Label value="{escape(name, quote=True)}"/>' for name in concepts)
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">{labels}\n  </BrushLabels>\n</View>\n')


def _region(row: dict) -> dict:
    key = f"{row['image_uri']}\n{row['concept']}\n{row.get('instance') or 0}"
    return {
        "id": hashlib.sha1(key.encode()).hexdigest()[:10],
        "type": "brushlabels", "from_name": FROM_NAME, "to_name": TO_NAME,
        "original_width": row[WIDTH], "original_height": row[HEIGHT], "image_rotation": 0,
        "value": {"format": "rle", "rle": mask_to_brush_rle(decode_rle(row[MASK_RLE])), "brushlabels": [row[CONCEPT]]},
        "score": float(row[SCORE]) if row[SCORE] is not None else None,
    }


def task(shown_uri: str, image: str, rows: list[dict]) -> dict:
    """One image's task: `image` is where Label Studio loads it from (redacted)."""
    regions = [_region(r) for r in rows if usable(r)]
    scores = [r["score"] for r in regions if r["score"] is not None]
    fingerprint = next((r[MODEL_FINGERPRINT] for r in rows if r.get(MODEL_FINGERPRINT)), None)
    return {
        "data": {"image": image, "persam_uri": shown_uri},
        "predictions": [{"model_version": f"persam {fingerprint or ''}".strip(), "result": regions,
                         "score": sum(scores) / len(scores) if scores else 0.0}],
    }


def export_label_studio(request: ExportRequest) -> str:
    dataset, output, images, _, storage_options, log = request.fields()
    concepts: set[str] = set()
    locator = build_locator(dataset, images, None, names=False, concepts=concepts)
    tasks = regions = 0
    with atomic_file(output, storage_options) as out:
        out.write(b"[")
        for uri, rows in dataset.images(COLUMNS):
            if all(r[ERROR] is not None for r in rows):
                continue
            entry = task(redact(uri), redact(locator.locate(uri)), rows)
            out.write(b",\n" * (tasks > 0) + json.dumps(entry).encode())
            tasks += 1
            regions += len(entry["predictions"][0]["result"])
        out.write(b"]\n")
    config = config_url(output)
    with atomic_file(config, storage_options) as out:
        out.write(labelling_config(sorted(concepts)).encode())
    return f"{tasks} tasks with {regions} brush regions -> {redact(output)} (labelling config: {redact(config)})"


def config_url(output: str) -> str:
    """`tasks.json` -> `tasks.label_config.xml`, beside it."""
    stem = output[: -len(".json")] if output.endswith(".json") else output
    return f"{stem}.label_config.xml"
