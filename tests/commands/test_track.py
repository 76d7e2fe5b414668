"""`persam track` in process (`--runner local`): a concept through a folder of clips with SAM 2's
memory -> one PNG per frame and track.json; refusals before work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from persam_core.concept import Concept
from persam_core.modeling.models import model_fingerprint

MODEL = ["--model-type", "tiny_sam2", "--checkpoint", "random:0", "--runner", "local"]


def write_clip(folder: Path, frames: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(frames):
        image = rng.integers(80, 150, size=(48, 64, 3)).astype(np.uint8)
        image[10:30, 5 + 4 * index : 25 + 4 * index] = (220, 40, 40)
        Image.fromarray(image).save(folder / f"frame{index:03d}.jpg", quality=95)


@pytest.fixture(scope="module")
def concept_file(tiny_sam2, tmp_path_factory) -> Path:
    vector = np.random.default_rng(1).normal(size=256).astype(np.float32)
    concept = Concept("red", "persam", vector / np.linalg.norm(vector), vector, model_fingerprint(tiny_sam2, "tiny_sam2"))
    path = tmp_path_factory.mktemp("concept") / "red.json"
    path.write_text(concept.to_json())
    return path


def test_track_writes_a_mask_per_frame_and_a_summary(concept_file: Path, tmp_path: Path, capsys) -> None:
    write_clip(tmp_path / "clips" / "a", 3, seed=0)
    write_clip(tmp_path / "clips" / "b", 2, seed=1)
    output = tmp_path / "out"
    # presence >= -1 holds everywhere: found on each clip's first frame
    rc = main(["track", *MODEL, "--concept", str(concept_file), "--input", str(tmp_path / "clips"),
               "--output", str(output), "--min-similarity", "0"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((output / "track.json").read_text())
    assert summary["concept"] == "red" and [c["name"] for c in summary["clips"]] == ["a", "b"]
    for clip, frames in (("a", 3), ("b", 2)):
        masks = sorted((output / clip).glob("*.png"))
        assert [m.name for m in masks] == [f"frame{i:03d}.png" for i in range(frames)]
        assert all(Image.open(m).mode == "L" and Image.open(m).size == (64, 48) for m in masks)
    assert all(c["found_at"] == 0 for c in summary["clips"]) and "note" in summary


def test_track_refuses_sam_and_several_concepts_before_work(concept_file: Path, tmp_path: Path, capsys) -> None:
    write_clip(tmp_path / "clip", 2, seed=0)
    base = ["track", "--checkpoint", "random:0", "--input", str(tmp_path / "clip"), "--output", str(tmp_path / "out")]
    assert main([*base, "--model-type", "tiny", "--concept", str(concept_file)]) == 3
    assert "pass a SAM 2 model type" in capsys.readouterr().err
    other = tmp_path / "blue.json"
    other.write_text(concept_file.read_text().replace('"red"', '"blue"'))
    assert main([*base, "--model-type", "tiny_sam2", "--concept", str(concept_file), "--concept", str(other)]) == 3
    assert "one concept per run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
