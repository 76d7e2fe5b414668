"""Warm starts (pipeline/compile_cache.py, persam_core/speed/compile_cache.py): a cold run keeps the
compiled encoder's artifacts, the next process loads them and builds no inductor graph; an
entry torch cannot read or that belongs to another key is ignored with one line; any key
change misses. Fast tests stand in for torch's compile; the slow one runs two real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_tools import MODEL, REPO
from process_tools import make_scenes
from jobs.pipeline import commit
from jobs.pipeline import compile_cache as cc
from jobs.storage.schema import IMAGE_URI, MASK_RLE, read_parts
from persam_core.speed.acceleration import EncoderSpeed
from persam_core.speed.compile_cache import cache_key
from persam_core.modeling.models import build_random

COMPILED = EncoderSpeed(compile=True)


@pytest.fixture
def tiny():
    return build_random("tiny", 0)


@pytest.fixture
def fake_compile(monkeypatch):
    """prepare_encoder without torch.compile: each call 'builds' one graph unless artifacts
    were loaded first; save_artifacts returns fixed bytes -> the calls' record."""
    record = {"loaded": [], "prepared": 0, "misses": 0}

    def load(blob: bytes) -> int:
        if blob != b"torch-bytes":
            raise RuntimeError("torch cannot read these bytes")
        record["loaded"].append(blob)
        return 1

    def prepare(sam, speed, log=print):
        record["prepared"] += 1
        if not record["loaded"]:
            record["misses"] += 1
        return speed

    monkeypatch.setattr(cc, "load_artifacts", load)
    monkeypatch.setattr(cc, "prepare_encoder", prepare)
    monkeypatch.setattr(cc, "save_artifacts", lambda: b"torch-bytes")
    monkeypatch.setattr(cc, "compile_counts", lambda: {"hit": 0, "miss": record["misses"]})
    return record


def _warm(tiny, folder: Path, speed: EncoderSpeed = COMPILED, model_type: str = "tiny") -> list[str]:
    lines: list[str] = []
    cc.prepare_warm(tiny, speed, model_type, str(folder), log=lines.append)
    return lines


def test_cold_saves_an_entry_and_the_next_start_is_warm(tiny, fake_compile, tmp_path):
    cold = _warm(tiny, tmp_path)
    assert len(cold) == 1 and cold[0].startswith("encoder compile: cold") and "saved to" in cold[0], cold
    entries = list(tmp_path.glob("tiny-*.bin"))
    assert len(entries) == 1 and not list(tmp_path.glob(".*part*"))
    warm = _warm(tiny, tmp_path)
    assert len(warm) == 1 and warm[0].startswith("encoder compile: warm (cache tiny-"), warm
    assert fake_compile["loaded"] == [b"torch-bytes"] and fake_compile["misses"] == 1


@pytest.mark.parametrize("content", [b"garbage", b"persam-compile-cache\nnot json\nxx", None])
def test_a_corrupt_or_foreign_entry_is_ignored_with_one_line(tiny, fake_compile, tmp_path, content):
    key = cache_key("tiny", COMPILED, "cpu", cc.persam_version())
    if content is None:  # a valid entry of another key, renamed to this key's name
        other = cache_key("tiny", EncoderSpeed(compile=True, batch_size=2), "cpu", cc.persam_version())
        content = cc.entry_bytes(other, b"torch-bytes")
    (tmp_path / f"{key.name()}.bin").write_bytes(content)
    lines = _warm(tiny, tmp_path)
    assert len(lines) == 2, lines
    assert lines[0].startswith("encoder compile: ignoring the cache entry") and "compiling cold" in lines[0]
    assert lines[1].startswith("encoder compile: cold") and fake_compile["loaded"] == []
    assert _warm(tiny, tmp_path)[0].startswith("encoder compile: warm")  # the cold run replaced the bad entry


def test_torch_bytes_it_cannot_read_cost_only_the_warm_start(tiny, fake_compile, tmp_path):
    key = cache_key("tiny", COMPILED, "cpu", cc.persam_version())
    (tmp_path / f"{key.name()}.bin").write_bytes(cc.entry_bytes(key, b"truncated"))
    lines = _warm(tiny, tmp_path)
    assert "RuntimeError: torch cannot read these bytes" in lines[0] and lines[1].startswith("encoder compile: cold")


def test_any_key_change_misses(tiny, fake_compile, tmp_path):
    _warm(tiny, tmp_path)
    for speed, model_type in ((EncoderSpeed(compile=True, precision="bf16"), "tiny"),
                              (EncoderSpeed(compile=True, fused_attention=True), "tiny"),
                              (EncoderSpeed(compile=True, batch_size=4), "tiny"), (COMPILED, "vit_b")):
        fake_compile["loaded"].clear()
        lines = _warm(tiny, tmp_path, speed, model_type)
        assert len(lines) == 1 and lines[0].startswith("encoder compile: cold"), (speed, model_type, lines)
    assert len(list(tmp_path.glob("*.bin"))) == 5
    names = {cache_key("tiny", COMPILED, "cpu", v).name() for v in ("0.1.0", "0.2.0")}
    assert len(names) == 2  # a persam release changes the key too


def test_no_cache_without_compile_or_when_off(tiny, fake_compile, tmp_path):
    assert _warm(tiny, tmp_path, EncoderSpeed()) == []
    lines: list[str] = []
    cc.prepare_warm(tiny, COMPILED, "tiny", "off", log=lines.append)
    assert lines == [] and not list(tmp_path.iterdir())
    assert cc.location("off") is None and cc.location(None).endswith("compile")


def test_an_unwritable_cache_costs_only_the_next_warm_start(tiny, fake_compile, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    lines = _warm(tiny, blocker / "cache")
    assert len(lines) == 1 and "not saved to" in lines[0]


def test_a_url_location_round_trips_without_showing_credentials(tiny, fake_compile):
    where = "memory://user:secret@bucket/compile?X-Amz-Signature=abc"
    cache = cc.CompileCache("memory://bucket/compile")
    lines = _warm(tiny, "memory://bucket/compile")
    assert lines[0].startswith("encoder compile: cold") and "memory://bucket/compile/tiny-" in lines[0]
    assert _warm(tiny, "memory://bucket/compile")[0].startswith("encoder compile: warm")
    key = cache_key("tiny", COMPILED, "cpu", cc.persam_version())
    assert cc.artifacts_of(key, cache.read(key)) == b"torch-bytes"
    assert "secret" not in cc.CompileCache(where).shown(key) and "Signature" not in cc.CompileCache(where).shown(key)


def _segment(scenes, output: Path, compile_cache: Path, inductor: Path) -> str:
    """`persam segment --compile` in its own process, with its own (empty) inductor cache
    folder: only the compile cache can make it warm -> what it printed."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "segment", *MODEL, "--compile", "--runner", "local",
                             "--concept", str(scenes.concept), "--input", str(scenes.images), "--output", str(output),
                             "--compile-cache", str(compile_cache)],
                            env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _masks(output: Path) -> dict[str, str]:
    rows = read_parts(commit.part_files(str(output)), columns=[IMAGE_URI, MASK_RLE]).to_pylist()
    return {row[IMAGE_URI]: row[MASK_RLE] for row in rows}


@pytest.mark.slow
def test_a_second_process_starts_warm_with_the_same_masks(tmp_path):
    scenes = make_scenes(tmp_path / "scenes", 2)
    cache = tmp_path / "compile-cache"
    cold = _segment(scenes, tmp_path / "cold", cache, tmp_path / "inductor-1")
    assert "encoder compile: cold" in cold and "saved to" in cold, cold[-3000:]
    assert len(list(cache.glob("tiny-*.bin"))) == 1
    warm = _segment(scenes, tmp_path / "warm", cache, tmp_path / "inductor-2")
    # logged only when the compile built no inductor graph (fxgraph_cache_miss unchanged)
    assert "encoder compile: warm (cache tiny-" in warm and "encoder compile: cold" not in warm, warm[-3000:]
    cold_masks, warm_masks = _masks(tmp_path / "cold"), _masks(tmp_path / "warm")
    assert len(cold_masks) == 2 and cold_masks == warm_masks
    assert np.all([mask is not None for mask in cold_masks.values()])


def test_compile_cache_is_a_setting_of_every_command_that_runs_the_model():
    from jobs.cli_parser import build_parser
    from jobs.spec import JobSpec

    for command in (["segment", "--concept", "c", "--input", "i", "--output", "o"],
                    ["rank", "--concept", "c", "--input", "i", "--output", "o"], ["bench", "--images", "1"]):
        args = build_parser().parse_args([*command, *MODEL, "--compile-cache", "s3://shared/compiled"])
        assert JobSpec.from_args(args).compile_cache == "s3://shared/compiled"
        assert JobSpec.from_args(build_parser().parse_args([*command, *MODEL])).compile_cache is None
