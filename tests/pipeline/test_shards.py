"""jobs.pipeline.shards: a Shard as the plan makes it and Ray carries it, a ShardOutcome summed.
No Ray: the functions are called directly."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from jobs.pipeline import commit
from jobs.pipeline.shards import Shard, ShardOutcome


def test_the_plan_gives_each_shard_the_partitions_lacking_it_and_their_superseded_files():
    urls = ["a.jpg", "b.jpg"]
    old, new = commit.urls_digest(["a.jpg"]), commit.urls_digest(urls)
    stale = f"out/concept=cat/{commit.shard_name(0, old)}"
    committed = {"cat": {0: {old: stale}},  # a.jpg only: b.jpg was added
                 "dog": {0: {new: f"out/concept=dog/{commit.shard_name(0, new)}"}},  # up to date
                 "owl": {}}  # a concept new to the output
    plan = commit.plan_output(urls, 1, committed)
    [shard] = plan.shards
    assert shard == Shard(0, ("a.jpg", "b.jpg"), new, ("cat", "owl"), {"cat": (stale,)})
    assert shard.previous == (stale,)
    assert plan.committed == {"cat": 0, "dog": 1, "owl": 0} and plan.skipped == 0 and plan.dropped == []


def test_a_shard_is_frozen_and_survives_pickling_as_ray_carries_it():
    shard = Shard(7, ("s3://b/a.jpg",), "0" * 12, ("cat", "dog"),
                  {"cat": ("p1",), "dog": ("p2", "p3")}, {"s3://b/a.jpg": "s3://key@b/a.jpg"})
    assert pickle.loads(pickle.dumps(shard)) == shard
    assert shard.previous == ("p1", "p2", "p3")  # partition by partition, in the job's order
    with pytest.raises(dataclasses.FrozenInstanceError):
        shard.shard = 8
    assert [Shard(0, tuple("abcde")).chunk_count(size) for size in (1, 2, 5, 9)] == [5, 3, 1, 1]
    assert Shard(0, ()).chunk_count(4) == 1  # an empty shard is still one chunk (it is committed)


def test_outcomes_sum_every_count_merge_per_concept_and_keep_each_problem_once():
    first = ShardOutcome(rows=4, errors=1, failed=1, images=2, encoded=2, cache_hits=0, carried=0, removed=1,
                         per_concept={"cat": {"shards_run": 1, "rows": 0}}, problems=("corrupt entry",))
    second = ShardOutcome(rows=6, errors=0, failed=0, images=3, encoded=1, cache_hits=2, carried=1, removed=0,
                          per_concept={"cat": {"shards_run": 1, "rows": 6}, "dog": {"shards_run": 1, "rows": 0}},
                          problems=("corrupt entry", "unreadable file"))
    total = ShardOutcome.total([first, second])
    assert total.counts() == {"rows": 10, "errors": 1, "failed": 1, "images": 5, "encoded": 3, "cache_hits": 2,
                              "carried": 1, "removed": 1}
    assert total.per_concept == {"cat": {"shards_run": 2, "rows": 6}, "dog": {"shards_run": 1, "rows": 0}}  # zeros kept
    assert total.problems == ("corrupt entry", "unreadable file")
    assert first.per_concept == {"cat": {"shards_run": 1, "rows": 0}}  # the summands are left as they were
    assert ShardOutcome.total([]) == ShardOutcome() and pickle.loads(pickle.dumps(total)) == total
