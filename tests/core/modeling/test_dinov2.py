"""DINOv2 (GF-SAM's feature encoder): timm's model against a plain forward, the official key
format both ways, the 518 input without antialias, and the per-channel token normalisation."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from persam_core.modeling.models import ModelError, build_random
from persam_core.modeling.dinov2 import (
    DINOV2_ARCH,
    GRID_SIDE,
    INPUT_SIDE,
    build_dinov2,
    build_random_dinov2,
    dinov2_fingerprint,
    dinov2_from_state_dict,
    dinov2_input,
    frame_tokens,
    normalise_tokens,
    official_state_dict,
    prenorm_tokens,
)

from dinov2_oracle import oracle_prenorm, scrambled
from fresh_python import fresh_python


def random_pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, INPUT_SIDE, INPUT_SIDE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    """Official-format tiny weights far from init (every block, norm and bias matters)."""
    return scrambled(official_state_dict(build_random_dinov2("tiny", 0)), seed=1)


@pytest.mark.parametrize("kind", ["tiny", pytest.param("vits14", marks=pytest.mark.slow)])
def test_timm_model_equals_the_plain_forward_written_from_the_key_layout(kind):
    state = scrambled(official_state_dict(build_random_dinov2(kind, 0)), seed=2)
    model = dinov2_from_state_dict(kind, state, source="x.pth")
    pixels = random_pixels(2 if kind == "tiny" else 1)
    ours = prenorm_tokens(model, pixels)
    expected = oracle_prenorm(state, pixels, heads=DINOV2_ARCH[kind][2])
    width = DINOV2_ARCH[kind][0]
    assert ours.shape == (len(pixels), GRID_SIDE * GRID_SIDE, width)
    scale = expected.abs().max().item()
    assert scale > 1.0  # the blocks did something
    assert (ours - expected).abs().max().item() < 1e-5 * scale


@pytest.mark.parametrize("kind, registered", [("vits14", "vit_small_patch14_dinov2"), ("vitb14", "vit_base_patch14_dinov2"),
                                              ("vitl14", "vit_large_patch14_dinov2")])
def test_sizes_are_timms_registered_dinov2_models(kind, registered):
    with torch.device("meta"):
        theirs = timm.create_model(registered, pretrained=False, img_size=INPUT_SIDE, num_classes=0)
    ours = build_dinov2(kind, device="meta", init=False)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.blocks[0].attn.num_heads == theirs.blocks[0].attn.num_heads
    assert ours.norm.eps == theirs.norm.eps == 1e-6
    assert type(ours.blocks[0].mlp.act) is torch.nn.GELU and ours.blocks[0].mlp.act.approximate == "none"
    assert tuple(ours.pos_embed.shape) == (1, 1370, DINOV2_ARCH[kind][0]) and ours.num_prefix_tokens == 1


def test_official_keys_round_trip_to_identical_tokens_and_fingerprint(tiny_state):
    model = dinov2_from_state_dict("tiny", tiny_state, source="x.pth")
    again = dinov2_from_state_dict("tiny", official_state_dict(model), source="y.pth")
    frames = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    assert torch.equal(frame_tokens(model, frames), frame_tokens(again, frames))
    assert dinov2_fingerprint(model, "tiny") == dinov2_fingerprint(again, "tiny")
    assert set(official_state_dict(model)) == set(tiny_state)  # mask_token included
    assert tiny_state["pos_embed"].shape == (1, 1370, 64) and tiny_state["mask_token"].shape == (1, 64)


def test_random_weights_are_deterministic_and_fingerprinted_by_seed_and_kind():
    first, second, other = (build_random_dinov2("tiny", s) for s in (5, 5, 6))
    assert not first.training
    assert dinov2_fingerprint(first, "tiny") == dinov2_fingerprint(second, "tiny") != dinov2_fingerprint(other, "tiny")
    assert dinov2_fingerprint(first, "tiny").startswith("dinov2_tiny:")
    # mask_token is not used by the forward, so it is not part of the weights' identity
    state = official_state_dict(first)
    state["mask_token"] = torch.ones_like(state["mask_token"])
    assert dinov2_fingerprint(dinov2_from_state_dict("tiny", state, "x.pth"), "tiny") == dinov2_fingerprint(first, "tiny")


def test_a_state_dict_of_another_size_is_one_line_naming_the_file():
    state = official_state_dict(build_dinov2("vits14", device="meta", init=False))
    with pytest.raises(ModelError) as error:
        dinov2_from_state_dict("tiny", state, source="dino.pth")
    message = str(error.value)
    assert message == ("dino.pth: a DINOv2 vits14 state dict (width 384), but --dinov2 tiny expects width 64; "
                       "pass the matching --dinov2")


def test_a_state_dict_of_another_model_or_with_registers_is_refused_naming_the_file():
    with pytest.raises(ModelError, match=r"^sam\.pth: not a DINOv2 state dict in the official .*key format") as error:
        dinov2_from_state_dict("tiny", build_random("tiny", 0).state_dict(), source="sam.pth")
    assert "\n" not in str(error.value)
    registers = official_state_dict(build_random_dinov2("tiny", 0))
    registers["register_tokens"] = torch.zeros(1, 4, 64)
    with pytest.raises(ModelError, match=r"^reg\.pth: .*register tokens.*without registers"):
        dinov2_from_state_dict("tiny", registers, source="reg.pth")
    truncated = official_state_dict(build_random_dinov2("tiny", 0))
    del truncated["blocks.1.mlp.fc2.weight"]
    with pytest.raises(ModelError, match=r"^cut\.pth: a DINOv2 tiny state dict \(width 64\), but it does not fit "
                                         r"--dinov2 tiny \(blocks\.1\.mlp\.fc2\.weight is missing\)"):
        dinov2_from_state_dict("tiny", truncated, source="cut.pth")
    other_grid = official_state_dict(build_random_dinov2("tiny", 0))
    other_grid["pos_embed"] = torch.zeros(1, 257, 64)  # a 224-px grid: timm's filter would resample it silently
    with pytest.raises(ModelError, match=r"^grid\.pth: .*pos_embed has shape \[1, 257, 64\], not \[1, 1370, 64\]"):
        dinov2_from_state_dict("tiny", other_grid, source="grid.pth")


def test_non_finite_weights_are_refused_naming_the_file_and_a_tensor(tiny_state):
    state = dict(tiny_state)
    state["blocks.1.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"].clone()
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"^bad\.pth: 1 tensors hold NaN or infinite values \(e\.g\. blocks\.1\.attn\.qkv\.weight\)"):
        dinov2_from_state_dict("tiny", state, source="bad.pth")


def test_timm_is_imported_where_a_dinov2_is_built_not_with_the_methods():
    """A PerSAM job's processes load every method (GF-SAM's too) but never build a DINOv2:
    timm's import (about 0.4 s of CPU per process) waits for the first build."""
    code = ("import sys; import persam_core.methods.registry, persam_core.methods.gfsam, persam_core.modeling.dinov2; "
            "before = 'timm' in sys.modules; persam_core.modeling.dinov2.build_random_dinov2('tiny', 0); "
            "print(before, 'timm' in sys.modules)")
    assert fresh_python(code).strip() == "False True"


def test_unknown_kind_lists_the_choices():
    with pytest.raises(ModelError, match="vitl14, vitb14, vits14, tiny"):
        build_dinov2("vitg14")


# ---------------------------------------------------------------------------- input and tokens


def test_dinov2_input_is_bilinear_without_antialias_then_imagenet_normalised():
    # one-pixel stripes: antialiasing would average them away, plain bilinear does not
    frames = torch.zeros(1, 3, 1024, 1024)
    frames[..., ::2] = 1.0
    pixels = dinov2_input(frames)
    assert pixels.shape == (1, 3, INPUT_SIDE, INPUT_SIDE)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    plain = F.interpolate(frames, size=(518, 518), mode="bilinear", align_corners=False, antialias=False)
    smooth = F.interpolate(frames, size=(518, 518), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(pixels, (plain - mean) / std, atol=1e-6)
    assert ((pixels - (smooth - mean) / std).abs().max() > 0.5)
    # the ImageNet constants: the mean maps to 0, mean + std to 1
    assert torch.allclose(dinov2_input(mean.expand(1, 3, 1024, 1024)), torch.zeros(1, 3, 518, 518), atol=1e-6)
    assert torch.allclose(dinov2_input((mean + std).expand(1, 3, 1024, 1024)), torch.ones(1, 3, 518, 518), atol=1e-6)


def test_normalise_tokens_divides_each_channel_by_its_norm_over_the_tokens_of_its_image():
    tokens = torch.rand(2, 1369, 8, generator=torch.Generator().manual_seed(0)) + 0.1
    tokens[1] = tokens[0] * 10.0  # the same image at another overall scale
    out = normalise_tokens(tokens)
    assert torch.allclose(out.norm(dim=1), torch.ones(2, 8), atol=1e-5)  # per (image, channel)
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2, 1369), atol=1e-2)  # not per token
    assert torch.allclose(out, tokens / tokens.norm(dim=1, keepdim=True), atol=1e-7)
    assert torch.allclose(out[0], out[1], atol=1e-7)  # an image's overall scale cancels: images are independent


def test_prenorm_tokens_are_before_the_final_norm_without_the_cls_token(tiny_state):
    model = dinov2_from_state_dict("tiny", tiny_state, source="x.pth")
    pixels = random_pixels(1)
    prenorm = prenorm_tokens(model, pixels)
    with torch.no_grad():
        normed = model.forward_features(pixels)  # [B, 1 + 1369, C] after the final norm
    assert normed.shape[1] == 1 + prenorm.shape[1]
    assert not torch.allclose(prenorm, normed[:, 1:], atol=1e-2)
    assert torch.allclose(model.norm(prenorm), normed[:, 1:], atol=1e-5)


def test_frame_tokens_shape_dtype_and_batch_independence(tiny_state):
    model = dinov2_from_state_dict("tiny", tiny_state, source="x.pth")
    frames = torch.rand(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    tokens = frame_tokens(model, frames)
    assert tokens.shape == (2, 1369, 64) and tokens.dtype == torch.float32
    assert torch.allclose(tokens[1:], frame_tokens(model, frames[1:]), atol=1e-6)
    assert torch.allclose(tokens.norm(dim=1), torch.ones(2, 64), atol=1e-5)


def test_frame_tokens_run_the_blocks_at_the_encoders_precision(tiny_state):
    """--precision reaches DINOv2 as SAM's encoder: bf16 autocast around the blocks (checked on
    CPU, where autocast bf16 exists too), fp32 tokens out; fp32 (CPU's default) changes nothing."""
    model = dinov2_from_state_dict("tiny", tiny_state, source="x.pth")
    frames = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))
    seen = []
    hook = model.blocks[0].attn.qkv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    with torch.no_grad():
        exact = frame_tokens(model, frames)
        half = frame_tokens(model, frames, "bf16")
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert exact.dtype == half.dtype == torch.float32
    assert torch.equal(exact, frame_tokens(model, frames, "fp32"))
    cosine = torch.nn.functional.cosine_similarity(exact, half, dim=-1)
    assert cosine.min() > 0.98  # the same tokens, at bf16's precision

