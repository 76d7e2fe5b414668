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
import jobs.pipeline.job_checks
from jobs.storage import files
from jobs.cli import main
from persam_core.concept import Concept

TINY = ["--model-type", "tiny", "--checkpoint", "random:0"]


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    """Any model load here is a failure: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    for module in (jobs.storage.checkpoints, jobs.commands.fit, jobs.pipeline.job_checks):
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


# ---------------------------------------------------------------------------- object stores


def _s3_error(capsys, command: str, url: str, phrase: str) -> None:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"persam {command}: error: {url}:") and phrase in lines[0], lines[0]


@pytest.mark.parametrize("command, flag, extra", [
    ("segment", "--output", []),
    ("segment", "--output", ["--dry-run"]),
    ("segment", "--cache", []),
    ("rank", "--output", ["--checkpoint", "s3://persam-weights/sam.pth"]),
    ("fit", "--out", []),
])
def test_a_missing_bucket_is_reported_before_work_and_never_created(command, flag, extra, concept_file, tmp_path, s3,
                                                                    capsys):
    bucket = f"no-such-bucket-{command}-{flag.strip('-')}-{len(extra)}"
    url = f"s3://{bucket}/masks" + ("/mug.json" if command == "fit" else "")
    if command == "fit":
        argv = ["fit", *TINY, "--image", str(tmp_path / "a.jpg"), "--mask", str(tmp_path / "a.png"), "--name", "mug"]
    else:
        argv = [command, *TINY, "--concept", str(concept_file), "--input", str(tmp_path)]
        if flag != "--output":
            argv += ["--output", str(tmp_path / "out")]
    rc = main([*argv, flag, url, *extra])
    assert rc == 3
    _s3_error(capsys, command, url, "its bucket does not exist; persam never creates one")
    s3.invalidate_cache()
    assert not s3.exists(bucket)  # s3fs's makedirs on a bucket path would have created it


def test_an_unwritable_prefix_is_found_before_the_checkpoint_is_read(concept_file, tmp_path, s3_env, capsys,
                                                                     monkeypatch):
    import s3fs

    real_pipe = s3fs.S3FileSystem._pipe_file

    async def forbidden(self, path, data, *args, **kwargs):  # what S3 answers a PUT that a policy denies
        if "/locked/" in path:
            raise PermissionError("Access Denied")
        return await real_pipe(self, path, data, *args, **kwargs)

    # before any instance exists: an instance binds its sync methods to the class's coroutines
    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", forbidden)
    s3fs.S3FileSystem.clear_instance_cache()
    s3 = s3fs.S3FileSystem()
    s3.mkdir("persam-locked")
    for flag in ("--output", "--cache"):
        url = "s3://persam-locked/locked/masks"
        argv = ["segment", *TINY, "--checkpoint", "s3://persam-locked/weights/sam.pth", "--concept", str(concept_file),
                "--input", str(tmp_path), "--output", str(tmp_path / "out"), flag, url]
        assert main(argv) == 3
        _s3_error(capsys, "segment", url, f"{flag} is not writable (PermissionError)")
    assert s3.ls("persam-locked") == []
