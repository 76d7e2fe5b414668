"""Checkpoints: from object storage (downloaded once per node into the cache, verified) and
MobileSAM's official layout (loaded strictly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.storage import checkpoints
from jobs.exports.names import safe_file_name
from persam_core.modeling.models import ModelError, build_random, model_fingerprint

from cli_tools import ACCESS_KEY, SECRET_KEY

LAYOUT = Path(__file__).parent / "data" / "mobile_sam_state_dict.txt"



@pytest.fixture()
def weights_in_s3(s3, tmp_path):
    s3.mkdir("weights")
    local = tmp_path / "tiny.pth"
    torch.save(build_random("tiny", 3).state_dict(), local)
    s3.put(str(local), "weights/tiny.pth")
    return "s3://weights/tiny.pth"


def test_s3_checkpoint_is_cached_once_and_fingerprinted(weights_in_s3, s3, checkpoint_cache):
    loaded = checkpoints.load_model("tiny", weights_in_s3)
    assert loaded.fingerprint == model_fingerprint(build_random("tiny", 3), "tiny")
    cached = list((checkpoint_cache / "checkpoints").rglob("tiny.pth"))
    assert len(cached) == 1
    s3.rm("weights/tiny.pth")  # the second load must not need the store
    assert checkpoints.load_model("tiny", weights_in_s3).fingerprint == loaded.fingerprint
    assert not list(checkpoint_cache.rglob("*.part*"))


def test_official_names_are_checked_against_their_published_sha256(s3_env, s3, checkpoint_cache):
    s3.mkdir("mirror")
    s3.pipe("mirror/sam_vit_b_01ec64.pth", b"not the published file")
    with pytest.raises(ModelError, match="SHA-256"):
        checkpoints.fetch("s3://mirror/sam_vit_b_01ec64.pth")
    assert not list(checkpoint_cache.rglob("sam_vit_b_01ec64.pth"))  # nothing corrupt is kept


def test_missing_checkpoint_names_the_url_without_credentials(s3_env, checkpoint_cache):
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


# ---------------------------------------------------------------------------- MobileSAM (vit_t)


def layout_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors with the keys, dtypes and shapes of the official mobile_sam.pt."""
    generator = torch.Generator().manual_seed(0)
    state = {}
    for line in LAYOUT.read_text().splitlines():
        name, dtype, *shape = line.split()
        size = [int(s) for s in shape]
        if dtype == "float32":
            state[name] = torch.randn(size, generator=generator) * 0.02
        else:
            state[name] = torch.zeros(size, dtype=getattr(torch, dtype))
    return state


def test_vit_t_loads_the_official_layout_strictly_and_encodes(tmp_path: Path) -> None:
    from jobs.storage.checkpoints import load_model
    from persam_core.modeling.models import ModelError, build_from_state_dict
    from persam_core.modeling.predictor import encode_images
    from persam_core.modeling.resize import resize_longest_side

    state = layout_state_dict()
    path = tmp_path / "mobile_sam.pt"
    torch.save(state, path)
    loaded = load_model("vit_t", str(path))  # weights_only load + strict key/shape match
    assert loaded.fingerprint.startswith("vit_t:")
    for name, tensor in loaded.sam.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    with torch.no_grad():
        features = loaded.sam.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert features.shape == (1, 256, 64, 64)
    image = np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8)
    assert encode_images(loaded.sam, [resize_longest_side(image)])[0].features.shape == (256, 64, 64)
    missing = dict(state)
    missing.pop("image_encoder.neck.0.weight")
    with pytest.raises(ModelError, match="not a vit_t checkpoint"):
        build_from_state_dict("vit_t", missing, "mobile_sam.pt")
