"""Python code in a fresh interpreter: what a module imports can only be seen where no other
test has imported anything yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fresh_python(code: str, timeout: float = 300) -> str:
    """Run `code` with `python -c` in the repository root (on the path) -> what it printed;
    fails the test with its stderr's end if it exits non-zero."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout
