"""`persam eval --output <existing file>` fails before any model loads, as segment does."""

from __future__ import annotations

import pytest

import jobs.commands.fit
import jobs.commands.eval_video
from jobs.cli import main

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu"]


@pytest.mark.parametrize("video", [False, True])
def test_eval_output_that_is_a_file_fails_before_the_model_loads(video, tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for module in (jobs.commands.fit, jobs.commands.eval_video):  # eval fits its concepts through fit's loaders
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(jobs.commands.fit, "load_dinov2", refuse)
    blocker = tmp_path / "metrics"
    blocker.write_text("not a folder")
    argv = ["eval", *MODEL, "--data", str(tmp_path / "data"), "--output", str(blocker), *(["--video"] if video else [])]
    assert main(argv) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output is an existing file" in err
    assert blocker.read_text() == "not a folder"
