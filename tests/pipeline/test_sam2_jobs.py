"""SAM 2.1 through every job command, on tiny_sam2 with seeded random weights.

`fit` (two shots, and PerSAM-F), `segment` (K = 2 concepts, --max-instances, --min-similarity,
an fp32 --cache), the warm cache (the one Ray job), `rank`, `export coco`, `eval` and `bench`.
The fidelity rule: the job's rows equal what persam_core computes on the same decoded images
(`segment_batch` with the same options, and the one-image `segment_persam`), bit for bit on CPU.
Everything but the warm-cache run uses `--runner local` (the product's stages in this process).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools.coco import COCO

from jobs.cli import main
from jobs.commands.rank import RANKING_FILE
from jobs.pipeline.cache import CachedFeatures, FeatureCache
from jobs.pipeline.commit import part_files
from jobs.storage.images import decode_image, decode_mask
from jobs.storage.schema import (AREA, BBOX, CONCEPT, ERROR, IMAGE_URI, INSTANCE, MASK_RLE, POINT, PRESENT, SCORE,
                                 SIMILARITY, read_parts)
from persam_core.modeling.families import as_backbone
from persam_core.batch import EncodedBatch
from persam_core.cascade import score_batch, segment_batch
from persam_core.concept import Concept, ConceptTensors, persam_targets, reference_cells
from persam_core.modeling.inputs import SAM2_HIGH_RES_SHAPES
from persam_core.masks import decode_rle
from persam_core.modeling.models import model_fingerprint
from persam_core.persam import segment_persam
from persam_core.modeling.predictor import encode_images

MODEL = ["--model-type", "tiny_sam2", "--checkpoint", "random:0", "--device", "cpu"]
LOCAL = ["--runner", "local"]
LAKE = {"a.jpg": "cat/01", "b.jpg": "duck_toy/01"}
MAX_INSTANCES = 2
COUNTS = re.compile(r"(\d+) encoded, (\d+) from cache")


def run_cli(argv: list[str]) -> SimpleNamespace:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, err.getvalue()[-3000:]
    return SimpleNamespace(out=out.getvalue(), err=err.getvalue())


def shrink(source: Path, target: Path, side: int = 320) -> Path:
    """An image (JPEG) or a mask (PNG, nearest neighbour) at most `side` px."""
    with Image.open(source) as picture:
        mask = target.suffix == ".png"
        picture = picture.convert("L" if mask else "RGB")
        picture.thumbnail((side, side), Image.Resampling.NEAREST if mask else Image.Resampling.BICUBIC)
        target.parent.mkdir(parents=True, exist_ok=True)
        picture.save(target, **({} if mask else {"quality": 90}))
    return target


def rows_of(output: Path) -> list[dict]:
    table = read_parts(part_files(str(output)))
    assert table is not None
    return sorted(table.to_pylist(), key=lambda r: (r[IMAGE_URI], r[CONCEPT], r[INSTANCE]))


@pytest.fixture(scope="module")
def lake(perseg_sample, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sam2-lake")
    for name, source in LAKE.items():
        shrink(perseg_sample / "Images" / f"{source}.jpg", root / "images" / name)
    return root


@pytest.fixture(scope="module")
def concept_files(perseg_sample, lake) -> list[Path]:
    """cat: PerSAM from two shots (00, 02); duck: PerSAM-F (3 epochs) from one."""
    shots = lambda name, *numbers: [flag for n in numbers for flag in (  # noqa: E731
        "--image", str(perseg_sample / f"Images/{name}/{n}.jpg"), "--mask", str(perseg_sample / f"Annotations/{name}/{n}.png"))]
    cat, duck = lake / "cat.json", lake / "duck.json"
    run_cli(["fit", *MODEL, "--name", "cat", "--out", str(cat), *shots("cat", "00", "02")])
    run_cli(["fit", *MODEL, "--name", "duck", "--out", str(duck), "--method", "persam-f", "--epochs", "3",
             *shots("duck_toy", "00")])
    return [cat, duck]


@pytest.fixture(scope="module")
def core(tiny_sam2, lake, concept_files) -> SimpleNamespace:
    """persam_core's own computation on the lake's images, decoded as the job decodes them."""
    backbone = as_backbone(tiny_sam2)
    urls = [str(lake / "images" / name) for name in sorted(LAKE)]
    encoded = [encode_images(tiny_sam2, [backbone.resize(decode_image(Path(u).read_bytes(), u))])[0] for u in urls]
    concepts = [ConceptTensors.on(Concept.from_json(path.read_text()), "cpu") for path in concept_files]
    similarity = np.stack([score_batch(tiny_sam2, EncodedBatch.of([e]), concepts)[0][0] for e in encoded])  # [N, K]
    low = np.sort(similarity.ravel())
    threshold = float(low[0] + low[1]) / 2  # exactly one (image, concept) pair falls below
    assert 0.0 < threshold < 1.0
    return SimpleNamespace(urls=urls, encoded=encoded, concepts=concepts, similarity=similarity, threshold=threshold)


@pytest.fixture(scope="module")
def segmented(lake, concept_files, core) -> SimpleNamespace:
    output, cache = lake / "masks", lake / "cache"
    result = run_cli(["segment", *MODEL, *LOCAL, *[f for c in concept_files for f in ("--concept", str(c))],
                      "--input", str(lake / "images"), "--output", str(output), "--cache", str(cache),
                      "--cache-dtype", "fp32", "--max-instances", str(MAX_INSTANCES),
                      "--min-similarity", repr(core.threshold)])
    assert COUNTS.search(result.out.splitlines()[-1]).groups() == ("2", "0")
    return SimpleNamespace(output=output, cache=cache, rows=rows_of(output))


def test_fit_pools_the_shots_through_sam2s_own_transform(tiny_sam2, perseg_sample, concept_files):
    pairs = [(decode_image((perseg_sample / f"Images/cat/{n}.jpg").read_bytes(), "image"),
              decode_mask((perseg_sample / f"Annotations/cat/{n}.png").read_bytes(), "mask")) for n in ("00", "02")]
    backbone = as_backbone(tiny_sam2)
    encoded = encode_images(tiny_sam2, [backbone.resize(image) for image, _ in pairs])
    feature, embedding = persam_targets(reference_cells(encoded, [m for _, m in pairs], ["00", "02"], model=tiny_sam2))
    cat, duck = (Concept.from_json(path.read_text()) for path in concept_files)
    assert np.array_equal(cat.target_feature, feature.numpy()) and np.array_equal(cat.target_embedding, embedding.numpy())
    assert cat.model_fingerprint == duck.model_fingerprint == model_fingerprint(tiny_sam2, "tiny_sam2")
    assert len(cat.references) == 2 and duck.method == "persam-f" and duck.mask_weights is not None


def test_segment_rows_equal_the_cores_batched_cascade(tiny_sam2, core, segmented):
    """K = 2 concepts per encode, --max-instances, --min-similarity: row for row the core's results."""
    names = [c.concept.name for c in core.concepts]
    absent = 0
    for url, encoded in zip(core.urls, core.encoded):
        expected = segment_batch(tiny_sam2, EncodedBatch.of([encoded]), core.concepts, MAX_INSTANCES, core.threshold)
        rows = [r for r in segmented.rows if r[IMAGE_URI] == url]
        order = sorted(range(len(expected)), key=lambda i: (names[expected.concept_index[i]], expected.instance[i]))
        assert len(rows) == len(expected) >= len(names)
        for row, i in zip(rows, order):
            assert row[ERROR] is None and (row[CONCEPT], row[INSTANCE]) == (names[expected.concept_index[i]], expected.instance[i])
            assert row[PRESENT] == bool(expected.present[i])
            assert np.array_equal(decode_rle(row[MASK_RLE]), expected.mask(i))
            assert row[SIMILARITY] == expected.similarity[i] and row[POINT] == list(expected.point[i])
            assert row[BBOX] == list(expected.bbox[i]) and row[AREA] == expected.area[i]
            assert (row[SCORE] is None) if np.isnan(expected.score[i]) else row[SCORE] == expected.score[i]
            absent += not row[PRESENT]
    assert absent == 1  # --min-similarity took exactly the pair below the threshold out


def test_persam_rows_equal_the_one_image_function(tiny_sam2, core, segmented):
    cat = core.concepts[0]
    for url, encoded in zip(core.urls, core.encoded):
        row = next(r for r in segmented.rows if r[IMAGE_URI] == url and r[CONCEPT] == "cat" and r[INSTANCE] == 0)
        if not row[PRESENT]:
            continue
        single = segment_persam(tiny_sam2, encoded, cat)
        assert np.array_equal(decode_rle(row[MASK_RLE]), single.mask)
        assert row[POINT] == list(single.point) and row[SCORE] == np.float32(single.score)


@pytest.mark.slow  # a job on Ray
def test_the_cache_holds_sam2s_high_res_levels_and_a_warm_run_gives_identical_rows(lake, concept_files, core, segmented,
                                                                                    monkeypatch):
    """The one real Ray job of the SAM 2 tests: every image from the cache, no encoder, same rows."""
    files = sorted(segmented.cache.rglob("shard-*.parquet"))
    assert files and all("tiny_sam2-" in str(path) for path in files)
    entries = [row for path in files for row in pq.read_table(path).to_pylist()]
    high_res_bytes = sum(int(np.prod(shape)) for shape in SAM2_HIGH_RES_SHAPES) * 4  # fp32
    assert len(entries) == 2 and all(len(e["high_res"]) == high_res_bytes for e in entries)

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    output = lake / "masks-warm"
    result = run_cli(["segment", *MODEL, *[f for c in concept_files for f in ("--concept", str(c))],
                      "--input", str(lake / "images"), "--output", str(output), "--cache", str(segmented.cache),
                      "--cache-dtype", "fp32", "--max-instances", str(MAX_INSTANCES),
                      "--min-similarity", repr(core.threshold)])
    assert COUNTS.search(result.out.splitlines()[-1]).groups() == ("0", "2")
    warm = rows_of(output)
    # The Ray actor runs with this machine's thread count (the test process with one thread),
    # which may split the decoder's float reductions differently: the predicted IoU can move in
    # its last bit; masks, points and every other column are the same.
    assert [{**r, SCORE: None} for r in warm] == [{**r, SCORE: None} for r in segmented.rows]
    scores = lambda rows: [np.nan if r[SCORE] is None else r[SCORE] for r in rows]  # noqa: E731
    assert scores(warm) == pytest.approx(scores(segmented.rows), rel=1e-6, nan_ok=True)


def test_rank_scores_equal_the_prior_and_read_the_cache(lake, concept_files, core, segmented):
    output = lake / "rank"
    result = run_cli(["rank", *MODEL, *LOCAL, "--concept", str(concept_files[0]), "--input", str(lake / "images"),
                      "--output", str(output), "--cache", str(segmented.cache), "--cache-dtype", "fp32", "--top-k", "1"])
    assert COUNTS.search(result.out.splitlines()[-1]).groups() == ("0", "2")
    ranking = pq.read_table(output / RANKING_FILE).to_pylist()
    expected = dict(zip(core.urls, core.similarity[:, 0]))
    assert [r[IMAGE_URI] for r in ranking] == sorted(expected, key=lambda u: -expected[u])
    assert all(r[SIMILARITY] == expected[r[IMAGE_URI]] for r in ranking)
    top = next(r for r in segmented.rows if r[IMAGE_URI] == ranking[0][IMAGE_URI] and r[CONCEPT] == "cat" and r[INSTANCE] == 0)
    assert ranking[0][MASK_RLE] is not None and decode_rle(ranking[0][MASK_RLE]).shape == decode_rle(top[MASK_RLE]).shape


def test_export_coco_of_a_sam2_output_loads(lake, segmented):
    out = lake / "coco.json"
    run_cli(["export", "coco", "--masks", str(segmented.output), "--output", str(out)])
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == len(LAKE)
    assert len(coco.getAnnIds()) == sum(r[PRESENT] and r[MASK_RLE] is not None for r in segmented.rows)
    for annotation in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(annotation).sum() == annotation["area"]


def test_perseg_eval_runs_on_sam2(perseg_sample, tmp_path):
    data = tmp_path / "perseg"
    for number in ("00", "01"):
        shrink(perseg_sample / f"Images/cat/{number}.jpg", data / f"Images/cat/{number}.jpg")
        shrink(perseg_sample / f"Annotations/cat/{number}.png", data / f"Annotations/cat/{number}.png")
    run_cli(["eval", *MODEL, *LOCAL, "--data", str(data), "--output", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["model_type"], metrics["images"], metrics["error_images"]) == ("tiny_sam2", 1, 0)
    assert metrics["model_fingerprint"].startswith("tiny_sam2:") and 0.0 <= metrics["miou"] <= 1.0


def test_cache_entries_of_sam2_keep_their_high_res_levels_or_are_recomputed(tmp_path):
    """No model needed: shapes are the cache's parameter (small ones here), dtype as --cache-dtype."""
    shapes = ((2, 4, 4), (3, 2, 2))
    generator = np.random.default_rng(0)
    entry = CachedFeatures(generator.standard_normal((256, 64, 64)).astype(np.float32), (1024, 1024), (30, 40),
                           tuple(generator.standard_normal(shape).astype(np.float32) for shape in shapes))
    cache = FeatureCache(str(tmp_path), "tiny_sam2:0", "fp16", num_shards=1, high_res_shapes=shapes)
    cache.store({"a.jpg": ("sha-a", entry)})
    cache.store({"b.jpg": ("sha-b", CachedFeatures(entry.features, (1024, 1024), (30, 40)))})  # no levels: not SAM 2's
    loaded, problems = cache.load(["a.jpg", "b.jpg"])
    assert set(loaded) == {"sha-a"} and problems == ["cache entry sha-b corrupt: recomputed"]
    back = loaded["sha-a"]
    assert back.features.dtype == np.float16 and [level.shape for level in back.high_res] == list(shapes)
    assert all(np.array_equal(a, b.astype(np.float16)) for a, b in zip(back.high_res, entry.high_res))
    # the same files read as SAM's (no levels expected) give the features alone
    sam_view, _ = FeatureCache(str(tmp_path), "tiny_sam2:0", "fp16", num_shards=1).load(["a.jpg"])
    assert sam_view["sha-a"].high_res == () and np.array_equal(sam_view["sha-a"].features, back.features)



def test_bench_times_sam2_in_the_same_table():
    result = run_cli(["bench", *MODEL, "--images", "1", "--concepts", "1", "--epochs", "1", "--json"])
    figures = json.loads(result.out.strip().splitlines()[-1])
    assert figures["model_type"] == "tiny_sam2" and figures["mask_iou_vs_fp32_min"] == 1.0
    for key in ("encoder_s_per_image", "persam_s_per_image", "cached_s_per_image", "reference_loop_s_per_image"):
        assert figures[key] > 0, key
    levels = sum(int(np.prod(shape)) for shape in SAM2_HIGH_RES_SHAPES)
    assert figures["cache_bytes_per_image_fp16"] == (256 * 64 * 64 + levels) * 2  # features + high-res levels
