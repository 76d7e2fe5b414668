"""The mask decoder through `decoder_speed`: the traced decode gives the eager results, pads
pairs to few shapes, traces each shape once, and falls back to eager when tracing fails; the
bf16 decoder stays close to fp32 and leaves fp32 logits; SAM 2 keeps its own decoder.

On CPU the trace runs through aot_eager (graphs exist on CUDA only): what these tests prove is
that the whole decode is one graph (fullgraph) computing what the eager decoder computes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from persam_core.speed.acceleration import EncoderSpeed, prepare_encoder, resolve_speed
from persam_core.batch import EncodedBatch
from persam_core.cascade import segment_batch
from persam_core.speed.decoder_speed import (MIN_BUCKET, configure_decoder, decode_eager, decode_prompts, decoder_mode,
                                       decoder_settings, pair_bucket)
from persam_core.evaluation.metrics import iou
from persam_core.speed.options import SpeedFlags
from tests.core.test_cascade import concepts, encoded  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def graphed_sam(tiny_sam):
    """A copy of the tiny SAM (the registry is per model: the shared fixture stays eager)."""
    return copy.deepcopy(tiny_sam)


def assert_same_rows(graphed, eager) -> None:
    assert len(graphed) == len(eager)
    for row in range(len(eager)):
        assert (graphed.image_index[row], graphed.concept_index[row], graphed.instance[row]) == \
            (eager.image_index[row], eager.concept_index[row], eager.instance[row])
        assert tuple(graphed.point[row]) == tuple(eager.point[row])
        assert graphed.present[row] == eager.present[row]
        assert iou(graphed.mask(row), eager.mask(row)) >= 0.999
        np.testing.assert_allclose(graphed.score[row], eager.score[row], atol=1e-4)


def test_pair_buckets_are_few_and_fit_full_batches():
    assert [pair_bucket(n) for n in (1, 8, 9, 13, 16, 17, 25, 33, 49, 100, 129)] == [8, 8, 12, 16, 16, 24, 32, 48, 64,
                                                                                   128, 192]
    assert all(pair_bucket(16 * k) == 16 * k for k in (1, 2, 3, 4, 6, 8))  # B = 16 images x K concepts
    assert len({pair_bucket(n) for n in range(1, 257)}) == 11
    assert pair_bucket(MIN_BUCKET) == MIN_BUCKET


@pytest.mark.parametrize("images,concept_slice,options", [
    (2, slice(0, 4), {}),  # mixed sizes, K = 4 (two of each method): 8 pairs
    (2, slice(0, 2), {"min_similarity": 0.3}),  # a subset of pairs reaches the decoder, padded to MIN_BUCKET
], ids=["all-pairs", "min-similarity"])
def test_traced_cascade_equals_eager(graphed_sam, encoded, concepts, images, concept_slice, options):  # noqa: F811
    batch, chosen = EncodedBatch.of(encoded[:images]), concepts[concept_slice]
    eager = segment_batch(graphed_sam, batch, chosen, **options)
    with decoder_settings(graphed_sam, graphs=True) as mode:
        assert mode.graphs
        graphed = segment_batch(graphed_sam, batch, chosen, **options)
    assert not decoder_mode(graphed_sam).graphs  # as before the block
    assert_same_rows(graphed, eager)
    if "min_similarity" in options:
        assert 0 < sum(eager.present) < len(eager), "all or no pair present: the subset proves nothing"


def test_each_shape_is_traced_once(graphed_sam, encoded, concepts):  # noqa: F811
    batch = EncodedBatch.of(encoded[:1])
    with decoder_settings(graphed_sam, graphs=True):
        segment_batch(graphed_sam, batch, concepts[:1])
        traced = counters["stats"]["unique_graphs"]
        segment_batch(graphed_sam, batch, concepts[:1])
        segment_batch(graphed_sam, EncodedBatch.of(encoded[3:4]), concepts[2:3])  # same pass kinds, same bucket
        assert counters["stats"]["unique_graphs"] == traced


def test_padded_rows_do_not_change_the_decode(graphed_sam, encoded):  # noqa: F811
    """Three pairs decoded as eight (row 0 repeated) give the three pairs' eager results."""
    features = torch.stack([e.features for e in encoded[:3]])
    coords = torch.tensor([[[100.0, 200.0], [500.0, 40.0]]] * 3)
    labels = torch.tensor([[1, 0]] * 3, dtype=torch.int)
    bias = torch.rand(3, 1, 1, 4096, generator=torch.Generator().manual_seed(0))
    target = torch.randn(3, 1, 256, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        low, scores = decode_eager(graphed_sam, features, coords, labels, None, None, False, bias, target)
        with decoder_settings(graphed_sam, graphs=True):
            low_g, scores_g = decode_prompts(graphed_sam, features, coords, labels, None, None, False, bias, target)
    assert low_g.shape == low.shape and scores_g.shape == scores.shape
    torch.testing.assert_close(low_g, low, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores_g, scores, atol=1e-5, rtol=1e-5)


def test_the_compiled_decoder_equals_the_eager_one(tiny_sam, encoded):  # noqa: F811
    """--decoder-compile: the same decode through inductor (fused kernels), for a first pair
    count and for a second one (compiled once more, the count dynamic; nothing padded)."""
    sam = copy.deepcopy(tiny_sam)
    features = torch.stack([e.features for e in encoded[:3]])
    coords = torch.tensor([[[100.0, 200.0], [500.0, 40.0]]] * 3)
    labels = torch.tensor([[1, 0]] * 3, dtype=torch.int)
    mask_input = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), decoder_settings(sam, compiled=True) as mode:
        assert mode == (False, "fp32", True)
        for count in (3, 2):
            args = (features[:count], coords[:count], labels[:count], None, mask_input[:count], True, None, None)
            low, scores = decode_eager(sam, *args)
            low_c, scores_c = decode_prompts(sam, *args)
            assert decoder_mode(sam).compiled  # it compiled: no fallback
            assert low_c.shape == low.shape and scores_c.shape == scores.shape
            torch.testing.assert_close(low_c, low, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(scores_c, scores, atol=1e-5, rtol=1e-5)
    assert decoder_mode(sam) == (False, "fp32", False)  # as before the block


def test_a_failed_trace_falls_back_to_eager_with_one_line(tiny_sam, encoded, concepts):  # noqa: F811
    sam, lines = copy.deepcopy(tiny_sam), []
    assert configure_decoder(sam, graphs=True, log=lines.append) == (True, "fp32", False)
    from persam_core.speed import decoder_speed as module

    def broken(*args, **kwargs):
        raise RuntimeError("capture not permitted\nsecond line")

    module._SETTINGS[sam].traced[(True, False)].compiled = broken
    batch = EncodedBatch.of(encoded[:2])
    graphed = segment_batch(sam, batch, concepts[:2])
    assert len(lines) == 1 and "RuntimeError: capture not permitted" in lines[0] and "decoding eagerly" in lines[0]
    assert not decoder_mode(sam).graphs
    assert_same_rows(graphed, segment_batch(tiny_sam, batch, concepts[:2]))


def test_bf16_decoder_stays_close_and_returns_fp32(graphed_sam, encoded, concepts):  # noqa: F811
    batch = EncodedBatch.of(encoded[:2])
    eager = segment_batch(graphed_sam, batch, concepts[:2])
    with decoder_settings(graphed_sam, precision="bf16") as mode:
        assert mode.precision == "bf16"
        half = segment_batch(graphed_sam, batch, concepts[:2])
        features = torch.stack([e.features for e in encoded[:2]])
        low, scores = decode_prompts(graphed_sam, features, torch.tensor([[[10.0, 20.0]]] * 2),
                                     torch.ones(2, 1, dtype=torch.int), None, None, True, None, None)
    assert low.dtype == scores.dtype == torch.float32
    assert [tuple(p) for p in half.point] == [tuple(p) for p in eager.point]  # the prior stays fp32
    assert min(iou(half.mask(r), eager.mask(r)) for r in range(len(eager))) > 0.9
    with pytest.raises(ValueError, match="--decoder-precision fp16: choose fp32, bf16"):
        configure_decoder(graphed_sam, precision="fp16")


def test_speed_settings(tiny_sam, tiny_sam2):
    assert resolve_speed("cuda").decoder_graphs is False  # off until measured on a GPU
    assert resolve_speed("cuda").decoder_precision == "fp32"
    assert resolve_speed("cuda", SpeedFlags(decoder_graphs=True)).decoder_graphs is True
    assert resolve_speed("cpu", SpeedFlags(decoder_graphs=True, decoder_precision="bf16")).decoder_precision == "bf16"
    with pytest.raises(ValueError, match="--decoder-precision"):
        resolve_speed("cpu", SpeedFlags(decoder_precision="int8"))
    sam = copy.deepcopy(tiny_sam)
    speed = prepare_encoder(sam, EncoderSpeed(decoder_graphs=True, decoder_precision="bf16"), log=print)
    assert speed.decoder_graphs and speed.decoder_precision == "bf16" and decoder_mode(sam).graphs
    lines = []
    sam2 = copy.deepcopy(tiny_sam2)
    speed = prepare_encoder(sam2, EncoderSpeed(decoder_graphs=True, decoder_precision="bf16"), log=lines.append)
    assert (speed.decoder_graphs, speed.decoder_precision) == (False, "fp32")
    assert lines == ["note: --decoder-graphs, --decoder-compile and --decoder-precision apply to SAM "
                     "(segment_anything) only; SAM 2 decodes run as sam2 runs them"]
    assert not decoder_mode(sam2).graphs


def test_a_dropped_model_is_freed_with_its_graphs(tiny_sam, encoded):  # noqa: F811
    """bench drops its fast copy before the job's actor needs the device memory."""
    import gc
    import weakref

    sam = copy.deepcopy(tiny_sam)
    configure_decoder(sam, graphs=True)
    features = torch.stack([e.features for e in encoded[:1]])
    with torch.no_grad():
        decode_prompts(sam, features, torch.tensor([[[10.0, 20.0]]]), torch.ones(1, 1, dtype=torch.int), None, None,
                       True, None, None)
    alive = weakref.ref(sam)
    del sam
    gc.collect()
    assert alive() is None


def test_a_thread_torch_did_not_set_up_gets_graph_state():
    """torch < 2.14 set up cudagraph trees' thread-local state on the importing thread only (a
    bare assert elsewhere: graphs fell back to eager in Ray's call threads on torch 2.11)."""
    import threading

    from torch._inductor import cudagraph_trees as trees

    from persam_core.speed.decoder_speed import _give_thread_graph_state

    seen = {}

    def fresh_thread() -> None:
        seen["before"] = hasattr(trees.local, "tree_manager_containers")
        _give_thread_graph_state()
        _give_thread_graph_state()  # a second call keeps what the first set up
        seen["containers"] = trees.get_obj(trees.local, "tree_manager_containers")
        seen["lock"] = trees.get_obj(trees.local, "tree_manager_locks")[0]

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert seen["before"] is False and seen["containers"] == {} and seen["lock"] is not None


def test_padding_keeps_the_memory_layout():
    """Padded channels-last features keep channels-last strides (the trace guards on strides:
    a padded pass would otherwise be traced, recorded and held a second time)."""
    from persam_core.speed.decoder_speed import _pad_rows

    features = torch.randn(3, 6, 4, 5).contiguous(memory_format=torch.channels_last)
    padded = _pad_rows(features, 8)
    assert padded.shape == (8, 6, 4, 5) and padded.stride() == torch.empty(8, 6, 4, 5).contiguous(
        memory_format=torch.channels_last).stride()
    assert torch.equal(padded[:3], features) and torch.equal(padded[3:], features[:1].expand(5, 6, 4, 5))
    masks = torch.randn(3, 1, 4, 5)  # contiguous stays contiguous
    assert _pad_rows(masks, 8).stride() == torch.empty(8, 1, 4, 5).stride()
    assert _pad_rows(features, 3) is features


def test_a_decoding_thread_gets_the_recompile_limit(graphed_sam, encoded):  # noqa: F811
    """torch >= 2.13 keeps dynamo's config per thread: a limit raised where the model was
    configured is torch's 8 on the actor's cascade thread, whose decodes (3 pass kinds x the
    pair buckets of its chunks) then failed over to eager. The decoding thread raises its own."""
    import threading

    from persam_core.speed.decoder_speed import RECOMPILE_LIMIT

    seen = {}

    def cascade_thread() -> None:
        with torch.no_grad():
            features = encoded[0].features[None]
            decode_prompts(graphed_sam, features, torch.tensor([[[100.0, 200.0]]]), torch.tensor([[1]]), None, None,
                           True, None, None)
        seen["limit"] = torch._dynamo.config.recompile_limit
        seen["mode"] = decoder_mode(graphed_sam)

    with decoder_settings(graphed_sam, graphs=True):  # configured here, as in the actor's __init__
        thread = threading.Thread(target=cascade_thread)
        thread.start()
        thread.join()
    assert seen["limit"] >= RECOMPILE_LIMIT and seen["mode"].graphs


@pytest.mark.parametrize("guided", [False, True])
def test_several_pairs_decode_as_each_pair_alone(tiny_sam, guided):
    """Several pairs take the decoder's batched path (contiguous tokens, fused attention
    where there is no bias, one layer_norm in the upscaling); one pair runs SAM's own modules
    (bit for bit, the oracle tests): both give the same logits up to float rounding."""
    generator = torch.Generator().manual_seed(0)
    count, channels = 3, tiny_sam.prompt_encoder.embed_dim
    height, width = tiny_sam.prompt_encoder.image_embedding_size
    features = torch.randn(count, channels, height, width, generator=generator)
    coords = torch.randint(0, 1024, (count, 2, 2), generator=generator).float()
    labels = torch.tensor([[1, 0]] * count)
    mask_input = torch.randn(count, 1, 4 * height, 4 * width, generator=generator)
    bias = torch.rand(count, 1, 1, height * width, generator=generator) if guided else None
    embedding = torch.randn(count, 1, channels, generator=generator) if guided else None
    with torch.no_grad():
        together = decode_eager(tiny_sam, features, coords, labels, None, mask_input, True, bias, embedding)
        for row in range(count):
            pick = lambda t: None if t is None else t[row : row + 1]  # noqa: E731
            alone = decode_eager(tiny_sam, pick(features), pick(coords), pick(labels), None, pick(mask_input), True,
                                 pick(bias), pick(embedding))
            torch.testing.assert_close(together[0][row : row + 1], alone[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(together[1][row : row + 1], alone[1], rtol=1e-5, atol=1e-5)
