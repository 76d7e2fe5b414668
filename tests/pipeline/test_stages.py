"""The pipeline's stages: chunks of a shard, the tensor-only model actor, the CPU finish
stage, the driver's gathering and commit, and the speed defaults on CPU.

Unit level, plus one job whose shard spans several chunks, all without Ray: the job runs the
product's local runner (the same stages in this process); commands/test_segment.py's job proves the
Ray wiring with several chunks per shard.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import jobs.pipeline.commit
from jobs.pipeline.cache import FeatureCache
from jobs.cli import build_parser
from jobs.pipeline.finish import finish_chunk
from jobs.pipeline.gather import ShardGatherer
from jobs.pipeline.payload import FinishedChunk, unpack_results
from jobs.pipeline.run import plan_chunks
from jobs.pipeline.shards import Shard
from jobs.pipeline.prepare import prepare_chunk
from jobs.commands.segment import run_segment
from jobs.pipeline.job import PreparedJob
from jobs.spec import JobSpec, ModelSpec, SpeedSpec
from jobs.pipeline.actors import SegmentActor
from jobs.storage.schema import read_part
from persam_core.speed.acceleration import EncoderSpeed, resolve_speed
from persam_core.concept import Concept, persam_targets, reference_cells
from persam_core.masks import decode_rle
from persam_core.speed.decoder_speed import decoder_mode
from persam_core.modeling.models import build_random, model_fingerprint
from persam_core.modeling.predictor import encode_images
from persam_core.modeling.resize import resize_longest_side

MODEL = ["--model-type", "tiny", "--checkpoint", "random:0"]
SOURCES = ("cat/01", "cat/02", "duck_toy/01", "duck_toy/02", "colorful_sneaker/01")


@pytest.fixture(scope="module")
def concepts(perseg_sample, tiny_sam, tmp_path_factory) -> list[Path]:
    """Two PerSAM concepts of the tiny random model, as files."""
    from jobs.storage.images import decode_image, decode_mask

    folder = tmp_path_factory.mktemp("concepts")
    paths = []
    for name in ("cat", "duck_toy"):
        image = decode_image((perseg_sample / "Images" / name / "00.jpg").read_bytes(), "image")
        mask = decode_mask((perseg_sample / "Annotations" / name / "00.png").read_bytes(), "mask")
        cells = reference_cells(encode_images(tiny_sam, [resize_longest_side(image)]), [mask], ["mask"])
        feature, embedding = persam_targets(cells)
        concept = Concept(name, "persam", feature.numpy(), embedding.numpy(), model_fingerprint(tiny_sam, "tiny"))
        paths.append(folder / f"{name}.json")
        paths[-1].write_text(concept.to_json())
    return paths


@pytest.fixture(scope="module")
def images(perseg_sample, tmp_path_factory) -> Path:
    """Five small sample photos and one broken file."""
    folder = tmp_path_factory.mktemp("images")
    for source in SOURCES:
        with Image.open(perseg_sample / "Images" / f"{source}.jpg") as picture:
            picture = picture.convert("RGB")
            picture.thumbnail((256, 256))
            picture.save(folder / f"{source.replace('/', '_')}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"<html>not an image</html>")
    return folder


# ---------------------------------------------------------------------------- chunks and the gatherer


def test_chunks_never_span_shards_and_keep_url_order():
    shards = [Shard(3, tuple(f"u{i}" for i in range(5)), previous_by_partition={"cat": ("p",)}), Shard(7, ("v",))]
    chunks = plan_chunks(shards, 2)
    assert [(c["shard"], c["chunk"], c["urls"]) for c in chunks] == [
        (3, 0, ["u0", "u1"]), (3, 1, ["u2", "u3"]), (3, 2, ["u4"]), (7, 0, ["v"])]
    assert [s.chunk_count(2) for s in shards] == [3, 1]
    assert all(c["previous"] == ["p"] for c in chunks[:3]) and chunks[3]["previous"] == []


def test_a_shard_is_handed_on_once_after_its_last_chunk_and_duplicates_are_dropped():
    handed = []
    shards = {0: Shard(0, ("a", "b", "c")), 1: Shard(1, ("d",))}  # 3 chunks and 1 of one image each
    with ShardGatherer(shards, 1, lambda shard, chunks: handed.append((shard.shard, [c.chunk for c in chunks]))) as gather:
        arrivals = [(0, 2), (1, 0), (0, 0), (0, 2), (1, 0), (0, 1), (0, 1), (0, 0)]  # retried tasks deliver twice
        fresh = [gather.add(FinishedChunk(s, c, 1, b"")) for s, c in arrivals]
        gather.results()
    assert fresh == [True, True, True, False, False, True, False, False]
    assert sorted(handed) == [(0, [0, 1, 2]), (1, [0])]  # each shard once, its chunks in order


def test_a_shard_missing_a_chunk_is_an_error_not_a_silent_gap():
    with ShardGatherer({0: Shard(0, ("a", "b"))}, 1, lambda shard, chunks: None) as gather:
        gather.add(FinishedChunk(0, 0, 1, b""))
        with pytest.raises(RuntimeError, match="did not receive all their chunks"):
            gather.results()


def test_a_failed_commit_stops_the_job():
    def broken(shard, chunks):
        raise OSError("output: disk full")

    with ShardGatherer({0: Shard(0, ("a",)), 1: Shard(1, ("b",))}, 1, broken) as gather:
        gather.add(FinishedChunk(0, 0, 1, b""))
        gather.pool.shutdown(wait=True)  # let the commit fail
        with pytest.raises(OSError, match="disk full"):
            gather.add(FinishedChunk(1, 0, 1, b""))


# ---------------------------------------------------------------------------- speed defaults on CPU


def test_cli_defaults_resolve_to_the_exact_cpu_path():
    for command in (["segment", "--concept", "c.json"], ["rank", "--concept", "c.json"]):
        args = build_parser().parse_args([*command, *MODEL, "--input", "i", "--output", "o"])
        assert (args.precision, args.fused_attention, args.compile, args.batch_size) == ("auto", None, None, None)
        spec = JobSpec.from_args(args)
        speed = resolve_speed("cpu", spec.speed)
        assert speed == EncoderSpeed(precision="fp32", fused_attention=False, compile=False, batch_size=1)
        assert resolve_speed("cuda", spec.speed) == EncoderSpeed("bf16", True, True, 16, tf32=True)


def test_the_old_flags_still_parse():
    args = build_parser().parse_args(["segment", "--concept", "c", *MODEL, "--input", "i", "--output", "o",
                                      "--fused-attention", "--compile", "--precision", "fp16", "--batch-size", "4"])
    assert (args.precision, args.fused_attention, args.compile, args.batch_size) == ("fp16", True, True, 4)
    args = build_parser().parse_args(["rank", "--concept", "c", *MODEL, "--input", "i", "--output", "o",
                                      "--no-fused-attention", "--no-compile"])
    assert (args.fused_attention, args.compile) == (False, False)


def test_decoder_settings_reach_the_actor():
    args = build_parser().parse_args(["segment", "--concept", "c", "--model-type", "tiny", "--checkpoint", "random:0",
                                      "--device", "cpu", "--input", "i", "--output", "o", "--decoder-graphs",
                                      "--decoder-precision", "bf16", "--decoder-compile"])
    spec = JobSpec.from_args(args)
    assert (spec.speed.decoder_graphs, spec.speed.decoder_precision, spec.speed.decoder_compile) == (True, "bf16", True)
    actor = SegmentActor(PreparedJob(spec, model_fingerprint(build_random("tiny", 0), "tiny"), ()), threads=1)
    assert actor.speed.decoder_graphs and actor.speed.decoder_precision == "bf16" and actor.speed.decoder_compile
    assert decoder_mode(actor.sam) == (True, "bf16", True)
    assert build_parser().parse_args(["segment", "--concept", "c", *MODEL, "--input", "i", "--output", "o"]
                                     ).decoder_graphs is None  # off unless asked for


@pytest.mark.parametrize("flags, recorded", [((), True), (("--no-tf32",), False), (("--precision", "fp32"), False)])
def test_tf32_on_gpu_actors_is_what_the_job_records(flags, recorded):
    """The driver records the settings its GPU actors will resolve (TF32 changes masks slightly):
    on by default with CUDA bf16, off when refused or on the exact path."""
    from jobs.pipeline.job_checks import expected_speed

    args = build_parser().parse_args(["segment", "--concept", "c", "--model-type", "tiny", "--checkpoint", "random:0",
                                      "--device", "cuda", "--input", "i", "--output", "o", *flags])
    assert expected_speed(JobSpec.from_args(args)).tf32 is recorded


# ---------------------------------------------------------------------------- the actor does tensor work only


@contextlib.contextmanager
def no_host_work(monkeypatch):
    """Every RLE, Arrow-table, Parquet and cache call fails the test while inside."""
    import jobs.pipeline.finish
    import jobs.pipeline.payload
    import persam_core.masks

    def forbidden(*args, **kwargs):
        raise AssertionError("host work (RLE, Arrow, Parquet or cache I/O) inside the model actor")

    with monkeypatch.context() as patch:
        for owner, name in ((persam_core.masks, "encode_rle"), (jobs.pipeline.finish, "encode_rle"), (jobs.pipeline.finish, "rows_to_table"),
                            (jobs.pipeline.payload, "table_to_ipc"), (jobs.pipeline.finish, "table_to_ipc"), (pa, "table"),
                            (pq, "write_table"), (pq, "read_table"), (pq, "ParquetFile"),
                            (FeatureCache, "store"), (FeatureCache, "load")):
            patch.setattr(owner, name, forbidden)
        yield


def test_the_actor_returns_arrays_and_the_finish_stage_builds_rows_and_the_cache(
    concepts, images, tmp_path, monkeypatch
):
    texts = tuple(p.read_text() for p in concepts)
    fingerprint = Concept.from_json(texts[0]).model_fingerprint
    spec = JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), cache=str(tmp_path / "cache"), cache_dtype="fp16")
    job = PreparedJob(spec, fingerprint, texts, cache_shards=1)
    cache = job.cache()
    urls = sorted(str(p) for p in images.iterdir())[:3]  # broken.jpg and two photos
    prepared = prepare_chunk({"shard": 4, "chunk": 1, "urls": urls, "previous": []}, job)
    actor = SegmentActor(job, threads=1)
    assert actor.speed == EncoderSpeed()  # CPU: fp32, eager, batch 1

    with no_host_work(monkeypatch):
        out = actor({"meta": [prepared["meta"]], "arrays": [prepared["arrays"]]})
    assert set(out) == {"meta", "results"} and out["meta"][0] == prepared["meta"]
    results = unpack_results(out["results"][0])
    assert sorted(results.fresh) == results.encoded == [1, 2]  # item 0 is broken.jpg
    assert results.masks is not None and sorted(set(results.masks.image_index.tolist())) == [1, 2]
    assert all(a.dtype == np.float16 for a in results.fresh.values())

    assert job.labels() == [("cat", "persam"), ("duck_toy", "persam")]
    row = FinishedChunk.from_row(finish_chunk({key: values[0] for key, values in out.items()}, job))
    assert (row.shard, row.chunk, row.images, row.encoded, row.cache_hits) == (4, 1, 3, 2, 0)
    table = row.rows().to_pylist()
    assert [(r["image_uri"], r["concept"]) for r in table] == [(u, c) for u in urls for c in ("cat", "duck_toy")]
    assert [r["error"] is not None for r in table] == [True, True, False, False, False, False]
    for r in table[2:]:
        assert decode_rle(r["mask_rle"]).shape == (r["height"], r["width"]) and r["content_sha256"]
    entries, problems = cache.load(urls)
    assert problems == [] and set(entries) == {r["content_sha256"] for r in table[2:]}


# ---------------------------------------------------------------------------- one shard, several chunks


def test_a_shard_of_several_chunks_commits_once_in_order(concepts, images, tmp_path, monkeypatch):
    commits, progress = [], []
    real_commit = jobs.pipeline.commit.commit_shard

    def counting(output, shard, digest, table, *args, **kwargs):
        commits.append((shard, table.num_rows))
        return real_commit(output, shard, digest, table, *args, **kwargs)

    monkeypatch.setattr(jobs.pipeline.commit, "commit_shard", counting)
    output = tmp_path / "masks"
    spec = JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"), SpeedSpec(chunk_size=2, batch_size=2),
                   concepts=tuple(str(p) for p in concepts), input=str(images), output=str(output), shard_size=100,
                   runner="local")
    summary = run_segment(spec, log=lambda line: None, on_progress=progress.append)

    urls = sorted(str(p) for p in images.iterdir())
    assert len(urls) == 6 and sorted(progress) == [2, 2, 2]  # three chunks, each reported once
    assert commits == [(0, 6), (0, 6)]  # one shard, committed once per concept partition, after its last chunk
    parts = sorted(output.rglob("part-*.parquet"))
    assert len(parts) == 2 and summary.shards_run == 1 and summary.rows == 12 and summary.error_rows == 2
    rows = [row for part in parts for row in read_part(str(part)).to_pylist()]
    assert [(r["image_uri"], r["concept"], r["instance"]) for r in rows] == [
        (u, c, 0) for c in ("cat", "duck_toy") for u in urls]  # a partition per concept, in URL order
    assert json.loads((output / "_persam_job.json").read_text())["settings"]["precision"] == "fp32"


def test_a_bf16_decoder_is_recorded_and_a_rerun_in_fp32_is_refused(concepts, images, tmp_path):
    """The bf16 decoder changes masks: the job record says so, and adding to that output with
    the fp32 decoder would mix two kinds of masks."""
    output = tmp_path / "masks"

    def spec(precision: str) -> JobSpec:
        return JobSpec("segment", ModelSpec("tiny", "random:0", "cpu"),
                       SpeedSpec(decoder_precision=precision),
                       concepts=(str(concepts[0]),), input=str(images), output=str(output), runner="local")

    summary = run_segment(spec("bf16"), log=lambda line: None)
    assert summary.rows == 6 and summary.error_rows == 1  # broken.jpg
    settings = json.loads((output / "_persam_job.json").read_text())["settings"]
    assert (settings["precision"], settings["decoder_precision"]) == ("fp32", "bf16")
    with pytest.raises(Exception, match="settings"):
        run_segment(spec("fp32"), log=lambda line: None)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's and ld.so's variables; /proc")
def test_the_cpu_model_actors_of_a_ray_job_start_with_the_allocator_environment(images):
    """On Ray, the CPU model actor's process starts with glibc's one-arena variable and, where
    this machine has tcmalloc, with tcmalloc loaded (host_memory.py: both act only from a
    process's start), whatever the driver's own environment."""
    from jobs.pipeline.host_memory import process_environment
    from jobs.pipeline.run import ray_stream

    class EnvironmentProbe:  # defined here: Ray's workers get it by value (a test module is not importable there)
        """A model actor's stand-in that reports how its process's allocator was set up."""

        scores_only = False

        def __init__(self, job: PreparedJob, threads: int) -> None:
            import os

            with open("/proc/self/maps") as maps:
                loaded = "tcmalloc" in maps.read()
            self.report = f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX')} tcmalloc={loaded}"

        def __call__(self, batch: dict) -> dict:
            raise RuntimeError(f"probe: {self.report}")

    args = build_parser().parse_args(["segment", "--concept", "c", *MODEL, "--device", "cpu", "--input", str(images),
                                      "--output", "o"])
    job = PreparedJob(JobSpec.from_args(args), "f", ())
    chunk = {"shard": 0, "chunk": 0, "urls": [str(next(images.glob("*.jpg")))], "previous": [], "sources": {}}
    tcmalloc = "LD_PRELOAD" in process_environment("cpu")
    with pytest.raises(Exception, match=f"probe: MALLOC_ARENA_MAX=1 tcmalloc={tcmalloc}"):
        list(ray_stream(job, EnvironmentProbe, [chunk]))
