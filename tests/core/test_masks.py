"""COCO RLE, bbox and area of binary masks (the mask output's `mask_rle`, `bbox`, `area`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from persam_core.masks import area_px, bbox_xywh, decode_rle, encode_rle

# pycocotools' decode trips a numpy 2 deprecation inside pycocotools itself; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPES = [(1, 1), (1, 7), (7, 1), (17, 33), (64, 64), (101, 57), (480, 641)]


def random_mask(shape: tuple[int, int], seed: int, density: float = 0.3) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


def blob_mask(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A filled rectangle: long runs, like a real object mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    y0, x0 = rng.integers(0, shape[0]), rng.integers(0, shape[1])
    y1, x1 = rng.integers(y0, shape[0]) + 1, rng.integers(x0, shape[1]) + 1
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["random", "blob", "empty", "full"])
def test_rle_round_trip(shape: tuple[int, int], kind: str) -> None:
    mask = {
        "random": lambda: random_mask(shape, seed=shape[0] * 1000 + shape[1]),
        "blob": lambda: blob_mask(shape, seed=shape[0] + shape[1]),
        "empty": lambda: np.zeros(shape, dtype=bool),
        "full": lambda: np.ones(shape, dtype=bool),
    }[kind]()
    rle = encode_rle(mask)
    assert rle["size"] == [shape[0], shape[1]]
    assert isinstance(rle["counts"], str)
    json.dumps(rle)  # the Parquet column stores it as plain JSON-able data

    decoded = decode_rle(rle)
    assert decoded.dtype == bool and decoded.shape == shape
    assert np.array_equal(decoded, mask)
    # Any COCO consumer decodes it: pycocotools itself, from bytes counts.
    theirs = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
    assert np.array_equal(theirs.astype(bool), mask)
    assert int(coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")})) == area_px(mask)


def test_rle_matches_pycocotools_encoding() -> None:
    """Same counts string as pycocotools' own encoder, whatever the input array's layout."""
    mask = random_mask((37, 53), seed=7)
    expected = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert encode_rle(mask)["counts"] == expected["counts"].decode("ascii")
    assert encode_rle(np.ascontiguousarray(mask))["counts"] == encode_rle(mask.T.copy().T)["counts"]


def test_decode_accepts_bytes_counts() -> None:
    mask = blob_mask((40, 30), seed=3)
    rle = encode_rle(mask)
    assert np.array_equal(decode_rle({"size": rle["size"], "counts": rle["counts"].encode("ascii")}), mask)


@pytest.mark.parametrize("shape", SHAPES)
def test_bbox_and_area_agree_with_pycocotools(shape: tuple[int, int]) -> None:
    for mask in (random_mask(shape, seed=1, density=0.05), blob_mask(shape, seed=2)):
        if not mask.any():
            continue
        rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert bbox_xywh(mask) == [int(v) for v in coco_mask.toBbox(rle)]
        assert area_px(mask) == int(coco_mask.area(rle)) == int(mask.sum())


def test_bbox_is_xywh_of_the_tight_box() -> None:
    mask = np.zeros((10, 20), dtype=bool)
    mask[2:5, 3:11] = True  # rows 2..4, columns 3..10
    assert bbox_xywh(mask) == [3, 2, 8, 3]
    assert area_px(mask) == 24
    single = np.zeros((5, 5), dtype=bool)
    single[4, 0] = True
    assert bbox_xywh(single) == [0, 4, 1, 1] and area_px(single) == 1


def test_empty_mask_has_zero_bbox_and_area() -> None:
    empty = np.zeros((12, 9), dtype=bool)
    assert bbox_xywh(empty) == [0, 0, 0, 0]
    assert area_px(empty) == 0


def test_full_mask_bbox_covers_the_image() -> None:
    full = np.ones((12, 9), dtype=bool)
    assert bbox_xywh(full) == [0, 0, 9, 12]
    assert area_px(full) == 108
