"""How SAM's prompt encoder + mask decoder run for P pairs: eagerly, replayed as CUDA
graphs and/or compiled by torch.compile, in fp32 or under bf16 autocast. All are speed
options, off unless asked for: graphs pay where kernel launches set the decoder's pace
(few pairs), bf16 where the decoder's own work does (many pairs). Whether they pay in a
whole job, and by how much: docs/performance.md.

`decode_prompts` is what `SamBackbone.decode` runs: one prompt-encoder and one mask-decoder
call (with PerSAM's guidance) for every pair of a pass. Eagerly, one such call is ~320 small
kernels launched one by one from Python, so on a GPU the host, not the device, sets the
decoder's pace at small P, whatever B and K.

Decoder graphs (`configure_decoder(sam, graphs=True)`) replace that with a CUDA-graph replay
per call: `torch.compile(backend="cudagraphs", fullgraph=True, dynamic=False)` traces the
function once per call signature (pass kind x pair count), and PyTorch's CUDA-graph trees
record it once per thread and replay it afterwards (one launch instead of ~320), owning the
memory pool.

- P is padded to a bucket (`pair_bucket`: 8, 12, 16, 24, 32, ...; padded rows repeat row 0
  and are dropped) so that the signatures stay few: a PerSAM cascade has 3 (PerSAM-F 3
  more), times the buckets that occur (B x K for full batches; subsets under
  --min-similarity or further instances).
- Outputs are cloned before they are returned: a replay reuses its output memory.
- Exactness: a replay runs the eager kernels; padding only changes the decoder's batch
  dimension (cuBLAS may tile another batch size differently: last-bit differences, as batching
  itself). A speed option like the encoder's compile.
- Only SAM (segment_anything): SAM 2's prompt encoder selects points by boolean indexing (a
  host read, which a graph cannot hold); SAM 2 decodes run as sam2 runs them.
- Off the GPU the same trace runs through `aot_eager` (no graphs exist there): the tests use it
  to check that the traced decode equals the eager one.
- If tracing, compiling or recording fails, the decode runs eagerly from then on, with one
  log line.
- Threads: torch keeps the graph trees in thread-local state, which older torch set up only
  on the thread that imported inductor's `cudagraph_trees`; `_give_thread_graph_state` sets
  it up for the calling thread. Dynamo's config is per thread too: the recompile limit is
  raised on the thread that decodes (`_raise_recompile_limit`), not where the model was
  loaded. Callers should still decode on one thread (the job's actors do): each thread
  records its own graphs.

Compiled decoder (`configure_decoder(sam, compiled=True)`): the same trace through
inductor, which fuses the decoder's elementwise work (adds, layer norms, GELUs, softmaxes)
into few kernels: at many pairs the decoder is paced by the memory traffic of its
[P, 4096, 256] tokens and [P, 32, 256, 256] upscaled features, not by its matrix
products. Alone, it is not padded: each pass kind compiles for the first pair count and
once more, with the count dynamic, at the second. With graphs too, inductor's own CUDA
graphs replay it (mode "reduce-overhead"), padded to the buckets above. Logits stay within
float rounding of the eager decode's (tested).

Decoder precision (`configure_decoder(sam, precision="bf16")`): at large P (many concepts) the
decoder's own work sets the pace instead: its matrix products and the memory traffic of
[P, 4096, 256] tokens; bf16 autocast halves the bytes and runs the matmuls on tensor cores.
Logits and scores come back as fp32; the location prior stays fp32. It changes masks, so it
is recorded in the job's settings. The gentler way to the tensor cores is TF32 (`acceleration.set_matmul_tf32`,
on by default with CUDA bf16): fp32 tensors, matmuls with a 10-bit mantissa, set once per
process rather than here per decode, because torch.compile guards on it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor
from segment_anything.modeling import Sam

from persam_core.decoder import decode_masks
from persam_core.errors import describe
from persam_core.speed.options import DECODER_PRECISIONS
from persam_core.prompts import encode_prompts

logger = logging.getLogger(__name__)

MIN_BUCKET = 8  # fewer pairs are padded to 8: tiny passes (the last instances) share one graph
DECODER_DTYPES = {"fp32": None, "bf16": torch.bfloat16}
assert tuple(DECODER_DTYPES) == DECODER_PRECISIONS, "options.DECODER_PRECISIONS names these"
RECOMPILE_LIMIT = 128  # signatures: up to 6 pass kinds x 9 buckets (8 to pairs.DECODER_PAIRS); torch's default is 8


def decode_eager(sam: torch.nn.Module, features: Tensor, coords: Tensor, labels: Tensor, boxes: Tensor | None,
                 mask_input: Tensor | None, multimask: bool, attention_bias: Tensor | None,
                 target_embedding: Tensor | None) -> tuple[Tensor, Tensor]:
    """One prompt-encoder and one mask-decoder call of SAM for P pairs.

    features: [P, 256, 64, 64]; coords: [P, N, 2] input pixels; labels: [P, N] int; boxes: [P, 4];
    mask_input: [P, 1, 256, 256]; attention_bias: [P, 1, 1, 4096]; target_embedding: [P, 1, 256]
    -> (low-res logits [P, M, 256, 256], predicted IoU [P, M]).
    """
    sparse, dense = encode_prompts(sam.prompt_encoder, coords, labels, boxes, mask_input)
    return decode_masks(sam.mask_decoder, features, sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                        attention_bias=attention_bias, target_embedding=target_embedding)


def pair_bucket(count: int) -> int:
    """P -> the padded pair count: the next of 8, 12, 16, 24, 32, 48, ... (powers of two and
    1.5x them). Padded pairs cost decoder work (on a GPU about as much as the launches a
    replay saves, at a few dozen pairs), so the steps are finer than powers of two, and
    B x K of a full batch (16 x 1, 2, 3, 4, 6, 8) needs none."""
    bucket = MIN_BUCKET
    while True:
        for candidate in (bucket, bucket * 3 // 2):
            if candidate >= count:
                return candidate
        bucket *= 2


def _pad_rows(tensor: Tensor | None, rows: int) -> Tensor | None:
    """[P, ...] -> [rows, ...], the extra rows copies of row 0 (valid prompts, results dropped),
    in the tensor's own memory layout: the trace guards on strides, so channels-last features
    padded as contiguous ones would be a second signature for every pass and bucket."""
    if tensor is None or tensor.shape[0] == rows:
        return tensor
    inner = sorted(range(1, tensor.dim()), key=lambda dim: -tensor.stride(dim))  # outermost first
    dense = tensor.permute(0, *inner)
    padded = torch.cat([dense, dense[:1].expand(rows - tensor.shape[0], *dense.shape[1:])])
    return padded.permute(0, *(1 + inner.index(dim) for dim in range(1, tensor.dim())))


def _raise_recompile_limit() -> None:
    """Dynamo's recompile limit, on the calling thread: torch >= 2.13 keeps config overrides
    per thread (a ContextVar), so a limit set where the model was loaded does not reach the
    actor's cascade thread, whose decodes would fail over to eager at torch's 8 signatures."""
    config = torch._dynamo.config
    if config.recompile_limit < RECOMPILE_LIMIT:
        config.recompile_limit = RECOMPILE_LIMIT


def _give_thread_graph_state() -> None:
    """Set up cudagraph trees' per-thread state for this thread where torch did not (< 2.14)."""
    from torch._inductor import cudagraph_trees as trees

    if hasattr(trees.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    # what torch's cudagraph_trees sets up for its importing thread (torch 2.14: `_initialize_tls`)
    trees.local.tree_manager_containers = {}
    trees.local.tree_manager_locks = defaultdict(threading.Lock)


class TracedDecoder:
    """`decode_eager` of one SAM, traced, then replayed as CUDA graphs (`graphs`) and/or compiled
    by inductor (`compiled`), see the module docstring."""

    def __init__(self, device_type: str, graphs: bool = True, compiled: bool = False,
                 log: Callable[[str], None] = logger.info) -> None:
        # No reference to the model here: the registry holds this per model weakly, so a model
        # dropped by its owner (bench frees its copy before the job) is freed with its graphs.
        self.log = log
        self.graph_trees = graphs and device_type == "cuda"
        # Graphs replay fixed shapes: pair counts are padded to buckets, each traced once. Compiled
        # alone, the pair count is left as it is: a second count recompiles once with it dynamic
        # (torch's automatic dynamic shapes), so no decoder work is spent on padding.
        self.padded = graphs
        if compiled:
            mode = "reduce-overhead" if self.graph_trees else None  # inductor's own CUDA graphs
            self.compiled = torch.compile(decode_eager, backend="inductor", mode=mode, fullgraph=True,
                                          dynamic=False if graphs else None)
        else:
            backend = "cudagraphs" if self.graph_trees else "aot_eager"  # no graphs off the GPU: the trace alone
            self.compiled = torch.compile(decode_eager, backend=backend, fullgraph=True, dynamic=False)
        self.what = "a compiled mask decoder" if compiled else "CUDA graphs of the mask decoder"
        self.failed = False

    def __call__(self, sam: torch.nn.Module, features: Tensor, coords: Tensor, labels: Tensor,
                 boxes: Tensor | None, mask_input: Tensor | None, multimask: bool, attention_bias: Tensor | None,
                 target_embedding: Tensor | None) -> tuple[Tensor, Tensor]:
        """`decode_eager`'s arguments -> its results, through the graphs."""
        if not self.failed:
            count = features.shape[0]
            rows = pair_bucket(count) if self.padded else count
            padded = [_pad_rows(t, rows) for t in (features, coords, labels, boxes, mask_input)]
            extra = [_pad_rows(t, rows) for t in (attention_bias, target_embedding)]
            try:
                _raise_recompile_limit()
                if self.graph_trees:
                    _give_thread_graph_state()
                    torch.compiler.cudagraph_mark_step_begin()  # earlier replays' outputs were cloned: reuse their memory
                low_res, scores = self.compiled(sam, *padded, multimask, *extra)
                if self.graph_trees:  # a replay reuses its output memory
                    return low_res[:count].clone(), scores[:count].clone()
                return low_res[:count], scores[:count]
            except Exception as error:  # a tracing, compiling or capture failure: the eager decoder from now on
                self.failed = True
                self.log(f"note: {self.what} failed ({describe(error)}); decoding eagerly")
        return decode_eager(sam, features, coords, labels, boxes, mask_input, multimask, attention_bias,
                            target_embedding)


class DecoderMode(NamedTuple):
    """How a model's decodes run: replayed as CUDA graphs, in which precision, compiled."""

    graphs: bool
    precision: str
    compiled: bool = False


EAGER = DecoderMode(False, "fp32", False)  # SAM's decoder as it is: every model's until configured


@dataclass
class _Settings:
    """How one model's decodes are asked to run, and `traced`: what was traced, compiled and
    recorded, by (graphs, compiled), kept across off / on (benchmarks time every way on one model)."""

    asked: DecoderMode = EAGER
    traced: dict[tuple[bool, bool], TracedDecoder] = field(default_factory=dict)

    def current(self) -> TracedDecoder | None:
        """The traced decoder the settings ask for, unless none is asked for or it failed."""
        traced = self.traced.get((self.asked.graphs, self.asked.compiled))
        return traced if traced is not None and not traced.failed else None


_SETTINGS: "weakref.WeakKeyDictionary[torch.nn.Module, _Settings]" = weakref.WeakKeyDictionary()


def check_decoder_precision(precision: str | None) -> None:
    """None (not given) or one of options.DECODER_PRECISIONS; anything else is a one-line error."""
    if precision is not None and precision not in DECODER_PRECISIONS:
        raise ValueError(f"--decoder-precision {precision}: choose {', '.join(DECODER_PRECISIONS)}")


def configure_decoder(sam: torch.nn.Module, graphs: bool | None = None, precision: str | None = None,
                      log: Callable[[str], None] = logger.info, compiled: bool | None = None) -> DecoderMode:
    """Set how `sam`'s decodes run from now on (None: as before) -> the mode in effect.
    A SAM 2 keeps its own decoder as it is: EAGER."""
    check_decoder_precision(precision)
    if not isinstance(sam, Sam):
        return EAGER
    settings = _SETTINGS.setdefault(sam, _Settings())
    before = settings.asked
    settings.asked = DecoderMode(before.graphs if graphs is None else graphs,
                                 before.precision if precision is None else precision,
                                 before.compiled if compiled is None else compiled)
    key = (settings.asked.graphs, settings.asked.compiled)
    if any(key) and key not in settings.traced:
        settings.traced[key] = TracedDecoder(next(sam.parameters()).device.type, *key, log=log)
    return decoder_mode(sam)


def decoder_mode(sam: torch.nn.Module) -> DecoderMode:
    """How `sam`'s decodes run now: graphs / compiled only where asked for and not failed."""
    settings = _SETTINGS.get(sam)
    if settings is None:
        return EAGER
    traced = settings.current() is not None
    asked = settings.asked
    return DecoderMode(traced and asked.graphs, asked.precision, traced and asked.compiled)


@contextlib.contextmanager
def decoder_settings(sam: torch.nn.Module, graphs: bool | None = None, precision: str | None = None,
                     compiled: bool | None = None) -> Iterator[DecoderMode]:
    """`configure_decoder` within the block, the settings before it after it."""
    before = _SETTINGS.get(sam)
    saved = before.asked if before is not None else EAGER
    try:
        yield configure_decoder(sam, graphs, precision, compiled=compiled)
    finally:
        if sam in _SETTINGS:
            _SETTINGS[sam].asked = saved


def decode_prompts(sam: torch.nn.Module, features: Tensor, coords: Tensor, labels: Tensor, boxes: Tensor | None,
                   mask_input: Tensor | None, multimask: bool, attention_bias: Tensor | None,
                   target_embedding: Tensor | None) -> tuple[Tensor, Tensor]:
    """`decode_eager` as `configure_decoder` set it for `sam` -> fp32 logits and scores."""
    settings = _SETTINGS.get(sam)
    args = (features, coords, labels, boxes, mask_input, multimask, attention_bias, target_embedding)
    traced = settings.current() if settings is not None else None
    if settings is None or (settings.asked.precision == "fp32" and traced is None):
        return decode_eager(sam, *args)
    dtype = DECODER_DTYPES[settings.asked.precision]
    with contextlib.nullcontext() if dtype is None else torch.autocast(features.device.type, dtype=dtype):
        low_res, scores = traced(sam, *args) if traced is not None else decode_eager(sam, *args)
    return low_res.float(), scores.float()
