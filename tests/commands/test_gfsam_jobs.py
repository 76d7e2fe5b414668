"""GF-SAM through the CLI (tiny SAM and tiny DINOv2, random weights, --runner local): the
concept `fit --method gf-sam` writes, `segment` with one concept of each method, the masks
against segment_gfsam called directly, --min-similarity, and the refusals before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from persam_core.masks import decode_rle
from persam_core.methods.frame_resize import stretch_resize
from persam_core.methods.frames import frame_tensor
from persam_core.methods.gfsam_batch import segment_gfsam
from persam_core.methods.gfsam_concept import GFSAMConcept
from persam_core.methods.registry import load_concept
from persam_core.modeling.dinov2 import build_random_dinov2, dinov2_fingerprint, frame_tokens
from persam_core.modeling.models import build_random
from persam_core.modeling.predictor import encode_images
from tests.cli_tools import LOCAL, MODEL, assert_one_error_line, run_cli
from tests.synthetic import small_concept_masks

DINO = ["--dinov2", "tiny", "--dinov2-checkpoint", "random:0"]
SIZES = [(40, 56), (64, 40)]  # (H, W) of the lake's images: two aspect ratios


def _scene(size: tuple[int, int], seed: int, small: bool = False) -> np.ndarray:
    """A noisy field with a red box: the shots' box covers half by a third of the image; a lake
    image's (small) a tenth of each side, so that GF-SAM's location map is peaked and a pair
    has about a dozen points rather than 128 (decoding them is what these tests wait for)."""
    rng = np.random.default_rng(seed)
    image = (rng.random((*size, 3)) * 50 + 60).astype(np.uint8)
    height, width = size
    if small:
        top, left = height // 3, width // 2
        image[top: top + max(1, height // 10), left: left + max(1, width // 10)] = (210, 50, 40)
    else:
        image[height // 4: height * 3 // 4, width // 3: width * 2 // 3] = (210, 50, 40)
    return image


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _rows(out: Path) -> list[dict]:
    rows = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pylist()
    return sorted(rows, key=lambda r: (r["concept"], r["image_uri"]))


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> SimpleNamespace:
    """Two shots and a lake of two images; one GF-SAM concept (2 shots) and one PerSAM concept."""
    root = tmp_path_factory.mktemp("gfsam")
    lake = root / "lake"
    lake.mkdir()
    shots = []
    for index, size in enumerate([(48, 64), (60, 45)]):
        Image.fromarray(_scene(size, 10 + index)).save(root / f"ref{index}.png")
        mask = np.zeros(size, np.uint8)
        mask[size[0] // 4: size[0] * 3 // 4, size[1] // 3: size[1] * 2 // 3] = 255
        Image.fromarray(mask).save(root / f"ref{index}_mask.png")
        shots += ["--image", str(root / f"ref{index}.png"), "--mask", str(root / f"ref{index}_mask.png")]
    for index, size in enumerate(SIZES):
        Image.fromarray(_scene(size, index, small=True)).save(lake / f"{index}.png")
    red, cat = root / "red.json", root / "cat.json"
    fit = run_cli(["fit", "--method", "gf-sam", *MODEL, *DINO, *shots, "--name", "red", "--out", str(red)])
    assert fit.rc == 0, fit.err
    persam = run_cli(["fit", "--method", "persam", *MODEL, *shots[:4], "--name", "cat", "--out", str(cat)])
    assert persam.rc == 0, persam.err
    return SimpleNamespace(root=root, lake=lake, red=red, cat=cat, shots=shots, fit=fit)


@pytest.fixture(scope="module")
def segmented(scene) -> Path:
    """`segment` with both concepts, --runner local -> its output."""
    out = scene.root / "out"
    segment = run_cli(["segment", *MODEL, *DINO, *LOCAL, "--concept", str(scene.red), "--concept", str(scene.cat),
                       "--input", str(scene.lake), "--output", str(out)])
    assert segment.rc == 0, segment.err
    return out


def test_fit_writes_a_gfsam_concept_of_the_dinov2_weights(scene):
    concept = load_concept(scene.red.read_text(), str(scene.red))
    assert isinstance(concept, GFSAMConcept) and concept.method == "gf-sam" and concept.dinov2 == "tiny"
    assert concept.dinov2_fingerprint == dinov2_fingerprint(build_random_dinov2("tiny", 0), "tiny")
    assert concept.reference.tokens.shape == (2, 1369, 64) and concept.reference.tokens.dtype == np.float32
    assert concept.reference.wpos.shape == concept.reference.wneg.shape == (2, 1369)
    assert (concept.reference.wpos > 0).any()
    again = GFSAMConcept.from_json(concept.to_json())
    assert again.reference.tokens.tobytes() == concept.reference.tokens.tobytes()
    assert again.reference.wpos.tobytes() == concept.reference.wpos.tobytes()
    assert json.loads(scene.red.read_text())["tokens"]["dtype"] == "<f4"  # declared, never pickled
    assert "2 shot(s)" in scene.fit.out


def test_segment_writes_both_methods_and_gfsam_masks_equal_segment_gfsam(scene, segmented):
    rows = _rows(segmented)
    assert [(r["concept"], r["method"]) for r in rows] == [("cat", "persam")] * 2 + [("red", "gf-sam")] * 2
    assert all(r["error"] is None and r["present"] for r in rows)
    sam, dinov2 = build_random("tiny", 0), build_random_dinov2("tiny", 0)
    concept = load_concept(scene.red.read_text())
    for row in rows[2:]:
        image = _read(Path(row["image_uri"]))
        assert (row["height"], row["width"]) == image.shape[:2]
        stretched = stretch_resize(image)
        encoded = encode_images(sam, [stretched])[0]
        with torch.no_grad():
            tokens = frame_tokens(dinov2, frame_tensor(torch.from_numpy(stretched.pixels)[None]))
        [result] = segment_gfsam(sam, encoded.features[None], tokens, [concept.reference], [image.shape[:2]])
        expected = result.mask.numpy()
        np.testing.assert_array_equal(decode_rle(row["mask_rle"]), expected)
        assert row["area"] == int(expected.sum())
        assert row["similarity"] == pytest.approx(float(result.presence), abs=1e-6)
        assert row["point"] == [int(v) for v in result.point]


def test_min_similarity_makes_gfsam_pairs_absent_without_decoding(scene):
    out = scene.root / "absent"
    result = run_cli(["segment", *MODEL, *DINO, *LOCAL, "--concept", str(scene.red), "--input", str(scene.lake),
                      "--output", str(out), "--min-similarity", "1.0"])
    assert result.rc == 0, result.err
    rows = _rows(out)
    assert len(rows) == 2 and all(r["method"] == "gf-sam" for r in rows)
    assert all(not r["present"] and r["area"] == 0 and r["score"] is None and r["error"] is None for r in rows)
    assert all(r["similarity"] is not None and r["similarity"] < 1.0 for r in rows)


def test_a_concept_of_other_dinov2_weights_is_refused_before_any_work(scene):
    out = scene.root / "other"
    result = run_cli(["segment", *MODEL, "--dinov2", "tiny", "--dinov2-checkpoint", "random:1", *LOCAL,
                      "--concept", str(scene.red), "--input", str(scene.lake), "--output", str(out)])
    line = assert_one_error_line(result, "red", "DINOv2 weights", "persam fit --method gf-sam")
    assert result.rc == 3, line  # as every concept error: bad input
    assert not out.exists()
    kind = run_cli(["segment", *MODEL, "--dinov2", "vits14", "--dinov2-checkpoint", "random:0", *LOCAL,
                    "--concept", str(scene.red), "--input", str(scene.lake), "--output", str(out)])
    assert_one_error_line(kind, "--dinov2 tiny")
    assert kind.rc == 3 and not out.exists()


def test_a_dinov2_checkpoint_of_another_size_is_one_line_naming_the_file(scene):
    checkpoint = scene.root / "dino-tiny.pth"
    from persam_core.modeling.dinov2 import official_state_dict

    torch.save(official_state_dict(build_random_dinov2("tiny", 0)), checkpoint)
    result = run_cli(["fit", "--method", "gf-sam", *MODEL, "--dinov2", "vits14", "--dinov2-checkpoint", str(checkpoint),
                      *scene.shots[:4], "--name", "x", "--out", str(scene.root / "x.json")])
    assert_one_error_line(result, str(checkpoint))
    assert not (scene.root / "x.json").exists()


def test_gfsam_concept_files_are_refused_naming_the_field(scene):
    document = json.loads(scene.red.read_text())
    concept = load_concept(scene.red.read_text())

    def damaged(**changes) -> str:
        return json.dumps({**document, **changes})

    from persam_core.methods.gfsam_concept import encode_array
    from persam_core.methods.registry import ConceptError

    reference = concept.reference
    cases = {
        "tokens": damaged(tokens=encode_array(reference.tokens[:, :100])),
        "wpos": damaged(wpos=encode_array(np.full_like(reference.wpos, np.nan))),
        "wneg": damaged(wneg=dict(document["wneg"], base64="!!")),
        "normalised": damaged(tokens=encode_array(reference.tokens * 3)),
    }
    for field, text in cases.items():
        with pytest.raises(ConceptError, match=field) as error:
            load_concept(text, "c.json")
        assert str(error.value).startswith("c.json:") and "\n" not in str(error.value)
    with pytest.raises(ConceptError, match="wpos is zero for every shot"):
        load_concept(damaged(wpos=encode_array(np.zeros_like(reference.wpos))), "c.json")


@pytest.mark.slow
def test_the_ray_job_writes_the_local_runner_rows(scene, segmented):
    """The same two concepts through Ray Data: the same rows as --runner local."""
    out = scene.root / "ray"
    result = run_cli(["segment", *MODEL, *DINO, "--concept", str(scene.red), "--concept", str(scene.cat),
                      "--input", str(scene.lake), "--output", str(out)])
    assert result.rc == 0, result.err
    ray_rows, local_rows = _rows(out), _rows(segmented)
    columns = ("concept", "method", "present", "width", "height", "mask_rle", "area", "point", "error")
    assert [[r[c] for c in columns] for r in ray_rows] == [[r[c] for c in columns] for r in local_rows]
    # the score is a float sum: its last bit follows the actor's torch thread count (masks and
    # points do not; a thread-count sweep gave identical masks and scores within 1.2e-7)
    assert [r["similarity"] for r in ray_rows] == pytest.approx([r["similarity"] for r in local_rows], abs=1e-5)


def _counting(monkeypatch, module, name: str, counts: dict) -> None:
    """Replace module.name by a wrapper that counts its calls (the encoders: their images)."""
    original = getattr(module, name)

    def counted(*args, **kwargs):
        counts[name] = counts.get(name, 0) + (len(args[1]) if name != "load_checked_model" else 1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_rank_scores_by_gfsam_presence_and_a_warm_rerun_reads_the_cache(scene, segmented, monkeypatch):
    """The presence pass reads DINOv2 alone: SAM is loaded and run only for the top k's masks."""
    from jobs.pipeline import actors, compute

    cache = scene.root / "cache"
    runs = []
    for name in ("cold", "warm"):
        out, counts = scene.root / f"rank-{name}", {}
        _counting(monkeypatch, compute, "encode_images", counts)  # SAM's encoder, images
        _counting(monkeypatch, compute, "frame_tokens", counts)  # DINOv2, images
        _counting(monkeypatch, actors, "load_checked_model", counts)  # SAM on an actor
        result = run_cli(["rank", *MODEL, *DINO, *LOCAL, "--concept", str(scene.red), "--input", str(scene.lake),
                          "--output", str(out), "--top-k", "1", "--cache", str(cache), "--cache-dtype", "fp32"])
        monkeypatch.undo()
        assert result.rc == 0, result.err
        runs.append((re.search(r"(\d+) encoded, (\d+) from cache", result.out).groups(),
                     pq.read_table(out / "ranking.parquet").to_pylist(), counts))
    (cold_counts, ranking, cold), (warm_counts, warm, hot) = runs
    assert cold_counts == ("2", "0") and warm_counts == ("0", "2")  # the warm run reads DINOv2 tokens from the cache
    # cold: SAM loaded once and run on the top image only (the masks pass); DINOv2 on 2 + 1 images
    assert cold == {"encode_images": 1, "frame_tokens": 3, "load_checked_model": 1}
    assert hot == {"load_checked_model": 1}  # warm: neither encoder runs
    assert warm == ranking
    folders = {folder.name for folder in cache.iterdir()}
    assert any("+" in folder for folder in folders)  # the masks pass: keyed by SAM's and DINOv2's fingerprints
    concept = load_concept(scene.red.read_text())
    assert concept.dinov2_fingerprint.replace(":", "-") in folders  # the presence pass: DINOv2's tokens alone
    presence = {r["image_uri"]: r["similarity"] for r in _rows(segmented) if r["method"] == "gf-sam"}
    assert [r["rank"] for r in ranking] == [1, 2]
    assert ranking[0]["similarity"] >= ranking[1]["similarity"]
    for row in ranking:
        assert row["similarity"] == pytest.approx(presence[row["image_uri"]], abs=1e-6)
    assert ranking[0]["mask_rle"] is not None and ranking[1]["mask_rle"] is None


def test_dry_run_names_the_dinov2_and_loads_nothing(scene):
    out = scene.root / "dry"
    result = run_cli(["segment", *MODEL, *DINO, *LOCAL, "--dry-run", "--concept", str(scene.red),
                      "--concept", str(scene.cat), "--input", str(scene.lake), "--output", str(out)])
    assert result.rc == 0, result.err
    assert "DINOv2 tiny, checkpoint random:0 (not loaded" in result.out
    assert "red (gf-sam, DINOv2 tiny weights" in result.out and not out.exists()


def test_exports_read_gfsam_rows(scene, segmented):
    target = scene.root / "coco.json"
    result = run_cli(["export", "coco", "--masks", str(segmented), "--output", str(target)])
    assert result.rc == 0, result.err
    coco = json.loads(target.read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    assert set(categories.values()) == {"red", "cat"}
    rows = [r for r in _rows(segmented) if r["present"] and r["area"] > 0]  # COCO holds non-empty masks only
    assert sorted(categories[a["category_id"]] for a in coco["annotations"]) == sorted(r["concept"] for r in rows)
    assert "red" in {categories[a["category_id"]] for a in coco["annotations"]}


@pytest.mark.slow
def test_bench_times_gfsam_beside_persam(monkeypatch):
    from jobs.commands.bench_gfsam import run_gfsam_bench
    from jobs.spec import JobSpec, ModelSpec

    # small concept objects: a pair decodes tens of prompts, not its 128 maximum (synthetic.py)
    monkeypatch.setattr("jobs.commands.bench_gfsam.concept_masks", small_concept_masks)

    spec = JobSpec("bench", ModelSpec("tiny", "random:0", "cpu", dinov2="tiny", dinov2_checkpoint="random:0"))
    result = run_gfsam_bench(spec, images=1, concepts=2, persam_s_per_image=1.0)
    for key in ("gfsam_sam_encoder_s_per_image", "gfsam_dinov2_s_per_image", "gfsam_cascade_k1_s_per_image",
                "gfsam_cascade_k_s_per_image", "gfsam_rank_s_per_image"):
        assert result[key] > 0, key
    assert result["gfsam_s_per_image"] >= result["gfsam_cascade_k1_s_per_image"]
    assert result["gfsam_over_persam"] == pytest.approx(result["gfsam_s_per_image"], rel=1e-3)
