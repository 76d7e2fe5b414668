"""Outputs that cannot take the result fail before any work (README "Bad input"): no model is
loaded, nothing is read; and the concept file appears whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

import jobs.storage.checkpoints
import jobs.commands.fit
import jobs.pipeline.job
from jobs.storage import files
from jobs.cli import main
from persam_core.concept import Concept

TINY = ["--model-type", "tiny", "--checkpoint", "random:0"]


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    """Any model load here is a failure: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for module in (jobs.storage.checkpoints, jobs.commands.fit, jobs.pipeline.job):
        monkeypatch.setattr(module, "load_model", refuse)


@pytest.fixture
def concept_file(tmp_path: Path) -> Path:
    feature = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    path = tmp_path / "mug.json"
    path.write_text(Concept("mug", "persam", feature / np.linalg.norm(feature), feature, "tiny:0").to_json())
    return path


def _one_line_error(capsys, command: str, named: Path, phrase: str) -> None:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"persam {command}: error: {named}:"), lines[0]
    assert phrase in lines[0], lines[0]


def test_fit_out_an_existing_folder(tmp_path, capsys):
    folder = tmp_path / "concepts"
    folder.mkdir()
    # The image and mask do not exist either: the output is checked before they are read.
    rc = main(["fit", *TINY, "--image", str(tmp_path / "a.jpg"), "--mask", str(tmp_path / "a.png"),
               "--name", "mug", "--out", str(folder)])
    assert rc == 3
    _one_line_error(capsys, "fit", folder, f"existing folder; pass a file path such as {folder}/mug.json")
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.probe"))


@pytest.mark.parametrize("command", ["rank", "segment"])
def test_output_an_existing_file(command, concept_file, tmp_path, capsys):
    blocker = tmp_path / "ranking.parquet"
    blocker.write_bytes(b"not a folder")
    rc = main([command, *TINY, "--concept", str(concept_file), "--input", str(tmp_path / "photos"),
               "--output", str(blocker)])
    assert rc == 3
    _one_line_error(capsys, command, blocker, "--output is an existing file")
    assert blocker.read_bytes() == b"not a folder"


def test_output_under_a_file(concept_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["rank", *TINY, "--concept", str(concept_file), "--input", str(tmp_path), "--output", str(blocker / "out")])
    assert rc == 3
    _one_line_error(capsys, "rank", blocker / "out", "not writable")


def test_cache_an_existing_file(concept_file, tmp_path, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("x")
    output = tmp_path / "out"
    rc = main(["rank", *TINY, "--concept", str(concept_file), "--input", str(tmp_path), "--output", str(output),
               "--cache", str(blocker)])
    assert rc == 3
    _one_line_error(capsys, "rank", blocker, "--cache is an existing file")
    assert not output.exists()  # nothing created by a refused job


@pytest.mark.parametrize("kind, make, phrase", [
    ("coco", lambda p: p.mkdir(), "existing folder; pass a file path such as"),
    ("overlays", lambda p: p.write_text("x"), "existing file"),
    ("subjects", lambda p: p.write_text("x"), "existing file"),
])
def test_export_output_checked_before_the_masks_are_read(kind, make, phrase, tmp_path, capsys):
    target = tmp_path / "target"
    make(target)
    rc = main(["export", kind, "--masks", str(tmp_path / "no-such-masks"), "--output", str(target)])
    assert rc == 3
    _one_line_error(capsys, "export", target, phrase)


# ---------------------------------------------------------------------------- atomic writes


def test_a_failing_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    files.write_atomically(str(path), b"old")

    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        files.write_atomically(str(path), b"new and longer")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_remote_write_is_one_whole_object(monkeypatch):
    fs = fsspec.filesystem("memory")
    calls = []
    monkeypatch.setattr(type(fs), "pipe_file", lambda self, path, data, **kw: calls.append((path, data)))
    monkeypatch.setattr(type(fs), "open", lambda *a, **kw: pytest.fail("streamed write"))
    files.write_atomically("memory://bucket/concepts/c.json", b'{"a": 1}')
    assert calls == [("/bucket/concepts/c.json", b'{"a": 1}')]
