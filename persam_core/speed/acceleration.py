"""Faster encoder paths, each an option measured against the fp32 path (never implied).

- fused attention: the image encoder's attention through `scaled_dot_product_attention`
  (relative-position bias passed as the additive mask), bound per module instance as a
  function over SAM's own modules;
- reduced precision: the image encoder under autocast (bf16 / fp16); features come back
  as fp32 so the location prior and the decoder stay in fp32;
- torch.compile of the image encoder;
- the mask decoder as CUDA graphs, compiled, and under bf16 autocast (`decoder_speed.py`):
  each decode one replay instead of ~320 kernel launches from Python; its elementwise work
  fused; half the bytes per pair. Off unless asked for (`--decoder-graphs`,
  `--decoder-compile`, `--decoder-precision bf16`) until they have been measured on a GPU
  against the eager fp32 decoder (`persam bench` prints them side by side);
- TF32 matrix products (`tf32`): CUDA's fp32 matmuls (the location prior, the mask
  decoder's projections) on tensor cores with a 10-bit mantissa. Measured on an H100, the
  cascade of a vit_b batch of 16 images x 8 concepts took 122.6 instead of 147.9 ms, with
  masks at min IoU 0.9992 against fp32 (random weights). It is torch's process-wide switch,
  and torch.compile guards on it: a compiled encoder called under the other setting than
  it was compiled under recompiles (dynamo's GLOBAL_STATE guard). So it is set once per
  process, before the encoder is compiled (`prepare_encoder`), never toggled around the
  decoder while the actor's encoder thread runs; `matmul_tf32` scopes it where one process
  also needs the exact path (`bench`).

SAM 2 (sam2.1_*): its Hiera encoder already attends through SDPA, so there is nothing to
fuse (no module changes); reduced precision and compile apply to its `image_encoder` (which
`forward_image` calls) as to SAM's.

`resolve_speed` owns the defaults: on CUDA, without flags, bf16 + fused attention +
batch 16 + compiled encoder + TF32 matmuls (measured against fp32 by `persam bench`); on
CPU the exact fp32 path, batch 1. `prepare_encoder` applies them once per process,
warming the compiled encoder up on a batch of the size it will always see (partial
batches are padded, so it never recompiles) and falling back to eager with one log line
if compilation fails.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from persam_core.modeling.backbone import Model
from persam_core.modeling.families import as_backbone
from persam_core.speed.decoder_speed import check_decoder_precision, configure_decoder
from persam_core.errors import describe
from persam_core.speed.options import GPU_BATCH_SIZE, SPEED_PRECISIONS, SpeedFlags

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
assert SPEED_PRECISIONS == ("auto", *PRECISIONS), "options.SPEED_PRECISIONS names these"


@dataclass(frozen=True)
class EncoderSpeed:
    """How the model runs: the encoder's precision (fp32|bf16|fp16), SDPA attention, compiled,
    batch; the decoder as CUDA graphs and its precision; CUDA's fp32 matmuls in TF32."""

    precision: str = "fp32"
    fused_attention: bool = False
    compile: bool = False
    batch_size: int = 1
    decoder_graphs: bool = False
    decoder_precision: str = "fp32"
    tf32: bool = False
    decoder_compile: bool = False


def resolve_speed(device_type: str, flags: SpeedFlags = SpeedFlags()) -> EncoderSpeed:
    """Flags (None / "auto" = not given) -> the settings in effect on `device_type` ("cuda"|"cpu").

    CUDA: bf16, fused, compiled, batch 16, TF32 matmuls, unless told otherwise; an explicit
    fp32 keeps the exact path (no fused attention, compile or TF32 unless asked for).
    CPU: fp32, batch 1 (TF32 is CUDA's: off whatever asked, so that records stay true).
    Decoder graphs, compile and precision: only when asked for, on any device (graphs exist
    on CUDA only; elsewhere the traced decoder runs, with the same results).
    """
    f = flags
    if f.precision not in SPEED_PRECISIONS:
        raise ValueError(f"--precision {f.precision}: choose {', '.join(SPEED_PRECISIONS)}")
    check_decoder_precision(f.decoder_precision)
    fast = device_type == "cuda" and f.precision in ("auto", "bf16", "fp16")
    return EncoderSpeed(
        precision=("bf16" if device_type == "cuda" else "fp32") if f.precision == "auto" else f.precision,
        fused_attention=fast if f.fused_attention is None else f.fused_attention,
        compile=fast if f.compile is None else f.compile,
        batch_size=(GPU_BATCH_SIZE if device_type == "cuda" else 1) if f.batch_size is None else f.batch_size,
        decoder_graphs=bool(f.decoder_graphs),
        decoder_precision=f.decoder_precision or "fp32",
        tf32=device_type == "cuda" and (fast if f.tf32 is None else f.tf32),
        decoder_compile=bool(f.decoder_compile),
    )


def _fused_forward(self: Attention, x: Tensor) -> Tensor:
    """ImageEncoderViT Attention.forward via SDPA. x: [B, H, W, C] -> [B, H, W, C]."""
    batch, height, width, _ = x.shape
    qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, heads, HW, head_dim]
    bias = None
    if self.use_rel_pos:
        rel_h_pos = get_rel_pos(height, height, self.rel_pos_h)
        rel_w_pos = get_rel_pos(width, width, self.rel_pos_w)
        r_q = q.reshape(batch * self.num_heads, height, width, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rel_h_pos)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rel_w_pos)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(
            batch, self.num_heads, height * width, height * width
        ).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(batch, self.num_heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out)


def enable_fused_attention(sam: Model) -> int:
    """Route every SAM image-encoder attention through SDPA -> number of modules changed
    (0 for SAM 2, whose encoder uses SDPA already)."""
    changed = 0
    for module in sam.image_encoder.modules():
        if isinstance(module, Attention):
            module.forward = types.MethodType(_fused_forward, module)
            changed += 1
    return changed


def compile_encoder(sam: Model) -> None:
    sam.image_encoder = torch.compile(sam.image_encoder, dynamic=False)


def prepare_encoder(sam: Model, speed: EncoderSpeed, log: Callable[[str], None] = print) -> EncoderSpeed:
    """Apply `speed` to `sam` (in place) -> the settings actually in effect.

    The compiled encoder is warmed up here on [batch_size, 3, 1024, 1024] (compilation
    happens once, before any image arrives); if that fails, the eager encoder is restored.
    TF32 is set for the whole process first: the compiled encoder must run under the
    setting it was compiled under (see the module docstring).
    """
    set_matmul_tf32(speed.tf32)
    if speed.fused_attention:
        enable_fused_attention(sam)
    mode = configure_decoder(sam, speed.decoder_graphs, speed.decoder_precision, log, speed.decoder_compile)
    if mode != (speed.decoder_graphs, speed.decoder_precision, speed.decoder_compile):
        log("note: --decoder-graphs, --decoder-compile and --decoder-precision apply to SAM (segment_anything) "
            "only; SAM 2 decodes run as sam2 runs them")
        speed = replace(speed, decoder_graphs=mode.graphs, decoder_precision=mode.precision,
                        decoder_compile=mode.compiled)
    if not speed.compile:
        return speed
    eager, size = sam.image_encoder, as_backbone(sam).image_size
    compile_encoder(sam)
    try:
        device = next(eager.parameters()).device
        warm = torch.zeros(speed.batch_size, 3, size, size, device=device)
        with torch.no_grad(), encoder_precision(speed.precision, device):
            sam.image_encoder(warm)
    except Exception as error:  # a missing compiler toolchain, an unsupported op: run eager
        sam.image_encoder = eager
        log(f"note: torch.compile of the image encoder failed ({describe(error)}); running it eagerly")
        return replace(speed, compile=False)
    return speed


@contextlib.contextmanager
def encoder_precision(precision: str, device: torch.device | str) -> Iterator[None]:
    """Autocast for the image encoder; fp32 is a no-op."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: choose {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
        yield


def set_matmul_tf32(enabled: bool) -> bool:
    """CUDA's fp32 matrix products in TF32 from now on, in the whole process -> the setting before.
    (torch's own switch; its legacy spelling, which torch versions from 2.4 on all read.)"""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    return before


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """`set_matmul_tf32(enabled)` within the block, the setting before it after it."""
    before = set_matmul_tf32(enabled)
    try:
        yield
    finally:
        set_matmul_tf32(before)
