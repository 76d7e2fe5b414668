"""How runs report: exit codes and the failure policy, the summary's totals, log levels and
JSON lines, --version, defaults in help, light CLI imports, dry runs that load nothing,
the input checked before the model loads, PerSAM-F fit progress, Ray's noise filtered."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.pipeline.job_checks
import jobs.pipeline.session
import jobs.storage.checkpoints
from jobs import cli, logs
from jobs.pipeline.progress import Progress

from fresh_python import fresh_python
MODEL = ["--model-type", "tiny", "--device", "cpu", "--checkpoint", "random:0"]
LOCAL = ["--runner", "local"]


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield
    logs.configure()  # later tests start from the defaults


@pytest.fixture(scope="module")
def concept(perseg_sample, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("concept") / "cat.json"
    result = run_cli(["fit", *MODEL, "--name", "cat", "--out", str(out),
                      "--image", str(perseg_sample / "Images/cat/00.jpg"),
                      "--mask", str(perseg_sample / "Annotations/cat/00.png")])
    assert result.rc == 0, result.err
    return out


def run_cli(argv: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def save_small(sample: Path, source: str, target: Path, side: int = 160) -> None:
    with Image.open(sample / "Images" / f"{source}.jpg") as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((side, side))
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, quality=90)


SOURCES = ("cat/01", "cat/02", "duck_toy/01", "duck_toy/02", "colorful_sneaker/01")


def photos(perseg_sample: Path, folder: Path, good: int, broken: int = 0) -> Path:
    for index in range(good):
        save_small(perseg_sample, SOURCES[index], folder / f"good{index}.jpg")
    for index in range(broken):
        (folder / f"broken{index}.jpg").write_bytes(b"<html>not an image</html>")
    return folder


def segment(concept: Path, images: Path, output: Path, *extra: str):
    return run_cli(["segment", *MODEL, "--concept", str(concept), "--input", str(images), "--output", str(output),
                    *LOCAL, *extra])


@pytest.fixture
def no_model(monkeypatch):
    """Any model load or Ray start is a failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or Ray started")

    for module in (jobs.storage.checkpoints, jobs.pipeline.job_checks):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(jobs.pipeline.session, "start_ray", refuse)


# ---------------------------------------------------------------------------- exit codes


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["segment", "--no-such-flag"])
    assert exited.value.code == cli.EXIT_USAGE == 2


def test_bad_input_exits_3(concept, tmp_path, monkeypatch, no_model):
    argv = ["segment", *MODEL, "--concept", str(concept), "--input", str(tmp_path / "nonexistent"),
            "--output", str(tmp_path / "out"), *LOCAL]
    result = run_cli(argv)  # the input is listed before any weights load (no_model)
    assert result.rc == cli.EXIT_BAD_INPUT == 3
    assert result.err.strip().splitlines() == [f"persam segment: error: {tmp_path / 'nonexistent'}: input not found; "
                                               "pass an existing directory, prefix, glob or manifest"]


def test_rank_lists_its_input_before_the_model_loads(concept, tmp_path, no_model):
    result = run_cli(["rank", *MODEL, "--concept", str(concept), "--input", str(tmp_path / "nonexistent"),
                      "--output", str(tmp_path / "out"), *LOCAL])
    assert result.rc == 3 and "input not found" in result.err


def test_error_rate_policy_commits_then_fails(perseg_sample, concept, tmp_path):
    images = photos(perseg_sample, tmp_path / "images", good=3, broken=1)
    failed = segment(concept, images, tmp_path / "out")
    assert failed.rc == cli.EXIT_JOB_FAILED == 4
    assert failed.err.strip().splitlines() == ["persam segment: failed: 1 of 4 images failed (25.0 %), more than "
                                               "--max-error-rate 0.05; their error rows are committed"]
    assert pq.read_table(tmp_path / "out").num_rows == 4  # committed before failing
    assert failed.out.strip().splitlines()[-1].startswith("done: 4 images committed in the output; this run: 4 images")

    tolerant = segment(concept, images, tmp_path / "out2", "--max-error-rate", "0.25")
    assert tolerant.rc == 0, tolerant.err


def test_a_run_where_every_image_failed_always_fails(concept, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    result = segment(concept, images, tmp_path / "out", "--max-error-rate", "1")
    assert result.rc == 4 and "all 1 images failed" in result.err


def test_a_noop_rerun_reports_the_committed_total(perseg_sample, concept, tmp_path):
    images = photos(perseg_sample, tmp_path / "images", good=2)
    assert segment(concept, images, tmp_path / "out").rc == 0
    again = segment(concept, images, tmp_path / "out")
    assert again.rc == 0
    assert again.out.strip().splitlines()[-1].startswith("done: 2 images committed in the output; this run: 0 images")


# ---------------------------------------------------------------------------- dry runs


def test_segment_dry_run_plans_without_loading_or_writing(perseg_sample, concept, tmp_path, monkeypatch):
    images = photos(perseg_sample, tmp_path / "images", good=3)
    assert segment(concept, images, tmp_path / "out", "--shard-size", "1").rc == 0
    (images / "good0.jpg").write_bytes((images / "good1.jpg").read_bytes())  # one image changed
    save_small(perseg_sample, SOURCES[4], images / "new.jpg")  # one added
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    for module in (jobs.storage.checkpoints, jobs.pipeline.job_checks):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    monkeypatch.setattr(jobs.pipeline.session, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    result = segment(concept, images, tmp_path / "out", "--dry-run")
    assert result.rc == 0, result.err
    lines = result.out.strip().splitlines()
    assert all(line.startswith("dry run: ") for line in lines), lines
    assert "model tiny, checkpoint random:0 (not loaded" in lines[0] and "cat (persam" in lines[1]
    assert f"input {images} (listing): 4 images" in result.out
    plan = lines[-1]
    assert "shards to run" in plan and "already committed" in plan and "to recompute" in plan
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before  # nothing written

    fresh = segment(concept, images, tmp_path / "new-out", "--dry-run")
    assert fresh.rc == 0 and "new output" in fresh.out and not (tmp_path / "new-out").exists()


def test_rank_and_eval_dry_runs_load_nothing(perseg_sample, concept, tmp_path, no_model):
    images = photos(perseg_sample, tmp_path / "images", good=2)
    ranked = run_cli(["rank", *MODEL, "--concept", str(concept), "--input", str(images),
                      "--output", str(tmp_path / "rank"), "--dry-run"])
    assert ranked.rc == 0, ranked.err
    assert "2 images in 1 shards, all scored; masks for the top 2" in ranked.out
    evaluated = run_cli(["eval", *MODEL, "--data", str(perseg_sample), "--output", str(tmp_path / "eval"), "--dry-run"])
    assert evaluated.rc == 0, evaluated.err
    assert "PerSeg" in evaluated.out and "nothing loaded or written" in evaluated.out


# ---------------------------------------------------------------------------- logging


def test_json_log_lines_parse(perseg_sample, concept, tmp_path):
    images = photos(perseg_sample, tmp_path / "images", good=2, broken=1)
    result = segment(concept, images, tmp_path / "out", "--log-format", "json")
    assert result.rc == 4
    entries = [json.loads(line) for line in result.out.strip().splitlines()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    assert entries[-1]["message"].startswith("done: 3 images committed")
    final = [json.loads(line) for line in result.err.strip().splitlines()]
    assert len(final) == 1 and final[0]["level"] == "error" and final[0]["exit_code"] == 4
    assert final[0]["message"].startswith("persam segment: failed: 1 of 3 images failed")


def test_quiet_prints_no_progress_or_summary(perseg_sample, concept, tmp_path):
    images = photos(perseg_sample, tmp_path / "images", good=1)
    result = segment(concept, images, tmp_path / "out", "--quiet")
    assert result.rc == 0 and result.out == "", result.out


def test_debug_prints_the_scrubbed_traceback(monkeypatch):
    secret = "sEcReTkEy123"

    def explode(args):
        raise RuntimeError(f"reading s3://AKIA:{secret}@bucket/x failed")

    monkeypatch.setattr(cli, "_run", explode)
    argv = ["export", "coco", "--masks", f"s3://AKIA:{secret}@bucket/m/", "--output", "o.json"]
    quiet = run_cli(argv)
    assert quiet.rc == 1 and len(quiet.err.strip().splitlines()) == 1 and "Traceback" not in quiet.err
    loud = run_cli([*argv, "--log-level", "debug"])
    lines = loud.err.strip().splitlines()
    assert loud.rc == 1 and lines[0] == "Traceback (most recent call last):" and "in explode" in loud.err
    assert lines[-1] == "persam export: failed: RuntimeError: reading s3://bucket/x failed"
    assert secret not in loud.err + loud.out


def test_version_and_defaults_in_help(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("persam ")
    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["segment"].format_help().split())
    assert "images per committed Parquet shard of a new output (default: 1024)" in text
    assert "(default: 0.05)" in text and "(default: None)" not in text
    assert text.count("default: 16 on CUDA") == 1 and "(default 16" not in text


def test_the_cli_module_imports_no_heavy_library():
    code = ("import sys, jobs.cli; heavy = [m for m in ('torch', 'ray', 'pyarrow', 'persam_core.modeling.models', "
            "'segment_anything') if m in sys.modules]; print(heavy)")
    assert fresh_python(code).strip() == "[]"


def test_progress_lines_off_a_terminal_and_a_bar_on_one(caplog):
    logs.configure()
    with caplog.at_level(logging.INFO, logger="jobs.pipeline.progress"):
        logging.getLogger("jobs").addHandler(caplog.handler)
        with Progress(4, "segment", interval=0.0) as progress:
            progress.update(2)
            progress.update(2)
    lines = [r.getMessage() for r in caplog.records if r.name == "jobs.pipeline.progress"]
    assert lines[0].startswith("segment: 2/4 images (50.0 %)") and lines[0].endswith(" left")
    assert lines[-1].startswith("segment: 4/4 images (100.0 %)") and all("\r" not in line for line in lines)
    logs._settings = logs.LogSettings(interactive=True)
    with Progress(4, "segment", interval=0.0) as progress:
        assert progress.bar is not None  # a live bar on a terminal


def test_fit_reports_persam_f_progress(perseg_sample, tmp_path):
    result = run_cli(["fit", *MODEL, "--method", "persam-f", "--epochs", "40", "--progress-interval", "0.000001",
                      "--name", "cat", "--out", str(tmp_path / "cat.json"),
                      "--image", str(perseg_sample / "Images/cat/00.jpg"),
                      "--mask", str(perseg_sample / "Annotations/cat/00.png")])
    assert result.rc == 0, result.err
    epochs = [line for line in result.out.splitlines() if line.startswith("PerSAM-F: epoch ")]
    assert len(epochs) >= 5 and " loss " in epochs[0] and epochs[0].endswith(" left")
    assert epochs[-1].startswith("PerSAM-F: epoch 39/40")


# ---------------------------------------------------------------------------- Ray's and torch's noise


def test_ray_noise_is_dropped_and_the_rest_kept(capfd):
    logs.configure()
    noise = ("[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker' and ID: 'ab' "
             "has constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
    with logs.native_stderr_filter():
        os.write(2, noise.encode())
        os.write(2, b"a real native error\n")
    assert capfd.readouterr().err == "a real native error\n"
    ray_progress = logging.getLogger("ray.data._internal.progress")
    assert not ray_progress.filters[0].filter(logging.makeLogRecord({"msg": "Progress bars disabled. To enable"}))
    assert ray_progress.filters[0].filter(logging.makeLogRecord({"msg": "something else"}))


def test_torchs_cuda_home_line_is_dropped_on_cpu():
    # what torch's extension builder logs when inductor imports it on a machine without a GPU
    logs.configure()
    builder = logging.getLogger("torch.utils.cpp_extension")
    line = logging.makeLogRecord({"msg": "No CUDA runtime is found, using CUDA_HOME='/usr/local'"})
    assert not builder.filters[0].filter(line)
    assert builder.filters[0].filter(logging.makeLogRecord({"msg": "Error building extension"}))
