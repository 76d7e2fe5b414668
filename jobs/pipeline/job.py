"""What the driver settles before any stage runs, shared by `segment`, `rank` and `eval`.

`prepare_job` makes every check that needs no Ray (device, outputs, weights against the
concepts, the cache) and returns a `PreparedJob`: the spec plus what the driver learned
(the model's fingerprint, the concepts as JSON, the cache's layout). That object is what
every stage and actor receives, whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

from persam_core.acceleration import EncoderSpeed, resolve_speed
from persam_core.concept import Concept
from persam_core.families import input_format

from jobs.pipeline.cache import FeatureCache
from jobs.pipeline.session import expected_device_type
from jobs.spec import JobSpec
from jobs.storage.checkpoints import LoadedModel, load_model, random_weights_note
from jobs.storage.outputs import check_output_folder

Log = Callable[[str], None]


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec
    fingerprint: str  # the weights every actor must load
    concept_texts: tuple[str, ...]  # Concept.to_json() of each concept, in the job's order
    cache_shards: int | None = None  # the cache's shard count; None: no --cache

    def concepts(self) -> list[Concept]:
        return [Concept.from_json(text) for text in self.concept_texts]

    def labels(self) -> list[tuple[str, str]]:
        """(name, method) of each concept, in the job's order."""
        return [(c.name, c.method) for c in self.concepts()]

    def cache(self) -> FeatureCache | None:
        if self.cache_shards is None:
            return None
        return feature_cache(self.spec, self.fingerprint, self.cache_shards)


def feature_cache(spec: JobSpec, fingerprint: str, num_shards: int | None = None) -> FeatureCache:
    """The job's --cache for the model of `fingerprint` (SAM 2 entries hold its high-res levels too)."""
    return FeatureCache(spec.cache, fingerprint, spec.cache_dtype, spec.storage_options, num_shards,
                        input_format(spec.model.model_type).high_res_shapes)


def concept_digests(concepts: list[Concept]) -> dict[str, str]:
    """Concept name -> digest of its file's content: a concept re-fitted under the same name
    is a different job (the job record keeps these)."""
    return {c.name: hashlib.sha1(c.to_json().encode()).hexdigest()[:12] for c in concepts}


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
    check_output_folder(spec.output, "--output", spec.storage_options)
    if spec.cache:
        check_output_folder(spec.cache, "--cache", spec.storage_options)


def prepare_job(spec: JobSpec, concepts: list[Concept], log: Log) -> tuple[str, FeatureCache | None]:
    """After check_job and the input listing (a typo costs no weights download): the weights
    vs the concepts, the cache -> (model fingerprint, the cache or None)."""
    model = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
    for concept in concepts:
        concept.require_fingerprint(model.fingerprint, f"--concept {concept.name}")
    cache = None
    if spec.cache:
        cache = feature_cache(spec, model.fingerprint)
        cache.check_writable()
    note = random_weights_note(spec.model.checkpoint)
    if note:
        log(f"note: {note}")
    return model.fingerprint, cache


def load_checked_model(spec: JobSpec, expected_fingerprint: str) -> LoadedModel:
    """The job's SAM on an actor's node, refusing weights other than the driver's."""
    loaded = load_model(spec.model.model_type, spec.model.checkpoint, spec.storage_options)
    if loaded.fingerprint != expected_fingerprint:
        raise RuntimeError(
            f"{loaded.source}: this node loaded weights {loaded.fingerprint}, the job expects "
            f"{expected_fingerprint}; the checkpoint changed under the job"
        )
    return loaded
