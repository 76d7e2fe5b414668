"""The review gallery (`persam export overlays`): thumbnails to scan, full-size overlays on click.

    <output>/index.html          cards sorted by similarity (highest first), absent ones last
    <output>/thumbs/<name>.jpg   overlay at most 512 px on its longest side
    <output>/full/<name>.jpg     full-size overlay (JPEG: a tenth of a PNG's size)

Each card's caption: concept, instance, image name (its full redacted URI on hover),
score, similarity, and "image changed" when the image's bytes are no longer those its
masks were computed from. Every row without error gets a card: an absent concept shows
the image alone. Missing or unreadable images are skipped with one line each (also listed
on the page) and `index.html` is always written. Every text from data is HTML-escaped and
file names come from names.safe_file_name, so no image or concept name can inject markup
or write outside the folder. The page keeps one small record per card until it is written.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from persam_core.masks import decode_rle

from jobs.storage.redaction import redact
from jobs.exports.drawing import draw_overlay, jpeg, thumbnail_inputs
from jobs.exports.request import ExportRequest
from jobs.exports.images import ImageReader, build_locator
from jobs.exports.names import safe_file_name
from jobs.exports.sink import Folder
from jobs.storage.schema import AREA, CONCEPT, CONTENT_SHA256, ERROR, HEIGHT, INSTANCE, MASK_RLE, POINT, PRESENT, SCORE, SIMILARITY, WIDTH

COLUMNS = (WIDTH, HEIGHT, MASK_RLE, AREA, SCORE, SIMILARITY, POINT, INSTANCE, PRESENT, CONTENT_SHA256)
MAX_LISTED_PROBLEMS = 1000
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:16px;background:#f6f6f6;color:#222}"
    "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:12px}"
    "figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:6px;overflow:hidden}"
    "figure img{width:100%;height:auto;display:block}"
    "figcaption{padding:6px 10px;font-size:15px;line-height:1.45;overflow-wrap:anywhere}"
    ".absent{opacity:.65}.changed{color:#b00020;font-weight:600}"
)


@dataclass(frozen=True)
class Card:
    name: str  # file stem under thumbs/ and full/
    concept: str
    instance: int
    image: str  # redacted URI
    label: str  # the image's path under the common folder of the images
    score: float | None
    similarity: float | None
    absent: bool
    empty: bool
    changed: bool

    def sort_key(self) -> tuple:
        similarity = self.similarity if self.similarity is not None else float("-inf")
        return (self.absent, -similarity, self.image, self.concept, self.instance)

    def html(self) -> str:
        e = html.escape
        figures = " · ".join(f"{label} {value:.3f}" for label, value in ((SCORE, self.score), (SIMILARITY, self.similarity))
                             if value is not None)
        notes = ["absent"] * self.absent + ["empty mask"] * (self.empty and not self.absent)
        flag = ' <span class="changed">image changed</span>' if self.changed else ""
        short = self.label
        return (f'<figure class="{"absent" if self.absent else "present"}"><a href="full/{e(self.name)}.jpg">'
                f'<img src="thumbs/{e(self.name)}.jpg" loading="lazy" alt="{e(self.concept)} in {e(short)}"></a>'
                f'<figcaption><b>{e(self.concept)}</b> #{self.instance} · <span title="{e(self.image)}">{e(short)}</span>'
                f'<br>{e(figures)}{" · " * bool(figures and notes)}{e(", ".join(notes))}{flag}</figcaption></figure>')


def index_html(cards: list[Card], problems: list[str], summary: str) -> str:
    listed = "".join(f"<li>{html.escape(line)}</li>" for line in problems[:MAX_LISTED_PROBLEMS])
    more = f"<li>… and {len(problems) - MAX_LISTED_PROBLEMS} more</li>" if len(problems) > MAX_LISTED_PROBLEMS else ""
    details = f"<details><summary>{len(problems)} problems</summary><ul>{listed}{more}</ul></details>" if problems else ""
    body = "\n".join(card.html() for card in sorted(cards, key=Card.sort_key))
    return (f'<!doctype html>\n<html lang="en"><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>persam review</title><style>{STYLE}</style>\n<h1>persam review</h1><p>{html.escape(summary)}</p>"
            f"{details}\n<main>\n{body}\n</main></html>\n")


def export_gallery(request: ExportRequest) -> str:
    dataset, output, images, _, storage_options, log = request.fields()
    problems: list[str] = []

    def note(line: str) -> None:
        problems.append(line)
        log(line)

    locator = build_locator(dataset, images, None, names=True)
    reader = ImageReader(locator, storage_options, note)
    folder, cards = Folder(output, storage_options), []
    for uri, rows in dataset.images(COLUMNS):
        rows = [r for r in rows if r[ERROR] is None]
        loaded = reader.load(uri, rows) if rows else None
        if loaded is None:
            continue
        for row in rows:
            absent = row.get(PRESENT) is False or row[MASK_RLE] is None
            mask = None if absent else decode_rle(row[MASK_RLE])
            point = tuple(row[POINT]) if row.get(POINT) and not absent else None
            name = safe_file_name(uri, row[CONCEPT], str(row.get(INSTANCE) or 0))
            folder.write(f"full/{name}.jpg", jpeg(draw_overlay(loaded.pixels, mask, point), quality=90))
            folder.write(f"thumbs/{name}.jpg", jpeg(draw_overlay(*thumbnail_inputs(loaded.pixels, mask, point)), quality=85))
            cards.append(Card(name, row[CONCEPT], int(row.get(INSTANCE) or 0), redact(locator.locate(uri)),
                              locator.file_name(uri)[0],
                              row[SCORE], row.get(SIMILARITY), absent, not absent and not row[AREA], loaded.changed))
    summary = f"{len(cards)} overlays{reader.summary()}"
    folder.write("index.html", index_html(cards, problems, summary).encode("utf-8"))
    return f"{summary} + index.html -> {redact(output)}"
