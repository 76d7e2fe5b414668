"""Faster encoder paths are options measured against fp32, never silent replacements."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from persam_core.speed.acceleration import encoder_precision, enable_fused_attention
from persam_core.modeling.predictor import encode_images
from persam_core.modeling.resize import resize_longest_side


@pytest.fixture(scope="module")
def resized():
    generator = np.random.default_rng(0)
    coarse = generator.integers(0, 256, size=(10, 14, 3), dtype=np.uint8)
    return resize_longest_side(np.kron(coarse, np.ones((48, 48, 1), dtype=np.uint8)))


def test_fused_attention_matches_the_encoder(tiny_sam, resized):
    reference = encode_images(tiny_sam, [resized])[0].features
    fused_model = copy.deepcopy(tiny_sam)
    assert enable_fused_attention(fused_model) == len(fused_model.image_encoder.blocks)
    fused = encode_images(fused_model, [resized])[0].features
    assert torch.allclose(fused, reference, atol=1e-4, rtol=1e-4)


def test_bf16_features_come_back_fp32_and_close(tiny_sam, resized):
    reference = encode_images(tiny_sam, [resized])[0].features
    reduced = encode_images(tiny_sam, [resized], "bf16")[0].features
    assert reduced.dtype == torch.float32
    relative = (reduced - reference).norm() / reference.norm()
    assert 0 < relative < 0.05  # different (it is an option), yet close


def test_fp32_is_the_default_and_unknown_precisions_are_refused():
    with encoder_precision("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="--precision"):
        with encoder_precision("int3", "cpu"):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: no CUDA device here")
def test_cuda_bf16_fused_encoder_close_to_fp32(tiny_sam, resized):
    model = copy.deepcopy(tiny_sam).cuda()
    reference = encode_images(model, [resized])[0].features
    enable_fused_attention(model)
    fast = encode_images(model, [resized], "bf16")[0].features
    assert (fast - reference).norm() / reference.norm() < 0.05


def test_speed_defaults_fast_on_cuda_exact_on_cpu():
    from persam_core.speed.acceleration import EncoderSpeed, resolve_speed
    from persam_core.speed.options import SpeedFlags as Flags

    assert resolve_speed("cuda") == EncoderSpeed("bf16", True, True, 16, tf32=True)
    assert resolve_speed("cpu") == EncoderSpeed("fp32", False, False, 1)
    assert resolve_speed("cuda", Flags("fp32")) == EncoderSpeed("fp32", False, False, 16)  # the exact path, batched
    assert resolve_speed("cuda", Flags(compile=False, batch_size=4)) == EncoderSpeed("bf16", True, False, 4, tf32=True)
    assert resolve_speed("cuda", Flags(tf32=False)).tf32 is False
    assert resolve_speed("cuda", Flags("fp32", tf32=True)).tf32 is True  # asked for: TF32 matmuls beside the fp32 encoder
    assert resolve_speed("cpu", Flags(tf32=True)).tf32 is False  # CUDA's switch: a CPU run records what it computed
    with pytest.raises(ValueError, match="--precision"):
        resolve_speed("cpu", Flags("int8"))


def test_failed_compile_falls_back_to_eager_with_one_line(tiny_sam, resized, monkeypatch):
    from persam_core.speed import acceleration
    from persam_core.speed.acceleration import EncoderSpeed, prepare_encoder

    model = copy.deepcopy(tiny_sam)
    eager = model.image_encoder

    class Fails(torch.nn.Module):  # what a compiled module without a working compiler does on first call
        def forward(self, *args, **kwargs):
            raise RuntimeError("no compiler here\nsecond line")

    def broken_compile(sam):
        sam.image_encoder = Fails()

    monkeypatch.setattr(acceleration, "compile_encoder", broken_compile)
    lines = []
    speed = prepare_encoder(model, EncoderSpeed("fp32", False, True, 2), log=lines.append)
    assert speed == EncoderSpeed("fp32", False, False, 2)
    assert model.image_encoder is eager
    assert len(lines) == 1 and "RuntimeError: no compiler here" in lines[0] and "eager" in lines[0]
    assert encode_images(model, [resized])[0].features.shape == (256, 64, 64)


def test_padded_batches_give_the_same_features(tiny_sam, resized):
    alone = encode_images(tiny_sam, [resized])[0].features
    padded = encode_images(tiny_sam, [resized], pad_to=3)
    assert len(padded) == 1 and torch.allclose(padded[0].features, alone, atol=1e-5)


def test_tf32_is_set_for_the_process_before_the_encoder_is_compiled(tiny_sam, monkeypatch):
    """The compiled encoder must run under the TF32 setting it was compiled under (see the
    next test), so prepare_encoder sets it first, for the whole process."""
    from persam_core.speed import acceleration
    from persam_core.speed.acceleration import EncoderSpeed, matmul_tf32, prepare_encoder

    at_compile = []
    monkeypatch.setattr(acceleration, "compile_encoder", lambda sam: at_compile.append(torch.backends.cuda.matmul.allow_tf32))
    with matmul_tf32(False):
        speed = prepare_encoder(copy.deepcopy(tiny_sam), EncoderSpeed("bf16", False, True, 1, tf32=True), log=print)
        assert speed.tf32 and at_compile == [True] and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 is False  # matmul_tf32 restores the setting before it


def test_a_compiled_function_recompiles_when_tf32_changes():
    """Why TF32 is never switched around the decoder alone: torch.compile guards on it, so the
    actor's compiled encoder, called on another thread meanwhile, would recompile."""
    from persam_core.speed.acceleration import matmul_tf32

    compiled = torch.compile(lambda x: x @ x + 1, backend="eager", dynamic=False)
    x = torch.ones(4, 4)
    with matmul_tf32(False):
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True), matmul_tf32(True):
            with pytest.raises(Exception, match="allow_tf32"):
                compiled(x)
