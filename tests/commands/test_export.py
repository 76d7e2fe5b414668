"""`persam export` (COCO, overlays, subjects) on a `persam segment --max-instances 2` job,
and the refusals of bad segment/export input before any work.

The job runs over the shared sample lake (conftest.py) with `--runner local`: the product's
own stages in this process; the Ray wiring is proven by test_segment.py.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cli_tools import LOCAL, MODEL, assert_one_error_line, fit_cli, run_cli
from jobs.exports.names import safe_file_name
from jobs.storage.images import decode_image
from persam_core.masks import decode_rle


@pytest.mark.parametrize("flags, phrase", [
    (["--min-similarity", "-0.1"], "--min-similarity"),
    (["--min-similarity", "1.5"], "--min-similarity"),
    (["--max-instances", "0"], "--max-instances"),
    (["--max-instances", "-2"], "--max-instances"),
])
def test_bad_presence_and_instance_flags_fail_before_work(flags, phrase, tmp_path):
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(tmp_path / "c.json"), "--input", str(tmp_path),
                      "--output", str(output), *flags])
    assert_one_error_line(result, phrase)
    assert not output.exists()


# ---------------------------------------------------------------------------- the job and its exports


@pytest.fixture(scope="module")
def job(sample_lake, tmp_path_factory):
    """cat and duck_toy over the lake's nine photos (a glob leaves its two broken files out)."""
    output = tmp_path_factory.mktemp("k-concepts") / "masks"
    result = run_cli(["segment", *MODEL, *LOCAL, "--concept", str(sample_lake.cat), "--concept", str(sample_lake.duck),
                      "--input", str(sample_lake.images / "*" / "*.jpg"), "--output", str(output), "--max-instances", "2"])
    assert result.rc == 0, result.err[-3000:]
    rows = pq.read_table(output).to_pylist()
    return SimpleNamespace(images=sample_lake.images, cat=sample_lake.cat, duck=sample_lake.duck, output=output,
                           result=result, rows=rows, urls=sample_lake.good_urls)


def usable(rows):
    return [r for r in rows if r["error"] is None and r["present"] and r["area"] > 0]


@pytest.mark.slow
def test_job_rows_cover_images_times_concepts_with_consistent_instances(job):
    rows = job.rows
    assert len(job.urls) == 9
    assert len(rows) >= len(job.urls) * 2
    keys = [(r["image_uri"], r["concept"], r["instance"]) for r in rows]
    assert len(keys) == len(set(keys))
    groups: dict = {}
    for row in rows:
        assert row["error"] is None and row["present"] is True
        groups.setdefault((row["image_uri"], row["concept"]), []).append(row)
    assert set(groups) == {(u, c) for u in job.urls for c in ("cat", "duck_toy")}
    for group in groups.values():
        assert sorted(r["instance"] for r in group) == list(range(len(group))) and len(group) <= 2
        masks = [decode_rle(r["mask_rle"]) for r in sorted(group, key=lambda r: r["instance"])]
        if len(masks) == 2:
            assert np.logical_and(*masks).sum() <= 0.5 * masks[1].sum()
    assert f"{len(rows)} rows" in job.result.out.strip().splitlines()[-1]


@pytest.mark.slow
def test_export_coco_loads_and_evaluates(job, tmp_path):
    path = tmp_path / "coco" / "masks.json"
    result = run_cli(["export", "coco", "--masks", str(job.output), "--output", str(path)])
    assert result.rc == 0, result.err
    document = json.loads(path.read_text())
    gt = COCO(str(path))
    good = usable(job.rows)
    assert len(gt.getAnnIds()) == len(good) > 0
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == {"cat", "duck_toy"}
    # file names relative to the images' common folder, as CVAT and FiftyOne match them
    assert {i["file_name"] for i in gt.loadImgs(gt.getImgIds())} == {str(Path(u).relative_to(job.images)) for u in job.urls}
    assert document["info"]["image_root"] == str(job.images)
    for ann in document["annotations"]:
        image = gt.loadImgs(ann["image_id"])[0]
        assert gt.annToMask(ann).shape == (image["height"], image["width"])
        assert int(gt.annToMask(ann).sum()) == ann["area"]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(document["annotations"])), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # the masks scored against themselves


@pytest.mark.slow
def test_export_overlays_writes_a_gallery_of_thumbnails_and_full_size_overlays(job, tmp_path):
    out = tmp_path / "overlays"
    result = run_cli(["export", "overlays", "--masks", str(job.output), "--output", str(out)])
    assert result.rc == 0, result.err
    full, thumbs = sorted((out / "full").glob("*.jpg")), sorted((out / "thumbs").glob("*.jpg"))
    good = usable(job.rows)
    assert len(full) == len(thumbs) == len(good)  # every row of this job is present
    index = (out / "index.html").read_text()
    assert all(f'href="full/{p.name}"' in index and f'src="thumbs/{p.name}"' in index for p in full)
    for row in good[:3]:
        name = f"{safe_file_name(row['image_uri'], row['concept'], str(row['instance']))}.jpg"
        with Image.open(out / "full" / name) as picture:
            assert picture.size == (row["width"], row["height"])
        with Image.open(out / "thumbs" / name) as picture:
            assert max(picture.size) == min(512, max(row["width"], row["height"]))


@pytest.mark.slow
def test_export_subjects_rgba_and_white_jpeg(job, tmp_path):
    out = tmp_path / "subjects"
    result = run_cli(["export", "subjects", "--masks", str(job.output), "--output", str(out)])
    assert result.rc == 0, result.err
    good = usable(job.rows)
    assert len(list(out.rglob("*.png"))) == len(list(out.rglob("*.jpg"))) == len(good)
    checked_outside, images = 0, {}
    for row in good:
        stem = safe_file_name(row["image_uri"], row["concept"], str(row["instance"]))
        folder = out / safe_file_name(row["concept"])
        x, y, w, h = row["bbox"]
        mask = decode_rle(row["mask_rle"])[y : y + h, x : x + w]
        if row["image_uri"] not in images:
            images[row["image_uri"]] = decode_image(Path(row["image_uri"]).read_bytes(), "x")
        image = images[row["image_uri"]][y : y + h, x : x + w]
        with Image.open(folder / f"{stem}.png") as png:
            assert png.mode == "RGBA" and png.size == (w, h)
            rgba = np.asarray(png)
        assert np.array_equal(rgba[..., 3] > 0, mask)
        assert np.all(rgba[..., 3][~mask] == 0) and np.all(rgba[..., 3][mask] == 255)
        assert np.array_equal(rgba[..., :3][mask], image[mask])
        with Image.open(folder / f"{stem}.jpg") as jpg:
            assert jpg.format == "JPEG" and jpg.mode == "RGB" and jpg.size == (w, h)
            white = np.asarray(jpg).astype(np.int32)
        if (~mask).sum() > 1000:
            assert np.median(white[~mask]) >= 250
            checked_outside += 1
    assert checked_outside > 0


# ---------------------------------------------------------------------------- bad input


def test_duplicate_concept_names_fail_before_work(sample_lake, perseg_sample, tmp_path):
    impostor = tmp_path / "also-cat.json"
    fit_cli(perseg_sample, [("duck_toy", "01")], impostor, name="cat")
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(sample_lake.cat), "--concept", str(impostor),
                      "--input", str(sample_lake.images), "--output", str(output)])
    assert_one_error_line(result, "unique")
    assert not output.exists()


def test_concept_from_other_weights_fails_before_work(sample_lake, perseg_sample, tmp_path):
    other = tmp_path / "other.json"
    fit_cli(perseg_sample, [("cat", "00")], other, name="cat1", checkpoint="random:1")
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(sample_lake.duck), "--concept", str(other),
                      "--input", str(sample_lake.images), "--output", str(output)])
    assert_one_error_line(result, "cat1")
    assert not output.exists()


def test_a_concept_directory_gives_every_concept_in_it(sample_lake, tmp_path):
    from jobs.storage.concept_files import read_concepts

    folder = tmp_path / "concepts"
    folder.mkdir()
    shutil.copyfile(sample_lake.cat, folder / "cat.json")
    shutil.copyfile(sample_lake.duck, folder / "duck.json")
    (folder / "notes.txt").write_text("not a concept")
    assert [c.name for c in read_concepts([str(folder)], {})] == ["cat", "duck_toy"]
    with pytest.raises(ValueError, match="unique"):
        read_concepts([str(folder), str(sample_lake.cat)], {})


def test_export_of_a_parquet_lacking_columns_fails(tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    pq.write_table(pa.table({"image_uri": ["a.jpg"], "concept": ["cat"]}), masks / "part-0.parquet")
    for kind in ("coco", "overlays", "subjects"):
        out = tmp_path / f"out-{kind}"
        result = run_cli(["export", kind, "--masks", str(masks), "--output", str(out / "x.json")])
        assert_one_error_line(result, "mask_rle")
        assert not out.exists()


def test_export_of_a_missing_masks_url_fails(tmp_path):
    result = run_cli(["export", "coco", "--masks", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x.json")])
    assert_one_error_line(result)
