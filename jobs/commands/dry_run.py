"""`--dry-run` of `segment`, `rank` and `eval`: what a run would do, found without doing it.

The checks a run makes before any work (concept files, device, --output / --cache
writability, the input listing or dataset layout) run as usual; then, instead of loading
weights and starting Ray, the plan is logged: images, concepts, model, and for `segment`
the shards a run would write, skip or recompute against what the output already holds.
Nothing is written (beyond the writability probes every run makes and removes), nothing
is loaded, no Ray is started.
"""

from __future__ import annotations

from typing import Callable, Iterable

from persam_core.concept import Concept
from persam_core.methods.registry import needs_dinov2

from jobs.pipeline import commit
from jobs.pipeline.output import output_of
from jobs.spec import JobSpec
from jobs.storage.checkpoints import random_weights_note
from jobs.storage.dinov2_checkpoints import random_dinov2_note
from jobs.storage.listing import credential_free, is_manifest
from jobs.storage.redaction import redact

Log = Callable[[str], None]


def describe_model(spec: JobSpec) -> str:
    note = random_weights_note(spec.model.checkpoint)
    return (f"model {spec.model.model_type}, checkpoint {redact(spec.model.checkpoint)} (not loaded"
            + ("; random weights: masks would not be meaningful" if note else "") + f"), device {spec.model.device}")


def describe_dinov2(spec: JobSpec, concepts: list) -> str | None:
    """The DINOv2 the run would load (only where a concept's method reads it), else None."""
    if not needs_dinov2([c.method for c in concepts]):
        return None
    random = random_dinov2_note(spec.model.dinov2_checkpoint)
    return (f"DINOv2 {spec.model.dinov2}, checkpoint {redact(spec.model.dinov2_checkpoint)} (not loaded"
            + ("; random weights: masks would not be meaningful" if random else "") + ")")


def describe_concepts(concepts: list[Concept]) -> str:
    return ", ".join(f"{c.name} ({c.method}, {c.weights_note})" for c in concepts)


def dry_run_segment(spec: JobSpec, concepts: list[Concept], batches: Iterable[dict[str, str]], log: Log) -> dict:
    """Log the plan of `persam segment` -> its counts (tests read them)."""
    log(f"dry run: {describe_model(spec)}")
    dinov2 = describe_dinov2(spec, concepts)
    if dinov2:
        log(f"dry run: {dinov2}")
    for concept in concepts:  # a concept of another DINOv2 kind is refused as the run would
        concept.require_models(None, (spec.model.dinov2, None) if dinov2 else None, f"--concept {concept.name}")
    log(f"dry run: {len(concepts)} concept(s): {describe_concepts(concepts)}")
    # (a run's refusals were raised before: segment.check_before_work, the very checks of a run)
    output = output_of(spec)  # a folder (its killed runs' staged files as the run will settle them) or a table
    record, committed = output.read_only([c.name for c in concepts])
    if not committed:  # a new output: every concept's partition is empty
        committed = {c.name: {} for c in concepts}
    counts = {"images": 0, "to_run": 0, "new": 0, "recompute": 0, "skip": 0, "remove": 0, "waves": 0}
    num_shards = int(record["num_shards"]) if record else None
    for index, versions in enumerate(batches):
        versions, _ = credential_free(versions)
        urls = list(versions)
        if num_shards is None:  # a new output: sharded by its first wave (a --cache's layout may differ)
            num_shards = commit.shard_count(len(urls), spec.shard_size)
        offset = index * num_shards
        local = {partition: {s - offset: files for s, files in shards.items() if offset <= s < offset + num_shards}
                 for partition, shards in committed.items()}
        plan = commit.plan_output(urls, num_shards, local, versions)
        recompute = sum(1 for shard in plan.shards if shard.previous)
        counts["images"] += len(urls)
        counts["waves"] += 1
        counts["to_run"] += len(plan.shards)
        counts["recompute"] += recompute
        counts["new"] += len(plan.shards) - recompute
        counts["skip"] += plan.skipped
        counts["remove"] += len(plan.dropped)
    kind = "manifest" if is_manifest(spec.input) else "listing"
    log(f"dry run: input {redact(spec.input)} ({kind}): {counts['images']} images"
        + (f" in {counts['waves']} waves" if counts["waves"] > 1 else ""))
    files = sum(len(f) for shards in committed.values() for f in shards.values())
    state = "new output" if record is None else f"existing output, {files} part files of these concepts"
    log(f"dry run: output {output.shown} ({state}), {num_shards} shards per wave of at most "
        f"{spec.shard_size} images" + (f", cache {redact(spec.cache)}" if spec.cache else ""))
    log(f"dry run: {counts['to_run']} shards to run ({counts['new']} new, {counts['recompute']} to recompute: "
        f"images changed), {counts['skip']} already committed, {counts['remove']} superseded files to remove; "
        "nothing loaded or written")
    return counts


def dry_run_rank(spec: JobSpec, concept: Concept, urls: list[str], num_shards: int, target: str, log: Log) -> None:
    log(f"dry run: {describe_model(spec)}")
    dinov2 = describe_dinov2(spec, [concept])
    if dinov2:
        log(f"dry run: {dinov2}")
    log(f"dry run: concept {describe_concepts([concept])}")
    log(f"dry run: input {redact(spec.input)}: {len(urls)} images in {num_shards} shards, all scored; "
        f"masks for the top {min(spec.top_k, len(urls))}")
    log(f"dry run: output {target} (replaced whole); nothing loaded or written")


def dry_run_eval(spec: JobSpec, what: str, log: Log) -> None:
    log(f"dry run: {describe_model(spec)}")
    masks = f", masks into {output_of(spec).shown}" if spec.table else ""
    log(f"dry run: {what}; method {spec.method}, output {redact(spec.output)}{masks}; nothing loaded or written")
