"""`persam eval --video` picks its video mode from the model, in process (`--runner local`):
SAM 2 tracks with its memory (`sam2-memory`), SAM re-localises every frame (`sam-prior`), and
metrics.json / metrics.md name the mode that ran."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from persam_core.evaluation.scores import davis_j
from synthetic import make_davis


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        return main(argv), err.getvalue()


@pytest.fixture(scope="module")
def davis(tmp_path_factory) -> Path:
    return make_davis(tmp_path_factory.mktemp("davis"), {"boxes": 3})


@pytest.mark.parametrize("model_type, mode", [("tiny_sam2", "sam2-memory"), ("tiny", "sam-prior")])
def test_video_eval_names_the_mode_that_ran(davis: Path, tmp_path: Path, model_type: str, mode: str) -> None:
    output = tmp_path / "out"
    rc, err = run_cli(["eval", "--video", "--model-type", model_type, "--checkpoint", "random:0",
                       "--runner", "local", "--data", str(davis), "--output", str(output)])
    assert rc == 0, err
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["mode"] == mode and metrics["model_type"] == model_type
    assert f"Mode: `{mode}`" in (output / "metrics.md").read_text()
    assert set(metrics["per_object"]) == {"boxes_1", "boxes_2"}
    predictions = sorted((output / "predictions" / "boxes").glob("*.png"))
    assert [p.name for p in predictions] == ["00000.png", "00001.png", "00002.png"]
    # J of object 1 = its one scored frame (frame 1) of the written prediction
    truth = np.array(Image.open(davis / "Annotations" / "480p" / "boxes" / "00001.png")) == 1
    assert metrics["per_object"]["boxes_1"]["j"] == pytest.approx(davis_j(truth, np.array(Image.open(predictions[1])) == 1))


def test_sam2_video_refuses_persam_f_before_work(davis: Path, tmp_path: Path) -> None:
    rc, err = run_cli(["eval", "--video", "--model-type", "tiny_sam2", "--checkpoint", "random:0", "--runner", "local",
                       "--method", "persam-f", "--data", str(davis), "--output", str(tmp_path / "out")])
    lines = [line for line in err.splitlines() if line.startswith("persam ")]
    assert rc != 0 and len(lines) == 1 and "--method persam-f" in lines[0], err
    assert not (tmp_path / "out" / "metrics.json").exists()
