"""`make demo`: fit a concept on a bundled photo, run the real Ray job, write overlays.

Photos come from scikit-image's bundled data (no download). The demo tries the official
SAM vit_b weights first and falls back to random weights, saying so, when offline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from persam_core.modeling.models import ModelError

from jobs.storage.checkpoints import fetch, official_url
from jobs.cli import main as persam
from jobs.commands.export import run_export

MODEL_TYPE = "vit_b"
# Rough outline of Chelsea the cat's head in skimage.data.chelsea() (451 x 300 px).
CAT_OUTLINE = [(0, 40), (40, 0), (390, 0), (380, 60), (345, 200), (300, 260), (250, 300), (0, 300)]


def write_photos(root: Path) -> tuple[Path, Path, Path]:
    """Reference photo + mask and a folder of target photos -> their paths."""
    import skimage.data

    reference_dir, targets = root / "reference", root / "images"
    reference_dir.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    cat = skimage.data.chelsea()
    Image.fromarray(cat).save(reference_dir / "chelsea.jpg", quality=95)
    mask = Image.new("L", (cat.shape[1], cat.shape[0]), 0)
    ImageDraw.Draw(mask).polygon(CAT_OUTLINE, fill=255)
    mask.save(reference_dir / "chelsea_mask.png")
    Image.fromarray(np.ascontiguousarray(cat[:, ::-1][20:, 30:])).save(targets / "chelsea_mirrored.jpg", quality=95)
    for name in ("coffee", "astronaut", "rocket"):
        Image.fromarray(getattr(skimage.data, name)()).save(targets / f"{name}.jpg", quality=95)
    return reference_dir / "chelsea.jpg", reference_dir / "chelsea_mask.png", targets


def choose_checkpoint() -> str:
    try:
        fetch(official_url(MODEL_TYPE))
        return "official"
    except ModelError as error:
        print(f"demo: could not download the official {MODEL_TYPE} weights ({error}); "
              f"falling back to --checkpoint random:0, so the masks are NOT meaningful")
        return "random:0"


def main(root: str = "demo-output") -> int:
    started = time.perf_counter()
    base = Path(root).resolve()
    image, mask, targets = write_photos(base)
    checkpoint = choose_checkpoint()
    model = ["--model-type", MODEL_TYPE, "--checkpoint", checkpoint, "--device", "auto"]
    concept = base / "concepts" / "chelsea.json"
    code = persam(["fit", *model, "--image", str(image), "--mask", str(mask), "--method", "persam",
                   "--name", "chelsea", "--out", str(concept)])
    if code:
        return code
    output = base / "masks"
    code = persam(["segment", *model, "--concept", str(concept), "--input", str(targets), "--output", str(output)])
    if code:
        return code
    print(run_export("overlays", str(output), str(base / "overlays")))
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s")
    print(f"  masks (Parquet): {output}")
    print(f"  review gallery:  {base / 'overlays' / 'index.html'}")
    print("  real SAM weights: persam segment --model-type vit_h --checkpoint /path/to/sam_vit_h_4b8939.pth ...")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
