"""Generated inputs for the bad-input tests: small JPEG scenes, a concept fitted on one with
the tiny random model, and a `segment` run over an input with `--runner local`."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from cli_tools import LOCAL, MODEL, run_cli
from synthetic import frame_image, rectangles, save_palette_png


def scene_bytes(seed: int) -> bytes:
    """A distinct small JPEG per seed."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(frame_image(rectangles(seed % 8), seed)).save(buffer, "JPEG")
    return buffer.getvalue()


def write_scenes(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for seed, path in enumerate(paths):
        path.write_bytes(scene_bytes(seed))
    return paths


def fit_concept(folder: Path, name: str = "thing") -> Path:
    """`persam fit` on a generated scene (object 1 of frame 0) -> the concept file."""
    folder.mkdir(parents=True, exist_ok=True)
    image, mask, out = folder / "ref.jpg", folder / "ref.png", folder / f"{name}.json"
    Image.fromarray(frame_image(rectangles(0), 0)).save(image)
    save_palette_png((rectangles(0) == 1).astype("uint8"), mask)
    result = run_cli(["fit", *MODEL, "--image", str(image), "--mask", str(mask), "--name", name, "--out", str(out)])
    assert result.rc == 0, result.err
    return out


def segment(concept: Path, source: str, output: Path, *extra: str):
    """`persam segment --runner local` -> the run (rc, out, err)."""
    return run_cli(["segment", *MODEL, *LOCAL, "--concept", str(concept), "--input", source,
                    "--output", str(output), *extra])


def output_rows(output: Path) -> list[dict]:
    return pq.read_table(output).to_pylist() if output.exists() else []
