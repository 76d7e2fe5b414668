"""`persam segment` end to end: output contract, resume, refusals.

One module-scoped job on an embedded local Ray (two concepts over the shared sample lake:
nine photos and two broken files) feeds most assertions and proves the Ray wiring; the
crash-resume and new-image reruns go through `--runner local` (the same stages in this
process), and so does MobileSAM (vit_t) through the job.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from cli_tools import LOCAL, error_lines, run_cli
from jobs.pipeline.commit import shard_of
from jobs.storage.listing import list_image_urls
from jobs.storage.schema import read_part
from persam_core.modeling.models import model_fingerprint

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0"]
CONCEPTS = ("cat", "duck_toy")
BROKEN = ("broken.jpg", "zero.png")
SPEC_COLUMNS = ("image_uri", "concept", "width", "height", "mask_rle", "bbox", "area", "score",
                "similarity", "point", "error", "model_fingerprint", "instance", "present")
DONE = re.compile(r"^done: (\d+) images committed in the output; this run: (\d+) images, (\d+) rows, (\d+) error rows, (\d+) shards written "
                  r"\((\d+) already committed\), \d+ encoded, \d+ from cache, \d+ unchanged, \d+ removed "
                  r"-> (.+) in ([0-9.]+) s$")


def done_line(result: SimpleNamespace) -> dict:
    lines = result.out.strip().splitlines()
    assert lines, result.err
    match = DONE.match(lines[-1])
    assert match, lines[-1]
    keys = ("committed", "images", "rows", "errors", "written", "skipped", "output", "seconds")
    return {k: (v if k == "output" else float(v) if k == "seconds" else int(v)) for k, v in zip(keys, match.groups())}


def fit(sample: Path, concept: str, out: Path, *extra: str, checkpoint: str = "random:0", name: str | None = None) -> None:
    result = run_cli([
        "fit", "--model-type", "tiny", "--checkpoint", checkpoint,
        "--image", str(sample / "Images" / concept / "00.jpg"),
        "--mask", str(sample / "Annotations" / concept / "00.png"),
        "--name", name or concept, "--out", str(out), *extra,
    ])
    assert result.rc == 0, result.err


def files_state(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (its concept partitions too), by relative path."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def read_rows(output: Path) -> list[dict]:
    return pq.read_table(output).to_pylist()


@pytest.fixture(scope="module")
def job(sample_lake, tmp_path_factory):
    """Segment every lake image (nine photos, two broken files) for cat and duck_toy on an
    embedded local Ray: 2 images per shard, 1 per chunk, so shards arrive in pieces."""
    output = tmp_path_factory.mktemp("segment") / "masks"
    argv = ["segment", *MODEL, "--concept", str(sample_lake.cat), "--concept", str(sample_lake.duck),
            "--input", str(sample_lake.images), "--output", str(output), "--shard-size", "2", "--chunk-size", "1",
            "--device", "cpu"]
    result = run_cli(argv)
    return SimpleNamespace(images=sample_lake.images, concepts=sample_lake.concepts, output=output, argv=argv,
                           result=result, urls=list(list_image_urls(str(sample_lake.images))))


@pytest.fixture(scope="module")
def rows(job) -> list[dict]:
    assert job.result.rc == 4, job.result.err[-3000:]  # 2 of 11 images failed: above --max-error-rate 0.05
    return read_rows(job.output)


def good_rows(rows):
    return [r for r in rows if r["error"] is None]


# ---------------------------------------------------------------------------- the job's output


@pytest.mark.slow
def test_job_commits_everything_then_fails_on_its_error_rate(job, rows):
    assert job.result.rc == 4  # undecodable files are error rows, committed; the share of them fails the job
    assert error_lines(job.result) == [f"persam segment: failed: 2 of 11 images failed (18.2 %), more than "
                                       "--max-error-rate 0.05; their error rows are committed"]
    summary = done_line(job.result)
    assert summary["images"] == summary["committed"] == len(job.urls) == 11
    assert summary["rows"] == len(rows) == 11 * len(CONCEPTS)
    assert summary["errors"] == len(BROKEN) * len(CONCEPTS)
    assert summary["skipped"] == 0 and summary["written"] >= 2
    assert summary["output"] == str(job.output)
    assert summary["seconds"] > 0
    assert "not meaningful" in job.result.out.lower()  # random weights are announced


@pytest.mark.slow
def test_one_row_per_image_and_concept(job, rows):
    keys = [(r["image_uri"], r["concept"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(url, concept) for url in job.urls for concept in CONCEPTS}
    assert {r["instance"] for r in rows} == {0}


@pytest.mark.slow
def test_broken_files_are_error_rows(job, rows):
    for row in rows:
        broken = Path(row["image_uri"]).name in BROKEN
        assert (row["error"] is not None) == broken, row["image_uri"]
        if broken:
            assert row["area"] == 0
            assert row["mask_rle"] is None and row["score"] is None and row["point"] is None
            assert row["present"] is not True
            assert Path(row["image_uri"]).name in row["error"] and "\n" not in row["error"]
    reasons = {Path(r["image_uri"]).name: r["error"] for r in rows if r["error"]}
    assert "empty" in reasons["zero.png"]
    assert "not a decodable image" in reasons["broken.jpg"]


@pytest.mark.slow
def test_parquet_schema_has_the_spec_columns(job):
    schema = read_part(str(next(job.output.rglob("part-*.parquet")))).schema  # the concept column from its folder
    assert set(SPEC_COLUMNS) <= set(schema.names)
    types = {name: schema.field(name).type for name in schema.names}
    for name in ("image_uri", "concept", "error", "model_fingerprint"):
        assert pa.types.is_string(types[name]) or pa.types.is_large_string(types[name]), name
    for name in ("width", "height", "area", "instance"):
        assert pa.types.is_integer(types[name]), name
    for name in ("score", "similarity"):
        assert pa.types.is_floating(types[name]), name
    assert pa.types.is_boolean(types["present"])
    for name in ("bbox", "point"):
        assert pa.types.is_list(types[name]) and pa.types.is_integer(types[name].value_type), name
    rle = types["mask_rle"]
    assert pa.types.is_struct(rle)
    assert pa.types.is_list(rle.field("size").type) and pa.types.is_integer(rle.field("size").type.value_type)
    assert pa.types.is_string(rle.field("counts").type)
    # Every shard has the same schema, so the directory reads as one dataset.
    schemas = {pq.read_schema(p).remove_metadata() for p in job.output.rglob("part-*.parquet")}
    assert len(schemas) == 1


@pytest.mark.slow
def test_rows_carry_the_model_fingerprint_and_method(rows, tiny_sam):
    fingerprint = model_fingerprint(tiny_sam, "tiny")
    assert {r["model_fingerprint"] for r in rows} == {fingerprint}
    methods = {r["concept"]: r.get("method") for r in rows}
    if "method" in rows[0]:
        assert methods == {"cat": "persam", "duck_toy": "persam-f"}


@pytest.mark.slow
def test_masks_decode_with_pycocotools_and_match_area_and_bbox(job, rows):
    sizes = {}
    for row in good_rows(rows):
        path = row["image_uri"]
        if path not in sizes:
            with Image.open(path) as image:
                sizes[path] = image.size
        width, height = sizes[path]
        assert (row["width"], row["height"]) == (width, height)

        rle = row["mask_rle"]
        assert list(rle["size"]) == [height, width]
        mask = coco_mask.decode({"size": list(rle["size"]), "counts": rle["counts"]})  # str counts, as stored
        assert mask.shape == (height, width)
        assert int(mask.sum()) == row["area"]
        assert int(coco_mask.area({"size": list(rle["size"]), "counts": rle["counts"].encode()})) == row["area"]

        ys, xs = np.nonzero(mask)
        expected_bbox = [0, 0, 0, 0] if xs.size == 0 else [
            int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        assert list(row["bbox"]) == expected_bbox
        x, y, w, h = row["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height

        px, py = row["point"]
        assert 0 <= px < width and 0 <= py < height
        assert row["present"] is True  # no --min-similarity: every concept counts as present
        assert row["score"] is not None and np.isfinite(row["score"])
        assert -1.0 - 1e-4 <= row["similarity"] <= 1.0 + 1e-4


@pytest.mark.slow
def test_output_holds_only_committed_files(job):
    names = sorted(files_state(job.output))
    assert "_persam_job.json" in names
    partition = rf"concept=({'|'.join(CONCEPTS)})/"
    assert all(n == "_persam_job.json" or re.fullmatch(partition + r"(_persam_concept\.json|part-\d{5}-[0-9a-f]{12}\.parquet)", n)
               for n in names), names
    assert len([n for n in names if "part-" in n]) == done_line(job.result)["written"] * len(CONCEPTS)


# ---------------------------------------------------------------------------- reruns


@pytest.mark.slow
def test_rerun_skips_every_committed_shard(job, rows):
    before = files_state(job.output)
    result = run_cli(job.argv)
    assert result.rc == 0, result.err
    summary = done_line(result)
    assert summary["written"] == 0
    assert (summary["images"], summary["committed"]) == (0, 11)  # nothing run now, everything committed
    assert summary["skipped"] == len({n.rsplit("/", 1)[-1] for n in before if "part-" in n})  # shards
    assert files_state(job.output) == before  # no new, changed or removed files
    assert read_rows(job.output) == rows


@pytest.mark.slow
def test_crash_resume_recomputes_only_the_lost_shard(job, rows, tmp_path):
    output = tmp_path / "masks"
    shutil.copytree(job.output, output)
    parts = sorted(output.rglob("part-*.parquet"))
    assert len(parts) >= 3
    lost = max(parts, key=lambda p: pq.read_metadata(p).num_rows)  # the shard with the most rows
    lost_rows = read_part(str(lost)).to_pylist()
    lost.unlink()  # as if the job died before this shard's publish
    kept = files_state(output)

    argv = [a if a != str(job.output) else str(output) for a in job.argv]
    # The concepts as a directory this time: same job identity, so the record still matches.
    argv = [*argv[: argv.index("--concept")], "--concept", str(job.concepts),
            *argv[argv.index("--input"):], "--max-error-rate", "1"]  # the lost shard may hold a broken file
    result = run_cli([*argv, *LOCAL])
    assert result.rc == 0, result.err[-3000:]
    summary = done_line(result)
    assert summary["written"] == 1 and summary["skipped"] == len({p.name for p in parts}) - 1
    assert summary["rows"] == len(lost_rows)

    after = files_state(output)
    lost_name = str(lost.relative_to(output))
    assert {k: v for k, v in after.items() if k != lost_name} == kept  # other shards untouched
    assert lost_name in after
    resumed = read_rows(output)
    keys = [(r["image_uri"], r["concept"]) for r in resumed]
    assert len(keys) == len(set(keys)) == len(rows)
    assert set(keys) == {(r["image_uri"], r["concept"]) for r in rows}
    recomputed = read_part(str(lost)).to_pylist()
    assert [(r["image_uri"], r["concept"], r["error"]) for r in recomputed] == [
        (r["image_uri"], r["concept"], r["error"]) for r in lost_rows]
    for new, old in zip(recomputed, lost_rows):  # same weights, same inputs: same masks (CPU fp32)
        if old["error"] is None:
            assert new["point"] == old["point"]
            assert abs(new["area"] - old["area"]) <= max(10, old["area"] // 1000)


# ---------------------------------------------------------------------------- refusals before any work


def test_concept_from_other_weights_is_refused(sample_lake, perseg_sample, tmp_path):
    foreign = tmp_path / "cat_seed1.json"
    fit(perseg_sample, "cat", foreign, "--method", "persam", checkpoint="random:1", name="cat1")
    output = tmp_path / "masks"
    result = run_cli(["segment", *MODEL, "--concept", str(sample_lake.cat), "--concept", str(foreign),
                      "--input", str(sample_lake.images), "--output", str(output)])
    assert result.rc != 0
    lines = error_lines(result)
    assert len(lines) == 1, result.err
    assert "cat1" in lines[0] and "re-run `persam fit`" in lines[0]
    assert "weights" in lines[0] or "fingerprint" in lines[0]
    assert not output.exists()  # refused before the output (or Ray) was touched


@pytest.mark.slow
def test_a_subset_of_the_concepts_finds_its_partition_committed(job):
    """Concept sets may differ between runs (one partition per concept): cat alone is done."""
    before = files_state(job.output)
    result = run_cli(["segment", *MODEL, "--concept", str(job.concepts / "cat.json"),
                      "--input", str(job.images), "--output", str(job.output)])
    assert result.rc == 0, result.err
    assert done_line(result)["written"] == 0
    assert files_state(job.output) == before


def test_empty_input_is_refused(sample_lake, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    result = run_cli(["segment", *MODEL, "--concept", str(sample_lake.cat),
                      "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "masks")])
    assert result.rc != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "no images found" in lines[0], result.err


def test_a_non_concept_file_is_refused(sample_lake, tmp_path):
    result = run_cli(["segment", *MODEL, "--concept", str(sample_lake.images / "cat" / "00.jpg"),
                      "--input", str(sample_lake.images), "--output", str(tmp_path / "masks")])
    assert result.rc != 0
    lines = error_lines(result)
    assert len(lines) == 1 and "00.jpg" in lines[0] and "persam fit" in lines[0], result.err


@pytest.mark.slow
def test_new_image_in_a_committed_shard_is_not_silently_skipped(job, tmp_path):
    output = tmp_path / "masks"
    shutil.copytree(job.output, output)
    num_shards = json.loads((output / "_persam_job.json").read_text())["num_shards"]
    committed = {int(p.name.split("-")[1]) for p in output.rglob("part-*.parquet")}
    extra = next(tmp_path / "new" / f"extra_{i}.jpg" for i in range(10_000)
                 if shard_of(str(tmp_path / "new" / f"extra_{i}.jpg"), num_shards) in committed)
    extra.parent.mkdir()
    shutil.copyfile(job.images / "cat" / "00.jpg", extra)
    manifest = tmp_path / "images.txt"
    manifest.write_text("\n".join([*job.urls, str(extra)]) + "\n")

    argv = [str(manifest) if a == str(job.images) else str(output) if a == str(job.output) else a for a in job.argv]
    result = run_cli([*argv, *LOCAL])
    new_rows = [r for r in read_rows(output) if r["image_uri"] == str(extra)]
    assert result.rc != 0 or len(new_rows) == len(CONCEPTS), result.out


# ---------------------------------------------------------------------------- MobileSAM (vit_t)


def test_vit_t_segments_through_the_segment_job(tmp_path: Path, perseg_sample: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(perseg_sample / "Images" / "cat" / "01.jpg", images / "01.jpg")
    model = ["--model-type", "vit_t", "--checkpoint", "random:0"]
    fit = run_cli(["fit", *model, "--image", str(perseg_sample / "Images" / "cat" / "00.jpg"),
                   "--mask", str(perseg_sample / "Annotations" / "cat" / "00.png"), "--name", "cat",
                   "--out", str(tmp_path / "cat.json")])
    assert fit.rc == 0, fit.err
    result = run_cli(["segment", *model, *LOCAL, "--concept", str(tmp_path / "cat.json"), "--input", str(images),
                      "--output", str(tmp_path / "masks")])
    assert result.rc == 0, result.err
    rows = pq.read_table(tmp_path / "masks").to_pylist()
    assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["model_fingerprint"].startswith("vit_t:")
