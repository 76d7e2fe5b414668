"""`persam bench`: the batched in-process paths and `--job` (the real Ray job) on the tiny model.

Rates on a shared CPU are noise; these tests check the contract: the keys, positive
rates, and that each job wrote one row per (image, concept).
"""

from __future__ import annotations

import json

import pytest

from cli_tools import MODEL, run_cli
from synthetic import small_concept_masks
from jobs.commands.bench_job import Progress, concept_sets

SPEC_KEYS = ("encoder_s_per_image", "persam_s_per_image", "persam_f_s_per_image", "k_concepts_s_per_image",
             "cached_s_per_image", "reference_loop_s_per_image", "peak_rss_mb")


def bench_json(argv: list[str]) -> tuple[dict, str]:
    """Run `persam bench` in this process -> (the JSON of its last line, what it wrote to stderr)."""
    result = run_cli(["bench", *MODEL, "--json", *argv])
    assert result.rc == 0, result.err[-2000:]
    return json.loads(result.out.strip().splitlines()[-1]), result.err


def test_in_process_bench_times_the_batched_paths():
    # --no-decoder-graphs: the default path (eager fp32 decoder), and the decoder variants timed beside it
    result, err = bench_json(["--images", "1", "--concepts", "2", "--epochs", "2", "--no-decoder-graphs"])
    for key in SPEC_KEYS:
        assert result[key] > 0, key
    assert result["speed"] == {"precision": "fp32", "fused_attention": False, "compile": False, "batch_size": 1,
                               "decoder_graphs": False, "decoder_precision": "fp32", "tf32": False,
                               "decoder_compile": False}
    # On CPU the default path is the fp32 exact path.
    assert result["mask_iou_vs_fp32_mean"] == result["mask_iou_vs_fp32_min"] == 1.0
    assert "bench: timing the batched paths" in err
    for variant in ("eager_decoder", "decoder_graphs", "bf16_decoder", "bf16_decoder_graphs"):  # K = 1 off the GPU
        assert result[f"cascade_k1_{variant}_s_per_image"] > 0
        assert result[f"cascade_k1_{variant}_torch_ops_per_batch"] > 300  # counted with torch.profiler on one batch
    assert result["cascade_k1_decoder_graphs_min_iou_vs_eager_fp32"] >= 0.999  # the same decoder, traced
    assert result["cascade_k1_bf16_decoder_min_iou_vs_eager_fp32"] > 0.9
    assert "SyncActivityProfilerHandler" not in err  # the profiler's own lines are filtered


@pytest.mark.slow
@pytest.mark.own_ray  # ray_start_s: Ray's own start, timed
def test_job_bench_runs_the_ray_job_for_one_and_k_concepts():
    images, concepts = 4, 2
    # one shard of one-image chunks: a result per image (the job's default would be one 4-image
    # chunk: one result, no steady state). Shards of one image instead are hashed from the
    # (temporary) URLs, so how many hold an image, each a result, varies from run to run.
    result, err = bench_json(["--job", "--images", str(images), "--concepts", str(concepts), "--shard-size",
                              str(images), "--chunk-size", "1"])
    assert (result["mode"], result["images"], result["concepts"]) == ("job", images, concepts)
    assert (result["job_k1_rows"], result["job_k_rows"]) == (images, images * concepts)
    assert (result["shard_size"], result["shards"]) == (images, 1)
    assert result["job_k1_error_rows"] == result["job_k_error_rows"] == 0
    for key in ("encoder_images_per_s", "actor_k1_images_per_s", "actor_k_images_per_s", "actor_stages_k1_images_per_s",
                "actor_stages_k_images_per_s", "reference_loop_images_per_s",
                "job_k1_whole_images_per_s", "job_k_whole_images_per_s", "peak_rss_mb", "ray_start_s"):
        assert result[key] > 0, key
    for job in ("job_k1", "job_k"):  # a steady state needs three results
        assert result[f"{job}_results"] == images and result[f"{job}_images_per_s"] > 0
        assert result[f"{job}_batch_fill"] == 1.0  # batch 1 on CPU: nothing padded
    for key in ("job_k1_over_encoder", "job_k_over_job_k1", "job_k1_over_reference_loop", "actor_k_over_encoder"):
        assert key in result
    assert result["job_k1_min_mask_iou_vs_actor_path"] >= 0.999  # the job computes what the actor path computes
    assert "bench: job with 2 concept(s)" in err


@pytest.mark.slow
def test_job_bench_runs_gfsam_beside_persam(monkeypatch):
    """--job --gfsam: GF-SAM's parts in-process (SAM and DINOv2 alone, its pass for 1 and K
    concepts) and its jobs on the PerSAM jobs' Ray and JPEGs, with the targets' ratios."""
    # small concept objects: a pair decodes tens of prompts, not its 128 maximum (synthetic.py)
    monkeypatch.setattr("jobs.commands.bench_job_gfsam.concept_masks", small_concept_masks)
    images, concepts = 1, 2
    result, err = bench_json(["--job", "--gfsam", "--dinov2", "tiny", "--dinov2-checkpoint", "random:0",
                              "--images", str(images), "--concepts", str(concepts), "--shard-size", "1"])
    assert (result["gfsam_job_k1_rows"], result["gfsam_job_k_rows"]) == (images, images * concepts)
    assert result["gfsam_job_k1_error_rows"] == result["gfsam_job_k_error_rows"] == 0
    assert (result["job_k1_rows"], result["gfsam_dinov2"]) == (images, "tiny")
    for key in ("gfsam_sam_encoder_images_per_s", "gfsam_dinov2_images_per_s", "gfsam_cascade_k1_images_per_s",
                "gfsam_cascade_k_images_per_s", "gfsam_job_k1_whole_images_per_s", "gfsam_job_k_whole_images_per_s",
                "gfsam_job_k1_over_job_k1_whole", "gfsam_job_k_over_gfsam_job_k1_whole"):
        assert result[key] > 0, key
    for key in ("gfsam_job_k1_over_job_k1", "gfsam_job_k_over_gfsam_job_k1"):  # steady state: None with < 3 results
        assert key in result
    assert "bench: GF-SAM job with 2 concept(s)" in err


def test_steady_state_runs_from_the_first_result_to_the_last_but_one(monkeypatch):
    """Start-up and the first chunk come before the first result; the last comes early (the
    pipeline drains), so the window ends at the last but one."""
    clock = iter([10.0, 12.0, 14.0, 14.5])
    monkeypatch.setattr("jobs.commands.bench_job.time.perf_counter", lambda: next(clock))
    tracker = Progress()
    tracker(4)
    tracker(3)
    assert tracker.steady_rate() is None and tracker.steady_window() is None  # two results: no window yet
    tracker(5)
    assert tracker.steady_rate() == pytest.approx(3 / 2) and tracker.steady_window() == 2.0
    tracker(6)  # early, as the pipeline drains: not in the window
    assert tracker.steady_rate() == pytest.approx((3 + 5) / 4) and (tracker.calls, tracker.images) == (4, 18)
    # chunks of 4, 3, 5 and 6 images: batches of 1 fill every slot; of 4, they take 4, 4, 8 and 8 slots
    assert tracker.batch_fill(1) == 1.0 and tracker.batch_fill(4) == pytest.approx(18 / 24)


def test_one_concept_is_timed_once():
    # `--job --concepts 1` runs one job, not the same job twice (the K column stays empty)
    assert concept_sets(["a"]) == [("k1", ["a"])]
    assert concept_sets(["a", "b", "c"]) == [("k1", ["a"]), ("k", ["a", "b", "c"])]


def test_start_ups_run_the_job_cold_then_warm_each_with_its_own_inductor_folder(tmp_path, monkeypatch):
    """bench --job's start-up figures: one compile cache for both jobs, an empty inductor
    folder for each (only the compile cache can make the second warm), the caller's restored."""
    import contextlib
    import os

    from jobs.commands import bench_start

    monkeypatch.setattr(bench_start, "ray_session", contextlib.nullcontext)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/callers/own")
    seen = []

    def run_job(cache: str, output):
        seen.append((cache, os.environ["TORCHINDUCTOR_CACHE_DIR"], output))
        return {"first_result_s": 30.0 if len(seen) == 1 else 3.0, "s": 40.0}

    figures = bench_start.start_ups(tmp_path, run_job)
    assert [cache for cache, _, _ in seen] == [str(tmp_path / "compile-cache")] * 2
    assert [inductor for _, inductor, _ in seen] == [str(tmp_path / "inductor-cold"), str(tmp_path / "inductor-warm")]
    assert (figures["start_cold_first_result_s"], figures["start_warm_first_result_s"]) == (30.0, 3.0)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/callers/own"
