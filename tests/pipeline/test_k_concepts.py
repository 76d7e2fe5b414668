"""K concepts in one encoder pass, encoder batches, per-image retries and presence, at unit
level without Ray: the model actor's device work (jobs.pipeline.compute: encode_chunk, then cascade_chunk) and the
finish stage's rows (jobs.pipeline.finish.mask_rows) on a hand-built chunk with the tiny random
model. The job and its exports: commands/test_export.py; several instances and several shots:
core/test_instances_and_shots.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sample_tools import iou, make_chunk, segment_rows
from persam_core.instances import segment_instances
from persam_core.masks import decode_rle
from persam_core.persam import prior_for, segment_persam
from persam_core.modeling.predictor import encode_images
from persam_core.modeling.resize import resize_longest_side


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


def test_k_concepts_encode_each_image_once(tiny_sam, tiny_fingerprint, concept_tensors, shard_images, encoder_calls):
    ks = [concept_tensors[n] for n in ("cat", "duck_toy", "colorful_sneaker", "duck_f")]
    rows, results = segment_rows(tiny_sam, tiny_fingerprint, ks, make_chunk(shard_images))
    assert encoder_calls == [1] * len(shard_images)  # images, not images x K
    assert results.encoded == list(range(len(shard_images)))
    assert len(rows) == len(shard_images) * len(ks)
    keys = [(r["image_uri"], r["concept"]) for r in rows]
    assert keys == [(url, c.concept.name) for url, _, _ in shard_images for c in ks]  # image, then concept order
    assert all(r["error"] is None and r["instance"] == 0 and r["present"] is True for r in rows)
    assert {r["method"] for r in rows} == {"persam", "persam-f"}

    # Decoding K concepts from shared features gives each concept's own single-concept result.
    encoder_calls.clear()
    alone, _ = segment_rows(tiny_sam, tiny_fingerprint, [concept_tensors["duck_toy"]], make_chunk(shard_images))
    assert encoder_calls == [1] * len(shard_images)
    shared = {r["image_uri"]: r for r in rows if r["concept"] == "duck_toy"}
    for row in alone:
        other = shared[row["image_uri"]]
        assert row["point"] == other["point"]
        assert row["similarity"] == pytest.approx(other["similarity"], abs=1e-6)
        assert iou(decode_rle(row["mask_rle"]), decode_rle(other["mask_rle"])) >= 0.98


def test_encoder_batches_cover_every_image_once(tiny_sam, tiny_fingerprint, concept_tensors, shard_images, encoder_calls):
    ks = [concept_tensors["cat"], concept_tensors["duck_toy"]]
    rows, _ = segment_rows(tiny_sam, tiny_fingerprint, ks, make_chunk(shard_images), 2)
    assert encoder_calls == [2, 1]
    assert len(rows) == len(shard_images) * 2


def test_a_failing_batch_is_retried_image_by_image(tiny_sam, tiny_fingerprint, concept_tensors, shard_images, monkeypatch):
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
    ks = [concept_tensors["cat"], concept_tensors["duck_toy"]]
    rows, results = segment_rows(tiny_sam, tiny_fingerprint, ks, make_chunk(images), batch_size=3)
    assert [(r["image_uri"], r["concept"]) for r in rows] == [(url, c.concept.name) for url, _, _ in images for c in ks]
    failed = [r for r in rows if r["error"] is not None]
    assert {r["image_uri"] for r in failed} == {"crop1"} and results.encoded == [0, 1, 2]
    assert all(r["error"] == "segment failed: RuntimeError: CUDA error: an illegal memory access" for r in failed)
    assert all((r["height"], r["width"]) == bad and r["mask_rle"] is None for r in failed)
    assert all(r["mask_rle"] is not None for r in rows if r["error"] is None)


# ---------------------------------------------------------------------------- presence


def test_below_threshold_is_one_absent_row_without_decoding(tiny_sam, concept_tensors, shard_images, decoder_calls):
    _, _, image = shard_images[0]
    encoded = encode_images(tiny_sam, [image])[0]
    concept = concept_tensors["cat"]
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


def test_absent_rows_in_a_shard(tiny_sam, tiny_fingerprint, concept_tensors, shard_images):
    ks = [concept_tensors["cat"], concept_tensors["duck_f"]]
    rows, _ = segment_rows(tiny_sam, tiny_fingerprint, ks, make_chunk(shard_images), 1, 2, 0.99999)
    assert len(rows) == len(shard_images) * len(ks)  # never fewer rows than images x concept_tensors
    for row in rows:
        assert row["present"] is False and row["instance"] == 0 and row["error"] is None
        assert row["area"] == 0 and row["score"] is None and row["bbox"] == [0, 0, 0, 0]
        assert not decode_rle(row["mask_rle"]).any()
        assert row["similarity"] is not None and row["similarity"] < 0.99999
        assert row["point"] is not None
