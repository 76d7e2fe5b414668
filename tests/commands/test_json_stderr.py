"""`--log-format json`: every line on stderr is one JSON object, whoever writes it — Python
warnings (PIL's, torch's, any library's), a library's raw prints, Ray's coloured worker lines
with their `(Map(prepare_chunk) pid=…)` prefixes, native lines on file descriptor 2 — and
the run's own final line still carries its exit code."""

from __future__ import annotations

import json
import logging
import os
import warnings

import pytest
from PIL import Image

from jobs import logs
from process_tools import make_scenes, start_persam

RAY_LINE = "\x1b[36m(Map(prepare_chunk) pid=4242)\x1b[0m /x/PIL/Image.py:1134: UserWarning: Palette images ...\n"
GLOG_LINE = "[2026-01-01 00:00:00,000 E 17 17] core_worker.cc:99: something native went wrong\n"


@pytest.fixture(autouse=True)
def _default_logging():
    yield
    logs.configure()


def _objects(text: str) -> list[dict]:
    """Every line -> its JSON object (a line that is not one fails the test, naming it)."""
    objects = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON: {line!r}") from None
        assert isinstance(value, dict) and {"time", "level", "logger", "message"} <= set(value), line
        objects.append(value)
    return objects


def test_every_kind_of_stderr_line_becomes_one_json_object(capfd):
    logs.configure(log_format="json")
    with logs.json_stderr():
        with open(2, "w", closefd=False) as stderr:  # what sys.stderr is in a real process
            print("a library's raw print", file=stderr, flush=True)
        os.write(2, RAY_LINE.encode())
        os.write(2, GLOG_LINE.encode())
        os.write(2, b"\n   \n")  # blank lines carry nothing
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library warns", UserWarning)
        os.write(2, (logs.json_line("error", "already JSON", exit_code=3) + "\n").encode())
        os.write(2, "caf\xe9 \udcff".encode("utf-8", "surrogateescape"))  # no newline, not UTF-8
    entries = _objects(capfd.readouterr().err)
    by_message = {e["message"].split(":")[0] if e["logger"] == "ray.worker" else e["message"]: e for e in entries}
    assert len(entries) == 6, entries
    assert by_message["a library's raw print"]["level"] == "warning"
    worker = [e for e in entries if e["logger"] == "ray.worker"][0]
    assert worker["source"] == "Map(prepare_chunk)" and worker["pid"] == 4242 and "\x1b" not in worker["message"]
    assert worker["message"].startswith("/x/PIL/Image.py:1134: UserWarning: Palette images")
    native = [e for e in entries if "something native" in e["message"]][0]
    assert native["level"] == "error"
    assert any(e["message"].startswith("caf") for e in entries)
    warned = [e for e in entries if "a library warns" in e["message"]][0]
    assert warned["level"] == "warning" and warned["logger"] == "py.warnings"
    assert {"message": "already JSON", "exit_code": 3}.items() <= entries[-2].items()


def test_text_mode_leaves_warnings_and_stderr_alone(capfd):
    logs.configure(log_format="json")
    logs.configure(log_format="text")
    assert warnings.showwarning is not logging._showwarning and logging.getLogger("py.warnings").handlers == []
    os.write(2, b"raw line\n")
    assert capfd.readouterr().err == "raw line\n"


def _palette_with_byte_transparency(path) -> None:
    """A PNG that makes PIL warn when converted to RGB (transparency given as bytes)."""
    image = Image.new("P", (40, 30), 3)
    image.putpalette([i % 256 for i in range(768)])
    image.save(path, transparency=bytes([0] * 10 + [255] * 246))


@pytest.fixture(scope="module")
def warning_scenes(tmp_path_factory):
    scenes = make_scenes(tmp_path_factory.mktemp("scenes"), 3)
    _palette_with_byte_transparency(scenes.images / "palette.png")
    (scenes.images / "broken.jpg").write_bytes(b"<html>not an image</html>")
    return scenes


def _json_run(scenes, tmp_path, runner: str) -> list[dict]:
    env = {**os.environ, "PYTHONWARNINGS": "always"}  # every warning any library raises, each time
    job = start_persam(["segment", "--model-type", "tiny", "--device", "cpu", "--checkpoint", "random:0",
                        "--concept", str(scenes.concept), "--input", str(scenes.images),
                        "--output", str(tmp_path / "masks"), "--runner", runner, "--log-format", "json"], env)
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 4, stderr[-3000:]  # the broken file's error row: 1 of 5 failed
    entries = _objects(stderr)
    assert entries[-1]["exit_code"] == 4 and entries[-1]["message"].startswith("persam segment: failed: 1 of 5")
    assert _objects(stdout)[-1]["message"].startswith("done: 5 images committed")
    return entries


def test_a_local_run_writes_only_json_on_stderr(warning_scenes, tmp_path):
    entries = _json_run(warning_scenes, tmp_path, "local")
    palette = [e for e in entries if "Palette images with Transparency" in e["message"]]
    assert palette and palette[0]["level"] == "warning" and palette[0]["logger"] == "py.warnings"


@pytest.mark.slow
@pytest.mark.ray_processes  # the CLI in a child process, on Ray
def test_a_ray_run_writes_only_json_on_stderr(warning_scenes, tmp_path):
    entries = _json_run(warning_scenes, tmp_path, "ray")
    palette = [e for e in entries if "Palette images with Transparency" in e["message"]]
    assert palette and palette[0]["level"] == "warning"
    assert palette[0]["logger"] == "ray.worker" and "prepare_chunk" in palette[0]["source"]
