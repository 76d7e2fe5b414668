"""Checkpoints from object storage: downloaded once per node into the cache, verified."""

from __future__ import annotations

import torch
import pytest

from jobs.storage import checkpoints
from jobs.overlays import safe_file_name
from persam_core.models import ModelError, build_random, model_fingerprint

from lake_tools import ACCESS_KEY, SECRET_KEY


@pytest.fixture()
def weights_in_s3(s3, tmp_path):
    s3.mkdir("weights")
    local = tmp_path / "tiny.pth"
    torch.save(build_random("tiny", 3).state_dict(), local)
    s3.put(str(local), "weights/tiny.pth")
    return "s3://weights/tiny.pth"


def test_s3_checkpoint_is_cached_once_and_fingerprinted(weights_in_s3, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    loaded = checkpoints.load_model("tiny", weights_in_s3)
    assert loaded.fingerprint == model_fingerprint(build_random("tiny", 3), "tiny")
    cached = list((tmp_path / "cache" / "checkpoints").rglob("tiny.pth"))
    assert len(cached) == 1
    s3.rm("weights/tiny.pth")  # the second load must not need the store
    assert checkpoints.load_model("tiny", weights_in_s3).fingerprint == loaded.fingerprint
    assert not list((tmp_path / "cache").rglob("*.part*"))


def test_official_names_are_checked_against_their_published_sha256(s3_env, s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    s3.mkdir("mirror")
    s3.pipe("mirror/sam_vit_b_01ec64.pth", b"not the published file")
    with pytest.raises(ModelError, match="SHA-256"):
        checkpoints.fetch("s3://mirror/sam_vit_b_01ec64.pth")
    assert not list((tmp_path / "cache").rglob("sam_vit_b_01ec64.pth"))  # nothing corrupt is kept


def test_missing_checkpoint_names_the_url_without_credentials(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSAM_CACHE", str(tmp_path / "cache"))
    url = f"s3://{ACCESS_KEY}:{SECRET_KEY}@nowhere/weights.pth?X-Amz-Signature=abc"
    with pytest.raises(ModelError) as error:
        checkpoints.fetch(url)
    assert "nowhere/weights.pth" in str(error.value)
    assert ACCESS_KEY not in str(error.value) and SECRET_KEY not in str(error.value) and "Signature" not in str(error.value)


def test_redact_drops_userinfo_and_query():
    assert checkpoints.redact("https://user:pw@host/a/b.pth?token=1") == "https://host/a/b.pth"
    assert checkpoints.redact("/local/path.pth") == "/local/path.pth"


@pytest.mark.parametrize("name", ["../../etc/passwd", "/abs/path.jpg", "a/../../b", "..", "we ird\\na:me?.png"])
def test_file_names_from_data_cannot_leave_their_folder(name):
    safe = safe_file_name(name, "concept/../x")
    assert "/" not in safe and "\\" not in safe and not safe.startswith(".") and safe not in ("", "..")
