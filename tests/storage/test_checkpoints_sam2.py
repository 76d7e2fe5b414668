"""SAM 2.1 checkpoints through the job's loader: official names, random weights, local files."""

from __future__ import annotations

import torch

from persam_core.modeling.families import family_of
from jobs.storage.checkpoints import load_model, official_url
from persam_core.modeling.models import model_fingerprint


def test_official_sam2_checkpoints_are_meta_s_files():
    base = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
    names = {"sam2.1_t": "tiny", "sam2.1_s": "small", "sam2.1_b+": "base_plus", "sam2.1_l": "large"}
    for model_type, name in names.items():
        assert official_url(model_type) == f"{base}sam2.1_hiera_{name}.pt"
        assert family_of(model_type).official_checkpoints[model_type][1] is None  # no published SHA-256 to check


def test_random_and_local_sam2_checkpoints_load_with_one_fingerprint(tiny_sam2, tmp_path):
    random = load_model("tiny_sam2", "random:0")
    assert random.fingerprint == model_fingerprint(tiny_sam2, "tiny_sam2")
    path = tmp_path / "sam2.1_tiny_test.pt"
    torch.save({"model": tiny_sam2.state_dict()}, path)
    local = load_model("tiny_sam2", str(path))
    assert local.fingerprint == random.fingerprint and local.source == str(path)
