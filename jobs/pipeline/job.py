"""What the driver settles before any stage runs, shared by `segment`, `rank` and `eval`.

`prepare_job` makes every check that needs no Ray (device, outputs, weights against the
concepts, the cache) and returns a `PreparedJob`: the spec plus what the driver learned
(the model's fingerprint, the concepts as JSON, the cache's layout). That object is what
every stage and actor receives, whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Sequence

from persam_core.speed.acceleration import EncoderSpeed, resolve_speed
from persam_core.modeling.families import input_format
from persam_core.methods.registry import (FRAME_STRETCH, concept_label, frames_of, load_concept, needs_dinov2,
                                          presence_reads_sam)
from persam_core.modeling.dinov2 import TOKENS, dinov2_width

from jobs.pipeline.cache import FeatureCache
from jobs.pipeline.session import expected_device_type
from jobs.spec import JobSpec
from jobs.storage.checkpoints import LoadedModel, load_model, random_weights_note
from jobs.storage.dinov2_checkpoints import load_dinov2, random_dinov2_note
from jobs.storage.outputs import check_output_folder

Log = Callable[[str], None]


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec
    fingerprint: str  # the weights every actor must load
    concept_texts: tuple[str, ...]  # to_json() of each concept, in the job's order
    cache_shards: int | None = None  # the cache's shard count; None: no --cache
    dinov2_fingerprint: str | None = None  # the DINOv2 weights every actor must load; None: no concept reads DINOv2
    presence_only: bool = False  # rank's first pass: only what the engines' presence (`score`) reads
    # (url, concept names): the only (image, concept) pairs computed and written (eval's few-shot
    # episodes, each scoring its own query); None: every image with every concept
    pairs: tuple[tuple[str, tuple[str, ...]], ...] | None = None

    def concepts(self) -> list[Any]:
        """The concepts, each validated by its method (the registry)."""
        return [load_concept(text) for text in self.concept_texts]

    def labels(self) -> list[tuple[str, str]]:
        """(name, method) of each concept, in the job's order."""
        return list(self._labels)

    @cached_property
    def _labels(self) -> tuple[tuple[str, str], ...]:
        # read once per process: a GF-SAM concept is megabytes, the CPU stages ask per chunk
        return tuple(concept_label(text) for text in self.concept_texts)

    def concepts_for(self, url: str) -> tuple[int, ...]:
        """The positions (job order) of the concepts computed for the image `url`: every one, or
        with `pairs` those paired with it (none for an image without a pair)."""
        if self.pairs is None:
            return tuple(range(len(self.concept_texts)))
        return self._paired.get(url, ())

    @cached_property
    def _paired(self) -> dict[str, tuple[int, ...]]:
        position = {name: index for index, (name, _) in enumerate(self._labels)}
        paired: dict[str, set[int]] = {}
        for url, names in self.pairs or ():
            # a job over some of the concepts (a rerun's lacking ones) computes their pairs only
            paired.setdefault(url, set()).update(position[name] for name in names if name in position)
        return {url: tuple(sorted(positions)) for url, positions in paired.items()}

    def images_with(self, names: Sequence[str], urls: Sequence[str]) -> list[str]:
        """Those of `urls` computed with at least one of the concepts `names` (all without `pairs`):
        the images whose rows a partition of those concepts holds."""
        if self.pairs is None:
            return list(urls)
        wanted = set(names)
        paired = {url for url, concepts in self.pairs if wanted & set(concepts)}
        return [url for url in urls if url in paired]

    def frames(self) -> tuple[str, ...]:
        """The frames the concepts' methods read (persam_core.methods.registry.FRAMES)."""
        return frames_of([method for _, method in self._labels])

    def needs_dinov2(self) -> bool:
        return needs_dinov2([method for _, method in self._labels])

    def needs_sam(self) -> bool:
        """Whether the actors load and run SAM: always, except for a presence-only pass whose
        methods' presence reads DINOv2 alone (the registry says, per method)."""
        methods = [method for _, method in self._labels]
        return not (self.presence_only and methods) or presence_reads_sam(methods)

    def cache(self) -> FeatureCache | None:
        if self.cache_shards is None:
            return None
        return feature_cache(self.spec, self.fingerprint, self.cache_shards)

    def stretch_cache(self) -> FeatureCache | None:
        """The --cache of the stretch frame (GF-SAM), or None: SAM's features of the stretched
        image with DINOv2's tokens as its one extra level [1369, C], under a fingerprint of both
        weights; sharded as the model frame's cache (whose layout the job adopted)."""
        if (self.cache_shards is None or self.dinov2_fingerprint is None or FRAME_STRETCH not in self.frames()
                or not self.needs_sam()):
            return None
        tokens = (TOKENS, dinov2_width(self.spec.model.dinov2))
        return FeatureCache(self.spec.cache, f"{self.fingerprint}+{self.dinov2_fingerprint}", self.spec.cache_dtype,
                            self.spec.storage_options, self.cache_shards, (tokens,))

    def token_cache(self) -> FeatureCache | None:
        """The --cache of a pass that reads DINOv2 alone (needs_sam() False), or None: the stretch
        frame's DINOv2 tokens [1369, C] as each entry's features, under DINOv2's fingerprint alone."""
        if self.cache_shards is None or self.dinov2_fingerprint is None or self.needs_sam():
            return None
        return FeatureCache(self.spec.cache, self.dinov2_fingerprint, self.spec.cache_dtype, self.spec.storage_options,
                            self.cache_shards, feature_shape=(TOKENS, dinov2_width(self.spec.model.dinov2)))


def feature_cache(spec: JobSpec, fingerprint: str, num_shards: int | None = None) -> FeatureCache:
    """The job's --cache for the model of `fingerprint` (SAM 2 entries hold its high-res levels too)."""
    return FeatureCache(spec.cache, fingerprint, spec.cache_dtype, spec.storage_options, num_shards,
                        input_format(spec.model.model_type).high_res_shapes)


def concept_digests(concepts: list[Any]) -> dict[str, str]:
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
