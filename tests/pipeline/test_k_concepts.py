"""Issue 5: K concepts in one encoder pass, presence, the job with its exports, bad input.

Unit level (no Ray): the model actor's device work (jobs.pipeline.compute.segment_chunk) and the
finish stage's rows (jobs.pipeline.finish.mask_rows) on a hand-built chunk with the tiny random
model. Job level: one module-scoped `persam segment` run (two concepts, --max-instances 2)
feeds the export tests. Several instances and several shots: test_instances_shots.py.
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

from feature_tools import MODEL, assert_one_error_line, fit_cli, iou, make_chunk, run_cli, segment_rows
from jobs.storage.images import decode_image
from jobs.overlays import safe_file_name
from persam_core.instances import segment_instances
from persam_core.masks import decode_rle
from persam_core.persam import prior_for, segment_persam
from persam_core.predictor import encode_images
from persam_core.preprocess import resize_longest_side


@pytest.fixture(scope="module")
def shard_images(perseg_sample) -> list[tuple]:
    """Each concept's 01 image, shrunk to 480 px (full-size postprocessing is the slow part):
    (url, content hash, resized image)."""
    items = []
    for name in ("cat", "duck_toy", "colorful_sneaker"):
        path = perseg_sample / "Images" / name / "01.jpg"
        with Image.open(path) as picture:
            picture.thumbnail((480, 480))
            pixels = np.asarray(picture.convert("RGB"))
        items.append((str(path), f"sha-{name}", resize_longest_side(pixels)))
    return items


@pytest.fixture
def encoder_calls(tiny_sam, monkeypatch) -> list[int]:
    """Batch size of every image-encoder forward call."""
    calls: list[int] = []
    original = tiny_sam.image_encoder.forward

    def counting(x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(tiny_sam.image_encoder, "forward", counting)
    return calls


@pytest.fixture
def decoder_calls(tiny_sam, monkeypatch) -> list[int]:
    """Prompt-encoder calls: every decode pass starts with one."""
    calls: list[int] = []
    original = tiny_sam.prompt_encoder.forward

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiny_sam.prompt_encoder, "forward", counting)
    return calls


# ---------------------------------------------------------------------------- K concepts, one encoder pass


def test_k_concepts_encode_each_image_once(tiny_sam, fingerprint, concepts, shard_images, encoder_calls):
    ks = [concepts[n] for n in ("cat", "duck_toy", "colorful_sneaker", "duck_f")]
    rows, results = segment_rows(tiny_sam, fingerprint, ks, make_chunk(shard_images))
    assert encoder_calls == [1] * len(shard_images)  # images, not images x K
    assert results.encoded == list(range(len(shard_images)))
    assert len(rows) == len(shard_images) * len(ks)
    keys = [(r["image_uri"], r["concept"]) for r in rows]
    assert keys == [(url, c.concept.name) for url, _, _ in shard_images for c in ks]  # image, then concept order
    assert all(r["error"] is None and r["instance"] == 0 and r["present"] is True for r in rows)
    assert {r["method"] for r in rows} == {"persam", "persam-f"}

    # Decoding K concepts from shared features gives each concept's own single-concept result.
    encoder_calls.clear()
    alone, _ = segment_rows(tiny_sam, fingerprint, [concepts["duck_toy"]], make_chunk(shard_images))
    assert encoder_calls == [1] * len(shard_images)
    shared = {r["image_uri"]: r for r in rows if r["concept"] == "duck_toy"}
    for row in alone:
        other = shared[row["image_uri"]]
        assert row["point"] == other["point"]
        assert row["similarity"] == pytest.approx(other["similarity"], abs=1e-6)
        assert iou(decode_rle(row["mask_rle"]), decode_rle(other["mask_rle"])) >= 0.98


def test_encoder_batches_cover_every_image_once(tiny_sam, fingerprint, concepts, shard_images, encoder_calls):
    rows, _ = segment_rows(tiny_sam, fingerprint, [concepts["cat"], concepts["duck_toy"]], make_chunk(shard_images), 2)
    assert encoder_calls == [2, 1]
    assert len(rows) == len(shard_images) * 2


def test_a_failing_batch_is_retried_image_by_image(tiny_sam, fingerprint, concepts, shard_images, monkeypatch):
    """One image the cascade cannot take becomes error rows; the others of its batch succeed."""
    import jobs.pipeline.compute

    # three crops of distinct sizes: the size tells the images apart inside the batch
    images = [(f"crop{i}", f"sha{i}", resize_longest_side(np.ascontiguousarray(
        shard_images[i][2].pixels[: 200 + 10 * i, :300]))) for i in range(3)]
    bad = images[1][2].original_size
    real = jobs.pipeline.compute.segment_batch

    def fragile(sam, batch, *args, **kwargs):
        if bad in batch.original_sizes:
            raise RuntimeError("CUDA error: an illegal memory access\nsecond line")
        return real(sam, batch, *args, **kwargs)

    monkeypatch.setattr(jobs.pipeline.compute, "segment_batch", fragile)
    ks = [concepts["cat"], concepts["duck_toy"]]
    rows, results = segment_rows(tiny_sam, fingerprint, ks, make_chunk(images), batch_size=3)
    assert [(r["image_uri"], r["concept"]) for r in rows] == [(url, c.concept.name) for url, _, _ in images for c in ks]
    failed = [r for r in rows if r["error"] is not None]
    assert {r["image_uri"] for r in failed} == {"crop1"} and results.encoded == [0, 1, 2]
    assert all(r["error"] == "segment failed: RuntimeError: CUDA error: an illegal memory access" for r in failed)
    assert all((r["height"], r["width"]) == bad and r["mask_rle"] is None for r in failed)
    assert all(r["mask_rle"] is not None for r in rows if r["error"] is None)


# ---------------------------------------------------------------------------- presence


def test_below_threshold_is_one_absent_row_without_decoding(tiny_sam, concepts, shard_images, decoder_calls):
    _, _, image = shard_images[0]
    encoded = encode_images(tiny_sam, [image])[0]
    concept = concepts["cat"]
    presence = prior_for(tiny_sam, encoded, concept).presence
    found = segment_instances(tiny_sam, encoded, concept, max_instances=3, min_similarity=presence + 1e-3)
    assert decoder_calls == []  # decoder skipped
    assert len(found) == 1
    absent = found[0]
    assert absent.present is False and absent.instance == 0
    assert absent.result.mask.shape == image.original_size and not absent.result.mask.any()
    assert absent.result.similarity == pytest.approx(presence)

    kept = segment_instances(tiny_sam, encoded, concept, max_instances=1, min_similarity=presence - 1e-3)
    assert len(kept) == 1 and kept[0].present is True
    assert np.array_equal(kept[0].result.mask, segment_persam(tiny_sam, encoded, concept).mask)


def test_absent_rows_in_a_shard(tiny_sam, fingerprint, concepts, shard_images):
    ks = [concepts["cat"], concepts["duck_f"]]
    rows, _ = segment_rows(tiny_sam, fingerprint, ks, make_chunk(shard_images), 1, 2, 0.99999)
    assert len(rows) == len(shard_images) * len(ks)  # never fewer rows than images x concepts
    for row in rows:
        assert row["present"] is False and row["instance"] == 0 and row["error"] is None
        assert row["area"] == 0 and row["score"] is None and row["bbox"] == [0, 0, 0, 0]
        assert not decode_rle(row["mask_rle"]).any()
        assert row["similarity"] is not None and row["similarity"] < 0.99999
        assert row["point"] is not None


@pytest.mark.parametrize("flags, phrase", [
    (["--min-similarity", "-0.1"], "--min-similarity"),
    (["--min-similarity", "1.5"], "--min-similarity"),
    (["--max-instances", "0"], "--max-instances"),
    (["--max-instances", "-2"], "--max-instances"),
])
def test_bad_presence_and_instance_flags_fail_before_work(flags, phrase, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(tmp_path / "c.json"), "--input", str(tmp_path),
                      "--output", str(output), *flags])
    assert_one_error_line(result, phrase)
    assert not output.exists()


# ---------------------------------------------------------------------------- the job and its exports


@pytest.fixture(scope="module")
def job(perseg_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("k-concepts")
    images = root / "images"
    for source in sorted((perseg_sample / "Images").rglob("*.jpg")):
        target = images / source.relative_to(perseg_sample / "Images")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        cat = root / "cat.json"
        duck = root / "duck.json"
        fit_cli(perseg_sample, [("cat", "00")], cat, name="cat")
        fit_cli(perseg_sample, [("duck_toy", "00")], duck, name="duck_toy")
        output = root / "masks"
        result = run_cli(["segment", *MODEL, "--concept", str(cat), "--concept", str(duck), "--input", str(images),
                          "--output", str(output), "--max-instances", "2"])
    assert result.rc == 0, result.err[-3000:]
    rows = pq.read_table(output).to_pylist()
    return SimpleNamespace(root=root, images=images, cat=cat, duck=duck, output=output, result=result, rows=rows,
                           urls=sorted(str(p) for p in images.rglob("*.jpg")))


def usable(rows):
    return [r for r in rows if r["error"] is None and r["present"] and r["area"] > 0]


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


def test_export_coco_loads_and_evaluates(job, tmp_path):
    path = tmp_path / "coco" / "masks.json"
    result = run_cli(["export", "coco", "--masks", str(job.output), "--output", str(path)])
    assert result.rc == 0, result.err
    document = json.loads(path.read_text())
    gt = COCO(str(path))
    good = usable(job.rows)
    assert len(gt.getAnnIds()) == len(good) > 0
    assert {c["name"] for c in gt.loadCats(gt.getCatIds())} == {"cat", "duck_toy"}
    assert {i["file_name"] for i in gt.loadImgs(gt.getImgIds())} == set(job.urls)
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


def test_export_overlays_writes_pngs_and_a_gallery(job, tmp_path):
    out = tmp_path / "overlays"
    result = run_cli(["export", "overlays", "--masks", str(job.output), "--output", str(out)])
    assert result.rc == 0, result.err
    pngs = sorted(out.glob("*.png"))
    good = usable(job.rows)
    assert len(pngs) == len(good)
    index = (out / "index.html").read_text()
    assert all(p.name in index for p in pngs)
    for row in good[:3]:
        path = out / f"{safe_file_name(row['image_uri'], row['concept'], str(row['instance']))}.png"
        with Image.open(path) as picture:
            assert picture.size == (row["width"], row["height"])


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


def test_duplicate_concept_names_fail_before_work(job, perseg_sample, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    impostor = tmp_path / "also-cat.json"
    fit_cli(perseg_sample, [("duck_toy", "01")], impostor, name="cat")
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(job.cat), "--concept", str(impostor),
                      "--input", str(job.images), "--output", str(output)])
    assert_one_error_line(result, "unique")
    assert not output.exists()


def test_concept_from_other_weights_fails_before_work(job, perseg_sample, tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    other = tmp_path / "other.json"
    fit_cli(perseg_sample, [("cat", "00")], other, name="cat1", checkpoint="random:1")
    output = tmp_path / "out"
    result = run_cli(["segment", *MODEL, "--concept", str(job.duck), "--concept", str(other),
                      "--input", str(job.images), "--output", str(output)])
    assert_one_error_line(result, "cat1")
    assert not output.exists()


def test_a_concept_directory_gives_every_concept_in_it(job, tmp_path):
    from jobs.storage.concept_files import read_concepts

    folder = tmp_path / "concepts"
    folder.mkdir()
    shutil.copyfile(job.cat, folder / "cat.json")
    shutil.copyfile(job.duck, folder / "duck.json")
    (folder / "notes.txt").write_text("not a concept")
    assert [c.name for c in read_concepts([str(folder)], {})] == ["cat", "duck_toy"]
    with pytest.raises(ValueError, match="unique"):
        read_concepts([str(folder), str(job.cat)], {})


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
