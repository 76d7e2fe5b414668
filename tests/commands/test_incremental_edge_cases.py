"""Edge cases of the cache, incremental reruns, rank and export, without Ray.

The jobs run with `--runner local`: the product's own stages (prepare -> model actor ->
finish) in this process, with the real chunk planning, gathering and committing. So these
cases cost seconds; the Ray path itself is covered by test_segment.py and
test_cache_and_rank_jobs.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_tools import LOCAL, MODEL, run_cli
from jobs.pipeline import commit
from jobs.pipeline.cache import CACHE_SCHEMA, FeatureCache
from jobs.storage.schema import rows_to_table
from persam_core.masks import area_px, bbox_xywh, encode_rle
from persam_core.modeling.models import model_fingerprint
from sample_tools import save_small


def ok(result: SimpleNamespace) -> str:
    assert result.rc == 0, result.err[-2000:]
    return result.out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def concept(tiny_concept) -> Path:
    """cat/00, PerSAM, tiny random:0 (the shared concept file)."""
    return tiny_concept


def segment(concept: Path, images: Path, output: Path, *extra: str) -> SimpleNamespace:
    return run_cli(["segment", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(images), "--output", str(output),
                    *extra])


def rank(concept: Path, images: Path, output: Path, *extra: str) -> SimpleNamespace:
    return run_cli(["rank", *MODEL, *LOCAL, "--concept", str(concept), "--input", str(images), "--output", str(output),
                    *extra])


# ---------------------------------------------------------------------------- the stand-in is faithful


def test_the_local_runner_matches_the_contract(perseg_sample, concept, tmp_path):
    images = tmp_path / "images"
    save_small(perseg_sample, "cat/01", images / "a.jpg")
    save_small(perseg_sample, "duck_toy/01", images / "b.jpg")
    line = ok(segment(concept, images, tmp_path / "out", "--cache", str(tmp_path / "cache")))
    assert "2 encoded, 0 from cache" in line
    assert "0 encoded, 2 from cache" in ok(segment(concept, images, tmp_path / "out2", "--cache", str(tmp_path / "cache")))
    assert len(pq.read_table(tmp_path / "out2").to_pylist()) == 2


# ---------------------------------------------------------------------------- incremental


def test_changed_content_under_the_same_name_is_reprocessed(perseg_sample, concept, tmp_path):
    images = tmp_path / "images"
    save_small(perseg_sample, "cat/01", images / "a.jpg")
    save_small(perseg_sample, "duck_toy/01", images / "b.jpg")
    ok(segment(concept, images, tmp_path / "out"))
    save_small(perseg_sample, "duck_toy/02", images / "b.jpg", 200)  # new content, same URL
    line = ok(segment(concept, images, tmp_path / "out"))
    rows = {Path(r["image_uri"]).name: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert rows["b.jpg"]["content_sha256"] == hashlib.sha256((images / "b.jpg").read_bytes()).hexdigest()
    assert "1 encoded" in line and "1 unchanged" in line


@pytest.fixture
def two_shards(perseg_sample, concept, tmp_path):
    """--shard-size 1 over two images that fall in different shards; then one is deleted."""
    images = tmp_path / "images"
    names = [f"img{i}.jpg" for i in range(40)]
    keep = names[0]
    gone = next(n for n in names[1:] if commit.shard_of(str(images / n), 2) != commit.shard_of(str(images / keep), 2))
    save_small(perseg_sample, "cat/01", images / keep)
    save_small(perseg_sample, "cat/02", images / gone)
    output = tmp_path / "out"
    ok(segment(concept, images, output, "--shard-size", "1"))
    (images / gone).unlink()
    return SimpleNamespace(output=output, keep=keep, gone=gone, line=ok(segment(concept, images, output, "--shard-size", "1")))


def test_deleted_image_of_an_emptied_shard_loses_its_rows(two_shards):
    rows = pq.read_table(two_shards.output).to_pylist()
    assert [Path(r["image_uri"]).name for r in rows] == [two_shards.keep]
    assert len(list(two_shards.output.rglob("part-*.parquet"))) == 1


def test_deleted_image_of_an_emptied_shard_is_reported(two_shards):
    assert "1 removed" in two_shards.line


# ---------------------------------------------------------------------------- the cache across jobs


def test_rank_cache_survives_a_change_in_shard_count(perseg_sample, concept, tmp_path):
    images, cache = tmp_path / "images", str(tmp_path / "cache")
    save_small(perseg_sample, "cat/01", images / "a.jpg")
    save_small(perseg_sample, "duck_toy/01", images / "b.jpg")
    assert "2 encoded, 0 from cache" in ok(rank(concept, images, tmp_path / "r1", "--cache", cache, "--shard-size", "2"))
    save_small(perseg_sample, "cat/02", images / "c.jpg")  # 3 images: 2 shards instead of 1
    assert "1 encoded, 2 from cache" in ok(rank(concept, images, tmp_path / "r2", "--cache", cache, "--shard-size", "2"))


def test_cache_entries_of_another_job_are_kept(perseg_sample, concept, tmp_path):
    cache = str(tmp_path / "cache")
    first, second = tmp_path / "first", tmp_path / "second"
    save_small(perseg_sample, "cat/01", first / "a.jpg")
    save_small(perseg_sample, "duck_toy/01", second / "b.jpg")
    ok(segment(concept, first, tmp_path / "o1", "--cache", cache))
    ok(segment(concept, second, tmp_path / "o2", "--cache", cache))
    assert "0 encoded, 1 from cache" in ok(segment(concept, first, tmp_path / "o3", "--cache", cache))


# ---------------------------------------------------------------------------- rank


def test_rank_with_an_unreadable_image_among_the_printed_rows(perseg_sample, concept, tmp_path):
    images = tmp_path / "images"
    save_small(perseg_sample, "cat/01", images / "a.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    result = rank(concept, images, tmp_path / "out")  # default --top-k 10 prints both rows
    assert result.rc == 4 and "1 of 2 images failed" in result.err  # --max-error-rate: the ranking is written first
    rows = pq.read_table(tmp_path / "out" / "ranking.parquet").to_pylist()
    assert [Path(r["image_uri"]).name for r in rows] == ["a.jpg", "broken.jpg"]


def test_rank_reports_a_corrupt_cache_entry(perseg_sample, concept, tiny_sam, tmp_path):
    images, cache = tmp_path / "images", str(tmp_path / "cache")
    save_small(perseg_sample, "cat/01", images / "a.jpg")
    save_small(perseg_sample, "duck_toy/01", images / "b.jpg")
    ok(rank(concept, images, tmp_path / "r1", "--cache", cache))
    [path] = FeatureCache(cache, model_fingerprint(tiny_sam, "tiny"), num_shards=1).shard_files(0)
    stored = pq.read_table(path)
    entries = stored.to_pylist()
    entries[0]["features"] = entries[0]["features"][:100] + b"\x00" * 8 + entries[0]["features"][108:]
    tampered = pa.Table.from_pylist(entries, schema=CACHE_SCHEMA).replace_schema_metadata(stored.schema.metadata)
    pq.write_table(tampered, path, row_group_size=1)  # as the cache writes: its index kept
    result = rank(concept, images, tmp_path / "r2", "--cache", cache)
    assert "1 encoded, 1 from cache" in ok(result)
    assert any(line.startswith("cache:") and "corrupt" in line for line in result.out.splitlines()), result.out


# ---------------------------------------------------------------------------- export --images


def test_export_relocated_images_of_a_single_image_dataset(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    new.mkdir()
    pixels = np.full((48, 64, 3), 120, dtype=np.uint8)
    Image.fromarray(pixels).save(new / "only.png")
    mask = np.zeros((48, 64), dtype=bool)
    mask[10:30, 20:50] = True
    rows = [{"image_uri": str(old / "only.png"), "concept": name, "method": "persam", "instance": 0, "present": True,
             "width": 64, "height": 48, "mask_rle": encode_rle(mask), "bbox": bbox_xywh(mask), "area": area_px(mask),
             "score": 0.9, "similarity": 0.8, "point": [30, 20], "error": None, "model_fingerprint": "x",
             "content_sha256": "y"} for name in ("cat", "dog")]
    masks = tmp_path / "masks"
    masks.mkdir()
    pq.write_table(rows_to_table(rows), masks / "part-00000-000000000000.parquet")
    result = run_cli(["export", "overlays", "--masks", str(masks), "--output", str(tmp_path / "ov"), "--images", str(new)])
    ok(result)
    assert len(list((tmp_path / "ov" / "full").glob("*.jpg"))) == len(list((tmp_path / "ov" / "thumbs").glob("*.jpg"))) == 2
