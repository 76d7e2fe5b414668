"""The embedding cache at unit level: stored and loaded features, dtypes, corrupt entries,
per-chunk files (the cache inside whole jobs: commands/test_cache_and_rank_jobs.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sample_tools import iou, make_chunk, segment_rows
from jobs.pipeline.cache import CACHE_SCHEMA, CacheError, CachedFeatures, FeatureCache
from jobs.pipeline.payload import Chunk, ChunkItem, pack_chunk, unpack_chunk
from persam_core.masks import decode_rle
from persam_core.modeling.resize import resize_longest_side


@pytest.fixture(scope="module")
def fp0(tiny_fingerprint) -> str:
    return tiny_fingerprint


@pytest.fixture(scope="module")
def unit(perseg_sample, tiny_sam, fp0, concept_tensors):
    concept = concept_tensors["cat"]  # what `persam fit` gives for cat/00 with the same weights
    items = []
    for name in ("cat/02", "duck_toy/02", "colorful_sneaker/02"):
        with Image.open(perseg_sample / "Images" / f"{name}.jpg") as picture:
            picture.thumbnail((400, 400))
            pixels = np.asarray(picture.convert("RGB"))
        items.append((name, hashlib.sha256(pixels.tobytes()).hexdigest(), resize_longest_side(pixels)))
    chunk = make_chunk(items)
    rows, results = segment_rows(tiny_sam, fp0, [concept], chunk, cache_dtype="fp32")  # fresh features as fp32
    features = {item.url: (item.sha256, CachedFeatures(results.fresh[i], item.input_size, item.original_size))
                for i, item in enumerate(chunk.items)}
    return SimpleNamespace(concept=concept, chunk=chunk, rows=rows, features=features)


def rows_from_cache(tiny_sam, fp0, unit, tmp_path, dtype: str, monkeypatch) -> list[dict]:
    cache = FeatureCache(str(tmp_path / dtype), fp0, dtype, num_shards=1)
    cache.store(unit.features)
    items = unit.chunk.items
    entries, problems = cache.load([item.url for item in items], {item.sha256 for item in items})
    assert problems == [] and len(entries) == len(items)
    chunk = Chunk(0, 0, [ChunkItem(i.url, i.sha256, source="cached", original_size=i.original_size,
                                   input_size=i.input_size) for i in items],
                  features={n: entries[i.sha256].features for n, i in enumerate(items)})
    chunk = unpack_chunk(*pack_chunk(chunk))  # as the CPU stage hands it to the actor
    calls = []
    monkeypatch.setattr(tiny_sam.image_encoder, "forward", lambda *a, **k: calls.append(1))
    rows, _ = segment_rows(tiny_sam, fp0, [unit.concept], chunk)
    assert calls == []  # cached features never run the encoder
    return rows


def test_fp32_cache_gives_identical_rows(tiny_sam, fp0, unit, tmp_path, monkeypatch):
    entries, _ = FeatureCache(str(tmp_path / "probe"), fp0, "fp32", num_shards=1).load(["any"])
    assert entries == {}
    rows = rows_from_cache(tiny_sam, fp0, unit, tmp_path, "fp32", monkeypatch)
    assert rows == unit.rows


def test_fp16_cache_costs_little_accuracy(tiny_sam, fp0, unit, tmp_path, monkeypatch):
    rows = rows_from_cache(tiny_sam, fp0, unit, tmp_path, "fp16", monkeypatch)
    ious = [iou(decode_rle(a["mask_rle"]), decode_rle(b["mask_rle"])) for a, b in zip(rows, unit.rows)]
    print(f"fp16 cache vs fresh features, mask IoU: {[round(v, 4) for v in ious]}")
    assert min(ious) >= 0.9
    assert [r["similarity"] for r in rows] == pytest.approx([r["similarity"] for r in unit.rows], abs=5e-3)


def test_corrupt_entries_and_files_are_reported_not_trusted(fp0, unit, tmp_path):
    cache = FeatureCache(str(tmp_path), fp0, "fp16", num_shards=1)
    cache.store(unit.features)
    [path] = [Path(p) for p in cache.shard_files(0)]
    stored = pq.read_table(path)
    table = stored.to_pylist()
    table[0]["features"] = table[0]["features"][:-2]  # truncated blob
    table[1]["dtype"] = "int8"  # unknown dtype
    tampered = pa.Table.from_pylist(table, schema=CACHE_SCHEMA).replace_schema_metadata(stored.schema.metadata)
    pq.write_table(tampered, path, row_group_size=1)  # as the cache writes: the footer's index kept
    entries, problems = cache.load(["any"])
    assert set(entries) == {table[2]["content_sha256"]} and len(problems) == 2
    assert all("corrupt" in p for p in problems)

    path.write_bytes(b"garbage, not parquet" * 100)
    entries, problems = cache.load(["any"])
    assert entries == {} and len(problems) == 1 and "unreadable" in problems[0]
    other = FeatureCache(str(tmp_path), "tiny:someone-else", "fp16", num_shards=1)
    assert other.shard_files(0) == [] and other.load(["any"]) == ({}, [])


def test_chunks_of_one_shard_store_side_by_side_and_load_what_they_need(fp0, unit, tmp_path):
    """Two chunks storing into one cache shard (as parallel tasks do) lose nothing; a load
    asks for the hashes it needs and gets just those."""
    cache = FeatureCache(str(tmp_path), fp0, "fp16", num_shards=1)
    (first_url, first), *rest = unit.features.items()
    cache.store({first_url: first})
    cache.store(dict(rest))
    assert len(cache.shard_files(0)) == 2
    entries, problems = cache.load(["any"])
    assert problems == [] and set(entries) == {sha for sha, _ in unit.features.values()}
    wanted = rest[0][1][0]
    entries, problems = cache.load(["any"], {wanted})
    assert problems == [] and set(entries) == {wanted}
    assert entries[wanted].features.dtype == np.float16 and entries[wanted].features.shape == (256, 64, 64)


def test_a_cache_file_without_its_index_is_reported_and_recomputed(fp0, unit, tmp_path):
    """persam writes the entries' hashes into every cache file's footer: a file without them
    is not one of ours (nothing is read from it as features)."""
    cache = FeatureCache(str(tmp_path), fp0, "fp32", num_shards=1)
    cache.store(unit.features)
    [path] = cache.shard_files(0)
    pq.write_table(pq.read_table(path).replace_schema_metadata(None), path)
    entries, problems = cache.load(["any"], {sha for sha, _ in unit.features.values()})
    assert entries == {} and len(problems) == 1 and "unreadable" in problems[0] and "recomputed" in problems[0]


def test_check_writable_refuses_a_path_under_a_file(fp0, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="not writable"):
        FeatureCache(str(tmp_path / "file" / "cache"), fp0).check_writable()
    FeatureCache(str(tmp_path / "ok"), fp0).check_writable()
    assert [p.name for p in (tmp_path / "ok").rglob("*") if p.is_file()] == []  # the probe is removed
