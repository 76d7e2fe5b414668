"""Helpers shared by the feature tests: the CLI in-process, sample images, mask IoU."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from jobs.cli import main
from jobs.images import decode_image, decode_mask
from persam_core.concept import Concept

TINY = ["--model-type", "tiny", "--device", "cpu"]
MODEL = [*TINY, "--checkpoint", "random:0"]


def run_cli(argv: list[str]) -> SimpleNamespace:
    """jobs.cli.main in this process -> rc, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def assert_one_error_line(result: SimpleNamespace, *phrases: str) -> str:
    """A non-zero exit with exactly one `persam ...` line on stderr holding every phrase."""
    assert result.rc != 0, result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("persam ") and "Traceback" not in result.err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def fit_cli(sample: Path, shots: list[tuple[str, str]], out: Path, *extra: str, name: str = "thing",
            checkpoint: str = "random:0") -> Concept:
    """`persam fit` on sample shots [(concept, "NN"), ...] -> the concept written."""
    argv = ["fit", *TINY, "--checkpoint", checkpoint, "--name", name, "--out", str(out)]
    for concept, number in shots:
        argv += ["--image", str(sample / "Images" / concept / f"{number}.jpg"),
                 "--mask", str(sample / "Annotations" / concept / f"{number}.png")]
    result = run_cli([*argv, *extra])
    assert result.rc == 0, result.err
    return Concept.from_json(out.read_text())


def load_pair(sample: Path, concept: str, number: str) -> tuple[np.ndarray, np.ndarray]:
    """A sample image and its mask, decoded as `persam fit` decodes them."""
    image = decode_image((sample / "Images" / concept / f"{number}.jpg").read_bytes(), "image")
    mask = decode_mask((sample / "Annotations" / concept / f"{number}.png").read_bytes(), "mask")
    return image, mask


def save_small(sample: Path, source: str, target: Path, side: int = 320, quality: int = 90) -> Path:
    """Sample image `source` ("cat/01") shrunk to `side` px, saved as JPEG at `target`."""
    with Image.open(sample / "Images" / f"{source}.jpg") as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((side, side))
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=quality)
    return target


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {Path(r["image_uri"]).name: r for r in rows}
