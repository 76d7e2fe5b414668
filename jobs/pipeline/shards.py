"""What a shard is and what committing one produced: the two types the driver's stages hand on.

`Shard` (what to compute) is made by the plan (commit.plan_shards / plan_output), placed in
its wave by `segment`, split into chunks by run.py and handed back whole to the committer
by gather.py. `ShardOutcome` (what a shard's commit, or a rank pass over it, produced) is
summed with `+` / `ShardOutcome.total`, so a count added here is summed everywhere.

Both are plain frozen dataclasses: Ray pickles them to and from its tasks as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Iterable, Mapping


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard to compute: `urls` (sorted, the shard's images), `digest` (of their URLs and
    version tokens: its part files' name), `partitions` (the concepts whose partitions lack
    that digest, in the job's order; empty where nothing is committed, as for `rank`),
    `previous_by_partition` ({partition: the shard's superseded files there}) and `sources`
    ({url: the reading URL holding credentials}, listing.credential_free; only for images
    that have one). `shard` is the job-wide id (a wave's offset included)."""

    shard: int
    urls: tuple[str, ...]
    digest: str = ""
    partitions: tuple[str, ...] = ()
    previous_by_partition: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def previous(self) -> tuple[str, ...]:
        """The superseded files of every partition being recomputed: where the prepare stage
        reads the rows of unchanged images."""
        return tuple(path for paths in self.previous_by_partition.values() for path in paths)

    def chunk_count(self, chunk_size: int) -> int:
        """How many chunks of at most `chunk_size` images the shard is computed in (at least one)."""
        return max(1, math.ceil(len(self.urls) / chunk_size))


@dataclass(frozen=True, slots=True)
class ShardOutcome:
    """What one shard produced: rows and error rows written, images with an error row
    (`failed`), images in the shard, encoded / from the cache / carried over unchanged,
    images of its previous files no longer in it (`removed`), {concept: {"shards_run",
    "rows"}} (`per_concept`) and the cache's problems (each once, in order)."""

    rows: int = 0
    errors: int = 0
    failed: int = 0
    images: int = 0
    encoded: int = 0
    cache_hits: int = 0
    carried: int = 0
    removed: int = 0
    per_concept: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    def __add__(self, other: ShardOutcome) -> ShardOutcome:
        per_concept = {name: dict(counts) for name, counts in self.per_concept.items()}
        for name, counts in other.per_concept.items():
            mine = per_concept.setdefault(name, {})
            for key, value in counts.items():
                mine[key] = mine.get(key, 0) + value
        return ShardOutcome(**{name: getattr(self, name) + getattr(other, name) for name in COUNTS},
                            per_concept=per_concept, problems=tuple(dict.fromkeys(self.problems + other.problems)))

    @staticmethod
    def total(outcomes: Iterable[ShardOutcome]) -> ShardOutcome:
        return sum(outcomes, ShardOutcome())

    def counts(self) -> dict[str, int]:
        """The summed counts by name (rows, errors, failed, images, encoded, cache_hits, carried, removed)."""
        return {name: getattr(self, name) for name in COUNTS}


COUNTS = tuple(f.name for f in fields(ShardOutcome) if f.type == "int")
