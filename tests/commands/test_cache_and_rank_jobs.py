"""The embedding cache, `persam rank` and incremental reruns across whole jobs.

Segment jobs chained through module fixtures so the order is fixed whatever the test order:
cold (3 encoded) -> warm (3 from cache) -> other weights (own fingerprint directory) ->
corrupted entry (recomputed, reported) -> incremental rerun (new, changed, deleted image);
these run with `--runner local` (the product's stages in this process; the segment job's
Ray wiring is proven by test_segment.py). Rank cold / warm on an fp32 cache run on one
embedded local Ray (rank's wiring). The cache's unit-level tests are in pipeline/test_cache.py.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_tools import LOCAL, TINY, run_cli
from sample_tools import by_name, iou, save_small
from jobs.pipeline.cache import CACHE_SCHEMA, FeatureCache
from jobs.commands.rank import RANKING_FILE, ranking_table
from jobs.pipeline.session import ray_session
from jobs.storage.schema import MASK_SCHEMA, RANK_SCHEMA
from persam_core.masks import decode_rle
from persam_core.modeling.models import model_fingerprint

SOURCES = {"a": "cat/01", "b": "duck_toy/01", "c": "colorful_sneaker/01"}  # the lake's first three images
COUNTS = re.compile(r"(\d+) encoded, (\d+) from cache, (\d+) unchanged, (\d+) removed")
RANK_DONE = re.compile(r"done: (\d+) images ranked .*, (\d+) encoded, (\d+) from cache")


def summary(result: SimpleNamespace) -> dict:
    assert result.rc == 0, result.err[-3000:]
    last = result.out.strip().splitlines()[-1]
    match = COUNTS.search(last)
    assert match and last.startswith("done: "), last
    images, rows = re.match(r"done: \d+ images committed in the output; this run: (\d+) images, (\d+) rows", last).groups()
    keys = ("encoded", "cache_hits", "unchanged", "removed")
    return {"images": int(images), "rows": int(rows), **{k: int(v) for k, v in zip(keys, match.groups())}}


def fit(sample: Path, out: Path, checkpoint: str) -> Path:
    result = run_cli(["fit", *TINY, "--checkpoint", checkpoint, "--name", "cat", "--out", str(out),
                      "--image", str(sample / "Images/cat/00.jpg"), "--mask", str(sample / "Annotations/cat/00.png")])
    assert result.rc == 0, result.err
    return out


@pytest.fixture(scope="module")
def lake(perseg_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("lake")
    images = root / "images"
    images.mkdir()
    for name, source in SOURCES.items():
        save_small(perseg_sample, source, images / f"{name}.jpg")
    concept0 = fit(perseg_sample, root / "cat0.json", "random:0")
    concept1 = fit(perseg_sample, root / "cat1.json", "random:1")
    return SimpleNamespace(root=root, images=images, cache=root / "cache", concept0=concept0, concept1=concept1,
                           sample=perseg_sample)


def segment(lake, output: Path, *extra: str, checkpoint: str = "random:0", concept: Path | None = None) -> SimpleNamespace:
    return run_cli(["segment", *TINY, *LOCAL, "--checkpoint", checkpoint, "--concept", str(concept or lake.concept0),
                    "--input", str(lake.images), "--output", str(output), "--cache", str(lake.cache), *extra])


def cache_files(lake, fingerprint: str) -> list[Path]:
    """The cache files of the lake's one cache shard (one per chunk that encoded images)."""
    return [Path(p) for p in FeatureCache(str(lake.cache), fingerprint, num_shards=1).shard_files(0)]


def cache_bytes(lake, fingerprint: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in cache_files(lake, fingerprint)}


@pytest.fixture(scope="module")
def fp0(tiny_sam) -> str:
    return model_fingerprint(tiny_sam, "tiny")


@pytest.fixture(scope="module")
def cold(lake):
    result = segment(lake, lake.root / "out1")
    rows = pq.read_table(lake.root / "out1").to_pylist()
    return SimpleNamespace(result=result, rows=rows)


@pytest.fixture(scope="module")
def warm(lake, cold):
    result = segment(lake, lake.root / "out2")
    return SimpleNamespace(result=result, rows=pq.read_table(lake.root / "out2").to_pylist())


@pytest.fixture(scope="module")
def other_weights(lake, warm, fp0):
    before = cache_bytes(lake, fp0)
    result = segment(lake, lake.root / "out3", checkpoint="random:1", concept=lake.concept1)
    return SimpleNamespace(result=result, rows=pq.read_table(lake.root / "out3").to_pylist(), fp0_before=before)


@pytest.fixture(scope="module")
def corrupted(lake, other_weights, fp0):
    """Flip one byte inside b.jpg's feature blob (its checksum left as it was), then rerun."""
    [path] = cache_files(lake, fp0)  # the cold run's one chunk
    stored = pq.read_table(path)
    entries = stored.to_pylist()
    victim = hashlib.sha256((lake.images / "b.jpg").read_bytes()).hexdigest()
    for entry in entries:
        if entry["content_sha256"] == victim:
            blob = bytearray(entry["features"])
            blob[len(blob) // 2] ^= 0xFF
            entry["features"] = bytes(blob)
    tampered = pa.Table.from_pylist(entries, schema=CACHE_SCHEMA).replace_schema_metadata(stored.schema.metadata)
    pq.write_table(tampered, path, compression="none", row_group_size=1)  # as the cache writes: its index kept
    result = segment(lake, lake.root / "out4")
    return SimpleNamespace(result=result, rows=pq.read_table(lake.root / "out4").to_pylist(), victim=victim)


@pytest.fixture(scope="module")
def incremental(lake, corrupted, cold):
    """out1 again after: d.jpg added, a.jpg re-saved (other size and quality), c.jpg deleted."""
    save_small(lake.sample, "cat/02", lake.images / "d.jpg")
    save_small(lake.sample, "cat/01", lake.images / "a.jpg", 280, quality=70)
    (lake.images / "c.jpg").unlink()
    result = segment(lake, lake.root / "out1")
    return SimpleNamespace(result=result, rows=pq.read_table(lake.root / "out1").to_pylist())


# ---------------------------------------------------------------------------- hits and misses


def test_cold_run_encodes_every_image(cold):
    counts = summary(cold.result)
    assert counts == {"images": 3, "rows": 3, "encoded": 3, "cache_hits": 0, "unchanged": 0, "removed": 0}
    assert all(r["error"] is None for r in cold.rows)


def test_warm_run_reads_every_image_from_the_cache(cold, warm):
    assert summary(warm.result)["encoded"] == 0 and summary(warm.result)["cache_hits"] == 3
    before, after = by_name(cold.rows), by_name(warm.rows)
    assert set(before) == set(after) == {"a.jpg", "b.jpg", "c.jpg"}
    ious = []
    for name, row in before.items():
        other = after[name]
        assert (other["width"], other["height"]) == (row["width"], row["height"])
        assert other["similarity"] == pytest.approx(row["similarity"], abs=5e-3)  # fp16 features
        ious.append(iou(decode_rle(row["mask_rle"]), decode_rle(other["mask_rle"])))
    print(f"fp16 cache, warm vs cold mask IoU: min {min(ious):.4f}")
    assert min(ious) >= 0.9


def test_other_weights_use_their_own_fingerprint_directory(lake, other_weights, fp0):
    counts = summary(other_weights.result)
    assert counts["encoded"] == 3 and counts["cache_hits"] == 0
    fp1 = {r["model_fingerprint"] for r in other_weights.rows}
    assert len(fp1) == 1 and fp0 not in fp1
    assert len(cache_files(lake, fp1.pop())) == 1
    assert cache_bytes(lake, fp0) == other_weights.fp0_before  # never mixed


def test_corrupt_entry_is_recomputed_and_reported(lake, cold, corrupted, fp0):
    counts = summary(corrupted.result)
    assert counts["encoded"] == 1 and counts["cache_hits"] == 2
    problems = [line for line in corrupted.result.out.splitlines() if line.startswith("cache:")]
    assert len(problems) == 1 and corrupted.victim[:12] in problems[0] and "corrupt" in problems[0]
    fresh, rows = by_name(cold.rows)["b.jpg"], by_name(corrupted.rows)["b.jpg"]
    assert rows["mask_rle"] == fresh["mask_rle"] and rows["similarity"] == fresh["similarity"]  # re-encoded
    for name in ("a.jpg", "c.jpg"):
        assert iou(decode_rle(by_name(corrupted.rows)[name]["mask_rle"]), decode_rle(by_name(cold.rows)[name]["mask_rle"])) >= 0.9
    entries, problems = FeatureCache(str(lake.cache), fp0, num_shards=1).load(["any"])
    assert problems == [] and len(entries) == 3  # the rerun stored a good copy beside the corrupt one


# ---------------------------------------------------------------------------- incremental


def test_incremental_rerun_counts(incremental):
    counts = summary(incremental.result)
    assert counts == {"images": 3, "rows": 3, "encoded": 2, "cache_hits": 0, "unchanged": 1, "removed": 1}


def test_incremental_output_has_one_row_per_current_image(lake, incremental):
    rows = by_name(incremental.rows)
    assert len(incremental.rows) == 3 and set(rows) == {"a.jpg", "b.jpg", "d.jpg"}
    for name, row in rows.items():
        data = (lake.images / name).read_bytes()
        assert row["content_sha256"] == hashlib.sha256(data).hexdigest() and row["error"] is None
        with Image.open(lake.images / name) as picture:
            assert (row["width"], row["height"]) == picture.size
    parts = list((lake.root / "out1").rglob("part-*.parquet"))
    assert len(parts) == 1 and not list((lake.root / "out1").rglob("*.tmp-*"))


def test_unchanged_rows_are_carried_as_they_were(cold, incremental):
    assert by_name(incremental.rows)["b.jpg"] == by_name(cold.rows)["b.jpg"]
    assert by_name(incremental.rows)["a.jpg"]["content_sha256"] != by_name(cold.rows)["a.jpg"]["content_sha256"]
    assert by_name(incremental.rows)["a.jpg"]["width"] != by_name(cold.rows)["a.jpg"]["width"]


def test_rerun_without_changes_writes_nothing(lake, incremental):
    before = {str(p): p.read_bytes() for p in (lake.root / "out1").rglob("*") if p.is_file()}
    result = segment(lake, lake.root / "out1")  # every shard committed: nothing runs
    assert result.rc == 0 and "0 shards written (1 already committed)" in result.out
    assert {str(p): p.read_bytes() for p in (lake.root / "out1").rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------------------- bad cache URL


def test_unwritable_cache_fails_before_work(lake, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    output = tmp_path / "out"
    for command in ("segment", "rank"):
        result = run_cli([command, *TINY, "--checkpoint", "random:0", "--concept", str(lake.concept0),
                          "--input", str(lake.images), "--output", str(output), "--cache", str(blocker / "cache")])
        assert result.rc != 0
        lines = [line for line in result.err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"persam {command}: error:") and "--cache" in lines[0], result.err
        assert not output.exists()


# ---------------------------------------------------------------------------- rank


@pytest.fixture(scope="module")
def ranked(lake, tmp_path_factory, cold):
    """rank --top-k 2 twice on an fp32 cache, on one embedded Ray: cold, then warm.
    Inputs: a, b, c as in `cold`, e, broken."""
    root = tmp_path_factory.mktemp("rank")
    images = root / "images"
    images.mkdir()
    for name, source in SOURCES.items():
        save_small(lake.sample, source, images / f"{name}.jpg")
    save_small(lake.sample, "cat/02", images / "e.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    runs = []
    # One embedded Ray for both runs: the runs compare bit for bit, and the local runner's
    # torch thread count differs from the actors' (mask scores differ in the 7th digit).
    with ray_session():
        for output in ("out-cold", "out-warm"):
            result = run_cli(["rank", *TINY, "--checkpoint", "random:0", "--concept", str(lake.concept0),
                              "--input", str(images), "--output", str(root / output), "--top-k", "2",
                              "--cache", str(root / "cache"), "--cache-dtype", "fp32", "--max-error-rate", "0.5"])
            assert result.rc == 0, result.err[-3000:]
            runs.append(SimpleNamespace(result=result, rows=pq.read_table(root / output / RANKING_FILE).to_pylist()))
    return SimpleNamespace(cold=runs[0], warm=runs[1], images=images)


def rank_counts(result) -> tuple[int, int, int]:
    match = RANK_DONE.search(result.out)
    assert match, result.out
    return tuple(int(v) for v in match.groups())


@pytest.mark.slow
def test_rank_writes_a_sorted_ranking_with_top_k_masks(ranked):
    rows = ranked.cold.rows
    assert [r["rank"] for r in rows] == list(range(1, 6))
    similarities = [r["similarity"] for r in rows]
    assert all(s is not None for s in similarities[:4]) and similarities == sorted(similarities[:4], reverse=True) + [None]
    assert Path(rows[-1]["image_uri"]).name == "broken.jpg" and rows[-1]["error"] is not None
    for row in rows:
        has_mask = row["mask_rle"] is not None
        assert has_mask == (row["rank"] <= 2), row
        if has_mask:
            assert decode_rle(row["mask_rle"]).shape == (row["height"], row["width"])
            assert row["area"] == int(decode_rle(row["mask_rle"]).sum()) and row["score"] is not None
    hits = [line.split() for line in ranked.cold.result.out.splitlines() if line.strip().startswith("#")]
    assert [h[0] for h in hits[:2]] == ["#1", "#2"]
    assert [h[-1] for h in hits[:2]] == [rows[0]["image_uri"], rows[1]["image_uri"]]


@pytest.mark.slow
def test_rank_agrees_with_segment(ranked, cold):
    """fp32 cache: the ranking's similarity/point/masks equal the fresh-feature segment rows."""
    segment_rows = by_name(cold.rows)
    compared = 0
    for row in ranked.cold.rows + ranked.warm.rows:
        same = segment_rows.get(Path(row["image_uri"]).name)
        if same is None:
            continue
        assert row["similarity"] == same["similarity"] and row["point"] == same["point"]
        if row["mask_rle"] is not None:
            assert row["mask_rle"] == same["mask_rle"] and row["bbox"] == same["bbox"]
            compared += 1
    assert compared >= 2  # 3 of the 4 good images are in `cold`: a top-2 mask is always among them


@pytest.mark.slow
def test_rank_with_a_warm_cache_never_encodes(ranked):
    assert rank_counts(ranked.cold.result) == (5, 4, 0)
    assert rank_counts(ranked.warm.result) == (5, 0, 4)
    drop = ("model_fingerprint",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ranked.warm.rows] == \
           [{k: v for k, v in r.items() if k not in drop} for r in ranked.cold.rows]


def test_ranking_table_orders_by_similarity_with_nulls_last():
    scores = pa.Table.from_pylist([
        {"image_uri": "d.jpg", "concept": "x", "similarity": 0.5, "point": [1, 2]},
        {"image_uri": "n.jpg", "concept": "x", "similarity": None, "error": "decode failed"},
        {"image_uri": "h.jpg", "concept": "x", "similarity": 0.9, "point": [3, 4]},
        {"image_uri": "a.jpg", "concept": "x", "similarity": 0.5, "point": [5, 6]},
        {"image_uri": "m.jpg", "concept": "x", "similarity": -0.2, "point": [7, 8]},
    ], schema=RANK_SCHEMA)
    rle = {"size": [2, 2], "counts": "04"}
    masks = pa.Table.from_pylist([
        {"image_uri": "h.jpg", "concept": "x", "instance": 0, "width": 2, "height": 2, "mask_rle": rle, "area": 4},
        {"image_uri": "h.jpg", "concept": "x", "instance": 1, "width": 9, "height": 9, "mask_rle": rle, "area": 1},
        {"image_uri": "a.jpg", "concept": "x", "instance": 0, "width": 2, "height": 2, "mask_rle": rle, "area": 4},
    ], schema=MASK_SCHEMA)
    table = ranking_table(scores, masks)
    rows = table.to_pylist()
    assert [r["image_uri"] for r in rows] == ["h.jpg", "a.jpg", "d.jpg", "m.jpg", "n.jpg"]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["mask_rle"] is not None for r in rows] == [True, True, False, False, False]
    assert rows[0]["width"] == 2 and rows[0]["area"] == 4  # instance 0 only
    assert ranking_table(scores, None).column("mask_rle").null_count == 5
