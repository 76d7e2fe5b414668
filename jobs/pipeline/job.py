"""What the driver settles before any stage runs, shared by `segment`, `rank` and `eval`.

`prepare_job` (job_checks.py) makes every check that needs no Ray (device, outputs, weights against the
concepts, the cache) and returns a `PreparedJob`: the spec plus what the driver learned
(the model's fingerprint, the concepts as JSON, the cache's layout). That object is what
every stage and actor receives, whole. This module imports neither torch nor the models, so
that the CPU stages that unpickle it do not either; the checks that load weights are in
job_checks.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple, Sequence

from persam_core.modeling.families import input_format
from persam_core.methods.registry import (FRAME_STRETCH, concept_label, frames_of, load_concept, needs_dinov2,
                                          presence_reads_sam)
from persam_core.modeling.dinov2_sizes import TOKENS, dinov2_width

from jobs.pipeline.cache import FeatureCache
from jobs.spec import JobSpec


class MethodReads(NamedTuple):
    """What a job's concepts' methods read, as the method registry says."""

    frames: tuple[str, ...]
    needs_dinov2: bool
    presence_reads_sam: bool


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

    def __post_init__(self) -> None:
        # What the concepts' methods read, asked of the registry where the job is made (the
        # driver, which has loaded the methods): it travels with the job, so that the CPU
        # stages never import a method's module (and torch with it) to learn it.
        methods = [method for _, method in self._labels]
        object.__setattr__(self, "_reads", MethodReads(frames_of(methods), needs_dinov2(methods), presence_reads_sam(methods)))

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
        return self._reads.frames

    def needs_dinov2(self) -> bool:
        return self._reads.needs_dinov2

    def needs_sam(self) -> bool:
        """Whether the actors load and run SAM: always, except for a presence-only pass whose
        methods' presence reads DINOv2 alone (the registry says, per method)."""
        return not (self.presence_only and self._labels) or self._reads.presence_reads_sam

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
