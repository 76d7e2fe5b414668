"""The stable hash that puts an image in a shard: every output (folder or table) and the
feature cache group images by it, so a rerun regroups them identically."""

from __future__ import annotations

import hashlib


def shard_of(url: str, num_shards: int) -> int:
    """sha1, not Python's salted hash: the same shard in every process and on every machine."""
    return int.from_bytes(hashlib.sha1(url.encode()).digest()[:8], "big") % num_shards
