"""Constants and a CLI runner shared by the data-lake tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ACCESS_KEY = "AKIAPERSAMTESTKEY0001"
SECRET_KEY = "persam-test-secret-value-0001"
PERSAM = [sys.executable, "-m", "jobs.cli"]
REPO = Path(__file__).resolve().parents[2]


def run_persam(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """Run the `persam` CLI in a child process (its own embedded Ray) from the repo root."""
    return subprocess.run(PERSAM + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
