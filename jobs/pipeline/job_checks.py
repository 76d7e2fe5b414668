"""The driver's checks before a job's stages run, and the actors' checks of the weights they
load: precision, outputs, the weights against the concepts, the cache (see job.py for the
PreparedJob these settle)."""

from __future__ import annotations

from typing import Any, Callable

from persam_core.speed.acceleration import EncoderSpeed, resolve_speed
from persam_core.methods.registry import needs_dinov2

from jobs.pipeline.cache import FeatureCache
from jobs.pipeline.job import feature_cache
from jobs.pipeline.session import expected_device_type
from jobs.spec import JobSpec
from jobs.storage.checkpoints import LoadedModel, load_model, random_weights_note
from jobs.storage.dinov2_checkpoints import load_dinov2, random_dinov2_note
from jobs.storage.outputs import check_output_folder

Log = Callable[[str], None]


def spec_speed(spec: JobSpec, device_type: str) -> EncoderSpeed:
    """The spec's speed flags resolved on `device_type` ("cuda" | "cpu"): what an actor there runs at."""
    return resolve_speed(device_type, spec.speed)


def expected_speed(spec: JobSpec) -> EncoderSpeed:
    """The settings the actors will run at, as far as the driver can tell: GPU actors
    (--device cuda, or auto on a cluster with GPUs) resolve "auto" as CUDA does."""
    return spec_speed(spec, expected_device_type(spec.model.device))


def check_job(spec: JobSpec) -> None:
    """The checks that need neither weights nor Ray (the spec checked --device): precision,
    --output, --cache."""
    resolve_speed("cpu", spec.speed)  # refuses an unknown precision before any work
    if spec.output is not None:  # a --table is checked by opening it (pipeline/output.py)
        check_output_folder(spec.output, "--output", spec.storage_options)
    if spec.cache:
        check_output_folder(spec.cache, "--cache", spec.storage_options)


def check_models(spec: JobSpec, concepts: list[Any], log: Log) -> tuple[str, str | None]:
    """Load SAM (and DINOv2 where a concept's method reads it) and refuse concepts fitted with
    other weights, DINOv2's kind checked before any weights load -> (SAM fingerprint, DINOv2's or None)."""
    dinov2 = needs_dinov2([c.method for c in concepts])
    kind = (spec.model.dinov2, None) if dinov2 else None
    for concept in concepts:
        concept.require_models(None, kind, f"--concept {concept.name}")
    model = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
    for concept in concepts:
        concept.require_models(model.fingerprint, None, f"--concept {concept.name}")
    dinov2_fingerprint = None
    if dinov2:
        _, dinov2_fingerprint = load_dinov2(spec.model.dinov2, spec.model.dinov2_checkpoint, "cpu",
                                            spec.storage_options)
        for concept in concepts:
            concept.require_models(None, (spec.model.dinov2, dinov2_fingerprint), f"--concept {concept.name}")
        note = random_dinov2_note(spec.model.dinov2_checkpoint)
        if note:
            log(f"note: {note}")
    return model.fingerprint, dinov2_fingerprint


def prepare_job(spec: JobSpec, concepts: list[Any], log: Log) -> tuple[str, FeatureCache | None, str | None]:
    """After check_job and the input listing (a typo costs no weights download): the weights
    vs the concepts, the cache -> (model fingerprint, the cache or None, DINOv2 fingerprint or None)."""
    fingerprint, dinov2_fingerprint = check_models(spec, concepts, log)
    cache = None
    if spec.cache:
        cache = feature_cache(spec, fingerprint)
        cache.check_writable()
    note = random_weights_note(spec.model.checkpoint)
    if note:
        log(f"note: {note}")
    return fingerprint, cache, dinov2_fingerprint


def load_checked_model(spec: JobSpec, expected_fingerprint: str) -> LoadedModel:
    """The job's SAM on an actor's node, refusing weights other than the driver's."""
    loaded = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
    if loaded.fingerprint != expected_fingerprint:
        raise RuntimeError(
            f"{loaded.source}: this node loaded weights {loaded.fingerprint}, the job expects "
            f"{expected_fingerprint}; the checkpoint changed under the job"
        )
    return loaded


def load_checked_dinov2(spec: JobSpec, expected_fingerprint: str, device) -> Any:
    """The job's DINOv2 on an actor's node, refusing weights other than the driver's."""
    model, fingerprint = load_dinov2(spec.model.dinov2, spec.model.dinov2_checkpoint, device, spec.storage_options)
    if fingerprint != expected_fingerprint:
        raise RuntimeError(f"--dinov2-checkpoint: this node loaded DINOv2 weights {fingerprint}, the job expects "
                           f"{expected_fingerprint}; the checkpoint changed under the job")
    return model
