"""Fixtures of the storage tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture()
def checkpoint_cache(tmp_path, monkeypatch) -> Path:
    """PERSAM_CACHE, where downloaded checkpoints are kept, in this test's own folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSAM_CACHE", str(cache))
    return cache
