"""A PerSeg-layout sample made from photos scikit-image ships inside its wheel (no download).

`make_bundled_perseg(root)` writes Images/<concept>/NN.jpg and Annotations/<concept>/NN.png
(palette PNGs, index 1 = the object, as PerSeg's): three concepts of three square views each,
cropped, mirrored and scaled from one photo, each mask the same transform of an outline drawn
once on that photo. The concept folders carry the names of the PerSeg sample the tests can
also read ($PERSAM_SAMPLE_DATA), so a test reads the same against either.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from synthetic import save_palette_png

Box = tuple[int, int, int, int]  # left, top, right, bottom in the photo's pixels


@dataclass(frozen=True)
class View:
    """One sample image: a square crop of the photo, mirrored or not, resized to `side` px."""

    crop: Box
    mirror: bool
    side: int


@dataclass(frozen=True)
class BundledConcept:
    photo: str  # the skimage.data function's name
    outline: Callable[[ImageDraw.ImageDraw], None]  # draws the object (fill 1) on the photo's grid
    views: tuple[View, ...]  # 00 (the reference shot), 01, 02


def _cat(draw: ImageDraw.ImageDraw) -> None:
    """Chelsea's head and chest in skimage.data.chelsea() (451 x 300)."""
    draw.polygon([(0, 300), (0, 60), (40, 0), (395, 0), (372, 55), (360, 120), (366, 175), (345, 235), (322, 300)],
                 fill=1)


def _cup(draw: ImageDraw.ImageDraw) -> None:
    """Cup, handle and saucer in skimage.data.coffee() (600 x 400); the spoon lies on the saucer."""
    draw.ellipse((76, 68, 480, 390), fill=1)  # saucer
    draw.ellipse((172, 18, 410, 205), fill=1)  # cup's rim
    draw.polygon([(176, 110), (406, 110), (384, 250), (330, 292), (250, 292), (200, 250)], fill=1)  # cup's body
    draw.ellipse((195, 228, 262, 306), fill=1)  # handle


def _rocket(draw: ImageDraw.ImageDraw) -> None:
    """The rocket on its pad in skimage.data.rocket() (640 x 427), towers left out."""
    draw.polygon([(321, 127), (313, 136), (309, 150), (309, 405), (335, 405), (335, 150), (331, 136)], fill=1)


# Sizes differ per view (PerSeg's photos differ too) and stay >= 480 px, the side tests
# shrink to; crops move the object around the frame and change its scale.
CONCEPTS: dict[str, BundledConcept] = {
    "cat": BundledConcept("chelsea", _cat, (
        View((151, 0, 451, 300), False, 512),
        View((120, 0, 420, 300), True, 544),
        View((171, 20, 451, 300), False, 576))),
    "duck_toy": BundledConcept("coffee", _cup, (
        View((80, 0, 480, 400), False, 544),
        View((40, 0, 440, 400), True, 512),
        View((150, 20, 500, 370), False, 608))),
    "colorful_sneaker": BundledConcept("rocket", _rocket, (
        View((107, 0, 534, 427), False, 512),
        View((172, 60, 472, 360), True, 576),
        View((40, 0, 467, 427), False, 480))),
}


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def _transform(picture: Image.Image, view: View, resample: Image.Resampling) -> Image.Image:
    picture = picture.crop(view.crop).resize((view.side, view.side), resample)
    return ImageOps.mirror(picture) if view.mirror else picture


def make_bundled_perseg(root: Path) -> Path:
    """Write the sample under `root` (PerSeg layout); returns root."""
    for concept, spec in CONCEPTS.items():
        photo = _photo(spec.photo)
        outline = Image.new("L", photo.size, 0)
        spec.outline(ImageDraw.Draw(outline))
        images, masks = root / "Images" / concept, root / "Annotations" / concept
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for number, view in enumerate(spec.views):
            _transform(photo, view, Image.Resampling.BICUBIC).save(images / f"{number:02d}.jpg", quality=92)
            labels = np.asarray(_transform(outline, view, Image.Resampling.NEAREST), dtype=np.uint8)
            save_palette_png(labels, masks / f"{number:02d}.png")
    return root
