"""What `persam segment` checks of its output before any work, and that `--dry-run` runs the
very same checks (one code path): every record persam reads is validated like a concept file
(a tampered one is one line naming it, the bad-input exit code, before the weights load), and
each refusal of a real run is the dry run's refusal, word for word.

No model is ever loaded here: the loader fails the test if called."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import jobs.pipeline.job_checks
import jobs.storage.checkpoints
from cli_tools import run_cli
from jobs.commands.segment import segment_record
from jobs.pipeline import commit
from jobs.pipeline.job_record import CONCEPT_FILE
from jobs.spec import JobSpec, ModelSpec, SpeedSpec
from persam_core.concept import Concept

FINGERPRINT = "tiny:00000000000000aa"
TINY = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu", "--runner", "local"]


@pytest.fixture(autouse=True)
def _no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the output was checked")

    for module in (jobs.storage.checkpoints, jobs.pipeline.job_checks):
        monkeypatch.setattr(module, "load_model", refuse)


def _concept(folder: Path, name: str, seed: int = 0, fingerprint: str = FINGERPRINT) -> Path:
    feature = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    feature /= np.linalg.norm(feature)
    path = folder / f"{name.replace('/', '_')}-{seed}-{fingerprint[-2:]}.json"
    path.write_text(Concept(name, "persam", feature, feature, fingerprint).to_json())
    return path


@pytest.fixture
def job(tmp_path):
    """An output recorded by a run of concept `mug` over one image (records written as a run
    writes them, without a model), and that run's argv."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "a.png")
    mug = _concept(tmp_path, "mug")
    output = tmp_path / "masks"
    spec = JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), SpeedSpec(), concepts=(str(mug),),
                   input=str(images), output=str(output), runner="local")
    concepts = [Concept.from_json(mug.read_text())]
    commit.open_output(str(output), segment_record(spec, concepts, FINGERPRINT, 1))
    argv = ["segment", *TINY, "--input", str(images), "--output", str(output)]
    return tmp_path, output, argv, mug


def _refused(argv: list[str]) -> str:
    result = run_cli(argv)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.rc == 3 and len(lines) == 1 and lines[0].startswith("persam segment: error: "), result.err
    return lines[0]


def _same_refusal(argv: list[str], *phrases: str) -> None:
    """The real run and the dry run refuse with the very same line."""
    real, dry = _refused(argv), _refused([*argv, "--dry-run"])
    assert real == dry
    for phrase in phrases:
        assert phrase in real, real


# ---------------------------------------------------------------------------- tampered records


JOB_TAMPERING = {
    "negative shards": lambda r: {**r, "num_shards": -3},
    "zero shards": lambda r: {**r, "num_shards": 0},
    "shards as text": lambda r: {**r, "num_shards": "4"},
    "fractional shards": lambda r: {**r, "num_shards": 2.5},
    "boolean shards": lambda r: {**r, "num_shards": True},
    "absurd shards": lambda r: {**r, "num_shards": 10 ** 12},
    "no shards": lambda r: {k: v for k, v in r.items() if k != "num_shards"},
    "no fingerprint": lambda r: {k: v for k, v in r.items() if k != "model_fingerprint"},
    "fingerprint a number": lambda r: {**r, "model_fingerprint": 7},
    "settings a list": lambda r: {**r, "settings": [1]},
    "unknown layout": lambda r: {**r, "layout": "sideways"},
    "no layout": lambda r: {k: v for k, v in r.items() if k != "layout"},
    "a list": lambda r: [r],
    "not JSON": lambda r: "{not json",
    "nested too deep": lambda r: "[" * 100_000 + "]" * 100_000,
}
CONCEPT_TAMPERING = {
    "digest a number": lambda r: {**r, "digest": 5},
    "no name": lambda r: {k: v for k, v in r.items() if k != "name"},
    "no fingerprint": lambda r: {k: v for k, v in r.items() if k != "model_fingerprint"},
    "settings text": lambda r: {**r, "settings": "x"},
    "null": lambda r: None,
    "not JSON": lambda r: "\x00\x01",
}


def _tamper(path: Path, change) -> None:
    value = change(json.loads(path.read_text()))
    path.write_text(value if isinstance(value, str) else json.dumps(value))


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("case", sorted(JOB_TAMPERING))
def test_a_tampered_job_record_is_one_line_before_the_weights_load(job, case, dry):
    _, output, argv, mug = job
    _tamper(output / commit.JOB_FILE, JOB_TAMPERING[case])
    line = _refused([*argv, "--concept", str(mug), *(["--dry-run"] if dry else [])])
    assert f"{output}/{commit.JOB_FILE}: not a valid persam job record" in line
    assert "delete it" in line and "--output" in line


@pytest.mark.parametrize("case", sorted(CONCEPT_TAMPERING))
def test_a_tampered_concept_record_is_one_line_before_the_weights_load(job, case):
    _, output, argv, mug = job
    _tamper(output / "concept=mug" / CONCEPT_FILE, CONCEPT_TAMPERING[case])
    line = _refused([*argv, "--concept", str(mug)])
    assert f"{output}/concept=mug/{CONCEPT_FILE}: not a valid persam concept record" in line and "delete it" in line


@pytest.mark.parametrize("value", ['{"num_shards": -1}', '{"num_shards": 0}', '{"num_shards": "2"}', '{}', "[]", "x"])
def test_a_tampered_cache_record_is_one_line_before_the_weights_load(job, value):
    tmp_path, _, argv, mug = job
    cache = tmp_path / "cache"
    layout = cache / FINGERPRINT.replace(":", "-") / "fp16" / "layout.json"
    layout.parent.mkdir(parents=True)
    layout.write_text(value)
    line = _refused([*argv, "--concept", str(mug), "--cache", str(cache)])
    assert f"{layout}: not a valid persam cache record" in line and "delete it" in line


# ---------------------------------------------------------------------------- the dry run refuses what a run refuses


def test_a_concept_name_that_cannot_name_a_folder(job):
    tmp_path, _, argv, _ = job
    for name in ("../../x", "a/b", "..", ".hidden", "my cat", "-rf"):
        fresh = [*argv[:-1], str(tmp_path / "new-output")]
        _same_refusal([*fresh, "--concept", str(_concept(tmp_path, name))], "cannot name a partition folder")
        assert not (tmp_path / "new-output").exists()


@pytest.mark.parametrize("flags, phrase", [
    (["--max-instances", "3"], "with settings"),
    (["--min-similarity", "0.9"], "with settings"),
    (["--precision", "bf16"], "with settings"),
])
def test_settings_that_disagree_with_the_output(job, flags, phrase):
    _, _, argv, mug = job
    _same_refusal([*argv, "--concept", str(mug), *flags], phrase, "another --output")


def test_a_refitted_concept_other_weights_and_mixed_weights(job):
    tmp_path, _, argv, mug = job
    refit = _concept(tmp_path, "mug", seed=1)
    _same_refusal([*argv, "--concept", str(refit)], "other contents")
    other_weights = _concept(tmp_path, "bowl", fingerprint="tiny:00000000000000bb")
    _same_refusal([*argv, "--concept", str(other_weights)], "another --output")
    _same_refusal([*argv, "--concept", str(mug), "--concept", str(other_weights)], "different weights")
