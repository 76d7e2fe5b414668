"""Issue 5: K concepts in one encoder pass, presence, several instances, several shots, exports.

Unit level (no Ray): jobs.worker.segment_shard on a hand-built shard, and
persam_core.instances.segment_instances on the tiny random model. Job level: one
module-scoped `persam segment` run (two concepts, --max-instances 2) feeds the export tests.
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

from jobs.cli import main
from jobs.images import decode_image, decode_mask
from jobs.overlays import safe_file_name
from jobs.shard_payload import Shard, ShardItem
from jobs.worker import segment_shard
from persam_core.concept import Concept, persam_f_target_feature, persam_targets, reference_cells
from persam_core.masks import decode_rle
from persam_core.models import model_fingerprint
from persam_core.persam import ConceptTensors, prior_for, segment_persam
from persam_core.predictor import encode_images
from persam_core.preprocess import reference_mask_grid, resize_longest_side
from persam_core.instances import segment_instances

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0", "--device", "cpu"]


# ---------------------------------------------------------------------------- helpers


def run_cli(argv: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def assert_one_error_line(result: SimpleNamespace, *phrases: str) -> str:
    assert result.rc != 0, result.out
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("persam ") and "Traceback" not in result.err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def fit_cli(sample: Path, shots: list[tuple[str, str]], out: Path, *extra: str, name: str = "thing",
            checkpoint: str = "random:0") -> Concept:
    argv = ["fit", "--model-type", "tiny", "--checkpoint", checkpoint, "--device", "cpu", "--name", name, "--out", str(out)]
    for concept, number in shots:
        argv += ["--image", str(sample / "Images" / concept / f"{number}.jpg"),
                 "--mask", str(sample / "Annotations" / concept / f"{number}.png")]
    result = run_cli([*argv, *extra])
    assert result.rc == 0, result.err
    return Concept.from_json(out.read_text())


def load_pair(sample: Path, concept: str, number: str) -> tuple[np.ndarray, np.ndarray]:
    image = decode_image((sample / "Images" / concept / f"{number}.jpg").read_bytes(), "image")
    mask = decode_mask((sample / "Annotations" / concept / f"{number}.png").read_bytes(), "mask")
    return image, mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.fixture(scope="module")
def fingerprint(tiny_sam) -> str:
    return model_fingerprint(tiny_sam, "tiny")


@pytest.fixture(scope="module")
def concepts(perseg_sample, tiny_sam, fingerprint) -> dict[str, ConceptTensors]:
    """PerSAM concepts from each sample concept's 00 shot, plus a PerSAM-F one (fixed weights)."""
    made = {}
    for name in ("cat", "duck_toy", "colorful_sneaker"):
        image, mask = load_pair(perseg_sample, name, "00")
        cells = reference_cells(encode_images(tiny_sam, [resize_longest_side(image)]), [mask], ["mask"])
        feature, embedding = persam_targets(cells)
        made[name] = ConceptTensors.on(Concept(name, "persam", feature.numpy(), embedding.numpy(), fingerprint), "cpu")
        if name == "duck_toy":
            made["duck_f"] = ConceptTensors.on(Concept(
                "duck_f", "persam-f", persam_f_target_feature(cells).numpy(), embedding.numpy(), fingerprint,
                mask_weights=np.array([0.2, 0.3, 0.5], dtype=np.float32)), "cpu")
    return made


@pytest.fixture(scope="module")
def shard_images(perseg_sample) -> list[ShardItem]:
    """Each concept's 01 image, shrunk to 480 px (full-size postprocessing is the slow part)."""
    items = []
    for name in ("cat", "duck_toy", "colorful_sneaker"):
        path = perseg_sample / "Images" / name / "01.jpg"
        with Image.open(path) as picture:
            picture.thumbnail((480, 480))
            pixels = np.asarray(picture.convert("RGB"))
        items.append(ShardItem(str(path), sha256=f"sha-{name}", image=resize_longest_side(pixels)))
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
    rows, encoded = segment_shard(tiny_sam, fingerprint, ks, Shard(0, list(shard_images)), 1)
    assert encoder_calls == [1] * len(shard_images)  # images, not images x K
    assert len(encoded) == len(shard_images)
    assert len(rows) == len(shard_images) * len(ks)
    keys = [(r["image_uri"], r["concept"]) for r in rows]
    assert sorted(keys) == sorted((i.url, c.concept.name) for i in shard_images for c in ks)
    assert all(r["error"] is None and r["instance"] == 0 and r["present"] is True for r in rows)
    assert {r["method"] for r in rows} == {"persam", "persam-f"}

    # Decoding K concepts from shared features gives each concept's own single-concept result.
    encoder_calls.clear()
    alone, _ = segment_shard(tiny_sam, fingerprint, [concepts["duck_toy"]], Shard(0, list(shard_images)), 1)
    assert encoder_calls == [1] * len(shard_images)
    shared = {r["image_uri"]: r for r in rows if r["concept"] == "duck_toy"}
    for row in alone:
        other = shared[row["image_uri"]]
        assert row["point"] == other["point"]
        assert row["similarity"] == pytest.approx(other["similarity"], abs=1e-6)
        assert iou(decode_rle(row["mask_rle"]), decode_rle(other["mask_rle"])) >= 0.98


def test_encoder_batches_cover_every_image_once(tiny_sam, fingerprint, concepts, shard_images, encoder_calls):
    rows, _ = segment_shard(tiny_sam, fingerprint, [concepts["cat"], concepts["duck_toy"]], Shard(0, list(shard_images)), 2)
    assert encoder_calls == [2, 1]
    assert len(rows) == len(shard_images) * 2


# ---------------------------------------------------------------------------- presence


def test_below_threshold_is_one_absent_row_without_decoding(tiny_sam, concepts, shard_images, decoder_calls):
    item = shard_images[0]
    encoded = encode_images(tiny_sam, [item.image])[0]
    concept = concepts["cat"]
    presence = prior_for(tiny_sam, encoded, concept).presence
    found = segment_instances(tiny_sam, encoded, concept, max_instances=3, min_similarity=presence + 1e-3)
    assert decoder_calls == []  # decoder skipped
    assert len(found) == 1
    absent = found[0]
    assert absent.present is False and absent.instance == 0
    assert absent.result.mask.shape == item.image.original_size and not absent.result.mask.any()
    assert absent.result.similarity == pytest.approx(presence)

    kept = segment_instances(tiny_sam, encoded, concept, max_instances=1, min_similarity=presence - 1e-3)
    assert len(kept) == 1 and kept[0].present is True
    assert np.array_equal(kept[0].result.mask, segment_persam(tiny_sam, encoded, concept).mask)


def test_absent_rows_in_a_shard(tiny_sam, fingerprint, concepts, shard_images):
    ks = [concepts["cat"], concepts["duck_f"]]
    rows, _ = segment_shard(tiny_sam, fingerprint, ks, Shard(0, list(shard_images)), 1, 2, 0.99999)
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


# ---------------------------------------------------------------------------- several instances


@pytest.fixture(scope="module")
def doubled(perseg_sample, tiny_sam):
    """Two copies of cat/00 side by side (with the tiny random model a second instance is found)."""
    image, _ = load_pair(perseg_sample, "cat", "00")
    return encode_images(tiny_sam, [resize_longest_side(np.concatenate([image, image], axis=1))])[0]


@pytest.fixture(scope="module")
def doubled_instances(tiny_sam, concepts, doubled):
    return segment_instances(tiny_sam, doubled, concepts["cat"], max_instances=3)


def test_instance_zero_is_the_single_result(tiny_sam, concepts, shard_images, doubled, doubled_instances):
    single_image = encode_images(tiny_sam, [shard_images[1].image])[0]
    for concept, encoded, found in (
        (concepts["cat"], doubled, doubled_instances),
        (concepts["duck_f"], single_image, segment_instances(tiny_sam, single_image, concepts["duck_f"], 3)),
    ):
        single = segment_instances(tiny_sam, encoded, concept, 1)
        assert len(single) == 1
        if concept.concept.method == "persam":
            reference = segment_persam(tiny_sam, encoded, concept)
            assert np.array_equal(single[0].result.mask, reference.mask)
            assert single[0].result.score == reference.score and single[0].result.point == reference.point
        first = found[0].result
        assert np.array_equal(first.mask, single[0].result.mask)
        assert first.score == single[0].result.score
        assert first.similarity == single[0].result.similarity == prior_for(tiny_sam, encoded, concept).presence


def test_instances_are_numbered_and_never_overlap_more_than_half(doubled_instances):
    assert [f.instance for f in doubled_instances] == list(range(len(doubled_instances)))
    assert 1 <= len(doubled_instances) <= 3
    union = np.zeros_like(doubled_instances[0].result.mask)
    for found in doubled_instances:
        mask = found.result.mask
        assert found.present and mask.any()
        assert np.logical_and(mask, union).sum() <= 0.5 * mask.sum()
        x, y = found.result.point
        assert not union[y, x]  # each later instance starts outside the masks found so far
        union |= mask


def test_second_instance_is_found_in_a_doubled_image(doubled_instances):
    assert len(doubled_instances) >= 2, "tiny random:0 finds a 2nd instance in two copies of cat/00"
    first, second = doubled_instances[0].result, doubled_instances[1].result
    assert second.similarity <= first.similarity
    assert np.logical_and(second.mask, ~first.mask).sum() >= 0.5 * second.mask.sum()


def test_search_stops_at_the_presence_threshold(tiny_sam, concepts, doubled, doubled_instances):
    if len(doubled_instances) < 2:
        pytest.skip("no second instance to threshold")
    presence, peak = doubled_instances[0].result.similarity, doubled_instances[1].result.similarity
    assert peak < presence
    stopped = segment_instances(tiny_sam, doubled, concepts["cat"], 3, (presence + peak) / 2)
    assert [f.instance for f in stopped] == [0] and stopped[0].present
    assert np.array_equal(stopped[0].result.mask, doubled_instances[0].result.mask)
    going = segment_instances(tiny_sam, doubled, concepts["cat"], 3, peak - 1e-6)
    assert len(going) >= 2
    assert np.array_equal(going[1].result.mask, doubled_instances[1].result.mask)


def test_max_instances_below_one_is_refused(tiny_sam, concepts, doubled):
    with pytest.raises(ValueError):
        segment_instances(tiny_sam, doubled, concepts["cat"], 0)


# ---------------------------------------------------------------------------- several shots


def _cells(sam, sample, shots):
    pairs = [load_pair(sample, c, n) for c, n in shots]
    encoded = encode_images(sam, [resize_longest_side(image) for image, _ in pairs])  # one batch, as fit does
    return reference_cells(encoded, [m for _, m in pairs], ["mask"] * len(pairs)), [m for _, m in pairs]


def test_one_shot_fit_is_bit_identical_to_persam_core(perseg_sample, tiny_sam, tmp_path):
    concept = fit_cli(perseg_sample, [("cat", "00")], tmp_path / "one.json")
    cells, _ = _cells(tiny_sam, perseg_sample, [("cat", "00")])
    feature, embedding = persam_targets(cells)
    assert concept.target_feature.dtype == np.float32
    assert np.array_equal(concept.target_feature, feature.numpy())
    assert np.array_equal(concept.target_embedding, embedding.numpy())


def test_two_shots_pool_the_cells_of_both(perseg_sample, tiny_sam, tmp_path):
    shots = [("cat", "00"), ("cat", "01")]
    both = fit_cli(perseg_sample, shots, tmp_path / "two.json")
    singles = [fit_cli(perseg_sample, [shot], tmp_path / f"{shot[1]}.json") for shot in shots]
    assert len(both.references) == 2
    cells, masks = _cells(tiny_sam, perseg_sample, shots)
    feature, embedding = persam_targets(cells)
    assert np.allclose(both.target_embedding, embedding.numpy(), atol=1e-6)
    assert np.allclose(both.target_feature, feature.numpy(), atol=1e-6)
    # mean over pooled cells = cell-count-weighted mean of the single-shot embeddings
    counts = [int(reference_mask_grid(m).sum()) for m in masks]
    assert cells.shape[0] == sum(counts)
    weighted = sum(n * s.target_embedding.astype(np.float64) for n, s in zip(counts, singles)) / sum(counts)
    assert np.allclose(both.target_embedding, weighted, atol=1e-4)
    for single in singles:
        assert not np.allclose(both.target_embedding, single.target_embedding, atol=1e-4)
    assert np.linalg.norm(both.target_feature) == pytest.approx(1.0, abs=1e-5)


def test_two_shots_persam_f_fits_on_both(perseg_sample, tiny_sam, tmp_path):
    shots = [("duck_toy", "00"), ("duck_toy", "01")]
    concept = fit_cli(perseg_sample, shots, tmp_path / "f.json", "--method", "persam-f", "--epochs", "3")
    cells, _ = _cells(tiny_sam, perseg_sample, shots)
    assert concept.method == "persam-f" and concept.mask_weights.shape == (3,)
    assert np.all(np.isfinite(concept.mask_weights)) and concept.mask_weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(concept.target_feature, persam_f_target_feature(cells).numpy(), atol=1e-6)


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
