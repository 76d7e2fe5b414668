"""`persam export coco`: file names under an image root, --images, what CVAT / FiftyOne /
pycocotools need, and streaming (one shard at a time, no full read)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from export_data import ok, run_cli, small_lake, write_parts
from jobs.exports import rows as rows_module


@pytest.fixture()
def lake(tmp_path):
    return small_lake(tmp_path)


def export(lake, out, *flags):
    return run_cli(["export", "coco", "--masks", str(lake.masks), "--output", str(out), *flags])


def test_coco_names_images_relative_to_their_common_folder_and_loads_in_pycocotools(lake, tmp_path):
    out = tmp_path / "labels" / "coco.json"
    line = ok(export(lake, out)).strip().splitlines()[-1]
    assert line.startswith("5 annotations on 3 images") and str(lake.photos) in line
    document = json.loads(out.read_text())
    coco = COCO(str(out))
    names = {image["file_name"] for image in coco.loadImgs(coco.getImgIds())}
    assert names == {"garden/cat.png", "garden/dog.png", "house/both.jpg"}  # the error-only image has no size
    assert document["info"]["image_root"] == str(lake.photos)
    assert all((lake.photos / name).is_file() for name in names)  # root + file_name: what FiftyOne/CVAT open
    by_name = {image["file_name"]: image for image in coco.loadImgs(coco.getImgIds())}
    for (name, concept), mask in lake.mask_of.items():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[by_name[name]["id"]], catIds=coco.getCatIds(catNms=[concept])))
        assert len(annotations) == (mask is not None)  # absent concepts have no annotation
        if mask is not None:
            assert np.array_equal(coco.annToMask(annotations[0]).astype(bool), mask)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(copy.deepcopy(document["annotations"])), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_has_every_field_cvat_coco_1_0_reads(lake, tmp_path):
    out = tmp_path / "coco.json"
    ok(export(lake, out))
    document = json.loads(out.read_text())
    assert {"info", "licenses", "categories", "images", "annotations"} <= set(document)
    assert [(c["id"], c["name"]) for c in document["categories"]] == [(1, "cat"), (2, "dog")]
    for image in document["images"]:
        assert {"id", "width", "height", "file_name"} <= set(image)
    for annotation in document["annotations"]:
        assert {"id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd"} <= set(annotation)
        assert set(annotation["segmentation"]) == {"size", "counts"} and isinstance(annotation["segmentation"]["counts"], str)
        assert annotation["iscrowd"] == 0  # COCOeval ignores crowd regions; RLE is read either way
    assert len({a["id"] for a in document["annotations"]}) == len(document["annotations"])
    assert len({i["id"] for i in document["images"]}) == len(document["images"])


def test_moved_images_are_named_under_images_and_an_explicit_root_is_honoured(lake, tmp_path):
    moved = tmp_path / "elsewhere" / "pictures"
    shutil.copytree(lake.photos, moved)
    shutil.rmtree(lake.photos)
    out = tmp_path / "moved.json"
    ok(export(lake, out, "--images", str(moved)))
    document = json.loads(out.read_text())
    assert document["info"]["image_root"] == str(moved)
    assert all((moved / image["file_name"]).is_file() for image in document["images"])
    # an explicit --image-root above the images: names keep the folders below it
    out = tmp_path / "rooted.json"
    ok(export(lake, out, "--images", str(moved), "--image-root", str(moved.parent)))
    assert {i["file_name"] for i in json.loads(out.read_text())["images"]} == {
        "pictures/garden/cat.png", "pictures/garden/dog.png", "pictures/house/both.jpg"}


def test_images_outside_an_explicit_root_keep_their_uri_with_one_line_each(lake, tmp_path):
    out = tmp_path / "coco.json"
    result = export(lake, out, "--image-root", str(lake.photos / "garden"))
    lines = [line for line in ok(result).splitlines() if line.startswith("outside --image-root")]
    assert lines == [f"outside --image-root: {lake.photos / 'house' / 'both.jpg'}: file_name is its full URI"]
    names = {i["file_name"] for i in json.loads(out.read_text())["images"]}
    assert names == {"cat.png", "dog.png", str(lake.photos / "house" / "both.jpg")}


def test_coco_streams_shard_by_shard(lake, tmp_path, monkeypatch):
    """Many shards: every read is one part file's rows, never the whole dataset."""
    rows = [dict(row, image_uri=f"{row['image_uri']}?copy={i}") for i in range(6) for row in lake.rows]
    for path in lake.masks.glob("*.parquet"):
        path.unlink()
    parts = write_parts(lake.masks, rows, num_shards=8)
    reads = []
    original = rows_module.MaskDataset._rows

    def counting(table, piece, columns):
        reads.append(table.num_rows)
        return original(table, piece, columns)

    monkeypatch.setattr(rows_module.MaskDataset, "_rows", staticmethod(counting))
    out = tmp_path / "coco.json"
    ok(export(lake, out))
    per_file = [pq.read_metadata(p).num_rows for p in parts]
    assert sorted(reads) == sorted(per_file * 2)  # two passes (names, then rows), one read per part file each
    assert len(parts) >= 4 and max(reads) < len(rows)  # (URL hashing: a shard of 8 may stay empty)
    assert len(json.loads(out.read_text())["annotations"]) == 6 * 5


def test_a_failed_export_publishes_nothing(lake, tmp_path, monkeypatch):
    from jobs.exports import coco

    def explode(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(coco, "_annotation", explode)
    out = tmp_path / "new" / "folders" / "coco.json"
    result = export(lake, out)
    assert result.rc == 1 and "disk gone" in result.err
    assert not (tmp_path / "new").exists()  # no partial file, no temp file, no folders left behind
