"""The array bundle between the job's stages: every array comes back as it went, the model
actor's pixels are views of the received bytes (no copy), the finish stage's a writable copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.pipeline.payload import (Chunk, ChunkItem, ChunkResults, bundle, pack_chunk, pack_results, unbundle,
                                   unpack_chunk, unpack_results)
from persam_core.modeling.preprocess import array_to_device


ARRAYS = {
    "pixels_0": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
    "empty": np.zeros((0, 2), np.int64),
    "flags": np.array([True, False, True]),
    "half": np.linspace(0, 1, 6, dtype=np.float16).reshape(2, 3),
    "strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # not contiguous
    "last_empty": np.zeros(0, np.uint8),
}


@pytest.mark.parametrize("copy", [True, False])
def test_every_array_comes_back_as_it_went(copy):
    header, arrays = unbundle(bundle(ARRAYS, {"failures": {"1": "x"}}), copy=copy)
    assert header == {"failures": {"1": "x"}} and list(arrays) == list(ARRAYS)
    for name, array in ARRAYS.items():
        assert arrays[name].dtype == array.dtype and arrays[name].shape == array.shape, name
        assert np.array_equal(arrays[name], array), name
        assert arrays[name].flags.writeable == copy, name


def test_the_actor_reads_pixels_without_a_copy_and_the_device_gets_its_own():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    chunk = Chunk(2, 1, [ChunkItem("a.jpg", source="pixels", original_size=(4, 5), input_size=(4, 5))], pixels={0: pixels})
    meta, data = pack_chunk(chunk)
    received = unpack_chunk(meta, data).pixels[0]
    assert np.array_equal(received, pixels) and not received.flags.writeable
    assert data.dtype == np.uint8 and np.shares_memory(received, data)  # a view of what arrived
    on_device = array_to_device(received, torch.device("cpu"))
    on_device += 1  # the device copy is writable and the received bytes stay as they were
    assert np.array_equal(received, pixels)


def test_results_unpack_as_writable_arrays():
    results = ChunkResults({3: "decode failed: x"}, [0, 1], similarity=np.ones((2, 2), np.float32),
                           point=np.zeros((2, 2, 2), np.int32))
    back = unpack_results(pack_results(results))
    assert back.failures == {3: "decode failed: x"} and back.encoded == [0, 1]
    back.similarity[0, 0] = 5  # the finish stage owns its copy
    assert back.point.shape == (2, 2, 2)
