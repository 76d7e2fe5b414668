"""jobs.storage.seen_images: the bounded set that keeps a manifest's repeats out of later waves."""

from __future__ import annotations

import random

from jobs.storage.seen_images import DIGEST_BYTES, SeenImages


def test_first_seen_marks_each_name_once_across_calls():
    seen = SeenImages()
    assert seen.first_seen(["a", "b", "a", "c"]) == [True, True, False, True]
    assert seen.first_seen(["c", "d", "b", "e", "d"]) == [False, True, False, True, False]
    assert seen.first_seen([]) == [] and len(seen) == 5
    assert seen.first_seen(["caf\udce9.jpg", "caf\\xe9.jpg"]) == [True, True]  # surrogates hash as their bytes


def test_a_shuffled_stream_in_waves_keeps_exactly_the_distinct_names():
    rng = random.Random(0)
    names = [f"s3://lake/{rng.randrange(5000)}.jpg" for _ in range(20_000)]
    seen, kept = SeenImages(), []
    for start in range(0, len(names), 1_000):
        wave = names[start:start + 1_000]
        kept += [n for n, fresh in zip(wave, seen.first_seen(wave)) if fresh]
    assert kept == list(dict.fromkeys(names))
    assert seen._sorted.nbytes == DIGEST_BYTES * len(kept)  # the documented 16 bytes per image
