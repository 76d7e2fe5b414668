"""The `persam` CLI as tests call it: in this process (`run_cli`) or in a child process
(`run_persam`, for what needs its own process: the console script, killed drivers), the
model flags of the tiny random model, and the one-line error contract."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from jobs.cli import main
from persam_core.concept import Concept

TINY = ["--model-type", "tiny", "--device", "cpu"]
MODEL = [*TINY, "--checkpoint", "random:0"]
# `--runner local`: the product's own stages in this process (tests that do not prove the Ray wiring)
LOCAL = ["--runner", "local"]
PERSAM = [sys.executable, "-m", "jobs.cli"]
REPO = Path(__file__).resolve().parents[1]
# Credentials of the loopback S3 endpoint (moto); tests assert they never reach any output.
ACCESS_KEY = "AKIAPERSAMTESTKEY0001"
SECRET_KEY = "persam-test-secret-value-0001"


def run_cli(argv: list[str]) -> SimpleNamespace:
    """jobs.cli.main in this process -> rc, out, err (what it printed)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def run_persam(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """The `persam` CLI in a child process (its own embedded Ray) from the repo root."""
    return subprocess.run(PERSAM + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def error_lines(result: SimpleNamespace) -> list[str]:
    """The `persam ...` lines of what a run printed to stderr."""
    return [line for line in result.err.splitlines() if line.startswith("persam ")]


def assert_one_error_line(result: SimpleNamespace, *phrases: str) -> str:
    """A non-zero exit with exactly one `persam ...` line on stderr holding every phrase."""
    assert result.rc != 0, result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("persam ") and "Traceback" not in result.err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def fit_cli(sample: Path, shots: list[tuple[str, str]], out: Path, *extra: str, name: str = "thing",
            checkpoint: str = "random:0") -> Concept:
    """`persam fit` on sample shots [(concept, "NN"), ...] -> the concept written."""
    argv = ["fit", *TINY, "--checkpoint", checkpoint, "--name", name, "--out", str(out)]
    for concept, number in shots:
        argv += ["--image", str(sample / "Images" / concept / f"{number}.jpg"),
                 "--mask", str(sample / "Annotations" / concept / f"{number}.png")]
    result = run_cli([*argv, *extra])
    assert result.rc == 0, result.err
    return Concept.from_json(out.read_text())
