"""SAM 2.1 in the model registry: sam2's own configs, seeded random weights, safe loading of
`{"model": state_dict}` checkpoints, fingerprints, architecture checks, encoder speed settings."""

from __future__ import annotations

import argparse
import copy

import numpy as np
import pytest
import torch

from persam_core.speed.acceleration import EncoderSpeed, enable_fused_attention, prepare_encoder
from persam_core.modeling.families import as_backbone
from persam_core.modeling.models import (
    model_types,
    ModelError,
    build_from_state_dict,
    build_random,
    check_architecture,
    fingerprint,
    load_state_dict_file,
    model_fingerprint,
)
from persam_core.modeling.predictor import encode_images, predict
from persam_core.modeling.sam2_models import CONFIGS, TINY_OVERRIDES

IMAGE = np.random.default_rng(0).integers(0, 256, (200, 320, 3), dtype=np.uint8)


def test_sam2_types_are_registered_with_sams():
    assert {"sam2.1_t", "sam2.1_s", "sam2.1_b+", "sam2.1_l", "tiny_sam2"} <= set(model_types())
    assert {"vit_h", "vit_l", "vit_b", "vit_t", "tiny"} <= set(model_types())
    assert all(CONFIGS[t].startswith("configs/sam2.1/") for t in ("sam2.1_t", "sam2.1_s", "sam2.1_b+", "sam2.1_l"))


def test_tiny_sam2_is_sam2s_hiera_t_config_shrunk(tiny_sam2):
    from sam2.build_sam import build_sam2
    from sam2.modeling.sam2_base import SAM2Base

    assert isinstance(tiny_sam2, SAM2Base) and not tiny_sam2.training
    torch.manual_seed(0)
    direct = build_sam2(CONFIGS["tiny_sam2"], None, device="cpu", hydra_overrides_extra=list(TINY_OVERRIDES))
    assert fingerprint(direct.state_dict(), "tiny_sam2") == model_fingerprint(tiny_sam2, "tiny_sam2")
    # a real SAM 2.1 decoder: object-score token, high-res skips, sigmoid IoU, stability fallback
    decoder = tiny_sam2.sam_mask_decoder
    assert decoder.pred_obj_scores and decoder.use_high_res_features and decoder.dynamic_multimask_via_stability
    assert tiny_sam2.image_size == 1024 and sum(p.numel() for p in tiny_sam2.image_encoder.parameters()) < 200_000


def test_seeded_random_weights_and_fingerprints(tiny_sam2):
    again = build_random("tiny_sam2", 0)
    assert model_fingerprint(again, "tiny_sam2") == model_fingerprint(tiny_sam2, "tiny_sam2")
    assert model_fingerprint(again, "tiny_sam2").startswith("tiny_sam2:")
    assert model_fingerprint(build_random("tiny_sam2", 1), "tiny_sam2") != model_fingerprint(tiny_sam2, "tiny_sam2")


def test_official_layout_checkpoint_loads_weights_only(tiny_sam2, tmp_path):
    """SAM 2.1 files are {"model": state_dict}; loading never unpickles objects."""
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": tiny_sam2.state_dict()}, path)
    state = load_state_dict_file(str(path))
    loaded = build_from_state_dict("tiny_sam2", state, "sam2.1_hiera_tiny.pt")
    assert fingerprint(state, "tiny_sam2") == model_fingerprint(loaded, "tiny_sam2") == model_fingerprint(tiny_sam2, "tiny_sam2")
    encoded = encode_images(loaded, [as_backbone(loaded).resize(IMAGE)])[0]
    reference = encode_images(tiny_sam2, [as_backbone(tiny_sam2).resize(IMAGE)])[0]
    assert torch.equal(encoded.features, reference.features)
    points, labels = np.array([[100, 50]]), np.array([1])
    assert torch.equal(predict(loaded, encoded, points, labels).low_res, predict(tiny_sam2, reference, points, labels).low_res)

    torch.save({"model": tiny_sam2.state_dict(), "args": argparse.Namespace(run="code")}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="refused"):
        load_state_dict_file(str(tmp_path / "evil.pt"))


def test_checkpoint_of_the_other_family_or_size_is_refused(tiny_sam, tiny_sam2):
    with pytest.raises(ModelError, match="is not a tiny_sam2 checkpoint .*missing keys"):
        build_from_state_dict("tiny_sam2", tiny_sam.state_dict(), "sam.pth")
    with pytest.raises(ModelError, match="is not a tiny checkpoint"):
        check_architecture("tiny", tiny_sam2.state_dict(), "sam2.pt")
    with pytest.raises(ModelError, match=r"is not a sam2.1_t checkpoint \(\d+ missing keys"):
        build_from_state_dict("sam2.1_t", tiny_sam2.state_dict(), "tiny.pt")


def test_speed_settings_apply_to_the_hiera_encoder(tiny_sam2, monkeypatch):
    model = copy.deepcopy(tiny_sam2)
    assert enable_fused_attention(model) == 0  # Hiera attends through SDPA already
    resized = as_backbone(model).resize(IMAGE)
    exact = encode_images(model, [resized])[0]
    bf16 = encode_images(model, [resized], precision="bf16")[0]
    assert bf16.features.dtype == torch.float32 and all(level.dtype == torch.float32 for level in bf16.high_res)
    cosine = torch.nn.functional.cosine_similarity(bf16.features.flatten(), exact.features.flatten(), dim=0)
    assert 0.99 < float(cosine) and not torch.equal(bf16.features, exact.features)
    padded = encode_images(model, [resized], pad_to=2)[0]
    assert torch.allclose(padded.features, exact.features, atol=1e-5)

    class Fails(torch.nn.Module):  # what a compiled module without a compiler does on first call
        def forward(self, *args, **kwargs):
            raise RuntimeError("no compiler here")

    import persam_core.speed.acceleration as acceleration

    eager, lines = model.image_encoder, []
    monkeypatch.setattr(acceleration, "compile_encoder", lambda m: setattr(m, "image_encoder", Fails()))
    speed = prepare_encoder(model, EncoderSpeed("fp32", False, True, 1), log=lines.append)
    assert speed.compile is False and model.image_encoder is eager and "no compiler here" in lines[0]
