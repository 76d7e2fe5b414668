"""The images of an export: where they are now, their names for labelling tools, and
reading them with every missing or changed image reported in one line, never fatal.

Where (`--images NEW`): rows hold the URIs the images had when `persam segment` ran.
When the images moved, NEW is where the common folder of all the rows' image URIs is now:
an image is found at NEW + its path relative to that common folder.

Names (`--image-root ROOT`): COCO's `file_name` and the hf-dataset's `file_name` are paths
relative to ROOT, which is what CVAT matches uploaded images by and what pycocotools,
FiftyOne and `datasets` users join with their image folder. Default ROOT: `--images` when
given, else the common folder of the image URIs. An image outside an explicit ROOT keeps
its full (redacted) URI as name and is reported.

Reading: the bytes are checked against the row's `content_sha256` (the hash of the bytes
its masks were computed from). A missing, unreadable or undecodable image is skipped with
one line; a changed one is flagged (or skipped, as the export decides); an image whose
size changed is skipped, its masks no longer fit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from jobs.pipeline.cache import content_sha256
from jobs.storage.images import ImageDecodeError, decode_image
from jobs.storage.files import read_bytes
from jobs.storage.redaction import redact
from jobs.exports.rows import MaskDataset
from jobs.storage.schema import CONCEPT, CONTENT_SHA256, HEIGHT, IMAGE_URI, WIDTH

Log = Callable[[str], None]


def common_folder(uris: Iterable[str]) -> str:
    """The deepest folder holding every URI, part by part ('s3://b/a/x.jpg', 's3://b/c/y.jpg'
    -> 's3://b'; no normalisation, so a scheme's '//' stays); '' when they share none."""
    common: list[str] | None = None
    for uri in uris:
        parts = uri.split("/")[:-1]
        if common is None:
            common = parts
            continue
        shared = 0
        for mine, theirs in zip(common, parts):
            if mine != theirs:
                break
            shared += 1
        del common[shared:]
    return "/".join(common or [])


def relative_to(uri: str, folder: str) -> str | None:
    """uri's path under folder; None when it is not under it ('' folder: the whole uri)."""
    if not folder:
        return uri
    prefix = folder.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else None


@dataclass(frozen=True)
class ImageLocator:
    """Where each image is now (`--images`) and its name under the image root."""

    folder: str = ""  # common folder of the rows' image URIs ("" when nothing needs it)
    images: str | None = None  # --images
    root: str = ""  # names are relative to this

    def locate(self, uri: str) -> str:
        if not self.images:
            return uri
        inside = relative_to(uri, self.folder)
        return f"{self.images.rstrip('/')}/{inside if inside is not None else uri.rsplit('/', 1)[-1]}"

    def file_name(self, uri: str) -> tuple[str, bool]:
        """(name relative to the root, True) or (the full redacted URI, False) when outside it."""
        located = self.locate(uri)
        inside = relative_to(located, self.root)
        return (inside, True) if inside is not None else (redact(located), False)


def build_locator(dataset: MaskDataset, images: str | None, image_root: str | None, names: bool,
                  concepts: set[str] | None = None) -> ImageLocator:
    """One pass over the image_uri column when the common folder is needed (to relocate with
    --images, or to name images without an explicit --image-root), or when `concepts` is
    given to be filled with every concept name on the way."""
    folder = ""
    if images or (names and image_root is None) or concepts is not None:
        seen = concepts if concepts is not None else set()

        def uris() -> Iterable[str]:
            for rows in dataset.shards([IMAGE_URI]):
                for row in rows:
                    seen.add(row[CONCEPT])
                    yield row[IMAGE_URI]

        folder = common_folder(uris())
    root = (image_root or images or folder).rstrip("/")
    return ImageLocator(folder, images, root)


@dataclass
class Loaded:
    pixels: np.ndarray  # [H, W, 3] uint8, displayed orientation (as the masks)
    changed: bool  # bytes differ from those the masks were computed from


@dataclass
class ImageReader:
    """Reads an image for its rows; problems are logged one line each and counted."""

    locator: ImageLocator
    storage_options: dict | None
    log: Log
    skip_changed: bool = False  # subjects: a changed image's crops would be wrong training data
    problems: Counter = field(default_factory=Counter)

    def load(self, uri: str, rows: list[dict]) -> Loaded | None:
        url = self.locator.locate(uri)
        shown = redact(url)
        outcome = f"{len(rows)} masks not exported"
        try:
            data = read_bytes(url, self.storage_options)
        except FileNotFoundError:
            return self._problem("missing", f"{shown}: image not found; {outcome} (pass --images if the images moved)")
        except Exception as error:  # permission, network: the type only, a message may quote a signed URL
            return self._problem("unreadable", f"{shown}: cannot read the image ({type(error).__name__}); {outcome}")
        expected = next((r.get(CONTENT_SHA256) for r in rows if r.get(CONTENT_SHA256)), None)
        changed = expected is not None and content_sha256(data) != expected
        if changed and self.skip_changed:
            return self._problem("changed", f"{shown}: the image changed since its masks were computed "
                                            f"(content_sha256 differs); {outcome}")
        try:
            pixels = decode_image(data, shown)
        except ImageDecodeError as error:
            return self._problem("undecodable", f"{error}; {outcome}")
        sized = next((r for r in rows if r.get(WIDTH) is not None), None)
        if sized is not None and pixels.shape[:2] != (sized[HEIGHT], sized[WIDTH]):
            return self._problem("resized", f"{shown}: the image is now {pixels.shape[1]}x{pixels.shape[0]}, its masks "
                                            f"are {sized['width']}x{sized['height']} (changed since segment); {outcome}")
        if changed:
            self.problems["changed"] += 1
            self.log(f"changed: {shown}: the image changed since its masks were computed (content_sha256 differs); "
                     "exported and flagged")
        return Loaded(pixels, changed)

    def _problem(self, kind: str, line: str) -> None:
        self.problems[kind] += 1
        self.log(f"{kind}: {line}")
        return None

    def summary(self) -> str:
        """', 2 missing, 1 changed' or ''."""
        return "".join(f", {count} {kind}" for kind, count in sorted(self.problems.items()))
