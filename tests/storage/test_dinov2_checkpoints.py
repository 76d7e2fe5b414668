"""`--dinov2-checkpoint`: random:SEED, local files, fsspec URLs through the checkpoint cache,
`official`, and one-line refusals naming the file (without credentials)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pytest
import timm
import torch

from jobs.storage import dinov2_checkpoints
from jobs.storage.dinov2_checkpoints import OFFICIAL_DINOV2, load_dinov2, official_dinov2_url, random_dinov2_note
from persam_core.modeling.models import ModelError
from persam_core.modeling.dinov2 import build_random_dinov2, dinov2_fingerprint, frame_tokens, official_state_dict

from cli_tools import ACCESS_KEY, SECRET_KEY



@pytest.fixture()
def tiny_file(tmp_path) -> Path:
    """An official-format tiny state dict of random:7's weights."""
    path = tmp_path / "dino.pth"
    torch.save(official_state_dict(build_random_dinov2("tiny", 7)), path)
    return path


@pytest.fixture()
def memory_store():
    store = fsspec.filesystem("memory")
    yield store
    if store.exists("/dinov2-test"):
        store.rm("/dinov2-test", recursive=True)


def test_random_seed_is_deterministic_and_in_eval_mode():
    model, fingerprint = load_dinov2("tiny", "random:7", "cpu")
    again, same = load_dinov2("tiny", "random:7", torch.device("cpu"))
    assert fingerprint == same == dinov2_fingerprint(build_random_dinov2("tiny", 7), "tiny")
    assert fingerprint != load_dinov2("tiny", "random:8", "cpu")[1]
    assert not model.training
    frames = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    assert torch.equal(frame_tokens(model, frames), frame_tokens(again, frames))
    assert random_dinov2_note("random:7") and random_dinov2_note("dino.pth") is None


def test_a_local_file_and_a_file_url_load_the_same_weights_as_the_seed(tiny_file):
    expected = load_dinov2("tiny", "random:7", "cpu")[1]
    assert load_dinov2("tiny", str(tiny_file), "cpu")[1] == expected
    assert load_dinov2("tiny", f"file://{tiny_file}", "cpu")[1] == expected


def test_an_fsspec_url_is_downloaded_once_into_the_cache(tiny_file, memory_store, checkpoint_cache):
    memory_store.put(str(tiny_file), "/dinov2-test/dino.pth")
    url = "memory://dinov2-test/dino.pth"
    fingerprint = load_dinov2("tiny", url, "cpu")[1]
    assert fingerprint == load_dinov2("tiny", "random:7", "cpu")[1]
    assert len(list((checkpoint_cache / "checkpoints").rglob("dino.pth"))) == 1
    memory_store.rm("/dinov2-test/dino.pth")  # a second load needs only the cache
    assert load_dinov2("tiny", url, "cpu")[1] == fingerprint


def test_official_is_metas_published_file_for_each_size_and_none_for_tiny():
    for kind, registered in (("vits14", "vit_small"), ("vitb14", "vit_base"), ("vitl14", "vit_large")):
        assert official_dinov2_url(kind) == timm.models.get_pretrained_cfg(f"{registered}_patch14_dinov2.lvd142m").url
    with pytest.raises(ModelError, match=r"^no official DINOv2 checkpoint for --dinov2 tiny .*random:SEED"):
        load_dinov2("tiny", "official", "cpu")


def test_official_goes_through_the_cache(tiny_file, memory_store, checkpoint_cache, monkeypatch):
    memory_store.put(str(tiny_file), "/dinov2-test/dinov2_tiny_pretrain.pth")
    monkeypatch.setitem(OFFICIAL_DINOV2, "tiny", "memory://dinov2-test/dinov2_tiny_pretrain.pth")
    assert load_dinov2("tiny", "official", "cpu")[1] == load_dinov2("tiny", "random:7", "cpu")[1]
    assert list((checkpoint_cache / "checkpoints").rglob("dinov2_tiny_pretrain.pth"))


def test_a_missing_file_is_one_line_naming_it():
    with pytest.raises(ModelError) as error:
        load_dinov2("tiny", "/no/such/dino.pth", "cpu")
    assert str(error.value) == "/no/such/dino.pth: checkpoint file not found; pass an existing path or URL"


def test_a_file_of_another_size_is_one_line_naming_the_url(memory_store, checkpoint_cache, tmp_path):
    path = tmp_path / "small.pth"
    torch.save(official_state_dict(build_random_dinov2("tiny", 0)), path)
    memory_store.put(str(path), "/dinov2-test/small.pth")
    with pytest.raises(ModelError) as error:
        load_dinov2("vits14", "memory://dinov2-test/small.pth", "cpu")
    assert str(error.value) == ("memory://dinov2-test/small.pth: a DINOv2 tiny state dict (width 64), "
                                "but --dinov2 vits14 expects width 384; pass the matching --dinov2")


def test_errors_name_the_url_without_credentials_not_the_cached_copy(tmp_path, monkeypatch):
    url = f"s3://{ACCESS_KEY}:{SECRET_KEY}@weights/dino.pth?X-Amz-Signature=abc"
    small, broken = tmp_path / "small.pth", tmp_path / "broken.pth"
    torch.save(official_state_dict(build_random_dinov2("tiny", 0)), small)
    broken.write_bytes(small.read_bytes()[:5000])  # a truncated download
    for cached, expected in ((small, "a DINOv2 tiny state dict"), (broken, "not a readable PyTorch checkpoint")):
        monkeypatch.setattr(dinov2_checkpoints, "fetch", lambda *_, path=cached: path)  # the download is SAM's, tested there
        with pytest.raises(ModelError) as error:
            load_dinov2("vits14", url, "cpu")
        message = str(error.value)
        assert message.startswith(f"s3://weights/dino.pth: {expected}"), message
        assert ACCESS_KEY not in message and SECRET_KEY not in message and "Signature" not in message
        assert str(tmp_path) not in message


def test_unsafe_or_corrupt_files_are_refused_naming_the_file(tmp_path, tiny_file, memory_store, checkpoint_cache):
    pickled = tmp_path / "evil.pth"
    torch.save({"blocks": object()}, pickled)
    with pytest.raises(ModelError, match=r"^.*evil\.pth: refused: .*could run code\); pass an official DINOv2 state dict$"):
        load_dinov2("tiny", str(pickled), "cpu")
    memory_store.pipe("/dinov2-test/cut.pth", tiny_file.read_bytes()[:5000])  # truncated
    with pytest.raises(ModelError) as error:
        load_dinov2("tiny", "memory://dinov2-test/cut.pth", "cpu")
    assert str(error.value) == ("memory://dinov2-test/cut.pth: not a readable PyTorch checkpoint (corrupt or truncated); "
                                "pass an official DINOv2 .pth file")


def test_unknown_kind_is_refused():
    with pytest.raises(ModelError, match="unknown --dinov2 'vitg14'"):
        load_dinov2("vitg14", "random:0", "cpu")
