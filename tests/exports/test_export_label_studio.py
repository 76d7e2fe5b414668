"""`persam export label-studio`: brush RLE byte-equal to label-studio-sdk's encoder, tasks
whose regions decode back to the masks, the labelling config, no credentials in tasks.

The SDK is not a dependency (it pins an older numpy); the golden digests below are of the
bytes `label_studio_sdk.converter.brush.mask2rle` (label-studio-sdk 2.1.2) wrote for these
masks. Where the SDK is installed, the tests also compare and decode with it directly.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from export_data import ellipse, ok, run_cli, small_lake
from jobs.exports.brush import mask_to_brush_rle

SECRET = "s3cr3t-Pa55word"
GOLDEN_SDK_DIGESTS = {  # sha256(bytes(mask2rle(mask * 255)))[:32]
    "empty 5x7": "2e7ddee9c0e29183bad0dad0c0802909",
    "full 3x3": "1f83affebcb183855e4904ddfe6abbdb",
    "noise 40x30": "932fa8172af7b880115687dc4ea85095",
    "sparse 64x48": "ead3d85121ac69d70102b169c233744d",
    "ellipse 120x90": "02ad03fb1a874897e0d0cf9c9274d029",
    "one pixel 600x700": "ba494fccd1f944a2602ef513a3ae8103",
    "run of 65540 values": "ebce711b7927d0a68374bbd62cd9fa54",
    "run of 131072 values": "c6960fd2673145efb1657827c5951457",
}


def golden_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    one = np.zeros((600, 700), bool)
    one[100, 5] = True
    return {
        "empty 5x7": np.zeros((5, 7), bool),
        "full 3x3": np.ones((3, 3), bool),
        "noise 40x30": rng.random((40, 30)) > 0.5,
        "sparse 64x48": rng.random((64, 48)) > 0.97,
        "ellipse 120x90": ellipse(120, 90, 50, 40, 30, 20),
        "one pixel 600x700": one,
        "run of 65540 values": np.ones((1, 16385), bool),  # longer than one token: split at 2^16
        "run of 131072 values": np.ones((1, 32768), bool),
    }


def sdk_brush():
    try:
        from label_studio_sdk.converter import brush
    except ImportError:
        return None
    return brush


def decode_brush(rle: list[int], height: int, width: int) -> np.ndarray:
    """The SDK's decoder where installed, else the same rle-pack decoding written out -> [H, W] alpha."""
    sdk = sdk_brush()
    if sdk is not None:
        return sdk.decode_rle(rle).reshape(height, width, 4)[:, :, 3]
    bits = np.unpackbits(np.array(rle, dtype=np.uint8))
    position = 0

    def read(count: int) -> int:
        nonlocal position
        value = int("".join(map(str, bits[position : position + count])) or "0", 2)
        position += count
        return value

    total, word = read(32), read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out, i = np.zeros(total, np.uint8), 0
    while i < total:
        series = read(1)
        j = i + 1 + read(sizes[read(2)])
        if series:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out.reshape(height, width, 4)[:, :, 3]


def test_brush_rle_is_byte_equal_to_the_label_studio_sdk():
    for name, mask in golden_masks().items():
        encoded = mask_to_brush_rle(mask)
        assert hashlib.sha256(bytes(encoded)).hexdigest()[:32] == GOLDEN_SDK_DIGESTS[name], name
        assert np.array_equal(decode_brush(encoded, *mask.shape), mask.astype(np.uint8) * 255), name


def test_brush_rle_equals_the_installed_sdk_on_random_masks():
    sdk = sdk_brush()
    if sdk is None:
        pytest.skip("optional SDK label-studio-sdk not installed (the golden digests above still compare with it)")
    rng = np.random.default_rng(3)
    for _ in range(20):
        height, width = rng.integers(1, 90, size=2)
        mask = ellipse(width, height, *rng.uniform(0, 60, size=2), *rng.uniform(1, 40, size=2)) ^ (rng.random((height, width)) > 0.95)
        assert mask_to_brush_rle(mask) == sdk.mask2rle(mask.astype(np.uint8) * 255)


def test_tasks_hold_one_task_per_image_with_regions_that_decode_to_the_masks(tmp_path):
    lake = small_lake(tmp_path)
    out = tmp_path / "ls" / "tasks.json"
    line = ok(run_cli(["export", "label-studio", "--masks", str(lake.masks), "--output", str(out)])).splitlines()[-1]
    assert line.startswith("3 tasks with 5 brush regions")
    tasks = json.loads(out.read_text())
    assert sorted(t["data"]["image"] for t in tasks) == sorted(str(lake.photos / n) for n in lake.data)
    for task in tasks:
        name = str(task["data"]["image"])[len(str(lake.photos)) + 1:]
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "persam tiny-0123456789ab"
        regions = {r["value"]["brushlabels"][0]: r for r in prediction["result"]}
        expected = {concept for (image, concept), mask in lake.mask_of.items() if image == name and mask is not None}
        assert set(regions) == expected  # absent concepts have no region; the task is still there
        for concept, region in regions.items():
            assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
            assert region["value"]["format"] == "rle"
            height, width = region["original_height"], region["original_width"]
            decoded = decode_brush(region["value"]["rle"], height, width)
            assert np.array_equal(decoded, lake.mask_of[(name, concept)].astype(np.uint8) * 255)
    config = (tmp_path / "ls" / "tasks.label_config.xml").read_text()
    assert '<BrushLabels name="tag" toName="image">' in config and '<Label value="cat"/>' in config


def test_the_sdk_converter_reads_a_task_back(tmp_path):
    sdk = sdk_brush()
    if sdk is None:
        pytest.skip("optional SDK label-studio-sdk not installed")
    lake = small_lake(tmp_path)
    out = tmp_path / "tasks.json"
    ok(run_cli(["export", "label-studio", "--masks", str(lake.masks), "--output", str(out)]))
    for task in json.loads(out.read_text()):
        results = task["predictions"][0]["result"]
        # the SDK's converter flattens each region as {**value, type, original_width, original_height}
        flat = [{**r["value"], "type": r["type"], "original_width": r["original_width"],
                 "original_height": r["original_height"]} for r in results]
        layers = sdk.decode_from_annotation("tag", flat)
        name = task["data"]["image"][len(str(lake.photos)) + 1:]
        for region in results:
            concept = region["value"]["brushlabels"][0]
            assert np.array_equal(layers[f"tag-{concept}-0"] > 0, lake.mask_of[(name, concept)])


def test_tasks_use_moved_images_without_credentials_and_escape_concept_names(tmp_path):
    lake = small_lake(tmp_path)
    for path in lake.masks.glob("*.parquet"):  # a concept name that is markup
        table = pq.read_table(path)
        concepts = ['a "quoted" <b>&</b>' if c == "dog" else c for c in table.column("concept").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("concept"), "concept", [concepts]), path)
    out = tmp_path / "tasks.json"
    images = f"https://reviewer:{SECRET}@cdn.example.com/photos"
    result = run_cli(["export", "label-studio", "--masks", str(lake.masks), "--output", str(out), "--images", images])
    ok(result)
    text = out.read_text()
    config = (tmp_path / "tasks.label_config.xml").read_text()
    for shown in (text, config, result.out, result.err):
        assert SECRET not in shown and "reviewer" not in shown
    assert {t["data"]["image"] for t in json.loads(text)} == {
        "https://cdn.example.com/photos/garden/cat.png", "https://cdn.example.com/photos/garden/dog.png",
        "https://cdn.example.com/photos/house/both.jpg"}
    assert '<Label value="a &quot;quoted&quot; &lt;b&gt;&amp;&lt;/b&gt;"/>' in config
