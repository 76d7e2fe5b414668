"""`persam export hf-dataset`: `datasets.load_dataset("parquet", ...)` gives image URIs and
masks that decode, the card describes every column; the layout itself checked with pyarrow."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from export_data import ok, run_cli, small_lake
from jobs.exports.hf_dataset import COLUMNS
from persam_core.masks import decode_rle


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    lake = small_lake(root)
    out = root / "hf"
    line = ok(run_cli(["export", "hf-dataset", "--masks", str(lake.masks), "--output", str(out)])).splitlines()[-1]
    return lake, out, line


def test_layout_card_and_features_metadata(exported):
    lake, out, line = exported
    files = sorted((out / "data").glob("train-*.parquet"))
    assert line.startswith(f"6 rows in {len(files)} Parquet files")  # error rows are left out
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"][0] == {"split": "train", "path": "data/*.parquet"}
    assert all(f"| `{column}` |" in card for column in COLUMNS)
    for path in files:
        schema = pq.read_schema(path)
        assert schema.names == list(COLUMNS)
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
        assert features["mask"] == {"_type": "Image"} and set(features) == set(COLUMNS)


def test_rows_carry_uris_names_and_png_masks(exported):
    from io import BytesIO

    from PIL import Image

    lake, out, _ = exported
    rows = pq.read_table(out / "data").to_pylist()
    assert len(rows) == 6
    for row in rows:
        name = row["file_name"]
        assert row["image_uri"] == str(lake.photos / name)
        expected = lake.mask_of[(name, row["concept"])]
        if expected is None:
            assert row["mask"] is None and row["present"] is False
            continue
        with Image.open(BytesIO(row["mask"]["bytes"])) as png:
            assert png.format == "PNG" and png.mode == "L"
            assert np.array_equal(np.asarray(png) == 255, expected) and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(decode_rle(row["mask_rle"]), expected)


def test_load_dataset_gives_image_uris_and_decodable_masks(exported, tmp_path):
    datasets = pytest.importorskip("datasets")
    lake, out, _ = exported
    loaded = datasets.load_dataset("parquet", data_files=str(out / "data" / "*.parquet"), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 6 and set(loaded.column_names) == set(COLUMNS)
    assert isinstance(loaded.features["mask"], datasets.Image)
    for row in loaded:
        expected = lake.mask_of[(row["file_name"], row["concept"])]
        assert row["image_uri"] == str(lake.photos / row["file_name"])
        if expected is None:
            assert row["mask"] is None
        else:  # a PIL image, 255 on the object
            assert row["mask"].size == (row["width"], row["height"])
            assert np.array_equal(np.asarray(row["mask"]) == 255, expected)
    # the card's `configs` make the folder itself loadable
    folder = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache2"))
    assert folder.num_rows == 6
